"""OpenAI's Responses API (POST /v1/responses), through the official `openai` client and raw HTTP,
on a real worker with the tiny models (exact replies: see testing/tiny_models.py)."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest
import requests

from testing.apps import make_app
from testing.servers import ServerProcess
from testing.tiny_models import TINY_CHAT_REPLY

HI_PROMPT_TOKENS = 3 + len("user\nHi\nassistant\n")  # 3 special tokens, one token per byte
STREAM_EVENTS = ["response.created", "response.in_progress", "response.output_item.added", "response.content_part.added",
                 *["response.output_text.delta"] * 3, "response.output_text.done", "response.content_part.done",
                 "response.output_item.done"]


@pytest.fixture
def client(tiny_worker: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=tiny_worker.url + "/v1", api_key="unused", max_retries=0)


def post(worker: ServerProcess, **body: object) -> requests.Response:
    return requests.post(worker.url + "/v1/responses", json={"input": "Hi", "temperature": 0, **body}, timeout=30)


def sse_events(response: requests.Response) -> list[tuple[str, dict]]:
    """(event name, data) of each event; asserts OpenAI's framing: the name repeats the data's type."""
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events = []
    for block in response.text.split("\n\n"):
        if block:
            name, data = block.split("\n")
            assert name.startswith("event: ") and data.startswith("data: "), block
            payload = json.loads(data.removeprefix("data: "))
            assert payload["type"] == name.removeprefix("event: ")
            events.append((payload["type"], payload))
    return events


# -- success shapes


def test_a_string_input_with_the_official_client(client: openai.OpenAI) -> None:
    response = client.responses.create(model="tiny-chat", input="Hi", temperature=0)
    assert response.output_text == TINY_CHAT_REPLY
    assert response.id.startswith("resp_") and response.object == "response" and response.status == "completed"
    assert response.model == "tiny-chat" and response.error is None and response.incomplete_details is None
    [message] = response.output
    assert message.type == "message" and message.role == "assistant" and message.status == "completed"
    assert message.id.startswith("msg_") and [part.type for part in message.content] == ["output_text"]
    assert response.usage is not None
    assert (response.usage.input_tokens, response.usage.output_tokens, response.usage.total_tokens) == \
        (HI_PROMPT_TOKENS, 26, HI_PROMPT_TOKENS + 26)
    assert response.store is False and response.tools == []


def test_the_response_object_field_by_field(tiny_worker: ServerProcess) -> None:
    body = post(tiny_worker, instructions="Be brief.", max_output_tokens=50, metadata={"k": "v"}).json()
    assert set(body) >= {"id", "object", "created_at", "status", "error", "incomplete_details", "instructions",
                         "max_output_tokens", "model", "output", "parallel_tool_calls", "previous_response_id", "store",
                         "temperature", "top_p", "text", "tool_choice", "tools", "truncation", "usage", "metadata"}
    assert isinstance(body["created_at"], int)
    assert (body["instructions"], body["max_output_tokens"], body["metadata"]) == ("Be brief.", 50, {"k": "v"})
    assert (body["temperature"], body["top_p"], body["text"]) == (0, 1, {"format": {"type": "text"}})
    assert body["output"][0]["content"] == [{"type": "output_text", "text": TINY_CHAT_REPLY, "annotations": [],
                                             "logprobs": []}]
    assert body["usage"]["input_tokens_details"] == {"cached_tokens": 0}
    assert body["usage"]["output_tokens_details"] == {"reasoning_tokens": 0}


def test_instructions_and_message_items_go_through_the_chat_template(client: openai.OpenAI) -> None:
    response = client.responses.create(model="tiny-chat", temperature=0, instructions="Be brief.", input=[
        {"role": "developer", "content": "Rules."},
        {"role": "user", "content": "Hi"},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Hey"}]},
        {"role": "user", "content": [{"type": "input_text", "text": "Hel"}, {"type": "input_text", "text": "lo"}]},
    ])
    assert response.output_text == TINY_CHAT_REPLY
    prompt = "system\nBe brief.\nsystem\nRules.\nuser\nHi\nassistant\nHey\nuser\nHello\nassistant\n"
    assert response.usage is not None and response.usage.input_tokens == 2 * 5 + 1 + len(prompt)  # <|im_start|>, <|im_end|> each


def test_max_output_tokens_makes_an_incomplete_response(client: openai.OpenAI) -> None:
    response = client.responses.create(model="tiny-chat", input="Hi", temperature=0, max_output_tokens=4)
    assert response.output_text == "abcd"
    assert response.status == "incomplete" and response.output[0].status == "incomplete"
    assert response.incomplete_details is not None and response.incomplete_details.reason == "max_output_tokens"


def test_a_stream_with_the_official_client(client: openai.OpenAI) -> None:
    events = list(client.responses.create(model="tiny-chat", input="Hi", temperature=0, stream=True))
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert events[0].type == "response.created" and events[0].response.status == "in_progress"
    assert events[-1].type == "response.completed"
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert "".join(deltas) == TINY_CHAT_REPLY and len(deltas) == 26
    assert events[-1].response.output_text == TINY_CHAT_REPLY
    assert events[-1].response.usage is not None and events[-1].response.usage.output_tokens == 26


def test_the_stream_helper_of_the_official_client_assembles_the_response(client: openai.OpenAI) -> None:
    with client.responses.stream(model="tiny-chat", input="Hi", temperature=0) as stream:
        texts = [event.delta for event in stream if event.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(texts) == TINY_CHAT_REPLY and final.output_text == TINY_CHAT_REPLY


def test_the_stream_wire_format_event_by_event(tiny_worker: ServerProcess) -> None:
    events = sse_events(post(tiny_worker, stream=True, max_output_tokens=3))
    assert [kind for kind, _ in events] == [*STREAM_EVENTS, "response.incomplete"]
    assert [data["sequence_number"] for _, data in events] == list(range(len(events)))
    created, in_progress, item_added, part_added, *deltas, text_done, part_done, item_done, incomplete = \
        [data for _, data in events]
    response_id, item_id = created["response"]["id"], item_added["item"]["id"]
    assert created["response"]["output"] == [] and created["response"]["usage"] is None
    assert in_progress["response"]["id"] == response_id == incomplete["response"]["id"]
    assert item_added["item"] == {"type": "message", "id": item_id, "status": "in_progress", "role": "assistant",
                                  "content": []}
    where = {"item_id": item_id, "output_index": 0, "content_index": 0}
    assert part_added == {"type": "response.content_part.added", "sequence_number": 3, **where,
                          "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}}
    assert [delta["delta"] for delta in deltas] == ["a", "b", "c"]
    assert all({**where, "logprobs": []}.items() <= delta.items() for delta in deltas)
    assert text_done == {"type": "response.output_text.done", "sequence_number": 7, **where, "text": "abc", "logprobs": []}
    assert part_done["part"]["text"] == "abc" and item_done["item"]["status"] == "incomplete"
    assert incomplete["response"]["output"] == [item_done["item"]]
    assert incomplete["response"]["usage"]["output_tokens"] == 3


# -- errors: OpenAI's error object, the field named


@pytest.mark.parametrize(("field", "value"), [
    ("store", True), ("previous_response_id", "resp_123"), ("conversation", "conv_123"),
    ("prompt", {"id": "pmpt_123"}), ("background", True), ("tools", [{"type": "web_search"}]),
    ("tool_choice", "required"), ("top_logprobs", 2),
])
def test_what_a_stateless_server_without_tools_cannot_do_is_refused(client: openai.OpenAI, field: str,
                                                                    value: object) -> None:
    with pytest.raises(openai.BadRequestError) as raised:
        client.responses.create(model="tiny-chat", input="Hi", extra_body={field: value})
    assert raised.value.status_code == 400 and raised.value.param == field
    assert field in raised.value.message


@pytest.mark.parametrize(("body", "param", "mentions"), [
    ({"input": None}, "input", "'input' is required"),
    ({"input": []}, "input", "non-empty array of message items"),
    ({"input": [{"type": "function_call_output", "call_id": "c", "output": "x"}]}, "input", "other item types"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input", "message items"),
    ({"temperature": 2.5}, "temperature", "between 0 and 2"),
    ({"top_p": 0}, "top_p", "greater than 0"),
    ({"max_output_tokens": 0}, "max_output_tokens", "at least 1"),
    ({"text": {"format": {"type": "json_schema", "schema": {}}}}, "text.format", "text"),
])
def test_bad_input_is_a_400_naming_the_field(tiny_worker: ServerProcess, body: dict, param: str, mentions: str) -> None:
    response = post(tiny_worker, **body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param) and mentions in error["message"]


def test_an_unknown_model_is_a_404_naming_the_installed_ones(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as raised:
        client.responses.create(model="gpt-5", input="Hi")
    assert raised.value.code == "model_not_found" and "tiny-chat" in raised.value.message


def test_a_prompt_longer_than_the_context_is_a_400_naming_input(tiny_worker: ServerProcess) -> None:
    error = post(tiny_worker, input="x" * 600).json()["error"]
    assert (error["code"], error["param"]) == ("context_length_exceeded", "input")


def test_access_and_loading_errors_are_openai_errors(tmp_path: Path) -> None:
    """401 without the key, 403 from a client not authorized, 413 for a body too large, 503 while the model
    loads (this app's models are never loaded), 405 for a wrong method."""
    keyed = make_app(tmp_path, API_KEY="k").test_client()
    assert keyed.post("/v1/responses", json={"input": "Hi"}).status_code == 401
    assert keyed.post("/v1/responses", json={"input": "Hi"}, headers={"Authorization": "Bearer k"}).status_code == 503
    cases = [(make_app(tmp_path, AUTHORIZED_URLS="10.9.9.9").test_client().post("/v1/responses", json={"input": "Hi"}), 403),
             (make_app(tmp_path, MAX_REQUEST_BYTES=1024).test_client().post("/v1/responses", json={"input": "x" * 2000}), 413),
             (make_app(tmp_path).test_client().get("/v1/responses"), 405)]
    for response, status in cases:
        assert response.status_code == status
        assert set(response.get_json()["error"]) == {"message", "type", "param", "code"}
