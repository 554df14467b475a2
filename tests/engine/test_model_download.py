"""Model retrieval, in-process: a loopback HTTP server plays the model catalog and the file host.

Every test here runs with a guard that refuses (and records) any connection to an address outside
127.0.0.0/8, so nothing can reach the internet even by mistake.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from api.config import Settings, load_settings
from api.errors import ApiError, DownloadDisabled, DownloadFailed, DownloadTimeout, Forbidden, InvalidRequest, ModelNotFound, NotFound
from api.model_download import ModelDownloader, model_file_name, resolve_folder
from testing.loopback import ModelServer, run_together, standard_server
from testing.servers import free_port
from testing.tiny_models import build_tiny_chat_model

# -- the loopback model server


@pytest.fixture(scope="session")
def tiny_model_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    return build_tiny_chat_model(tmp_path_factory.mktemp("served") / "served.gguf").read_bytes()


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
    from testing.loopback import ConnectionRecorder

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
