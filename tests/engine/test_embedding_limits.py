"""Long embedding requests under the real supervisor, on the tiny embedding model.

Embedding work reports progress like token generation does, so a long request (hundreds of
inputs) is not taken for a hung worker; over its time limit the client gets a 504, and a stall
(one input too long to embed within STALL_TIMEOUT) is a 504 too: never an empty reply.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable

import requests

from testing.servers import Service

STALL = 1.0
HANG_MARGIN = 1.0  # supervisor.arbiter.Timing.hang_margin: how much later than the worker the supervisor acts
MANY_INPUTS = [f"{index:04d} " + "lorem ipsum dolor sit amet " * 37 for index in range(500)]  # 500 x ~1 KB


def embed(service: Service, texts: list[str], timeout: float = 180) -> requests.Response:
    return requests.post(service.url + "/v1/embeddings", json={"input": texts}, timeout=timeout)


def test_a_long_embedding_request_reports_progress_and_is_answered(start_service: Callable[..., Service]) -> None:
    service = start_service(RESTART_AFTER_REQUESTS=0, STALL_TIMEOUT=STALL, REQUEST_TIMEOUT=150)
    started = time.monotonic()
    response = embed(service, MANY_INPUTS)
    elapsed = time.monotonic() - started
    assert response.status_code == 200, response.text
    assert elapsed > STALL + HANG_MARGIN, f"only {elapsed:.1f} s: too short to tell progress from a stall"
    assert "seems hung" not in service.log()
    pid = int(response.headers["X-Worker-Pid"])
    assert pid in {worker.pid for worker in service.workers()}, "the worker serves on (RESTART_AFTER_REQUESTS=0)"
    data = response.json()["data"]
    assert [item["index"] for item in data] == list(range(len(MANY_INPUTS)))
    for index in (0, 257, len(MANY_INPUTS) - 1):  # the inputs went to gpt4all in groups: each keeps its place
        alone = embed(service, [MANY_INPUTS[index]], timeout=10).json()["data"][0]["embedding"]
        assert max(abs(a - b) for a, b in zip(alone, data[index]["embedding"], strict=True)) < 1e-3


def test_an_embedding_request_over_request_timeout_gets_a_504_and_its_worker_is_recycled(
        start_service: Callable[..., Service]) -> None:
    service = start_service(RESTART_AFTER_REQUESTS=0, REQUEST_TIMEOUT=1.5, STALL_TIMEOUT=1.5)
    response = embed(service, MANY_INPUTS)
    assert response.status_code == 504, response.text
    assert response.json()["error"]["code"] == "timeout"
    assert "REQUEST_TIMEOUT" in response.json()["error"]["message"]
    pid = int(response.headers["X-Worker-Pid"])
    recycled = re.compile(rf"\(pid {pid}\) exited after serving 0 request\(s\): "
                          r"(a generation ran past REQUEST_TIMEOUT|an inference request ended with 504)")
    service.wait_for(lambda: recycled.search(service.log()), 10, "the timed-out worker to be recycled")
    assert "seems hung" not in service.log(), "the worker stopped the embedding itself: no kill needed"
    after = embed(service, ["hello"], timeout=10)
    assert after.status_code == 200 and after.headers["X-Worker-Pid"] != str(pid)


def test_one_input_too_long_to_embed_within_the_stall_limit_is_a_504_not_an_empty_reply(
        start_service: Callable[..., Service]) -> None:
    service = start_service(RESTART_AFTER_REQUESTS=0, STALL_TIMEOUT=STALL)
    response = embed(service, ["".join(MANY_INPUTS)])  # one call into gpt4all, no progress until it returns
    assert response.status_code == 504, response.text
    assert "STALL_TIMEOUT" in response.json()["error"]["message"]
    assert embed(service, ["hello"], timeout=10).status_code == 200
