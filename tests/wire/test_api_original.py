"""The original contract, POST /gpt4all_api {prompt, persona}, against a real worker process."""

from __future__ import annotations

import requests

from testing.assertions import assert_json_error
from testing.servers import ServerProcess
from testing.tiny_models import TINY_CHAT_REPLY


def post(worker: ServerProcess, body: object, **kwargs: object) -> requests.Response:
    return requests.post(worker.url + "/gpt4all_api", json=body, timeout=30, **kwargs)


def test_reply_is_the_text_itself(tiny_worker: ServerProcess) -> None:
    response = post(tiny_worker, {"prompt": "Hello", "persona": "You are terse.", "temp": 0})
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert response.text == TINY_CHAT_REPLY


def test_json_reply_carries_model_usage_and_timings(tiny_worker: ServerProcess) -> None:
    response = post(tiny_worker, {"prompt": "Hello", "temp": 0}, headers={"Accept": "application/json"})
    assert response.status_code == 200
    body = response.json()
    assert body["reply"] == TINY_CHAT_REPLY
    assert body["model"] == "tiny-chat.gguf"
    assert body["finish_reason"] == "stop"
    # ChatML: <|im_start|> "user\nHello" <|im_end|> "\n" <|im_start|> "assistant\n": 3 special tokens
    # and one token per byte of the 21 bytes of text (the tiny model has no merges)
    assert body["usage"] == {"prompt_tokens": 3 + 21, "completion_tokens": 26, "total_tokens": 3 + 21 + 26}
    assert body["timings"]["total_seconds"] > 0


def test_max_tokens_and_assist_are_honoured(tiny_worker: ServerProcess) -> None:
    body = {"prompt": "Hello", "assist": "an earlier answer", "temp": 0, "max_tokens": 5}
    response = post(tiny_worker, body, headers={"Accept": "application/json"})
    assert response.json()["reply"] == TINY_CHAT_REPLY[:5]
    assert response.json()["finish_reason"] == "length"


def test_streamed_reply(tiny_worker: ServerProcess) -> None:
    with requests.post(tiny_worker.url + "/gpt4all_api", json={"prompt": "Hi", "temp": 0, "stream": True},
                       stream=True, timeout=30) as response:
        assert response.status_code == 200
        pieces = [chunk.decode() for chunk in response.iter_content(chunk_size=None) if chunk]
    assert "".join(pieces) == TINY_CHAT_REPLY
    assert len(pieces) > 1


def test_missing_prompt(tiny_worker: ServerProcess) -> None:
    assert_json_error(post(tiny_worker, {"persona": "x"}), 400, "'prompt' is required")


def test_empty_prompt(tiny_worker: ServerProcess) -> None:
    assert_json_error(post(tiny_worker, {"prompt": "   "}), 400, "'prompt' must not be empty")


def test_wrong_types_name_the_field(tiny_worker: ServerProcess) -> None:
    assert_json_error(post(tiny_worker, {"prompt": 42}), 400, "'prompt' must be a string")
    assert_json_error(post(tiny_worker, {"prompt": "x", "persona": ["a"]}), 400, "'persona' must be a string")
    assert_json_error(post(tiny_worker, {"prompt": "x", "temp": "hot"}), 400, "'temp' must be a number")
    assert_json_error(post(tiny_worker, {"prompt": "x", "temp": 9}), 400, "'temp' must be between 0 and 2")
    assert_json_error(post(tiny_worker, {"prompt": "x", "max_tokens": 0}), 400, "'max_tokens' must be at least 1")
    assert_json_error(post(tiny_worker, {"prompt": "x", "stream": "yes"}), 400, "'stream' must be a boolean")


def test_malformed_bodies(tiny_worker: ServerProcess) -> None:
    url = tiny_worker.url + "/gpt4all_api"
    headers = {"Content-Type": "application/json"}
    assert_json_error(requests.post(url, data="{not json", headers=headers, timeout=10), 400, "not valid JSON")
    assert_json_error(requests.post(url, data="[1, 2]", headers=headers, timeout=10), 400, "must be a JSON object")
    assert_json_error(requests.post(url, data="", headers=headers, timeout=10), 400, "body is empty")
    assert_json_error(requests.post(url, data=b"\xff\xfe", headers=headers, timeout=10), 400, "not valid JSON")


def test_get_on_the_route_is_a_json_405(tiny_worker: ServerProcess) -> None:
    assert_json_error(requests.get(tiny_worker.url + "/gpt4all_api", timeout=10), 405, "GET is not allowed")
