"""GET /metrics on the real supervisor with real generations of the tiny model: the counts equal
what the test sent, across workers replaced after every request, whoever answers the scrape;
X-Request-Id is echoed (the client's when valid, a new one otherwise); API_KEY protects it."""

from __future__ import annotations

import concurrent.futures
from collections.abc import Callable
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families

from testing.servers import Service

SHORT = {"prompt": "count 0", "max_tokens": 8, "temperature": 0}


def scrape(service: Service, **headers: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    response = requests.get(service.url + "/metrics", headers=headers, timeout=30)
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"].startswith("text/plain")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(response.text) for sample in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:  # type: ignore[type-arg]
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def total(samples: dict, name: str) -> float:  # type: ignore[type-arg]
    return sum(found for (sample, _labels), found in samples.items() if sample == name)


def test_counts_equal_what_was_sent_across_restarts(start_service: Callable[..., Service]) -> None:
    service = start_service(WORKERS=2, WARM_SPARES=1, RESTART_AFTER_REQUESTS=1)
    sent = 12

    def complete(_index: int) -> requests.Response:
        return requests.post(service.url + "/v1/completions", json=SHORT, timeout=120)

    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        replies = list(pool.map(complete, range(sent)))
    statuses = [reply.status_code for reply in replies]
    pids = {reply.headers["X-Worker-Pid"] for reply in replies}
    assert len(pids) == sent, "every request met a fresh worker"
    prompt = sum(reply.json()["usage"]["prompt_tokens"] for reply in replies if reply.status_code == 200)
    generated = sum(reply.json()["usage"]["completion_tokens"] for reply in replies if reply.status_code == 200)
    missing = requests.post(service.url + "/v1/completions", json={"max_tokens": 1}, timeout=60)  # no prompt
    assert missing.status_code == 400

    samples = scrape(service)
    route = "/v1/completions"
    for status in set(statuses):
        assert value(samples, "gpt4all_http_requests_total", route=route, status=str(status),
                     wire_format="openai_chat") == statuses.count(status)
    assert value(samples, "gpt4all_http_requests_total", route=route, status="400", wire_format="openai_chat") == 1
    assert total(samples, "gpt4all_prompt_tokens_total") == prompt
    assert total(samples, "gpt4all_generated_tokens_total") == generated
    assert value(samples, "gpt4all_time_to_first_token_seconds_count") == statuses.count(200)
    service.wait_for(lambda: value(scrape(service), "gpt4all_worker_exits_total", reason="served") >= sent, 30,
                     "every used worker reaped")
    assert value(scrape(service), "gpt4all_worker_startup_seconds_count") >= sent
    again = scrape(service)  # another worker answers: the same counts
    assert value(again, "gpt4all_http_requests_total", route=route, status="200",
                 wire_format="openai_chat") == statuses.count(200)
    assert total(again, "gpt4all_generated_tokens_total") == generated


def test_request_id_is_echoed_and_metrics_need_the_key(start_service: Callable[..., Service]) -> None:
    service = start_service(WORKERS=1, WARM_SPARES=0, API_KEY="sesame")
    refused = requests.get(service.url + "/metrics", headers={"X-Request-Id": "abc-123"}, timeout=30)
    assert refused.status_code == 401
    assert refused.headers["X-Request-Id"] == "abc-123"
    fresh = requests.get(service.url + "/health", headers={"X-Request-Id": "bad id with spaces"}, timeout=30)
    assert fresh.headers["X-Request-Id"] not in ("", "bad id with spaces")
    samples = scrape(service, Authorization="Bearer sesame")
    assert value(samples, "gpt4all_http_requests_total", route="/metrics", status="401", wire_format="health") == 1


def test_json_logs_one_object_per_line_with_an_access_line(start_service: Callable[..., Service]) -> None:
    import json

    service = start_service(WORKERS=1, WARM_SPARES=1, LOG_FORMAT="json")
    reply = requests.post(service.url + "/v1/completions", json=SHORT, headers={"X-Request-Id": "trace-7"}, timeout=120)
    assert reply.status_code == 200 and reply.headers["X-Request-Id"] == "trace-7"

    def access_line() -> dict | None:  # type: ignore[type-arg]
        lines = [json.loads(line) for line in service.log_path.read_text().splitlines() if line.strip()]
        return next((line for line in lines if line.get("request_id") == "trace-7" and "status" in line), None)

    service.wait_for(access_line, 20, "the request's access-log line")
    line = access_line()
    assert line is not None
    assert line["status"] == 200 and line["route"] == "/v1/completions" and line["worker"].startswith("worker ")
    assert line["pid"] == int(reply.headers["X-Worker-Pid"])
    assert line["completion_tokens"] == reply.json()["usage"]["completion_tokens"]
    assert line["duration_seconds"] > 0 and "time_to_first_token_seconds" in line


def test_compaction_keeps_every_count_and_removes_dead_files(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import os
    import subprocess
    import sys

    from prometheus_client.multiprocess import MultiProcessCollector

    from api.metrics import Compactor, FolderCollector
    from testing.servers import REPO

    folder = tmp_path / "metrics"
    folder.mkdir()
    code = ("from api.metrics import meters; m = meters(); m.requests.labels('/x', '200', 'w').inc(3); "
            "m.request_seconds.labels('w').observe(0.3); m.generated_tokens.labels('tiny').inc(5)")
    pids = []
    for _ in range(3):  # three real "workers", each leaving its files behind
        child = subprocess.Popen([sys.executable, "-c", code], cwd=REPO,
                                 env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder)})
        assert child.wait(60) == 0
        pids.append(child.pid)

    def samples() -> dict:  # type: ignore[type-arg]
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in FolderCollector(folder).collect() for s in family.samples}

    before = samples()
    assert before == {(s.name, tuple(sorted(s.labels.items()))): s.value
                      for family in MultiProcessCollector.merge([str(p) for p in folder.glob("*.db")])
                      for s in family.samples}
    assert before[("gpt4all_http_requests_total", (("route", "/x"), ("status", "200"), ("wire_format", "w")))] == 9
    compactor = Compactor(folder, every=2)
    for pid in pids[:2]:
        compactor.worker_gone(pid)  # the second one compacts
    assert samples() == before
    assert [path.name for path in folder.glob("*.db") if path.stem.endswith(str(pids[2]))]
    assert not [path for path in folder.glob("*.db") if path.stem.rsplit("_", 1)[-1] in map(str, pids[:2])]
    compactor.worker_gone(pids[2])
    compactor.compact()  # a second generation on top of the first
    assert samples() == before
    assert not list(folder.glob("*.db"))


