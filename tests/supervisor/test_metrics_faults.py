"""/metrics and X-Request-Id where test_metrics.py does not look: the supervisor's 503 fallback
while a broken model keeps every worker down, every wire format and its errors, and the exit
reasons of a hung worker (SIGSTOP) and of a reload (SIGHUP), all on the real service."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from testing.servers import ENDLESS, PYTHON, ServerProcess, Service, free_port, gone, supervisor_env
from testing.tiny_models import TINY_CHAT, copy_tiny_models
from tests.supervisor.test_metrics import scrape, total, value

API_KEY = "metrics-key"
USER = [{"role": "user", "content": "Hello!"}]


def load_failed_503(service: Service, **headers: str) -> requests.Response:
    """The fallback's first 503 that says the model could not be loaded (so a load has failed);
    earlier ones may say it is still loading, and before the supervisor listens nothing answers."""
    def unavailable() -> list[requests.Response]:  # a list: a Response with an error status is falsy
        try:
            reply = requests.post(service.url + "/v1/chat/completions", json={"messages": USER}, headers=headers,
                                  timeout=10)
        except requests.RequestException:
            return []
        return [reply] if reply.status_code == 503 and "could not be loaded" in reply.text else []

    [reply] = service.wait_for(unavailable, 20, "the 503 fallback naming the load failure")  # type: ignore[misc]
    return reply


def fallback_503s(service: Service, count: int) -> int:
    """Send `count` chat requests that the fallback answers; the 503s seen."""
    headers = {"Authorization": f"Bearer {API_KEY}"}
    load_failed_503(service, **headers)
    statuses = [requests.post(service.url + "/v1/chat/completions", json={"messages": USER}, headers=headers,
                              timeout=30).status_code for _ in range(count)]
    return statuses.count(503)


@pytest.mark.parametrize("public", [False, True], ids=["key-required", "metrics-public"])
def test_the_fallback_serves_metrics_counting_its_503s_and_the_load_failures(
        start_service: Callable[..., Service], tiny_model_dir: Path, tmp_path: Path, public: bool) -> None:
    models = copy_tiny_models(tiny_model_dir, tmp_path / "models")
    (models / TINY_CHAT).write_bytes(os.urandom(4096))
    service = start_service(wait=False, model_dir=models, API_KEY=API_KEY, METRICS_PUBLIC=str(public).lower(),
                            WARM_SPARES=0, RESTART_BACKOFF_MAX=1)
    seen = fallback_503s(service, 3)
    assert seen == 3
    bare = requests.get(service.url + "/metrics", headers={"X-Request-Id": "fb-metrics-1"}, timeout=30)
    assert bare.headers["X-Request-Id"] == "fb-metrics-1"
    if public:
        assert bare.status_code == 200, bare.text
    else:
        assert bare.status_code == 401, bare.text
        assert "error" in bare.json() and API_KEY not in bare.text
    samples = scrape(service, Authorization=f"Bearer {API_KEY}")
    assert "gpt4all_fallback_responses_total" in {name for name, _ in samples}
    assert value(samples, "gpt4all_fallback_responses_total", status="503") >= seen + 1  # + the wait_for probe
    assert value(samples, "gpt4all_model_load_failures_total") >= 1
    assert value(samples, "gpt4all_worker_exits_total", reason="load_failed") == \
        value(samples, "gpt4all_model_load_failures_total")
    assert value(samples, "gpt4all_worker_exits_total", reason="crashed") == 0
    if not public:
        assert value(samples, "gpt4all_fallback_responses_total", status="401") >= 1  # the bare scrape


WIRE_CASES = {  # path: (good body, bad body)
    "/gpt4all_api": ({"prompt": "count 0", "max_tokens": 4, "temp": 0}, {"persona": "no prompt"}),
    "/v1/chat/completions": ({"messages": USER, "max_tokens": 4, "temperature": 0}, {"messages": "not a list"}),
    "/v1/responses": ({"input": "Hello!", "max_output_tokens": 4, "temperature": 0}, {"max_output_tokens": 4}),
    "/v1/messages": ({"messages": USER, "max_tokens": 4, "temperature": 0}, {"max_tokens": 4}),
    "/api/chat": ({"model": TINY_CHAT, "messages": USER, "options": {"num_predict": 4, "temperature": 0}},
                  {"model": TINY_CHAT, "messages": 7}),
}


@pytest.fixture(scope="module")
def one_worker(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """One supervisor with one worker that is never recycled, shared by the wire cases."""
    folder = tmp_path_factory.mktemp("one-worker")
    port = free_port()
    environment = supervisor_env(tiny_model_dir, folder, port, WORKERS=1, WARM_SPARES=0, RESTART_AFTER_REQUESTS=0)
    process = ServerProcess([PYTHON, "watchdog_main.py"], environment, port, folder / "console.log").start()
    try:
        process.wait_ready(timeout=30)
        yield Service(process, folder)
    finally:
        assert process.stop(timeout=15) == [], "processes left behind"


@pytest.mark.parametrize("path", list(WIRE_CASES))
@pytest.mark.parametrize("kind", ["ok", "error"])
def test_every_wire_format_echoes_the_request_id_on_success_and_error(one_worker: Service, path: str,
                                                                       kind: str) -> None:
    good, bad = WIRE_CASES[path]
    rid = f"wire-{kind}-{path.strip('/').replace('/', '-')}"
    stream = path == "/api/chat" and kind == "ok"  # Ollama streams ndjson by default
    response = requests.post(one_worker.url + path, json=good if kind == "ok" else bad, stream=stream,
                             headers={"X-Request-Id": rid}, timeout=60)
    with response:
        assert response.headers.get("X-Request-Id") == rid, (response.status_code, dict(response.headers))
        if kind == "ok":
            assert response.status_code == 200, response.text
            if stream:
                assert response.headers["Content-Type"].startswith("application/x-ndjson")
                assert b'"done":true' in response.content.replace(b" ", b"")
        else:
            assert 400 <= response.status_code < 500, response.text
            if path == "/v1/messages":
                assert response.json()["type"] == "error" and response.json()["error"]["type"] == "invalid_request_error"


def test_the_fallback_503_echoes_the_request_id(start_service: Callable[..., Service], tiny_model_dir: Path,
                                                tmp_path: Path) -> None:
    models = copy_tiny_models(tiny_model_dir, tmp_path / "models")
    (models / TINY_CHAT).write_bytes(os.urandom(4096))
    service = start_service(wait=False, model_dir=models, WARM_SPARES=0, RESTART_BACKOFF_MAX=1)

    reply = load_failed_503(service, **{"X-Request-Id": "fb-503-7"})
    assert reply.headers["X-Request-Id"] == "fb-503-7"
    fresh = requests.post(service.url + "/v1/chat/completions", json={"messages": USER}, timeout=30)
    assert fresh.status_code == 503 and fresh.headers.get("X-Request-Id")


def test_a_hung_worker_and_a_reload_are_counted_by_their_reason(start_service: Callable[..., Service]) -> None:
    service = start_service(RESTART_AFTER_REQUESTS=0, STALL_TIMEOUT=1, KILL_TIMEOUT=1)
    before = scrape(service)
    assert value(before, "gpt4all_worker_exits_total", reason="hung") == 0
    thread, _ = service.stream_in_background(ENDLESS)
    busy = service.busy_worker()
    os.kill(busy, signal.SIGSTOP)
    service.wait_for(lambda: gone(busy), 15, "the frozen worker to be killed")
    service.wait_for(lambda: value(scrape(service), "gpt4all_worker_exits_total", reason="hung") == 1, 10,
                     "the hung exit counted")
    thread.join(10)
    service.wait_for(lambda: len(service.workers()) == 2, 15, "the pool back to full size")
    old = {worker.pid for worker in service.workers()}
    service.signal(signal.SIGHUP)
    service.wait_for(lambda: not old & {worker.pid for worker in service.workers()}, 30, "every worker replaced")
    service.wait_for(lambda: value(scrape(service), "gpt4all_worker_exits_total", reason="reload") == len(old), 10,
                     "the reload exits counted")
    after = scrape(service)
    assert value(after, "gpt4all_worker_exits_total", reason="hung") == 1
    assert value(after, "gpt4all_worker_exits_total", reason="crashed") == 0
    assert total(after, "gpt4all_worker_exits_total") == 1 + len(old)


def test_a_worker_that_recycles_itself_after_a_504_is_counted_as_recycled(
        start_service: Callable[..., Service]) -> None:
    service = start_service(RESTART_AFTER_REQUESTS=0, REQUEST_TIMEOUT=1.5, STALL_TIMEOUT=1.5)
    response = requests.post(service.url + "/v1/completions", json=ENDLESS, timeout=20)
    assert response.status_code == 504
    service.wait_for(lambda: value(scrape(service), "gpt4all_worker_exits_total", reason="recycled") == 1, 10,
                     "the self-recycled worker counted")
    samples = scrape(service)
    assert value(samples, "gpt4all_worker_exits_total", reason="crashed") == 0
    assert value(samples, "gpt4all_worker_exits_total", reason="served") == 0
    assert value(samples, "gpt4all_worker_exits_total", reason="hung") == 0
