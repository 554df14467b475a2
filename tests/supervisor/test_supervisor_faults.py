"""Real faults injected into the real supervisor and its workers: SIGKILL and SIGSTOP of a busy
worker, a generation over REQUEST_TIMEOUT, a broken model file, a memory limit, the supervisor
itself killed. Each test asserts what clients see and what the log tells."""

from __future__ import annotations

import contextlib
import errno
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psutil
import pytest
import requests

from api.protocol import WorkerState
from testing.servers import CHAT, ENDLESS, Service, gone
from testing.tiny_models import TINY_CHAT, TINY_CHAT_REPLY, TINY_EMBED, build_tiny_embedding_model, copy_tiny_models, tiny_embedding_vocab


def listeners_on(port: int) -> list[str]:
    """Who still listens on this TCP port, as "pid name (parent ppid)" lines."""
    holders = []
    for connection in psutil.net_connections(kind="tcp"):
        if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port:
            if connection.pid is None:
                holders.append("a process this test may not see")
                continue
            try:
                process = psutil.Process(connection.pid)
                holders.append(f"{connection.pid} {process.name()} (parent {process.ppid()})")
            except (psutil.Error, ValueError):
                holders.append(f"{connection.pid} (gone)")
    return holders


def all_threads_stopped(pid: int) -> bool:
    """True once every thread of `pid` is stopped (SIGSTOP reaches each thread in its own time)."""
    try:
        return all(Path(f"/proc/{pid}/task/{task}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
                   for task in os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return False


def freeze_a_booting_worker(service: Service, start_one: Callable[[], object], attempts: int = 20) -> int:
    """SIGSTOP a worker while it loads its model, after it announced its control port; its pid.

    `start_one` makes the service start a worker (it runs in a thread of its own). A tiny model
    loads in tens of milliseconds: a worker that turns out to have said READY before it stopped is
    continued, and the next one is tried."""
    for _ in range(attempts):
        known = set(service.sentinels())
        threading.Thread(target=start_one, daemon=True).start()
        deadline, new = time.monotonic() + 10, None
        while new is None and time.monotonic() < deadline:
            new = next(((pid, sentinel) for pid, sentinel in service.sentinels().items()
                        if pid not in known and sentinel.control_port), None)
        assert new is not None, f"no new worker started\n{service.log()[-3000:]}"
        pid, sentinel = new
        if sentinel.state is not WorkerState.BOOTING:
            continue  # first seen after it had loaded
        os.kill(pid, signal.SIGSTOP)
        service.wait_for(lambda frozen=pid: all_threads_stopped(frozen) or gone(frozen), 5, f"pid {pid} to stop")
        sentinel = service.sentinels().get(pid)
        if sentinel is not None and sentinel.state is WorkerState.BOOTING:
            return pid
        os.kill(pid, signal.SIGCONT)  # too late: it had loaded already
    raise AssertionError(f"no worker could be stopped while booting in {attempts} attempts")


def test_sigkill_of_a_busy_worker_the_next_request_is_served_within_a_second(
        start_service: Callable[..., Service]) -> None:
    service = start_service(RESTART_AFTER_REQUESTS=0)
    thread, outcome = service.stream_in_background(ENDLESS)
    busy = service.busy_worker()
    os.kill(busy, signal.SIGKILL)
    killed_at = time.monotonic()
    response = service.chat(timeout=10)
    elapsed = time.monotonic() - killed_at
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == TINY_CHAT_REPLY
    assert elapsed < 1.0, f"the next request took {elapsed:.2f} s"
    assert response.headers["X-Worker-Pid"] != str(busy)
    thread.join(10)
    assert "error" in outcome, "the client of the killed worker saw its connection end"
    service.wait_for(lambda: f"(pid {busy}) killed by SIGKILL in the middle of a generation" in service.log(), 5,
                     "the crash in the log")
    assert "Its last sentinel: state BUSY" in service.log()
    service.wait_for(lambda: len(service.workers()) == 2, 10, "the pool back to full size")


def test_sigstop_of_a_busy_worker_is_detected_killed_and_replaced(start_service: Callable[..., Service]) -> None:
    service = start_service(RESTART_AFTER_REQUESTS=0, STALL_TIMEOUT=1, KILL_TIMEOUT=1)
    thread, _ = service.stream_in_background(ENDLESS)
    busy = service.busy_worker()
    os.kill(busy, signal.SIGSTOP)
    stopped_at = time.monotonic()
    # the spare serves meanwhile
    assert service.chat(timeout=10).status_code == 200
    service.wait_for(lambda: gone(busy), 10, "the frozen worker to be killed")
    detected = time.monotonic() - stopped_at
    assert detected < 6, f"took {detected:.1f} s"
    log = service.log()
    assert re.search(rf"worker \d+ \(pid {busy}\) seems hung: (its generation made no progress|it did not answer)", log), log
    assert "TERM now, and KILL of its process tree" in log
    service.wait_for(lambda: f"(pid {busy}) was stopped because" in service.log(), 5, "the reap in the log")
    service.wait_for(lambda: len(service.workers()) == 2, 10, "a replacement")
    thread.join(10)
    assert service.chat(timeout=10).status_code == 200


def test_a_worker_frozen_while_loading_is_replaced_long_before_boot_timeout_and_clients_get_503_meanwhile(
        start_service: Callable[..., Service]) -> None:
    # probes of 4 s: the frozen worker is called hung after about 13 s, later than the short wait
    service = start_service(WORKERS=1, WARM_SPARES=0, BOOT_TIMEOUT=120, HEALTH_INTERVAL=4)
    frozen = freeze_a_booting_worker(service, lambda: service.chat(timeout=30))
    # the worker that served that request leaves: no worker is up, and the frozen one will not be
    response = service.chat(timeout=30)
    assert response.status_code == 503, response.text
    assert int(response.headers["Retry-After"]) >= 1
    error = response.json()["error"]
    assert error["code"] == "service_unavailable" and "the model has been loading for" in error["message"], error
    service.wait_for(lambda: gone(frozen), 30, "the frozen worker to be replaced (BOOT_TIMEOUT is 120 s)")
    hung = f"(pid {frozen}) seems hung: it did not answer 3 health probes in a row while loading its model"
    service.wait_for(lambda: hung in service.log(), 5, "the hang in the log")
    response = service.chat(timeout=30)
    assert response.status_code == 200 and response.headers["X-Worker-Pid"] != str(frozen)
    service.wait_for(lambda: "the service is back after" in service.log(), 5, "the end of the 503 period in the log")


def test_a_loading_worker_that_resumes_while_clients_get_503_takes_over_from_the_fallback(
        start_service: Callable[..., Service]) -> None:
    """The fallback answers while a loading worker might still come up: the accept gate makes a
    worker that finishes loading meanwhile wait until the fallback has stopped, then serve."""
    service = start_service(WORKERS=1, WARM_SPARES=0, BOOT_TIMEOUT=120, HEALTH_INTERVAL=5)  # hung after ~16 s
    late = freeze_a_booting_worker(service, lambda: service.chat(timeout=30))
    response = service.chat(timeout=30)
    assert response.status_code == 503
    os.kill(late, signal.SIGCONT)
    for _ in range(5):  # a client that honours Retry-After
        time.sleep(int(response.headers["Retry-After"]))
        response = service.chat(timeout=30)
        if response.status_code != 503:
            break
    assert response.status_code == 200, response.text
    assert response.headers["X-Worker-Pid"] == str(late)
    assert "seems hung" not in service.log()


def test_sigstop_of_an_idle_worker_is_found_by_the_health_probe(start_service: Callable[..., Service]) -> None:
    service = start_service(RESTART_AFTER_REQUESTS=0, HEALTH_INTERVAL=0.3)
    service.wait_for(lambda: service.ready_count() == 2, 10, "two ready workers")
    idle = service.workers()[0].pid
    os.kill(idle, signal.SIGSTOP)
    service.wait_for(lambda: gone(idle), 15, "the frozen idle worker to be killed")
    assert "did not answer 3 health probes in a row" in service.log()
    service.wait_for(lambda: service.ready_count() == 2, 10, "the pool back to two ready workers")


def test_a_generation_over_request_timeout_gets_a_504_and_its_worker_is_recycled(
        start_service: Callable[..., Service]) -> None:
    service = start_service(RESTART_AFTER_REQUESTS=0, REQUEST_TIMEOUT=1.5, STALL_TIMEOUT=1.5)
    started = time.monotonic()
    response = requests.post(service.url + "/v1/completions", json=ENDLESS, timeout=20)
    assert response.status_code == 504
    assert response.json()["error"]["code"] == "timeout"
    assert 1.4 < time.monotonic() - started < 4
    pid = int(response.headers["X-Worker-Pid"])
    recycled = re.compile(rf"\(pid {pid}\) exited after serving 0 request\(s\): "
                          r"(a generation ran past REQUEST_TIMEOUT|an inference request ended with 504)")
    service.wait_for(lambda: recycled.search(service.log()), 5, "the timed-out worker to be recycled")
    next_pid = service.chat(timeout=10).headers["X-Worker-Pid"]
    assert next_pid != str(pid)
    assert "seems hung" not in service.log(), "the worker stopped the generation itself: no kill needed"


def write_random_bytes(path: Path) -> None:
    path.write_bytes(os.urandom(4096))


def write_aborting_embedding_model(path: Path) -> None:
    """A duplicate vocabulary entry makes llama.cpp abort the whole process (SIGABRT) at load."""
    vocab = tiny_embedding_vocab()
    build_tiny_embedding_model(path, vocab=[*vocab, vocab[-1]])


@pytest.mark.parametrize(("broken_file", "break_it", "symptom", "logged"), [
    (TINY_CHAT, write_random_bytes, "the model could not be loaded",
     "exited with code 11 (the model could not be loaded) while loading its model: a model could not be loaded: tiny-chat.gguf"),
    (TINY_EMBED, write_aborting_embedding_model, "a worker crashed while loading its model",
     "killed by SIGABRT while loading its model"),
], ids=["unreadable-chat-model", "embedding-model-that-aborts"])
def test_a_broken_model_backs_off_answers_503_and_recovers_once_fixed(
        start_service: Callable[..., Service], tiny_model_dir: Path, tmp_path: Path, broken_file: str,
        break_it: Callable[[Path], None], symptom: str, logged: str) -> None:
    models = copy_tiny_models(tiny_model_dir, tmp_path / "models")
    break_it(models / broken_file)
    service = start_service(wait=False, model_dir=models, RESTART_BACKOFF_MAX=2)
    # clients get a clear 503, not a hanging connection. Under load a first 503 may say the model
    # is still loading (a load slower than the short wait); the one that names the crash follows.
    [response] = service.wait_for(lambda: _unavailable(service, symptom), 20, f"a 503 saying {symptom!r}")  # type: ignore[misc]
    error = response.json()["error"]
    assert error["code"] == "service_unavailable", error
    assert 1 <= int(response.headers["Retry-After"]) <= 3
    assert logged in service.log(), "the details are in the log"
    # no restart storm: count the workers started over four seconds
    first = _spawned(service)
    time.sleep(4)
    spawned = _spawned(service) - first
    assert 1 <= spawned <= 5, f"{spawned} workers started in 4 s"
    assert "failures in a row: the next worker starts in" in service.log()
    # repaired: it recovers by itself
    shutil.copy(tiny_model_dir / broken_file, models / "fixed.tmp")
    os.replace(models / "fixed.tmp", models / broken_file)
    service.wait_for(lambda: _ok(service), 15, "recovery after the model file was fixed")
    service.wait_for(lambda: "the service is back after" in service.log(), 5, "the end of the 503 period in the log")


def _unavailable(service: Service, symptom: str) -> list[requests.Response]:
    """[the response] if it is a 503 whose message names the symptom (a list: a Response with an
    error status is falsy)."""
    try:
        response = service.chat(timeout=5)
    except requests.RequestException:
        return []
    if response.status_code != 503 or symptom not in response.json()["error"]["message"]:
        return []
    return [response]


def _ok(service: Service) -> bool:
    try:
        return service.chat(timeout=5).status_code == 200
    except requests.RequestException:
        return False


def _spawned(service: Service) -> int:
    """Workers started so far: every worker prints 'could not be loaded' or 'loaded' once."""
    return len(set(re.findall(r"\[worker (\d+) pid", service.log())))


API_KEY = "the-test-key"
# Requests a worker refuses (name: path, headers, client address); AUTHORIZED_URLS is 127.0.0.1 only.
REFUSED = {
    "no key": ("/v1/chat/completions", {}, "127.0.0.1"),
    "a wrong key": ("/v1/chat/completions", {"Authorization": "Bearer wrong"}, "127.0.0.1"),
    "the key from an unlisted address": ("/v1/chat/completions", {"X-Api-Key": API_KEY}, "127.0.0.2"),
    "a health check from an unlisted address": ("/health", {}, "127.0.0.2"),
}


def ask(service: Service, path: str, headers: dict[str, str], client: str) -> tuple[int, dict[str, object]]:
    """One request from the loopback address `client`: (status, JSON body)."""
    connection = http.client.HTTPConnection("127.0.0.1", service.port, timeout=10, source_address=(client, 0))
    try:
        if path in ("/health", "/ready"):
            connection.request("GET", path, headers=headers)
        else:
            connection.request("POST", path, body=json.dumps(CHAT), headers={"Content-Type": "application/json", **headers})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_the_503_fallback_refuses_whom_a_worker_refuses_and_names_no_path_pid_or_exit_code(
        start_service: Callable[..., Service], tiny_model_dir: Path, tmp_path: Path) -> None:
    models = copy_tiny_models(tiny_model_dir, tmp_path / "models")
    service = start_service(model_dir=models, API_KEY=API_KEY, AUTHORIZED_URLS="127.0.0.1", WARM_SPARES=0)
    from_a_worker = {case: ask(service, *request) for case, request in REFUSED.items()}
    assert [status for status, _ in from_a_worker.values()] == [401, 401, 403, 403], from_a_worker
    # the model file goes away (by rename: the loaded worker keeps its mapping and serves one more request);
    # every replacement then fails to load it, with MODEL_PATH's full path in its reason
    os.rename(models / TINY_CHAT, models / "moved-away.gguf")
    assert ask(service, "/v1/chat/completions", {"X-Api-Key": API_KEY}, "127.0.0.1")[0] == 200

    def unavailable() -> list[dict[str, object]]:
        status, body = ask(service, "/v1/chat/completions", {"Authorization": f"Bearer {API_KEY}"}, "127.0.0.1")
        return [body] if status == 503 else []

    [body] = service.wait_for(unavailable, 20, "the 503 fallback")  # type: ignore[misc]
    message = body["error"]["message"]  # type: ignore[index]
    assert message.startswith("No worker can serve requests right now: the model could not be loaded."), message
    assert str(models) not in message and not re.search(r"\bpid\b|code \d+", message), message
    assert str(models) in service.log() and "exited with code 11" in service.log(), "the log keeps the details"
    # the fallback refuses exactly whom a worker refused, with the same status and error body
    from_the_fallback = {case: ask(service, *request) for case, request in REFUSED.items()}
    assert from_the_fallback == from_a_worker
    # the health checks need no key, as on a worker: the service is alive, and not ready, and says why
    status, body = ask(service, "/health", {}, "127.0.0.1")
    assert status == 200 and body["status"] == "live" and body["ready"] is False, body
    status, body = ask(service, "/ready", {}, "127.0.0.1")
    assert status == 503 and str(body["reason"]).startswith("No worker can serve requests right now: the model could "
                                                            "not be loaded."), body


def test_the_503_fallback_takes_the_api_key_of_a_reload(
        start_service: Callable[..., Service], tiny_model_dir: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    models.mkdir()
    write_random_bytes(models / TINY_CHAT)
    env_file = tmp_path / "service.env"
    env_file.write_text("API_KEY=old-key\n")
    service = start_service(wait=False, model_dir=models, env={"ENV_FILE": str(env_file)})

    def status_with(key: str) -> int:
        try:
            return ask(service, "/v1/chat/completions", {"X-Api-Key": key}, "127.0.0.1")[0]
        except OSError:
            return 0

    service.wait_for(lambda: status_with("old-key") == 503, 20, "the 503 fallback")
    assert status_with("new-key") == 401
    env_file.write_text("API_KEY=new-key\n")
    service.signal(signal.SIGHUP)
    service.wait_for(lambda: status_with("new-key") == 503, 20, "the fallback to take the reloaded key")
    assert status_with("old-key") == 401


def test_a_worker_over_the_memory_limit_is_recycled_after_its_request(start_service: Callable[..., Service]) -> None:
    service = start_service(RESTART_AFTER_REQUESTS=0, MAX_WORKER_MEMORY_MB=1, HEALTH_INTERVAL=0.5)
    time.sleep(1.5)
    assert len(service.workers()) == 2, "no recycling before a request"
    response = service.chat()
    assert response.status_code == 200
    pid = int(response.headers["X-Worker-Pid"])
    service.wait_for(lambda: f"(pid {pid}) exited after serving 1 request(s)" in service.log(), 5,
                     "the bloated worker to go")
    assert re.search(rf"\(pid {pid}\) uses [\d.]+ MB of its own memory \(USS\), above MAX_WORKER_MEMORY_MB \(1\)",
                     service.log())
    assert service.chat().headers["X-Worker-Pid"] != str(pid)


def test_when_the_supervisor_is_killed_every_worker_exits_within_two_seconds(
        start_service: Callable[..., Service]) -> None:
    service = start_service(RESTART_AFTER_REQUESTS=0)
    _thread, _ = service.stream_in_background(ENDLESS)
    service.busy_worker()
    workers = service.workers()
    assert len(workers) == 2
    os.kill(service.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    # An exited worker whose parent died waits as a zombie until init reaps it: gone() counts it as gone.
    while time.monotonic() - killed_at < 2 and not all(gone(worker.pid) for worker in workers):
        time.sleep(0.05)
    alive = [worker for worker in workers if not gone(worker.pid)]
    assert alive == [], f"workers still alive {time.monotonic() - killed_at:.1f} s after the supervisor died"
    # Nothing else keeps the port either (a worker being forked at that moment, the fork server):
    # on a loaded machine the last of them may need a moment more to be scheduled and exit.
    while time.monotonic() - killed_at < 10 and listeners_on(service.port):
        time.sleep(0.1)
    assert listeners_on(service.port) == [], f"the port is still held {time.monotonic() - killed_at:.1f} s on"
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", service.port))  # the port is free
    # and a new supervisor takes over the stale pid file
    assert service.process.process is not None
    service.process.process.wait(5)
    service.process.start()
    service.process.wait_ready(timeout=30)
    assert "found the sentinel of worker" in service.log() or "supervisor (pid" in service.log()


def test_a_model_file_overwritten_in_place_is_named_as_the_cause_of_the_sigbus(
        start_service: Callable[..., Service], tiny_model_dir: Path, tmp_path: Path) -> None:
    models = copy_tiny_models(tiny_model_dir, tmp_path / "models")
    service = start_service(model_dir=models, RESTART_AFTER_REQUESTS=0)
    with open(models / TINY_CHAT, "r+b") as model:  # what `cp new.gguf models/` does to a mapped file
        model.truncate(4096)
    with pytest.raises(requests.ConnectionError):  # the worker dies under this request
        service.chat(timeout=10)
    service.wait_for(lambda: "killed by SIGBUS (a mapped file changed under it: was the model file overwritten"
                     in service.log(), 10, "the SIGBUS explained in the log")


# -- log faults


@pytest.fixture
def small_filesystem(tmp_path: Path) -> Iterator[Path]:
    """A 256 kB tmpfs of its own, to fill up for real; unmounted afterwards."""
    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    if not sys.platform.startswith("linux") or shutil.which("mount") is None:
        pytest.skip("needs Linux's mount to make a small filesystem to fill up")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill up (needs root): {mounted.stderr.strip()}")
    try:
        yield mount_point
    finally:
        if subprocess.run(["umount", str(mount_point)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "--lazy", str(mount_point)], check=True)


def fill_up(folder: Path) -> Path:
    """Write a file into `folder` until its filesystem is full; returns the file."""
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as error:
        assert error.errno == errno.ENOSPC, error
    finally:
        os.close(fd)
    return filler


def test_a_full_log_disk_neither_stops_serving_nor_floods_the_console(
        small_filesystem: Path, start_service: Callable[..., Service]) -> None:
    log_file = small_filesystem / "logs" / "gpt4all-api.log"
    service = start_service(env={"LOG_FOLDER_NAME": str(small_filesystem / "logs")})
    filler = fill_up(small_filesystem)

    def console() -> str:
        return service.process.log_text()

    # every request is served (each one a new worker, so log records keep coming) while they cannot be written
    for _ in range(40):
        assert service.chat(timeout=15).status_code == 200
        if "cannot write the log file" in console() or "Logging error" in console():
            break  # the log met the full disk
    assert "Traceback" not in console() and "Logging error" not in console(), console()[-3000:]
    assert "No space left on device. The service goes on" in console()
    assert service.chat(timeout=15).status_code == 200
    # space again: the next records say how many were lost
    filler.unlink()
    assert service.chat(timeout=15).status_code == 200
    service.wait_for(lambda: "the log file can be written again: " in log_file.read_text(), 10, "the recovery note")
    assert re.search(r"the log file can be written again: [1-9]\d* log record\(s\) were dropped", log_file.read_text())
    # a graceful stop is a clean exit, and the console got one warning and no traceback
    fill_up(small_filesystem)
    service.signal(signal.SIGTERM)
    assert service.process.process is not None and service.process.process.wait(20) == 0, console()[-3000:]
    text = console()
    assert text.count("cannot write the log file") == 1, text[-3000:]
    assert "Traceback" not in text and "Logging error" not in text, text[-3000:]


def test_two_sighups_closer_together_than_a_model_load_never_leave_no_worker_ready(
        start_service: Callable[..., Service]) -> None:
    """A worker frozen while it loads stands for a load slower than the time between two reloads:
    the second reload must not count it as capacity and drain the only READY worker."""
    service = start_service(WORKERS=1, WARM_SPARES=0, RESTART_AFTER_REQUESTS=0)
    loading = freeze_a_booting_worker(service, lambda: service.signal(signal.SIGHUP))
    serving = {pid for pid, sentinel in service.sentinels().items() if sentinel.state is WorkerState.READY}
    fewest_ready = [service.ready_count()]
    sampling = threading.Event()

    def count_ready_workers() -> None:
        while not sampling.is_set():
            fewest_ready[0] = min(fewest_ready[0], service.ready_count())

    sampler = threading.Thread(target=count_ready_workers)
    sampler.start()
    try:
        service.signal(signal.SIGHUP)  # the second reload, while the first one's worker still loads
        service.wait_for(lambda: [pid for pid, s in service.sentinels().items()
                                  if pid not in {*serving, loading} and s.state is WorkerState.READY], 20,
                         "the second reload's worker to be READY")
        with contextlib.suppress(ProcessLookupError):  # its missed probes may have had it killed already
            os.kill(loading, signal.SIGCONT)
        service.wait_for(lambda: "reload complete" in service.log(), 20, "the reload to complete")
    finally:
        sampling.set()
        sampler.join(5)
        with contextlib.suppress(ProcessLookupError):
            os.kill(loading, signal.SIGCONT)
    assert fewest_ready[0] >= 1, f"no worker was READY for a while\n{service.log()[-3000:]}"
    assert service.chat(timeout=10).status_code == 200