def test_a_compaction_that_fails_stops_nothing_and_loses_no_count(tmp_path: Path) -> None:
    """A compaction runs in the supervisor's loop: if it cannot write (here: something in the way
    of its working folder, as a full disk would), the loop goes on, every count is still scraped,
    and the next compaction still adds the earlier generation in."""
    import os
    import subprocess
    import sys

    from api.metrics import COMPACTED_FOLDER, Compactor, FolderCollector
    from testing.servers import REPO

    folder = tmp_path / "metrics"
    folder.mkdir()
    code = "from api.metrics import meters; meters().requests.labels('/x', '200', 'w').inc(2)"
    pids = []
    for _ in range(3):
        child = subprocess.Popen([sys.executable, "-c", code], cwd=REPO,
                                 env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder)})
        assert child.wait(60) == 0
        pids.append(child.pid)

    def requests_counted() -> float:
        return sum(sample.value for family in FolderCollector(folder).collect() for sample in family.samples
                   if sample.name == "gpt4all_http_requests_total")

    compactor = Compactor(folder, every=1)
    compactor.worker_gone(pids[0])  # generation 1
    (folder / COMPACTED_FOLDER / ".building-2").write_text("in the way")
    compactor.worker_gone(pids[1])  # fails: logged, not raised
    assert compactor.generation == 1 and requests_counted() == 6
    (folder / COMPACTED_FOLDER / ".building-2").unlink()
    compactor.worker_gone(pids[2])  # tried again, with the two it could not compact
    assert compactor.generation == 2 and requests_counted() == 6
    assert not list(folder.glob("*.db")), "every dead worker's files were compacted"


def test_a_scrape_skips_a_file_a_starting_worker_has_not_sized_yet(tmp_path: Path) -> None:
    """A starting worker creates its file empty, then sizes it: a scrape between the two steps
    (a replacement starting while someone scrapes) read it and answered 500."""
    import os
    import subprocess
    import sys

    from api.metrics import FolderCollector
    from testing.servers import REPO

    folder = tmp_path / "metrics"
    folder.mkdir()
    code = "from api.metrics import meters; meters().requests.labels('/x', '200', 'w').inc(2)"
    child = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env={**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(folder)})
    assert child.wait(60) == 0
    (folder / "counter_999999.db").touch()  # what open(..., "a+b") leaves before the truncate
    counted = sum(sample.value for family in FolderCollector(folder).collect() for sample in family.samples
                  if sample.name == "gpt4all_http_requests_total")
    assert counted == 2
