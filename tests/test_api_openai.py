"""The OpenAI-compatible routes, checked with raw HTTP (exact wire shapes) and the official client."""

from __future__ import annotations

import base64
import json
import struct

import openai
import pytest
import requests

from api.gguf_file import file_fingerprint
from testing.assertions import assert_json_error
from testing.servers import ServerProcess
from testing.tiny_models import TINY_CHAT, TINY_CHAT_REPLY

USER_HI = [{"role": "user", "content": "Hi"}]


def chat(worker: ServerProcess, **body: object) -> requests.Response:
    return requests.post(worker.url + "/v1/chat/completions", json={"messages": USER_HI, "temperature": 0, **body},
                         timeout=30)


def sse_events(response: requests.Response) -> list[str]:
    """The data payloads of an SSE stream, in order; asserts the framing."""
    assert response.headers["Content-Type"].startswith("text/event-stream")
    assert response.headers["X-Accel-Buffering"] == "no"
    events = []
    for block in response.text.split("\n\n"):
        if block:
            assert block.startswith("data: "), block
            events.append(block[len("data: "):])
    return events


@pytest.fixture
def client(tiny_worker: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=tiny_worker.url + "/v1", api_key="unused", max_retries=0)


# -- chat completions


def test_chat_completion_shape(tiny_worker: ServerProcess) -> None:
    response = chat(tiny_worker)
    assert response.status_code == 200
    body = response.json()
    assert body["id"].startswith("chatcmpl-")
    assert body["object"] == "chat.completion"
    assert body["model"] == "tiny-chat"
    assert isinstance(body["created"], int)
    assert body["choices"] == [{"index": 0, "message": {"role": "assistant", "content": TINY_CHAT_REPLY, "refusal": None},
                                "logprobs": None, "finish_reason": "stop"}]
    prompt_tokens = 3 + len("user\nHi\nassistant\n")  # 3 special tokens, one token per byte
    assert body["usage"] == {"prompt_tokens": prompt_tokens, "completion_tokens": 26,
                             "total_tokens": prompt_tokens + 26}


def test_chat_with_official_client(client: openai.OpenAI) -> None:
    completion = client.chat.completions.create(model="tiny-chat", messages=USER_HI, temperature=0, max_tokens=4)
    assert completion.choices[0].message.content == "abcd"
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 4


