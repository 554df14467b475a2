"""Scale-out behind a real nginx (deploy/nginx/gpt4all-api.conf): two daemons on loopback, a load
from a few threads, one daemon SIGKILLed mid-load (supervisor and workers, every process group of
its tree, as when a machine dies). Only the requests in flight at that daemon may fail; the
survivor answers every later one; nothing is left running.

nginx adds the upstream it used (`$upstream_addr`) to each answer in this test's own nginx.conf,
so every outcome is attributed to a daemon, including nginx's own 502s."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import string
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import requests

from testing.servers import REPO, ServerProcess, Service, free_port, gone, processes_naming
from testing.tiny_models import TINY_CHAT_REPLY

NGINX = shutil.which("nginx", path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))
pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (Debian: apt-get install nginx; "
                                                      "test.sh tries that when it can)")

TEMPLATE = REPO / "deploy" / "nginx" / "gpt4all-api.conf"
CHAT_BODY = {"messages": [{"role": "user", "content": "Hello!"}], "temperature": 0}
STREAM_BODY = {"prompt": "count 0", "max_tokens": 400, "temperature": 0, "stream": True}
THREADS = 4


@dataclass
class Outcome:
    started: float
    ended: float
    upstream: str  # the last address nginx tried ("" if nginx did not say)
    tried: str  # every address nginx tried, in order ("a, b")
    ok: bool
    detail: str


class Nginx:
    """nginx run in the foreground from its own prefix folder, on the deploy template."""

    def __init__(self, folder: Path, backends: list[str]) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        site = string.Template(TEMPLATE.read_text()).safe_substitute(
            GPT4ALL_BACKEND_1=backends[0], GPT4ALL_BACKEND_2=backends[1], GPT4ALL_LISTEN=f"127.0.0.1:{self.port}")
        # nginx tries a failed daemon again after fail_timeout: 1 s here, so that the test sees
        # requests sent to the dead daemon again (refused, then passed to the other) within seconds
        site = site.replace("fail_timeout=10s", "fail_timeout=1s")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "gpt4all-api.conf").write_text(site)
        for temp in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (folder / temp).mkdir(parents=True, exist_ok=True)
        user = "user root;" if os.geteuid() == 0 else ""  # workers must reach the temp folders in tmp_path
        (folder / "nginx.conf").write_text(f"""
