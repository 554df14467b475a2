"""Loopback stand-ins for the network: a catalog and model server, and a proxy that records any use."""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ConnectionRecorder:
    """A TCP listener that counts connections (an HTTP proxy nobody should use) and closes them."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            connection.close()

    def close(self) -> None:
        self.sock.close()




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




@dataclass
class ServedFile:
    body: bytes
    mode: str = "ok"
    """ok | truncate (Content-Length says more than is sent) | slow (stalls mid-way) | drip (slow but steady)"""