def test_chat_stream_with_official_client(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model="tiny-chat", messages=USER_HI, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == TINY_CHAT_REPLY
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 26


def test_chat_stream_wire_format_chunk_by_chunk(tiny_worker: ServerProcess) -> None:
    response = chat(tiny_worker, stream=True, stream_options={"include_usage": True}, max_tokens=3)
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert len({chunk["id"] for chunk in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert all(chunk["object"] == "chat.completion.chunk" for chunk in chunks)
    first, *content, finish, usage = chunks
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [chunk["choices"][0]["delta"] for chunk in content] == [{"content": "a"}, {"content": "b"}, {"content": "c"}]
    assert all(chunk["choices"][0]["finish_reason"] is None for chunk in [first, *content])
    assert finish["choices"][0]["delta"] == {} and finish["choices"][0]["finish_reason"] == "length"
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == 3
    assert all(chunk["usage"] is None for chunk in [first, *content, finish])


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_a_stream_of_several_choices_streams_them_all(tiny_worker: ServerProcess, route: str) -> None:
    """The second choice starts once the view has returned (while the stream is sent): it broke the
    stream mid-way (an internal error outside the app context), which a fuzzer found."""
    body = {"messages": USER_HI} if route.endswith("chat/completions") else {"prompt": "Hi"}
    response = requests.post(tiny_worker.url + route, json={**body, "temperature": 0, "max_tokens": 2, "n": 3,
                                                            "stream": True, "stream_options": {"include_usage": True}},
                             timeout=30)
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert "error" not in chunks[-1], chunks[-1]
    finished = [chunk["choices"][0] for chunk in chunks if chunk["choices"] and chunk["choices"][0]["finish_reason"]]
    assert [choice["index"] for choice in finished] == [0, 1, 2]
    assert chunks[-1]["usage"]["completion_tokens"] == 6


def test_a_max_tokens_past_the_int32_range_means_no_limit(tiny_worker: ServerProcess) -> None:
    """The document allows any max_tokens from 1 up; llama.cpp's n_predict is an int32, and ctypes
    wrapped 2**31 to a negative number: the reply ended after one token."""
    response = requests.post(tiny_worker.url + "/v1/completions", timeout=30,
                             json={"prompt": "a", "temperature": 0, "max_tokens": 2**31})
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert (choice["text"], choice["finish_reason"]) == ("bcdefghijklmnopqrstuvwxyz", "stop")


def test_stream_without_usage_has_no_usage_chunk(tiny_worker: ServerProcess) -> None:
    chunks = [json.loads(event) for event in sse_events(chat(tiny_worker, stream=True))[:-1]]
    assert "usage" not in chunks[-1] and chunks[-1]["choices"][0]["finish_reason"] == "stop"


@pytest.mark.parametrize("stream", [False, True])
def test_stop_strings_cut_without_leaking(tiny_worker: ServerProcess, stream: bool) -> None:
    response = chat(tiny_worker, stop=["xyz", "klm"], stream=stream)
    if stream:
        chunks = [json.loads(event) for event in sse_events(response)[:-1]]
        text = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks)
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    else:
        text = response.json()["choices"][0]["message"]["content"]
    assert text == "abcdefghij"


def test_stop_as_a_single_string(tiny_worker: ServerProcess) -> None:
    assert chat(tiny_worker, stop="d").json()["choices"][0]["message"]["content"] == "abc"


def test_content_parts_and_system_roles(tiny_worker: ServerProcess) -> None:
    messages = [{"role": "developer", "content": "Be brief."},
                {"role": "user", "content": [{"type": "text", "text": "Hel"}, {"type": "text", "text": "lo"}]}]
    body = chat(tiny_worker, messages=messages).json()
    assert body["choices"][0]["message"]["content"] == TINY_CHAT_REPLY
    expected_prompt = "system\nBe brief.\nuser\nHello\nassistant\n"
    assert body["usage"]["prompt_tokens"] == 5 + len(expected_prompt)


def test_n_gives_several_choices(tiny_worker: ServerProcess) -> None:
    body = chat(tiny_worker, n=2, max_tokens=2).json()
    assert [choice["index"] for choice in body["choices"]] == [0, 1]
    assert all(choice["message"]["content"] == "ab" for choice in body["choices"])
    assert body["usage"]["completion_tokens"] == 4


def test_sampling_parameters_are_accepted(tiny_worker: ServerProcess) -> None:
    response = chat(tiny_worker, temperature=0.5, top_p=0.9, top_k=5, min_p=0.05, seed=7, presence_penalty=0.5,
                    max_completion_tokens=8, frequency_penalty=0, user="someone")
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] <= 8


@pytest.mark.parametrize(("body", "param"), [
    ({"messages": []}, "messages"),
    ({"messages": "hi"}, "messages"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0].content"),
    ({"messages": USER_HI, "temperature": 3}, "temperature"),
    ({"messages": USER_HI, "top_p": 0}, "top_p"),
    ({"messages": USER_HI, "max_tokens": -1}, "max_tokens"),
    ({"messages": USER_HI, "frequency_penalty": 0.5}, "frequency_penalty"),
    ({"messages": USER_HI, "presence_penalty": -1}, "presence_penalty"),
    ({"messages": USER_HI, "stop": [1, 2]}, "stop"),
    ({"messages": USER_HI, "n": 0}, "n"),
    ({"messages": USER_HI, "stream": "yes"}, "stream"),
    ({"messages": USER_HI, "stream_options": {"include_usage": True}}, "stream_options"),
    ({"messages": USER_HI, "tools": [{"type": "function"}]}, "tools"),
    ({"messages": USER_HI, "logprobs": True}, "logprobs"),
    ({"messages": USER_HI, "model": 12}, "model"),
    ({}, "messages"),
])
def test_bad_chat_requests_are_400_naming_the_parameter(tiny_worker: ServerProcess, body: dict, param: str) -> None:
    response = requests.post(tiny_worker.url + "/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


def test_unknown_model_is_404_naming_the_available_ones(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        client.chat.completions.create(model="gpt-4", messages=USER_HI)
    error = caught.value.body
    assert isinstance(error, dict) and error["code"] == "model_not_found"
    assert "tiny-chat" in error["message"] and "tiny-embed" in error["message"]


def test_trailing_slash_routes(tiny_worker: ServerProcess) -> None:
    response = requests.post(tiny_worker.url + "/v1/chat/completions/", json={"messages": USER_HI, "temperature": 0},
                             timeout=30, allow_redirects=False)
    assert response.status_code == 200


# -- completions


def test_completion_shape_and_echo(tiny_worker: ServerProcess) -> None:
    response = requests.post(tiny_worker.url + "/v1/completions", timeout=30,
                             json={"prompt": "Say x", "temperature": 0, "echo": True, "max_tokens": 30})
    body = response.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["choices"] == [{"index": 0, "text": "Say x" + "yz", "logprobs": None, "finish_reason": "stop"}]
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}


def test_completion_with_official_client_streaming(client: openai.OpenAI) -> None:
    stream = client.completions.create(model="tiny-chat", prompt="w", temperature=0, stream=True)
    pieces = [chunk.choices[0].text for chunk in stream]
    assert "".join(pieces) == "xyz"
    assert len(pieces) >= 3


def test_completion_stream_ends_with_finish_and_done(tiny_worker: ServerProcess) -> None:
    response = requests.post(tiny_worker.url + "/v1/completions", timeout=30,
                             json={"prompt": "0", "temperature": 0, "stream": True, "max_tokens": 5})
    events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == "12345"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(("body", "param"), [
    ({}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": [1, 2, 3]}, "prompt"),
    ({"prompt": ["a", ""]}, "prompt"),
    ({"prompt": ["a"] * 33}, "prompt"),
    ({"prompt": ["a"] * 5, "n": 7}, "prompt"),
    ({"prompt": ["a"] * 9, "n": 3}, "prompt"),
    ({"prompt": ["a"] * 17, "n": 2}, "prompt"),
    ({"prompt": "x", "echo": "yes"}, "echo"),
    ({"prompt": "x", "suffix": "y"}, "suffix"),
])
def test_bad_completion_requests(tiny_worker: ServerProcess, body: dict, param: str) -> None:
    response = requests.post(tiny_worker.url + "/v1/completions", json=body, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == param


# -- models


def test_models_list_and_retrieve(client: openai.OpenAI, tiny_worker: ServerProcess) -> None:
    ids = sorted(model.id for model in client.models.list())
    assert ids == ["tiny-chat", "tiny-embed"]
    assert client.models.retrieve("tiny-chat").id == "tiny-chat"
    assert requests.get(tiny_worker.url + "/v1/models/tiny-chat.gguf", timeout=10).json()["id"] == "tiny-chat"
    missing = requests.get(tiny_worker.url + "/v1/models/nope", timeout=10)
    assert_json_error(missing, 404, "Available models: tiny-chat, tiny-embed")
    traversal = requests.get(tiny_worker.url + "/v1/models/..%2F..%2Fetc%2Fpasswd", timeout=10)
    assert traversal.status_code == 404


# -- embeddings


def test_embeddings_with_official_client_base64_default(client: openai.OpenAI) -> None:
    result = client.embeddings.create(model="tiny-embed", input=["hello world", "goodbye"])
    assert [item.index for item in result.data] == [0, 1]
    assert all(len(item.embedding) == 32 for item in result.data)
    assert result.data[0].embedding != result.data[1].embedding
    assert result.usage.prompt_tokens > 0 and result.usage.total_tokens == result.usage.prompt_tokens


def test_embeddings_float_and_base64_agree(tiny_worker: ServerProcess) -> None:
    url = tiny_worker.url + "/v1/embeddings"
    as_float = requests.post(url, json={"input": "same text"}, timeout=30).json()
    as_b64 = requests.post(url, json={"input": "same text", "encoding_format": "base64"}, timeout=30).json()
    vector = as_float["data"][0]["embedding"]
    decoded = struct.unpack(f"<{len(vector)}f", base64.b64decode(as_b64["data"][0]["embedding"]))
    assert decoded == pytest.approx(vector, rel=1e-6)
    assert as_float["object"] == "list" and as_float["data"][0]["object"] == "embedding"
    assert as_float["model"] == "tiny-embed"
    again = requests.post(url, json={"input": "same text"}, timeout=30).json()
    assert again["data"][0]["embedding"] == vector


@pytest.mark.parametrize(("body", "param"), [
    ({}, "input"), ({"input": ""}, "input"), ({"input": []}, "input"), ({"input": [[1, 2]]}, "input"),
    ({"input": "x", "encoding_format": "hex"}, "encoding_format"), ({"input": "x", "dimensions": 7}, "dimensions"),
])
def test_bad_embedding_requests(tiny_worker: ServerProcess, body: dict, param: str) -> None:
    response = requests.post(tiny_worker.url + "/v1/embeddings", json=body, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == param


def test_embedding_with_unknown_model_is_404(tiny_worker: ServerProcess) -> None:
    response = requests.post(tiny_worker.url + "/v1/embeddings", json={"input": "x", "model": "ada"}, timeout=30)
    assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"


# -- system_fingerprint


def test_system_fingerprint_names_the_loaded_model_file(tiny_worker: ServerProcess, tiny_model_dir) -> None:
    """Every reply and every chunk of chat and completions carries the loaded file's fingerprint (a
    string, as OpenAI's document types it), the same in every request to that file."""
    expected = file_fingerprint(tiny_model_dir / TINY_CHAT)
    assert expected.startswith("fp_") and len(expected) == 13
    replies = [chat(tiny_worker, max_tokens=2).json(),
               requests.post(tiny_worker.url + "/v1/completions", json={"prompt": "w", "max_tokens": 2}, timeout=30).json()]
    chunks = [json.loads(event) for event in sse_events(chat(tiny_worker, max_tokens=2, stream=True,
                                                             stream_options={"include_usage": True}))[:-1]]
    chunks += [json.loads(event) for event in sse_events(requests.post(
        tiny_worker.url + "/v1/completions", json={"prompt": "w", "stream": True, "stream_options": {"include_usage": True}},
        timeout=30))[:-1]]
    assert len(chunks) > 6 and chunks[-1]["choices"] == []  # the usage chunk is among them
    assert {payload["system_fingerprint"] for payload in replies + chunks} == {expected}


def test_system_fingerprint_through_the_official_client(client: openai.OpenAI, tiny_model_dir) -> None:
    completion = client.chat.completions.create(model="tiny-chat", messages=USER_HI, max_tokens=1)
    assert completion.system_fingerprint == file_fingerprint(tiny_model_dir / TINY_CHAT)


# -- a batch of prompts on /v1/completions


def test_a_list_of_prompts_answers_each_n_times_numbered_prompt_by_prompt(tiny_worker: ServerProcess) -> None:
    response = requests.post(tiny_worker.url + "/v1/completions", timeout=60,
                             json={"prompt": ["w", "0"], "n": 2, "temperature": 0, "max_tokens": 5, "echo": True})
    assert response.status_code == 200, response.text
    body = response.json()
    assert [(choice["index"], choice["text"], choice["finish_reason"]) for choice in body["choices"]] == [
        (0, "wxyz", "stop"), (1, "wxyz", "stop"), (2, "012345", "length"), (3, "012345", "length")]
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 3 + 3 + 5 + 5, "total_tokens": 20}


@pytest.mark.parametrize(("n", "prompts"), [(1, 32), (2, 16), (4, 8), (8, 4)])
def test_the_largest_batches_are_accepted(tiny_worker: ServerProcess, n: int, prompts: int) -> None:
    response = requests.post(tiny_worker.url + "/v1/completions", timeout=120,
                             json={"prompt": ["w"] * prompts, "n": n, "temperature": 0, "max_tokens": 1})
    assert response.status_code == 200, response.text
    assert [choice["index"] for choice in response.json()["choices"]] == list(range(prompts * n))


def test_a_streamed_batch_with_the_official_client(client: openai.OpenAI) -> None:
    """OpenAI's SDK sends the list as it is; the stream interleaves nothing: choice by choice, in order."""
    stream = client.completions.create(model="tiny-chat", prompt=["w", "0", "Say x"], temperature=0, max_tokens=5,
                                       stream=True, stream_options={"include_usage": True})
    texts: dict[int, str] = {}
    order: list[int] = []
    usage = None
    for chunk in stream:
        usage = chunk.usage or usage
        for choice in chunk.choices:
            texts[choice.index] = texts.get(choice.index, "") + choice.text
            if not order or order[-1] != choice.index:
                order.append(choice.index)
    assert texts == {0: "xyz", 1: "12345", 2: "yz"}
    assert order == [0, 1, 2]
    assert usage is not None and usage.completion_tokens == 3 + 5 + 2 and usage.prompt_tokens == 1 + 1 + 5


def test_a_batch_too_large_is_a_400_naming_prompt(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="tiny-chat", prompt=["a"] * 9, n=4)
    assert isinstance(caught.value.body, dict) and caught.value.body["param"] == "prompt"
    assert caught.value.body["message"].startswith("'prompt': at most 8 prompts with n=4")


# -- token ids


@pytest.mark.parametrize("ids", [[9906, 1917], [[9906, 1917], [15339]]])
def test_token_id_embedding_input_is_a_400_that_names_the_client_setting(tiny_worker: ServerProcess, ids: list) -> None:
    """langchain's OpenAIEmbeddings sends tiktoken ids unless check_embedding_ctx_length=False."""
    response = requests.post(tiny_worker.url + "/v1/embeddings", json={"input": ids, "model": "tiny-embed"}, timeout=30)
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("input", "token_ids_not_supported")
    assert "check_embedding_ctx_length=False" in error["message"]


def test_token_id_prompts_are_a_400_with_their_code(tiny_worker: ServerProcess) -> None:
    response = requests.post(tiny_worker.url + "/v1/completions", json={"prompt": [[1, 2], [3]]}, timeout=30)
    assert response.status_code == 400
    assert (response.json()["error"]["param"], response.json()["error"]["code"]) == ("prompt", "token_ids_not_supported")


# -- tool_choice that asks for no tool call


@pytest.mark.parametrize("body", [{"tool_choice": "none"}, {"tool_choice": "auto"}, {"tools": [], "tool_choice": "none"},
                                  {"function_call": "none"}, {"function_call": "auto"}])
def test_tool_choice_that_asks_for_no_tool_call_is_accepted(tiny_worker: ServerProcess, body: dict) -> None:
    response = chat(tiny_worker, max_tokens=3, **body)
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["message"]["content"] == "abc"


@pytest.mark.parametrize(("body", "param"), [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto"}, "tools"),
    ({"function_call": {"name": "f"}}, "function_call"),
])
def test_real_tool_calling_is_still_refused_naming_the_field(client: openai.OpenAI, body: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="tiny-chat", messages=USER_HI, **body)
    assert isinstance(caught.value.body, dict) and caught.value.body["param"] == param