daemon off;
{user}
worker_processes 1;
pid {folder}/nginx.pid;
error_log {folder}/error.log info;
events {{ worker_connections 256; }}
http {{
    access_log {folder}/access.log;
    client_body_temp_path {folder}/client_body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
    add_header X-Upstream-Addr $upstream_addr always;
    include {folder}/gpt4all-api.conf;
}}
""")
        self.server = ServerProcess(
            [str(NGINX), "-p", str(folder), "-c", str(folder / "nginx.conf"), "-e", str(folder / "error.log")],
            os.environ, self.port, folder / "console.log")

    def start(self) -> Nginx:
        """Start it and wait for an answer from a daemon through it (ServerProcess.wait_ready would
        take the daemon's X-Worker-Pid for an intruder's)."""
        self.server.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with contextlib.suppress(requests.RequestException):
                if requests.get(self.url + "/ready", timeout=1).status_code == 200:
                    return self
            assert self.server.process is not None and self.server.process.poll() is None, self.error_log()
            time.sleep(0.05)
        raise TimeoutError(f"nginx did not answer /ready:\n{self.error_log()}")

    def refused_by(self, address: str) -> bool:
        """Whether nginx logged a connection to `address` refused (then passed the request on)."""
        return any("Connection refused" in line and f"//{address}/" in line for line in self.error_log(0).splitlines())

    def error_log(self, tail: int = 3000) -> str:
        path = self.folder / "error.log"
        return path.read_text(errors="replace")[-tail:] if path.exists() else ""

    def stop(self) -> list[int]:
        """SIGTERM (nginx's fast shutdown) to the master; returns the pids that had to be killed."""
        return self.server.stop()


@pytest.fixture
def nginx_in_front(tmp_path: Path) -> Iterator[Callable[[list[str]], Nginx]]:
    started: list[Nginx] = []

    def start(backends: list[str]) -> Nginx:
        started.append(Nginx(tmp_path / "nginx", backends).start())
        return started[-1]

    yield start
    for server in started:
        assert server.stop() == [], "nginx left processes behind"


def last_upstream(response: requests.Response) -> str:
    return response.headers.get("X-Upstream-Addr", "").split(",")[-1].strip()


def one_request(session: requests.Session, url: str, streamed: bool, streaming_at: set[str]) -> Outcome:
    """A chat request or a streamed completion through nginx, checked for the exact tiny-model answer.

    While a stream's body is being read, its upstream is in `streaming_at`."""
    started = time.monotonic()
    upstream, tried, ok, detail = "", "", False, ""
    try:
        if streamed:
            with session.post(url + "/v1/completions", json=STREAM_BODY, stream=True, timeout=30) as response:
                upstream, tried = last_upstream(response), response.headers.get("X-Upstream-Addr", "")
                streaming_at.add(upstream)
                try:
                    lines = [line for line in response.iter_lines() if line.startswith(b"data: ")]
                finally:
                    streaming_at.discard(upstream)
                ok = response.status_code == 200 and lines[-1:] == [b"data: [DONE]"] and len(lines) > 100
                detail = f"{response.status_code}, {len(lines)} data lines"
        else:
            response = session.post(url + "/v1/chat/completions", json=CHAT_BODY, timeout=30)
            upstream, tried = last_upstream(response), response.headers.get("X-Upstream-Addr", "")
            ok = response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == TINY_CHAT_REPLY
            detail = f"{response.status_code}: {response.text[:200]}"
    except requests.RequestException as error:
        detail = type(error).__name__
    return Outcome(started, time.monotonic(), upstream, tried, ok, detail)


def send_load(url: str, stop: threading.Event, outcomes: list[Outcome], streaming_at: set[str], index: int) -> None:
    """One request after another, streamed and not in turn (threads start out of step)."""
    with requests.Session() as session:
        count = 0
        while not stop.is_set():
            outcomes.append(one_request(session, url, (count + index) % 2 == 0, streaming_at))
            count += 1


def kill_whole_tree(service: Service) -> None:
    """SIGKILL the supervisor and its workers at once: every process group in its tree (workers
    run in groups of their own), so nothing gets to run a clean-up."""
    tree = [psutil.Process(service.pid), *service.process.descendants()]
    groups = {os.getpgid(process.pid) for process in tree if not gone(process.pid)}
    for group in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
    psutil.wait_procs(tree, timeout=5)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_killing_one_daemon_mid_load_loses_only_its_requests_in_flight(
        start_service: Callable[..., Service], nginx_in_front: Callable[[list[str]], Nginx], tmp_path: Path) -> None:
    doomed, survivor = start_service(), start_service()
    doomed_addr, survivor_addr = f"127.0.0.1:{doomed.port}", f"127.0.0.1:{survivor.port}"
    proxy = nginx_in_front([doomed_addr, survivor_addr])

    outcomes: list[Outcome] = []
    streaming_at: set[str] = set()
    stop = threading.Event()
    threads = [threading.Thread(target=send_load, args=(proxy.url, stop, outcomes, streaming_at, i), daemon=True)
               for i in range(THREADS)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: sum(o.ok and o.upstream == doomed_addr for o in outcomes) >= 5, 60,
                   "both daemons to serve through nginx")
        wait_until(lambda: doomed_addr in streaming_at, 30, "a stream in flight at the daemon to kill")
        killed_at = time.monotonic()
        kill_whole_tree(doomed)
        killed_done = time.monotonic()
        wait_until(lambda: sum(o.started > killed_done for o in outcomes) >= 20, 60, "load after the kill")
        wait_until(lambda: proxy.refused_by(doomed_addr), 30, "nginx to try the dead daemon again")
    finally:
        stop.set()
        for thread in threads:
            thread.join(40)

    failed = [o for o in outcomes if not o.ok]
    later = [o for o in outcomes if o.started > killed_done]
    summary = (f"{len(outcomes)} requests, {len(failed)} failed, {len(later)} after the kill; "
               f"failures: {[(o.upstream, o.detail) for o in failed]}")
    print(summary)
    assert len(outcomes) >= 30, summary
    for outcome in failed:  # each failure was at the killed daemon, and in flight when it died
        assert outcome.upstream == doomed_addr and outcome.started < killed_done and outcome.ended > killed_at, summary
        assert outcome.tried == doomed_addr, summary  # a POST that reached a daemon is not sent again
    assert 1 <= len(failed) <= THREADS, summary  # the stream in flight is lost; at most one per client thread
    assert all(o.ok and o.upstream == survivor_addr for o in later), summary
    assert sum(o.ok and o.upstream == doomed_addr for o in outcomes if o.ended < killed_at) >= 5, summary

    assert survivor.process.stop(timeout=15) == [], "the survivor left processes behind"
    assert proxy.stop() == [], "nginx left processes behind"
    assert doomed.process.process is not None and doomed.process.process.poll() is not None
    assert processes_naming(tmp_path) == [], "processes left behind"
