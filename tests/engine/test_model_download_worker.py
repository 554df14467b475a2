"""Model retrieval through HTTP on a real worker with ALLOW_DOWNLOAD=true and an API key.

The catalog and the files come from a loopback server this test starts (tests/engine/test_model_download.py).
The worker's HTTP(S)_PROXY points at a recorder with NO_PROXY covering loopback only: any request to
another host would reach the recorder, and the test checks that none did.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from testing.loopback import ConnectionRecorder, ModelServer, run_together, standard_server
from testing.servers import ServerProcess, running_worker
from testing.tiny_models import TINY_CHAT, TINY_CHAT_REPLY, copy_tiny_models, tiny_settings

KEY = "retrieval-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def model_server(tiny_model_dir: Path) -> Iterator[ModelServer]:
    server = standard_server((tiny_model_dir / TINY_CHAT).read_bytes())
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = copy_tiny_models(tiny_model_dir, tmp_path_factory.mktemp("download-models"))
    (folder / "sub").mkdir()
    return folder


@pytest.fixture(scope="module")
def worker(model_dir: Path, model_server: ModelServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    recorder = ConnectionRecorder()
    proxy = f"http://127.0.0.1:{recorder.port}"
    settings = tiny_settings(ALLOW_DOWNLOAD="true", MODEL_CATALOG_URL=model_server.catalog_url, DOWNLOAD_TIMEOUT="0.5",
                             API_KEY=KEY, HTTP_PROXY=proxy, HTTPS_PROXY=proxy, http_proxy=proxy, https_proxy=proxy,
                             NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    with running_worker(model_dir, tmp_path_factory.mktemp("download-worker"), **settings) as process:
        yield process
        recorder.close()
        assert recorder.connections == 0, "the worker tried to reach a host outside loopback"


def retrieve(worker: ServerProcess, body: dict[str, object], headers: dict[str, str] | None = None) -> requests.Response:
    return requests.post(worker.url + "/v0/language-models/retrieve", json=body, headers=AUTH if headers is None else headers,
                         timeout=30)


def model_files(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if path.is_file())


def test_retrieval_needs_the_api_key(worker: ServerProcess, model_server: ModelServer) -> None:
    assert retrieve(worker, {"model_name": "good"}, headers={}).status_code == 401
    assert requests.get(worker.url + "/v1/models/good", timeout=10).status_code == 401
    assert model_server.gets_of("good.gguf") == 0


def test_v0_retrieve_downloads_then_the_model_serves(worker: ServerProcess, model_server: ModelServer, model_dir: Path) -> None:
    response = retrieve(worker, {"model_name": "good", "allow_download": True})
    assert response.status_code == 200, response.text
    assert response.json() == {"success": True, "message": "Model good.gguf downloaded successfully."}
    assert (model_dir / "good.gguf").is_file()
    chat = requests.post(worker.url + "/v1/chat/completions", headers=AUTH, timeout=30,
                         json={"model": "good", "temperature": 0, "messages": [{"role": "user", "content": "Hi"}]})
    assert chat.status_code == 200 and chat.json()["model"] == "good"
    assert chat.json()["choices"][0]["message"]["content"] == TINY_CHAT_REPLY
    again = retrieve(worker, {"model_name": "good.gguf"})
    assert again.json() == {"success": True, "message": "Model good.gguf is installed."}
    assert model_server.gets_of("good.gguf") == 1
    log = worker.log_text()
    assert "downloading good.gguf from 127.0.0.1" in log and "downloaded good.gguf" in log and "checksum verified" in log
    listed = requests.get(worker.url + "/v0/models", headers=AUTH, timeout=10).json()["models"]
    assert "good.gguf" in listed


def test_v1_model_route_retrieves_what_is_not_installed(worker: ServerProcess) -> None:
    response = requests.get(worker.url + "/v1/models/other", headers=AUTH, timeout=30)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"] == "other" and body["object"] == "model"
    assert body["data"] == "Model other.gguf downloaded successfully."
    missing = requests.get(worker.url + "/v1/models/not-in-catalog", headers=AUTH, timeout=30)
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


def test_a_folder_inside_model_path(worker: ServerProcess, model_dir: Path) -> None:
    response = retrieve(worker, {"model_name": "good", "model_path": "sub"})
    assert response.status_code == 200 and response.json()["success"] is True
    assert (model_dir / "sub" / "good.gguf").is_file()
    outside = retrieve(worker, {"model_name": "good", "model_path": str(model_dir.parent)})
    assert outside.status_code == 403 and outside.json()["error"]["param"] == "model_path"
    assert outside.json()["error"]["code"] == "outside_model_path"


def test_concurrent_retrievals_share_one_download(worker: ServerProcess, model_server: ModelServer) -> None:
    results = run_together([lambda: retrieve(worker, {"model_name": "drip"})] * 3)
    assert all(isinstance(result, requests.Response) and result.status_code == 200 for result in results), results
    assert model_server.gets_of("drip.gguf") == 1


@pytest.mark.parametrize(("name", "status", "code"), [
    ("truncated", 502, "download_failed"),
    ("badsum", 502, "download_failed"),
    ("notgguf", 502, "download_failed"),
    ("slow", 504, "download_timeout"),
])
def test_failed_downloads_leave_nothing(worker: ServerProcess, model_dir: Path, name: str, status: int, code: str) -> None:
    before = model_files(model_dir)
    response = retrieve(worker, {"model_name": name})
    assert response.status_code == status, response.text
    body = response.json()
    assert body["success"] is False and body["error"]["code"] == code
    assert model_files(model_dir) == before, "no model and no part file may remain"
    assert not any(path.name.endswith(".part") for path in model_dir.rglob("*"))
