"""Anthropic's Messages API (POST /v1/messages, /v1/messages/count_tokens), through the official
`anthropic` client and raw HTTP, on a real worker with the tiny models (exact replies: see
testing/tiny_models.py).

This `anthropic` release no longer has sampling arguments on messages.create; the API still takes
them, so the tests send them as `extra_body`, as a client of that release would.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import anthropic
import pytest
import requests

from testing.apps import make_app
from testing.servers import ServerProcess, running_worker
from testing.tiny_models import TINY_CHAT_REPLY, tiny_settings

HI = [{"role": "user", "content": "Hi"}]
HI_PROMPT_TOKENS = 3 + len("user\nHi\nassistant\n")  # 3 special tokens, one token per byte
GREEDY = {"temperature": 0}
KEY = "anthropic-key"


@pytest.fixture
def client(tiny_worker: ServerProcess) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=tiny_worker.url, api_key="unused", max_retries=0)


def post(worker: ServerProcess, path: str = "/v1/messages", **body: object) -> requests.Response:
    return requests.post(worker.url + path, json={"messages": HI, "max_tokens": 100, **GREEDY, **body}, timeout=30)


def sse_events(response: requests.Response) -> list[dict]:
    """The data of each event; asserts Anthropic's framing: `event: <type>` naming the data's type."""
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events = []
    for block in response.text.split("\n\n"):
        if block:
            name, data = block.split("\n")
            payload = json.loads(data.removeprefix("data: "))
            assert name == f"event: {payload['type']}", block
            events.append(payload)
    return events


def assert_anthropic_error(response: requests.Response, status: int, kind: str, mentions: str = "") -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body == {"type": "error", "error": {"type": kind, "message": body["error"]["message"]}}
    assert mentions in body["error"]["message"] and "Traceback" not in response.text


# -- success shapes


def test_a_message_with_the_official_client(client: anthropic.Anthropic) -> None:
    message = client.messages.create(model="tiny-chat", max_tokens=100, messages=HI, extra_body=GREEDY)
    assert message.id.startswith("msg_") and message.type == "message" and message.role == "assistant"
    assert message.model == "tiny-chat"
    assert [(block.type, block.text) for block in message.content] == [("text", TINY_CHAT_REPLY)]
    assert (message.stop_reason, message.stop_sequence) == ("end_turn", None)
    assert (message.usage.input_tokens, message.usage.output_tokens) == (HI_PROMPT_TOKENS, 26)


def test_the_message_object_field_by_field(tiny_worker: ServerProcess) -> None:
    body = post(tiny_worker).json()
    assert body == {"id": body["id"], "type": "message", "role": "assistant", "model": "tiny-chat",
                    "content": [{"type": "text", "text": TINY_CHAT_REPLY}], "stop_reason": "end_turn", "stop_sequence": None,
                    "usage": {"input_tokens": HI_PROMPT_TOKENS, "output_tokens": 26, "cache_creation_input_tokens": 0,
                              "cache_read_input_tokens": 0}}


def test_system_and_text_blocks_go_through_the_chat_template(client: anthropic.Anthropic) -> None:
    message = client.messages.create(model="tiny-chat", max_tokens=100, extra_body=GREEDY,
                                     system=[{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}],
                                     messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"},
                                               {"role": "user", "content": [{"type": "text", "text": "Hel"},
                                                                            {"type": "text", "text": "lo"}]}])
    assert message.content[0].type == "text" and message.content[0].text == TINY_CHAT_REPLY
    prompt = "system\nBe brief.\nuser\nHi\nassistant\nHey\nuser\nHello\nassistant\n"
    assert message.usage.input_tokens == 2 * 4 + 1 + len(prompt)  # <|im_start|>, <|im_end|> per message


def test_max_tokens_is_the_stop_reason_when_it_cuts_the_reply(client: anthropic.Anthropic) -> None:
    message = client.messages.create(model="tiny-chat", max_tokens=4, messages=HI, extra_body=GREEDY)
    assert message.content[0].type == "text" and message.content[0].text == "abcd"
    assert (message.stop_reason, message.usage.output_tokens) == ("max_tokens", 4)


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_a_stop_sequence_cuts_the_reply_and_is_reported(client: anthropic.Anthropic, stream: bool) -> None:
    arguments = {"model": "tiny-chat", "max_tokens": 100, "messages": HI, "stop_sequences": ["xyz", "klm"],
                 "extra_body": GREEDY}
    if stream:
        with client.messages.stream(**arguments) as events:  # type: ignore[arg-type]
            text = "".join(events.text_stream)
            message = events.get_final_message()
        assert text == "abcdefghij"
    else:
        message = client.messages.create(**arguments)  # type: ignore[call-overload]
    assert message.content[0].type == "text" and message.content[0].text == "abcdefghij"
    assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", "klm")


def test_a_stream_with_the_official_client_helper(client: anthropic.Anthropic) -> None:
    with client.messages.stream(model="tiny-chat", max_tokens=100, messages=HI, extra_body=GREEDY) as stream:
        text = "".join(stream.text_stream)
        message = stream.get_final_message()
    assert text == TINY_CHAT_REPLY and message.content[0].type == "text" and message.content[0].text == TINY_CHAT_REPLY
    assert message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (HI_PROMPT_TOKENS, 26)


def test_a_raw_stream_with_the_official_client(client: anthropic.Anthropic) -> None:
    events = list(client.messages.create(model="tiny-chat", max_tokens=3, messages=HI, stream=True, extra_body=GREEDY))
    assert [event.type for event in events] == ["message_start", "content_block_start", *["content_block_delta"] * 3,
                                                "content_block_stop", "message_delta", "message_stop"]
    start, block_start, *deltas, _stop, delta, _end = events
    assert start.type == "message_start" and start.message.usage.input_tokens == HI_PROMPT_TOKENS
    assert block_start.type == "content_block_start" and block_start.content_block.type == "text"
    assert [event.delta.text for event in deltas if event.type == "content_block_delta" and event.delta.type == "text_delta"] \
        == ["a", "b", "c"]
    assert delta.type == "message_delta" and delta.delta.stop_reason == "max_tokens" and delta.usage.output_tokens == 3


def test_the_stream_wire_format_event_by_event(tiny_worker: ServerProcess) -> None:
    events = sse_events(post(tiny_worker, stream=True, max_tokens=2))
    start, block_start, ping, *deltas, block_stop, delta, stop = events
    message = start["message"]
    assert message == {"id": message["id"], "type": "message", "role": "assistant", "model": "tiny-chat", "content": [],
                       "stop_reason": None, "stop_sequence": None,
                       "usage": {"input_tokens": HI_PROMPT_TOKENS, "output_tokens": 0, "cache_creation_input_tokens": 0,
                                 "cache_read_input_tokens": 0}}
    assert message["id"].startswith("msg_")
    assert block_start == {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
    assert ping == {"type": "ping"}
    assert deltas == [{"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}
                      for text in "ab"]
    assert block_stop == {"type": "content_block_stop", "index": 0}
    assert delta == {"type": "message_delta", "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
                     "usage": {"input_tokens": HI_PROMPT_TOKENS, "output_tokens": 2}}
    assert stop == {"type": "message_stop"}


def test_count_tokens_is_what_a_message_reports_as_input(client: anthropic.Anthropic) -> None:
    conversation = {"system": "Be brief.", "messages": [{"role": "user", "content": "Hi"},
                                                        {"role": "assistant", "content": "Hey"},
                                                        {"role": "user", "content": [{"type": "text", "text": "Hello"}]}]}
    counted = client.messages.count_tokens(model="tiny-chat", **conversation)  # type: ignore[arg-type]
    message = client.messages.create(model="tiny-chat", max_tokens=5, extra_body=GREEDY, **conversation)  # type: ignore[arg-type]
    assert counted.input_tokens == message.usage.input_tokens == 2 * 4 + 1 + len(
        "system\nBe brief.\nuser\nHi\nassistant\nHey\nuser\nHello\nassistant\n")


# -- errors: Anthropic's shape, with its type for each status


@pytest.mark.parametrize(("path", "body", "mentions"), [
    ("/v1/messages", {"max_tokens": None}, "'max_tokens' is required"),
    ("/v1/messages", {"max_tokens": 0}, "'max_tokens' must be at least 1"),
    ("/v1/messages", {"messages": []}, "'messages' must have at least 1 item"),
    ("/v1/messages", {"messages": [{"role": "system", "content": "x"}]}, "'messages[0].role'"),
    ("/v1/messages", {"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
     "'messages[0].content' must be a string or an array of text blocks"),
    ("/v1/messages", {"messages": [*HI, {"role": "assistant", "content": "The answer is"}]},
     "'messages[1].role': the conversation must end with a user message"),
    ("/v1/messages", {"system": 5}, "'system'"),
    ("/v1/messages", {"temperature": 2.5}, "'temperature' must be between 0 and 2"),
    ("/v1/messages", {"top_k": -1}, "'top_k'"),
    ("/v1/messages", {"stop_sequences": "x"}, "'stop_sequences' must be an array"),
    ("/v1/messages", {"tools": [{"name": "f", "input_schema": {}}]}, "'tools': tool use is not supported"),
    ("/v1/messages", {"tool_choice": {"type": "any"}}, "'tool_choice'"),
    ("/v1/messages", {"thinking": {"type": "enabled", "budget_tokens": 1024}}, "'thinking'"),
    ("/v1/messages", {"output_config": {"format": {"type": "json_schema", "schema": {}}}}, "'output_config.format'"),
    ("/v1/messages", {"messages": [{"role": "user", "content": "x" * 600}]}, "context window"),
    ("/v1/messages/count_tokens", {"messages": None}, "'messages' is required"),
    ("/v1/messages/count_tokens", {"tools": [{"name": "f", "input_schema": {}}]}, "'tools'"),
    ("/v1/messages/count_tokens", {"messages": [{"role": "user", "content": "x" * 600}]}, "context window"),
])
def test_bad_input_is_an_invalid_request_error(tiny_worker: ServerProcess, path: str, body: dict, mentions: str) -> None:
    assert_anthropic_error(post(tiny_worker, path, **body), 400, "invalid_request_error", mentions)


def test_the_official_client_raises_its_bad_request_error(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.BadRequestError) as raised:
        client.messages.create(model="tiny-chat", max_tokens=5, messages=HI, extra_body={"tools": [{"name": "f"}]})
    assert raised.value.body == {"type": "error", "error": {"type": "invalid_request_error",
                                                            "message": "'tools': tool use is not supported by this server"}}


def test_an_unknown_model_is_a_not_found_error(client: anthropic.Anthropic, tiny_worker: ServerProcess) -> None:
    with pytest.raises(anthropic.NotFoundError) as raised:
        client.messages.create(model="claude-sonnet-4-5", max_tokens=5, messages=HI)
    assert "tiny-chat" in raised.value.message
    assert_anthropic_error(post(tiny_worker, "/v1/messages/count_tokens", model="nope"), 404, "not_found_error", "tiny-chat")


def test_errors_of_routes_and_methods_under_v1_messages_are_anthropic_errors(tiny_worker: ServerProcess) -> None:
    assert_anthropic_error(requests.post(tiny_worker.url + "/v1/messages/batches", json={}, timeout=10), 404,
                           "not_found_error")
    assert_anthropic_error(requests.get(tiny_worker.url + "/v1/messages", timeout=10), 405, "invalid_request_error")
    assert_anthropic_error(requests.post(tiny_worker.url + "/v1/messages", data=b"{", timeout=10), 400,
                           "invalid_request_error", "not valid JSON")
    assert "type" not in requests.get(tiny_worker.url + "/v1/nope", timeout=10).json(), "other paths keep OpenAI's shape"


def test_access_size_and_loading_errors_are_anthropic_errors(tmp_path: Path) -> None:
    """403 from a client not authorized, 413 for a body too large, 503 (overloaded) while the model loads
    (this app's models are never loaded); both routes."""
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        body = {"messages": HI, "max_tokens": 5}
        for client, status, kind, payload in [
            (make_app(tmp_path, AUTHORIZED_URLS="10.9.9.9").test_client(), 403, "permission_error", body),
            (make_app(tmp_path, MAX_REQUEST_BYTES=1024).test_client(), 413, "request_too_large",
             {**body, "system": "x" * 2000}),
            (make_app(tmp_path).test_client(), 503, "overloaded_error", body),
        ]:
            response = client.post(path, json=payload)
            assert response.status_code == status, (path, response.get_json())
            assert response.get_json()["type"] == "error" and response.get_json()["error"]["type"] == kind
        assert response.headers["Retry-After"] == "1"


@pytest.fixture(scope="module")
def keyed_worker(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_worker(tiny_model_dir, tmp_path_factory.mktemp("keyed"), **tiny_settings(API_KEY=KEY)) as worker:
        yield worker


def test_the_key_comes_as_x_api_key_as_the_official_client_sends_it(keyed_worker: ServerProcess) -> None:
    good = anthropic.Anthropic(base_url=keyed_worker.url, api_key=KEY, max_retries=0)
    message = good.messages.create(model="tiny-chat", max_tokens=100, messages=HI, extra_body=GREEDY)
    assert message.content[0].type == "text" and message.content[0].text == TINY_CHAT_REPLY
    assert good.messages.count_tokens(model="tiny-chat", messages=HI).input_tokens == HI_PROMPT_TOKENS  # type: ignore[arg-type]
    wrong = anthropic.Anthropic(base_url=keyed_worker.url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as raised:
        wrong.messages.create(model="tiny-chat", max_tokens=5, messages=HI)
    assert raised.value.status_code == 401
    assert isinstance(raised.value.body, dict) and raised.value.body["error"]["type"] == "authentication_error"
