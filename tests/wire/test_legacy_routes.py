"""The interfaces of the earlier GPT4All API servers, on a real worker, with the shapes their READMEs
documented (shared/originals/): the Flask /v0 server, the generic LLM API, and the FastAPI-style /v1
extras. The worker has a third model, `tiny-short` (a 64-token context), so a test can tell which
model served a request. Its HTTP(S)_PROXY points at a recorder: any outgoing HTTP would show there.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
import requests

from api.config import ConfigError, load_settings
from api.wire.llm_api import token_event
from testing.assertions import assert_json_error
from testing.loopback import ConnectionRecorder
from testing.servers import ServerProcess, running_worker
from testing.tiny_models import TINY_CHAT, TINY_CHAT_REPLY, TINY_EMBED, build_tiny_chat_model, build_tiny_embedding_model, tiny_settings

TINY_SHORT = "tiny-short.gguf"
LONG_PROMPT = "word " * 30  # 150 byte tokens: over tiny-short's 64, well within tiny-chat's 512


@pytest.fixture(scope="module")
def legacy_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("legacy-models")
    build_tiny_chat_model(folder / TINY_CHAT)
    build_tiny_embedding_model(folder / TINY_EMBED)
    build_tiny_chat_model(folder / TINY_SHORT, context_length=64)
    return folder


@pytest.fixture(scope="module")
def legacy_worker(legacy_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    recorder = ConnectionRecorder()
    proxy = f"http://127.0.0.1:{recorder.port}"
    with running_worker(legacy_model_dir, tmp_path_factory.mktemp("legacy"),
                          **tiny_settings(HTTP_PROXY=proxy, HTTPS_PROXY=proxy, http_proxy=proxy, https_proxy=proxy,
                                          NO_PROXY="", no_proxy="")) as worker:
        yield worker
        recorder.close()
        assert recorder.connections == 0, "the worker tried to reach the network"


def post(worker: ServerProcess, path: str, body: object) -> requests.Response:
    return requests.post(worker.url + path, json=body, timeout=30)


def assert_param_error(response: requests.Response, status: int, param: str | None, mentions: str = "") -> dict:
    assert_json_error(response, status, mentions)
    error = response.json()["error"]
    assert error["param"] == param, error
    return error


# -- the Flask /v0 server (originals/000)


def test_v0_chat_completions_readme_example(legacy_worker: ServerProcess) -> None:
    body = {"messages": [
        {"role": "user", "content": "Tell me a joke"},
        {"role": "assistant", "content": "Why don't scientists trust atoms?"},
        {"role": "user", "content": "I don't know, why?"},
        {"role": "assistant", "content": "Because they make up everything!"},
    ]}
    response = post(legacy_worker, "/v0/language-models/chat-completions", body)
    assert response.status_code == 200, response.text
    reply = response.json()
    assert list(reply) == ["id", "replies"]
    assert re.fullmatch(r"chat-completions-\d+\.\d{6}", reply["id"])
    assert reply["replies"] == [{"role": "assistant", "content": TINY_CHAT_REPLY}]


def test_v0_generate_readme_example_passes_the_raw_prompt(legacy_worker: ServerProcess) -> None:
    response = post(legacy_worker, "/v0/language-models/generate", {"prompt": "Once upon a time"})
    reply = response.json()
    assert list(reply) == ["id", "text"]
    assert re.fullmatch(r"generate-\d+\.\d{6}", reply["id"])
    assert reply["text"] == TINY_CHAT_REPLY[TINY_CHAT_REPLY.index("e") + 1:]  # raw: continues after the last "e"


def test_v0_generate_takes_gpt4all_parameters(legacy_worker: ServerProcess) -> None:
    body = {"prompt": "a", "max_tokens": 3, "temp": 0, "top_k": 1, "top_p": 0.9, "repeat_penalty": 1.1, "repeat_last_n": 8}
    assert post(legacy_worker, "/v0/language-models/generate", body).json()["text"] == "bcd"


def test_v0_models_lists_the_installed_files(legacy_worker: ServerProcess) -> None:
    response = requests.get(legacy_worker.url + "/v0/models", timeout=10)
    assert response.json() == {"models": [TINY_CHAT, TINY_EMBED, TINY_SHORT]}


@pytest.mark.parametrize("name", ["tiny-chat", TINY_CHAT])
def test_v0_retrieve_an_installed_model(legacy_worker: ServerProcess, name: str) -> None:
    response = post(legacy_worker, "/v0/language-models/retrieve", {"model_name": name, "allow_download": True})
    assert response.status_code == 200
    assert response.json() == {"success": True, "message": f"Model {TINY_CHAT} is installed."}
    inside = post(legacy_worker, "/v0/language-models/retrieve", {"model_name": name, "model_path": "."})
    assert inside.json()["success"] is True


def test_v0_retrieve_when_downloads_are_disabled(legacy_worker: ServerProcess) -> None:
    response = post(legacy_worker, "/v0/language-models/retrieve", {"model_name": "gptj", "allow_download": True})
    assert response.status_code == 403
    body = response.json()
    assert body["success"] is False and "ALLOW_DOWNLOAD=false" in body["message"]
    assert body["error"]["code"] == "download_disabled" and "disabled" in body["error"]["message"]
    refused = post(legacy_worker, "/v0/language-models/retrieve", {"model_name": "gptj", "allow_download": False})
    assert refused.status_code == 404 and refused.json()["success"] is False
    assert "allow_download is false" in refused.json()["message"]


@pytest.mark.parametrize(("body", "param"), [
    ({"model_name": "../tiny-chat.gguf"}, "model_name"),
    ({"model_name": "/etc/passwd"}, "model_name"),
    ({"model_name": "..\\..\\x.gguf"}, "model_name"),
    ({}, "model_name"),
    ({"model_name": 5}, "model_name"),
    ({"model_name": "tiny-chat", "allow_download": "yes"}, "allow_download"),
])
def test_v0_retrieve_refuses_traversal_and_bad_fields(legacy_worker: ServerProcess, body: dict, param: str) -> None:
    response = post(legacy_worker, "/v0/language-models/retrieve", body)
    error = assert_param_error(response, 400, param)
    assert response.json()["success"] is False and response.json()["message"] == error["message"]


@pytest.mark.parametrize(("model_path", "status"), [("..", 403), ("../../etc", 403), ("/etc", 403), ("/", 403),
                                                    ("no-such-folder", 404)])
def test_v0_retrieve_keeps_model_path_inside_model_path(legacy_worker: ServerProcess, model_path: str,
                                                        status: int) -> None:
    """Where a path leads depends on the server's files, not on the request's form: a 403 or a 404."""
    response = post(legacy_worker, "/v0/language-models/retrieve", {"model_name": "tiny-chat", "model_path": model_path})
    error = assert_param_error(response, status, "model_path")
    assert response.json()["success"] is False and response.json()["message"] == error["message"]


@pytest.mark.parametrize(("path", "body", "param", "mentions"), [
    ("chat-completions", {}, "messages", "'messages' is required"),
    ("chat-completions", {"messages": []}, "messages", "at least 1"),
    ("chat-completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "must be"),
    ("chat-completions", {"messages": [{"role": "user"}]}, "messages[0].content", "is required"),
    ("chat-completions", {"messages": [{"role": "user", "content": "x"}], "temp": "hot"}, "temp", "'temp' must be a number"),
    ("generate", {}, "prompt", "'prompt' is required"),
    ("generate", {"prompt": 7}, "prompt", "'prompt' must be a string"),
    ("generate", {"prompt": "x", "top_p": 0}, "top_p", "greater than 0 and at most 1"),
    ("generate", {"prompt": "x", "max_tokens": 0}, "max_tokens", "'max_tokens' must be at least 1"),
])
def test_v0_errors_name_the_field(legacy_worker: ServerProcess, path: str, body: dict, param: str, mentions: str) -> None:
    assert_param_error(post(legacy_worker, "/v0/language-models/" + path, body), 400, param, mentions)


def test_v0_unknown_model_is_a_404(legacy_worker: ServerProcess) -> None:
    response = post(legacy_worker, "/v0/language-models/generate", {"prompt": "x", "model": "gptj"})
    assert_param_error(response, 404, "model", "Available models: tiny-chat, tiny-embed, tiny-short")


# -- the generic LLM API (originals/004)

README_PARAMS = {"n_predict": 300, "temp": 0.1, "top_k": 40, "top_p": 0.95, "stop": ["\\Q"], "repeat_penalty": 1.3}


def test_llm_generate_readme_example_answers_a_json_string(legacy_worker: ServerProcess) -> None:
    response = post(legacy_worker, "/generate", {"prompt": "What is the capital of paris", "params": README_PARAMS})
    assert response.status_code == 200 and response.headers["Content-Type"] == "application/json"
    assert response.json() == "tuvwxyz"


def test_llm_generate_params_are_honoured_and_unknown_ones_ignored(legacy_worker: ServerProcess) -> None:
    assert post(legacy_worker, "/generate", {"prompt": "a", "params": {"n_predict": 2, "temp": 0}}).json() == "bc"
    assert post(legacy_worker, "/generate", {"prompt": "a", "params": {"stop": ["e"], "mirostat": 2}}).json() == "bcd"
    assert post(legacy_worker, "/generate", {"prompt": "w"}).json() == "xyz"


def sse_data(response: requests.Response) -> list[str]:
    """The data of each event, SSE-decoded (multi-line data joined with newlines)."""
    assert response.headers["Content-Type"].startswith("text/event-stream")
    events = []
    for block in response.text.split("\r\n\r\n"):
        if block:
            lines = block.split("\r\n")
            assert all(line.startswith("data: ") for line in lines), block
            events.append("\n".join(line[len("data: "):] for line in lines))
    return events


def test_llm_agenerate_streams_one_event_per_token(legacy_worker: ServerProcess) -> None:
    with requests.post(legacy_worker.url + "/agenerate", json={"prompt": "What is the capital of paris", "params": README_PARAMS},
                       stream=True, timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["X-Accel-Buffering"] == "no"
        response.encoding = "utf-8"
        events = sse_data(response)
    assert events == list("tuvwxyz")


def test_sse_token_framing_keeps_newlines() -> None:
    assert token_event("a") == "data: a\r\n\r\n"
    assert token_event(" b") == "data:  b\r\n\r\n"
    assert token_event("x\ny") == "data: x\r\ndata: y\r\n\r\n"
    assert token_event("\n") == "data: \r\ndata: \r\n\r\n"


def test_llm_embeddings_answer_the_vector(legacy_worker: ServerProcess) -> None:
    vector = post(legacy_worker, "/embeddings", {"text": "hello world"}).json()
    assert isinstance(vector, list) and len(vector) == 32 and all(isinstance(value, float) for value in vector)
    openai_vector = post(legacy_worker, "/v1/embeddings", {"input": "hello world"}).json()["data"][0]["embedding"]
    assert vector == pytest.approx(openai_vector)


def test_llm_check(legacy_worker: ServerProcess) -> None:
    response = requests.get(legacy_worker.url + "/check", timeout=10)
    assert response.status_code == 200 and response.json() == "Ok"


@pytest.mark.parametrize(("path", "body", "param", "mentions"), [
    ("/generate", {}, "prompt", "'prompt' is required"),
    ("/generate", {"prompt": ""}, "prompt", "must not be empty"),
    ("/generate", {"prompt": "x", "params": {"temp": "hot"}}, "params.temp", "'params.temp' must be a number"),
    ("/generate", {"prompt": "x", "params": {"n_predict": 0}}, "params.n_predict", "at least 1"),
    ("/generate", {"prompt": "x", "params": {"stop": [1]}}, "params.stop", "a string or a list"),
    ("/generate", {"prompt": "x", "params": [1]}, "params", "must be an object"),
    ("/agenerate", {"prompt": "x", "params": {"top_k": -1}}, "params.top_k", "at least 0"),
    ("/embeddings", {}, "text", "'text' is required"),
    ("/embeddings", {"text": ["a"]}, "text", "must be a string"),
])
def test_llm_api_errors_name_the_field(legacy_worker: ServerProcess, path: str, body: dict, param: str, mentions: str) -> None:
    assert_param_error(post(legacy_worker, path, body), 400, param, mentions)


# -- the FastAPI-style /v1 extras (originals/001 and 002)


def completion(worker: ServerProcess, **body: object) -> requests.Response:
    return post(worker, "/v1/completions", {"temperature": 0, **body})


def test_prompt_template_wraps_the_prompt(legacy_worker: ServerProcess) -> None:
    plain = completion(legacy_worker, prompt="Hello").json()
    assert plain["choices"][0]["text"] == "pqrstuvwxyz"
    template = "### Instruction:\n%1\n### Response:\n"
    wrapped = completion(legacy_worker, prompt="Hello", prompt_template=template).json()
    assert wrapped["choices"][0]["text"] == TINY_CHAT_REPLY
    assert wrapped["usage"]["prompt_tokens"] == len(template.replace("%1", "Hello"))
    with_reply_marker = completion(legacy_worker, prompt="Hello", prompt_template="User: %1\nAssistant: %2", echo=True).json()
    assert with_reply_marker["choices"][0]["text"] == "Hello" + TINY_CHAT_REPLY
    assert with_reply_marker["usage"]["prompt_tokens"] == len("User: Hello\nAssistant: ")


@pytest.mark.parametrize("template", ["no placeholder", "%1 and %1", "%2 before %1", "%1 %2 then more", ""])
def test_a_bad_prompt_template_is_a_400(legacy_worker: ServerProcess, template: str) -> None:
    assert_param_error(completion(legacy_worker, prompt="x", prompt_template=template), 400, "prompt_template", "%1")


def test_gpt4all_python_api_readme_example(legacy_worker: ServerProcess) -> None:
    body = {
        "prompt": "Only strings is allowed", "max_tokens": 50, "temperature": 0.28, "top_p": 0.1, "top_k": 40,
        "prompt_batch_size": 128, "repeat_penality": 1.18, "repeat_last_n": 64, "reload": True, "thread_count": 4,
        "prompt_template": "\n### Instruction:\nParaphrase and Expand the text below.\n### Text:\n%1\n### Response:\n",
    }
    response = post(legacy_worker, "/v1/completions", body)
    assert response.status_code == 200, response.text
    reply = response.json()
    assert reply["object"] == "text_completion" and reply["choices"][0]["text"] == TINY_CHAT_REPLY
    assert reply["choices"][0]["finish_reason"] == "stop" and reply["usage"]["completion_tokens"] == 26


@pytest.mark.parametrize(("body", "param"), [
    ({"repeat_penality": 0}, "repeat_penality"),
    ({"repeat_penalty": 1.1, "repeat_penality": 1.3}, "repeat_penality"),
    ({"repeat_penality": "high"}, "repeat_penality"),
    ({"prompt_batch_size": 0}, "prompt_batch_size"),
    ({"repeat_last_n": -1}, "repeat_last_n"),
    ({"reload": "yes"}, "reload"),
    ({"prompt_template": 5}, "prompt_template"),
])
def test_bad_gpt4all_completion_fields(legacy_worker: ServerProcess, body: dict, param: str) -> None:
    assert_param_error(completion(legacy_worker, prompt="x", **body), 400, param)


def test_both_spellings_of_the_penalty_are_refused_even_when_equal(legacy_worker: ServerProcess) -> None:
    """The document can say "not both" (JSON Schema cannot compare two fields), so the route says that too."""
    response = completion(legacy_worker, prompt="a", max_tokens=2, repeat_penalty=1.2, repeat_penality=1.2)
    assert_param_error(response, 400, "repeat_penality", "not both")
    assert completion(legacy_worker, prompt="a", max_tokens=2, repeat_penality=1.2).status_code == 200


@pytest.mark.parametrize("path", ["/v1/health", "/v1/health/"])
def test_v1_health(legacy_worker: ServerProcess, path: str) -> None:
    response = requests.get(legacy_worker.url + path, timeout=10, allow_redirects=False)
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_v1_engines(legacy_worker: ServerProcess) -> None:
    engines = requests.get(legacy_worker.url + "/v1/engines", timeout=10).json()
    assert engines["object"] == "list"
    assert [engine["id"] for engine in engines["data"]] == ["tiny-chat", "tiny-embed", "tiny-short"]
    one = requests.get(legacy_worker.url + "/v1/engines/tiny-chat", timeout=10).json()
    assert one == {"id": "tiny-chat", "object": "engine", "created": one["created"], "owner": "local", "ready": True}
    assert requests.get(legacy_worker.url + "/v1/engines/", timeout=10, allow_redirects=False).status_code == 200
    assert_param_error(requests.get(legacy_worker.url + "/v1/engines/davinci", timeout=10), 404, "engine_id", "tiny-chat")


def test_v1_model_that_is_not_installed_says_downloads_are_disabled(legacy_worker: ServerProcess) -> None:
    response = requests.get(legacy_worker.url + "/v1/models/gpt4all-j-v1.3-groovy", timeout=10)
    error = assert_param_error(response, 404, "model", "Available models: tiny-chat, tiny-embed, tiny-short")
    assert "ALLOW_DOWNLOAD=false" in error["message"] and error["code"] == "model_not_found"


# -- a request for another installed model is served by that model


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/completions", {"prompt": LONG_PROMPT}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG_PROMPT}]}),
    ("/v0/language-models/generate", {"prompt": LONG_PROMPT}),
    ("/generate", {"prompt": LONG_PROMPT}),
])
def test_the_model_field_picks_the_installed_model(legacy_worker: ServerProcess, path: str, body: dict) -> None:
    default = post(legacy_worker, path, {**body, "max_tokens": 2})
    assert default.status_code == 200, default.text
    other = post(legacy_worker, path, {**body, "model": "tiny-short", "max_tokens": 2})
    assert_json_error(other, 400, "context window")  # only tiny-short's 64-token context is too small


def test_the_reply_names_the_model_that_served_it(legacy_worker: ServerProcess) -> None:
    reply = post(legacy_worker, "/v1/chat/completions", {"model": "tiny-short", "temperature": 0,
                                                          "messages": [{"role": "user", "content": "Hi"}]}).json()
    assert reply["model"] == "tiny-short" and reply["choices"][0]["message"]["content"] == TINY_CHAT_REPLY
    assert post(legacy_worker, "/v1/completions", {"model": "tiny-chat", "prompt": "a"}).json()["model"] == "tiny-chat"


# -- the original servers' openai examples, with today's openai package


def test_gpt4all_rest_api_readme_examples_with_the_openai_client(legacy_worker: ServerProcess) -> None:
    client = openai.OpenAI(base_url=legacy_worker.url + "/v1", api_key="not needed for a local LLM", max_retries=0)
    prompt = "Who is Michael Jordan?"
    response = client.completions.create(model="tiny-chat", prompt=prompt, max_tokens=50, temperature=0.28, top_p=0.95,
                                         n=1, echo=True, stream=False)
    assert len(response.choices[0].text) > len(prompt)
    messages = [{"role": "system", "content": "You are a helpful assistant who needs to anser in less than 200 tokens"},
                {"role": "assistant", "content": "Michael Jordan was a basketball player for the Chicago Bulls"},
                {"role": "user", "content": "Who is Michael Jordan?"}]
    whole = client.chat.completions.create(model="tiny-chat", max_tokens=200, messages=messages, stream=False)
    assert whole.choices[0].message.role == "assistant" and whole.choices[0].message.content == TINY_CHAT_REPLY
    chunks = list(client.chat.completions.create(model="tiny-chat", max_tokens=200, messages=messages, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == TINY_CHAT_REPLY


# -- ROUTE cannot hide another interface


@pytest.mark.parametrize("route", ["/generate", "/check", "/embeddings/", "/v1/chat/completions", "/v0/models", "/docs",
                                   "/openapi.json", "/health"])
def test_route_may_not_take_over_another_interface(tmp_path: Path, route: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings({"ROUTE": route}, env_file=tmp_path / "none")
    assert "ROUTE" in str(caught.value) and "a URL path" in str(caught.value)
