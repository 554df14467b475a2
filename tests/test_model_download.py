"""Model retrieval, in-process: a loopback HTTP server plays the model catalog and the file host.

Every test here runs with a guard that refuses (and records) any connection to an address outside
127.0.0.0/8, so nothing can reach the internet even by mistake.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from api.config import Settings, load_settings
from api.errors import ApiError, Forbidden, InvalidRequest, ModelNotFound, NotFound
from api.model_download import (
    DownloadDisabled,
    DownloadFailed,
    DownloadTimeout,
    ModelDownloader,
    model_file_name,
    resolve_folder,
)
from tests.servers import free_port
from tests.tiny_models import build_tiny_chat_model

# -- the loopback model server


@dataclass
class ServedFile:
    body: bytes
    mode: str = "ok"
    """ok | truncate (Content-Length says more than is sent) | slow (stalls mid-way) | drip (slow but steady)"""


@dataclass
class ModelServer:
    """A catalog (/models3.json) and its files (/files/<name>) on 127.0.0.1, with a request log."""

    files: dict[str, ServedFile] = field(default_factory=dict)
    catalog: list[dict[str, object]] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    port: int = 0
    _server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def catalog_url(self) -> str:
        return self.url + "/models3.json"

    def add(self, name: str, body: bytes, *, mode: str = "ok", size: int | None = None, md5: str | None = None,
            url: str | None = None) -> None:
        self.files[name] = ServedFile(body, mode)
        self.catalog.append({
            "order": "z", "name": name, "filename": name, "filesize": str(len(body) if size is None else size),
            "md5sum": md5 or hashlib.md5(body).hexdigest(), "url": url or f"{self.url}/files/{name}",
            "requires": "2.7.1", "ramrequired": "1", "parameters": "tiny", "quant": "f32", "type": "LLaMA",
        })

    def gets_of(self, name: str) -> int:
        return self.requests.count(f"/files/{name}")

    def start(self) -> ModelServer:
        served = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                served.requests.append(self.path)
                if self.path == "/models3.json":
                    return self._send(json.dumps(served.catalog).encode(), "application/json")
                name = self.path.removeprefix("/files/")
                found = served.files.get(name)
                if found is None:
                    self.send_error(404)
                    return None
                return self._send(found.body, "application/octet-stream", found.mode)

            def _send(self, body: bytes, kind: str, mode: str = "ok") -> None:
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if mode == "truncate":
                    self.wfile.write(body[: len(body) // 2])
                    self.close_connection = True
                elif mode == "slow":
                    self.wfile.write(body[:100])
                    self.wfile.flush()
                    time.sleep(3)
                    with contextlib.suppress(OSError):
                        self.wfile.write(body[100:])
                elif mode == "drip":
                    for start in range(0, len(body), len(body) // 8 + 1):
                        self.wfile.write(body[start:start + len(body) // 8 + 1])
                        self.wfile.flush()
                        time.sleep(0.1)
                else:
                    self.wfile.write(body)

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        server.block_on_close = False
        self._server = server
        self.port = server.server_address[1]
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="model-server", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


@pytest.fixture(scope="session")
def tiny_model_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return build_tiny_chat_model(tmp_path_factory.mktemp("served") / "served.gguf").read_bytes()


def standard_server(model: bytes) -> ModelServer:
    """Serves the tiny chat model under several names, each failing in its own way."""
    server = ModelServer().start()
    server.add("good.gguf", model)
    server.add("other.gguf", model)
    server.add("truncated.gguf", model, mode="truncate")
    server.add("badsum.gguf", model, md5="0" * 32)
    server.add("wrongsize.gguf", model, size=len(model) + 1)
    server.add("slow.gguf", model, mode="slow")
    server.add("drip.gguf", model, mode="drip")
    server.add("notgguf.gguf", b"<html>not a model</html>" * 10)
    server.catalog.append({"filename": "gone.gguf", "filesize": "10", "md5sum": "0" * 32, "url": f"{server.url}/files/gone"})
    return server


@pytest.fixture
def model_server(tiny_model_bytes: bytes) -> Iterator[ModelServer]:
    server = standard_server(tiny_model_bytes)
    try:
        yield server
    finally:
        server.stop()


# -- nothing leaves the machine


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[object]]:
    """Refuse and record every outgoing connection that is not to 127.0.0.0/8."""
    refused: list[object] = []
    real_connect = socket.socket.connect

    def guarded_connect(sock: socket.socket, address: object) -> None:
        host = address[0] if isinstance(address, tuple) else None
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not ipaddress.ip_address(str(host)).is_loopback:
            refused.append(address)
            raise ConnectionRefusedError(f"test guard: no connection to {address} outside loopback")
        real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    yield refused
    assert refused == [], f"something tried to reach {refused}"


def settings_for(folder: Path, **overrides: object) -> Settings:
    values = {"MODEL_PATH": str(folder), "ALLOW_DOWNLOAD": "true", "DOWNLOAD_TIMEOUT": "1"}
    values.update({key: str(value) for key, value in overrides.items()})
    return load_settings(values, env_file=folder / "no.env")


def leftovers(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir())


# -- names and folders


def test_model_names_are_bare_gguf_file_names() -> None:
    assert model_file_name("good") == "good.gguf"
    assert model_file_name("good.gguf") == "good.gguf"
    for bad in ("../good.gguf", "/etc/passwd", "a/b.gguf", "..", "C:\\x.gguf", ".hidden.gguf"):
        with pytest.raises(InvalidRequest) as caught:
            model_file_name(bad, param="model_name")
        assert caught.value.param == "model_name"


def test_folders_stay_inside_model_path(tmp_path: Path) -> None:
    base = tmp_path / "models"
    (base / "sub").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    outside = ["..", "../outside", "sub/../../outside", str(tmp_path / "outside"), "/etc"]
    with contextlib.suppress(OSError):  # Windows without the symlink privilege: no symlink to test
        (base / "escape").symlink_to(tmp_path / "outside")
        outside.append("escape")
    assert resolve_folder(base, None) == base.resolve()
    assert resolve_folder(base, "sub") == (base / "sub").resolve()
    assert resolve_folder(base, str(base / "sub")) == (base / "sub").resolve()
    assert resolve_folder(base, str(base)) == base.resolve()
    for requested in outside:
        with pytest.raises(Forbidden) as caught:
            resolve_folder(base, requested)
        assert caught.value.param == "model_path" and caught.value.status == 403
    with pytest.raises(NotFound) as missing:
        resolve_folder(base, "missing")
    assert missing.value.param == "model_path" and missing.value.status == 404


# -- downloads


def test_disabled_by_default_and_nothing_is_fetched(tmp_path: Path, model_server: ModelServer) -> None:
    settings = load_settings({"MODEL_PATH": str(tmp_path), "MODEL_CATALOG_URL": model_server.catalog_url},
                             env_file=tmp_path / "no.env")
    assert settings.allow_download is False
    with pytest.raises(DownloadDisabled) as caught:
        ModelDownloader(settings).retrieve("good.gguf")
    assert caught.value.status == 403 and "ALLOW_DOWNLOAD=false" in caught.value.message
    assert model_server.requests == []
    assert leftovers(tmp_path) == []


def test_a_catalog_model_is_downloaded_verified_and_renamed_into_place(
        tmp_path: Path, model_server: ModelServer, tiny_model_bytes: bytes, caplog: pytest.LogCaptureFixture) -> None:
    downloader = ModelDownloader(settings_for(tmp_path, MODEL_CATALOG_URL=model_server.catalog_url))
    caplog.set_level("INFO", logger="api.model_download")
    retrieval = downloader.retrieve("good.gguf")
    assert retrieval.downloaded and retrieval.path == tmp_path / "good.gguf"
    assert retrieval.path.read_bytes() == tiny_model_bytes
    assert leftovers(tmp_path) == ["good.gguf"]
    assert "downloading good.gguf from 127.0.0.1" in caplog.text and "checksum verified" in caplog.text
    again = downloader.retrieve("good.gguf")
    assert not again.downloaded and model_server.gets_of("good.gguf") == 1


def test_a_download_into_a_folder_inside_model_path(tmp_path: Path, model_server: ModelServer) -> None:
    (tmp_path / "more").mkdir()
    downloader = ModelDownloader(settings_for(tmp_path, MODEL_CATALOG_URL=model_server.catalog_url))
    assert downloader.retrieve("good.gguf", tmp_path / "more").path == tmp_path / "more" / "good.gguf"


@pytest.mark.parametrize(("name", "error", "mentions"), [
    ("truncated.gguf", DownloadFailed, "cut short"),
    ("badsum.gguf", DownloadFailed, "md5 checksum does not match"),
    ("wrongsize.gguf", DownloadFailed, "cut short"),
    ("notgguf.gguf", DownloadFailed, "not a GGUF model"),
    ("gone.gguf", DownloadFailed, "HTTP 404"),
    ("slow.gguf", DownloadTimeout, "DOWNLOAD_TIMEOUT"),
])
def test_a_failed_download_leaves_nothing_behind(tmp_path: Path, model_server: ModelServer, name: str,
                                                 error: type[ApiError], mentions: str) -> None:
    downloader = ModelDownloader(settings_for(tmp_path, MODEL_CATALOG_URL=model_server.catalog_url, DOWNLOAD_TIMEOUT=0.5))
    started = time.monotonic()
    with pytest.raises(error) as caught:
        downloader.retrieve(name)
    assert type(caught.value) is error
    assert mentions in caught.value.message
    assert caught.value.status == (504 if error is DownloadTimeout else 502)
    assert leftovers(tmp_path) == [], "no model file and no temporary file may remain"
    assert time.monotonic() - started < 3


def test_unknown_models_and_unreachable_catalogs(tmp_path: Path, model_server: ModelServer) -> None:
    downloader = ModelDownloader(settings_for(tmp_path, MODEL_CATALOG_URL=model_server.catalog_url))
    with pytest.raises(ModelNotFound):
        downloader.retrieve("not-in-catalog.gguf")
    closed = f"http://127.0.0.1:{free_port()}/models3.json"
    with pytest.raises(DownloadFailed) as caught:
        ModelDownloader(settings_for(tmp_path, MODEL_CATALOG_URL=closed)).retrieve("good.gguf")
    assert caught.value.status == 502 and caught.value.code == "catalog_unavailable"
    catalog_file = tmp_path / "catalog.json"
    catalog_file.write_text("{not json")
    with pytest.raises(DownloadFailed, match="not valid JSON"):
        ModelDownloader(settings_for(tmp_path, MODEL_CATALOG_URL=catalog_file)).retrieve("good.gguf")
    assert leftovers(tmp_path) == ["catalog.json"]


def test_a_catalog_file_on_disk_works_too(tmp_path: Path, model_server: ModelServer) -> None:
    catalog_file = tmp_path.parent / f"{tmp_path.name}-catalog.json"
    catalog_file.write_text(json.dumps(model_server.catalog))
    downloader = ModelDownloader(settings_for(tmp_path, MODEL_CATALOG_URL=catalog_file))
    assert downloader.retrieve("good.gguf").downloaded


def run_together(calls: list[Callable[[], object]]) -> list[object]:
    results: list[object] = [None] * len(calls)

    def run(index: int) -> None:
        try:
            results[index] = calls[index]()
        except Exception as error:
            results[index] = error

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return results


def test_concurrent_requests_for_one_model_share_one_download(tmp_path: Path, model_server: ModelServer) -> None:
    downloader = ModelDownloader(settings_for(tmp_path, MODEL_CATALOG_URL=model_server.catalog_url))
    results = run_together([lambda: downloader.retrieve("drip.gguf")] * 4)
    assert all(not isinstance(result, Exception) for result in results), results
    assert {result.path for result in results} == {tmp_path / "drip.gguf"}  # type: ignore[union-attr]
    assert model_server.gets_of("drip.gguf") == 1
    assert leftovers(tmp_path) == ["drip.gguf"]


def test_concurrent_requests_share_a_failure_too(tmp_path: Path, model_server: ModelServer) -> None:
    downloader = ModelDownloader(settings_for(tmp_path, MODEL_CATALOG_URL=model_server.catalog_url, DOWNLOAD_TIMEOUT=0.5))
    results = run_together([lambda: downloader.retrieve("slow.gguf")] * 3)
    assert all(isinstance(result, DownloadTimeout) for result in results), results
    assert model_server.gets_of("slow.gguf") == 1
    assert leftovers(tmp_path) == []


def test_another_process_download_is_awaited_and_a_dead_ones_taken_over(tmp_path: Path, model_server: ModelServer,
                                                                         tiny_model_bytes: bytes) -> None:
    downloader = ModelDownloader(settings_for(tmp_path, MODEL_CATALOG_URL=model_server.catalog_url))
    # a part file that stopped growing long ago: its owner died; take over
    stale = tmp_path / ".good.gguf.part"
    stale.write_bytes(b"GGUF partial")
    os.utime(stale, (time.time() - 3600, time.time() - 3600))
    assert downloader.retrieve("good.gguf").downloaded
    assert leftovers(tmp_path) == ["good.gguf"]
    # a growing part file: another process is at work; its result is used, nothing fetched again
    fresh = tmp_path / ".other.gguf.part"
    fresh.write_bytes(b"GGUF")

    def other_process_finishes() -> None:
        time.sleep(0.5)
        (tmp_path / "other.gguf").write_bytes(tiny_model_bytes)
        fresh.unlink()

    threading.Thread(target=other_process_finishes).start()
    retrieval = downloader.retrieve("other.gguf")
    assert retrieval.path == tmp_path / "other.gguf"
    assert model_server.gets_of("other.gguf") == 0
    assert leftovers(tmp_path) == ["good.gguf", "other.gguf"]


def test_part_files_left_by_dead_downloads_are_removed_at_start(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    dead = [tmp_path / ".a.gguf.part", tmp_path / "sub" / ".b.gguf.part"]
    alive = tmp_path / ".c.gguf.part"
    for part in [*dead, alive]:
        part.write_bytes(b"GGUF")
    for part in dead:
        os.utime(part, (time.time() - 3600, time.time() - 3600))
    ModelDownloader(settings_for(tmp_path, ALLOW_DOWNLOAD="false"))
    assert all(part.exists() for part in dead), "nothing is touched while downloads are off"
    ModelDownloader(settings_for(tmp_path))
    assert not any(part.exists() for part in dead) and alive.exists()


def test_the_default_catalog_is_reached_only_through_a_proxy_the_tests_control(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the worker tests rely on: with HTTPS_PROXY set, even the internet default catalog is asked
    of the (loopback) proxy, so a recorder there sees every attempt to leave the machine."""
    from tests.test_legacy_routes import ConnectionRecorder

    recorder = ConnectionRecorder()
    try:
        for variable in ("HTTPS_PROXY", "https_proxy"):
            monkeypatch.setenv(variable, f"http://127.0.0.1:{recorder.port}")
        for variable in ("NO_PROXY", "no_proxy"):
            monkeypatch.delenv(variable, raising=False)
        downloader = ModelDownloader(settings_for(tmp_path))  # MODEL_CATALOG_URL: the default, on the internet
        assert downloader.catalog_url.startswith("https://")
        with pytest.raises(DownloadFailed) as caught:
            downloader.retrieve("Meta-Llama-3-8B-Instruct.Q4_0.gguf")
        assert caught.value.code == "catalog_unavailable"
        assert recorder.connections == 1
    finally:
        recorder.close()
    assert leftovers(tmp_path) == []


def test_the_guard_really_refuses_the_internet(loopback_only: list[object]) -> None:
    with pytest.raises(ConnectionRefusedError), socket.socket() as sock:
        sock.connect(("192.0.2.1", 80))  # TEST-NET-1: documentation-only, never routed
    assert loopback_only == [("192.0.2.1", 80)]
    loopback_only.clear()
