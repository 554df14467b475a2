"""litellm's `ollama_chat/` provider as a client of the Ollama routes, streaming and not, on the tiny
models with exact text. litellm lives in a virtualenv of its own (.venv-litellm, from
requirements-litellm.txt, which ./test.sh installs), so the client runs as a separate process:
testing/litellm_client.py, which also reports every non-loopback address it tried to reach."""

from __future__ import annotations

import json
import socket
import subprocess

import pytest

from testing.litellm_client import audit
from testing.loopback import ConnectionRecorder
from testing.servers import REPO, ServerProcess
from testing.tiny_models import TINY_CHAT_REPLY

LITELLM_PYTHON = REPO / ".venv-litellm" / "bin" / "python"


def run_litellm(base_url: str, model: str, proxy: ConnectionRecorder) -> dict:
    assert LITELLM_PYTHON.exists(), "no .venv-litellm: run ./test.sh once, which creates it from requirements-litellm.txt"
    proxy_url = f"http://127.0.0.1:{proxy.port}"
    env = {"PATH": "/usr/bin:/bin", "HOME": str(REPO), "LITELLM_LOCAL_MODEL_COST_MAP": "True",
           "HTTP_PROXY": proxy_url, "HTTPS_PROXY": proxy_url, "ALL_PROXY": proxy_url, "NO_PROXY": "127.0.0.1,localhost"}
    run = subprocess.run([str(LITELLM_PYTHON), str(REPO / "testing" / "litellm_client.py"), base_url, model],
                         capture_output=True, text=True, timeout=120, env=env, stdin=subprocess.DEVNULL)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_litellm_ollama_chat_streaming_and_not_with_no_network(tiny_worker: ServerProcess) -> None:
    proxy = ConnectionRecorder()
    try:
        result = run_litellm(tiny_worker.url, "tiny-chat", proxy)
    finally:
        proxy.close()
    assert result["text"] == TINY_CHAT_REPLY and result["finish_reason"] == "stop"
    assert "".join(result["streamed"]) == TINY_CHAT_REPLY and len(result["streamed"]) > 1
    assert result["usage"]["completion_tokens"] == 26 and result["usage"]["prompt_tokens"] > 0
    assert result["short"] == "abc" and result["short_finish_reason"] == "length"
    assert result["non_loopback"] == [], "litellm reached for the network"
    assert proxy.connections == 0, "litellm used the (recording) proxy: it tried to reach the network"


def test_the_client_s_audit_hook_blocks_what_is_not_loopback() -> None:
    """The check the litellm test relies on, called as Python's audit machinery calls it (the hook is
    not installed here: an audit hook cannot be removed). 192.0.2.1 is TEST-NET-1, never reached."""
    with socket.socket() as sock:
        audit("socket.connect", (sock, ("127.0.0.1", 9)))
        audit("socket.getaddrinfo", ("localhost", 80, 0, 0, 0))
        with pytest.raises(PermissionError, match=r"connect 192\.0\.2\.1:443"):
            audit("socket.connect", (sock, ("192.0.2.1", 443)))
        with pytest.raises(PermissionError, match=r"lookup raw\.githubusercontent\.com"):
            audit("socket.getaddrinfo", ("raw.githubusercontent.com", 443, 0, 0, 0))
