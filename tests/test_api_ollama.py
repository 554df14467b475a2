"""Ollama's API (/, /api/*) on real workers with the tiny models: the exact wire shapes over raw HTTP,
the official `ollama` and `langchain-ollama` packages as clients, the error statuses (those of access
and loading in-process: tests/test_wire_shapes.py), and cancellation when a streaming client goes away."""

from __future__ import annotations

import json
import math
import socket
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import gguf
import ollama
import pytest
import requests
from langchain_ollama import ChatOllama, OllamaEmbeddings, OllamaLLM

from api.wire.ollama import human_number
from testing.assertions import QUESTION, cosine
from testing.servers import ServerProcess, Service, running_worker
from testing.tiny_models import TINY_CHAT, TINY_CHAT_REPLY, TINY_CHAT_TEMPLATE, TINY_EMBED, TINY_EMBEDDING_DIM, tiny_settings

KEY = "ollama-key"
HELLO = [{"role": "user", "content": "Hello!"}]
GREEDY = {"temperature": 0}
ENDLESS = {"model": "tiny-chat", "prompt": "0", "raw": True, "options": {"temperature": 0, "num_predict": 100_000_000}}
"""A raw prompt ending in a digit: the tiny model counts 1234567890... until stopped."""


def chat_prompt_tokens(*turns: tuple[str, str]) -> int:
    """Prompt tokens of a ChatML prompt on the tiny model: 2 special tokens and one per byte per turn, and
    `<|im_start|>assistant\\n` after them."""
    return sum(2 + len(f"{role}\n{content}\n") for role, content in turns) + 1 + len("assistant\n")


def post(worker: ServerProcess, path: str, body: object, **kwargs: Any) -> requests.Response:
    return requests.post(worker.url + path, json=body, timeout=30, **kwargs)


def chat(worker: ServerProcess, **body: object) -> requests.Response:
    return post(worker, "/api/chat", {"model": "tiny-chat", "messages": HELLO, "stream": False, "options": GREEDY, **body})


@pytest.mark.parametrize(("path", "body", "mentions"), [
    ("/api/chat", {"model": "tiny-embed", "messages": HELLO}, '"tiny-embed" does not support chat: it is an embedding model'),
    ("/api/chat", {"model": "tiny-embed", "messages": []}, '"tiny-embed" does not support chat'),
    ("/api/generate", {"model": "tiny-embed:latest", "prompt": "Hi"}, '"tiny-embed:latest" does not support generate'),
    ("/api/generate", {"model": "tiny-embed"}, '"tiny-embed" does not support generate'),
    ("/api/embed", {"model": "tiny-chat", "input": "x"}, "'tiny-chat' is a chat model; embeddings come from tiny-embed:latest"),
    ("/api/embeddings", {"model": "tiny-chat", "prompt": "x"}, "'tiny-chat' is a chat model; embeddings come from"),
])
def test_a_model_of_the_other_kind_is_a_400_that_says_which_to_use(tiny_worker: ServerProcess, path: str, body: dict,
                                                                    mentions: str) -> None:
    """Ollama answers a model without the completion capability with a 400 in these words
    (server/routes.go: `"%q does not support chat"`); it checks no capability for embeddings, where
    gpt4all can only use an embedding model, so a chat model there is the request's fault too."""
    assert_ollama_error(post(tiny_worker, path, {"stream": False, **body}), 400, mentions)


def ndjson(response: requests.Response) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    assert response.headers["Content-Type"] == "application/x-ndjson"
    assert response.text.endswith("\n")
    return [json.loads(line) for line in response.text.splitlines()]


def assert_ollama_error(response: requests.Response, status: int, mentions: str) -> None:
    """Ollama's error shape: {"error": "<message>"} and nothing else, with the status."""
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    body = response.json()
    assert list(body) == ["error"] and isinstance(body["error"], str), body
    assert mentions in body["error"], body
    assert "Traceback" not in response.text


def assert_stats(final: dict[str, Any], prompt_tokens: int, completion_tokens: int, reason: str) -> None:
    """The last object of a generation: done, its reason, token counts and measured durations in nanoseconds."""
    assert final["done"] is True and final["done_reason"] == reason
    assert final["prompt_eval_count"] == prompt_tokens and final["eval_count"] == completion_tokens
    durations = [final[name] for name in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration")]
    assert all(isinstance(value, int) and value >= 0 for value in durations), durations
    assert final["prompt_eval_duration"] > 0 and final["total_duration"] > 0
    assert final["total_duration"] >= final["prompt_eval_duration"] + final["eval_duration"]
    assert final["total_duration"] < 60 * 10**9  # nanoseconds, not microseconds: a tiny reply takes under a minute


def created_at(value: str) -> datetime:
    assert value.endswith("Z"), value
    return datetime.fromisoformat(value)


@pytest.fixture
def client(tiny_worker: ServerProcess) -> ollama.Client:
    return ollama.Client(host=tiny_worker.url)


# -- health and model routes


def test_root_says_ollama_is_running(tiny_worker: ServerProcess) -> None:
    response = requests.get(tiny_worker.url + "/", timeout=10)
    assert response.status_code == 200 and response.text == "Ollama is running"
    assert response.headers["Content-Type"].startswith("text/plain")
    head = requests.head(tiny_worker.url + "/", timeout=10)
    assert head.status_code == 200 and head.content == b""


def test_version(tiny_worker: ServerProcess) -> None:
    response = requests.get(tiny_worker.url + "/api/version", timeout=10)
    assert response.status_code == 200
    assert list(response.json()) == ["version"] and response.json()["version"].count(".") == 2


def tensor_parameters(path: Path) -> int:
    return sum(math.prod(int(n) for n in tensor.shape) for tensor in gguf.GGUFReader(path).tensors)


def test_tags_list_the_models_with_details_from_the_gguf_header(tiny_worker: ServerProcess,
                                                                tiny_model_dir: Path) -> None:
    response = requests.get(tiny_worker.url + "/api/tags", timeout=10)
    assert response.status_code == 200
    models = {model["name"]: model for model in response.json()["models"]}
    assert set(models) == {"tiny-chat:latest", "tiny-embed:latest"}
    for name, file_name, family in [("tiny-chat:latest", TINY_CHAT, "llama"), ("tiny-embed:latest", TINY_EMBED, "bert")]:
        model = models[name]
        path = tiny_model_dir / file_name
        assert model["model"] == name and model["size"] == path.stat().st_size
        assert created_at(model["modified_at"]).timestamp() == int(path.stat().st_mtime)
        assert len(model["digest"]) == 64 and int(model["digest"], 16) >= 0
        assert model["details"] == {"parent_model": "", "format": "gguf", "family": family, "families": [family],
                                    "parameter_size": human_number(tensor_parameters(path)), "quantization_level": "F32"}


def test_parameter_sizes_read_as_ollama_prints_them() -> None:
    assert [human_number(n) for n in (134_515_008, 8_030_261_248, 7_000_000_000, 91_136, 999)] == \
        ["134.52M", "8.0B", "7B", "91K", "999"]


def test_show_describes_a_model_from_its_gguf_metadata(tiny_worker: ServerProcess) -> None:
    response = post(tiny_worker, "/api/show", {"model": "tiny-chat"})
    assert response.status_code == 200, response.text
    shown = response.json()
    assert shown["template"] == TINY_CHAT_TEMPLATE
    assert shown["parameters"].splitlines() == ["num_ctx" + " " * 24 + "512", "stop" + " " * 27 + '"<|im_end|>"']
    assert "PARAMETER num_ctx 512" in shown["modelfile"] and 'PARAMETER stop "<|im_end|>"' in shown["modelfile"]
    assert shown["modelfile"].splitlines()[1] == f"FROM {TINY_CHAT}"
    assert shown["details"]["family"] == "llama" and shown["capabilities"] == ["completion"]
    info = shown["model_info"]
    assert info["general.architecture"] == "llama" and info["llama.context_length"] == 512
    assert info["tokenizer.ggml.eos_token_id"] == 258 and info["tokenizer.ggml.tokens"] == []
    assert "tokenizer.chat_template" not in info and "eos_token" not in info
    verbose = post(tiny_worker, "/api/show", {"name": "tiny-chat:latest", "verbose": True}).json()  # older clients: name
    assert len(verbose["model_info"]["tokenizer.ggml.tokens"]) == 260
    assert verbose["model_info"]["tokenizer.ggml.tokens"][258] == "<|im_end|>"


def test_show_an_embedding_model(tiny_worker: ServerProcess) -> None:
    shown = post(tiny_worker, "/api/show", {"model": "tiny-embed.gguf"}).json()
    assert shown["capabilities"] == ["embedding"] and shown["details"]["family"] == "bert"
    assert shown["parameters"] == "num_ctx" + " " * 24 + "512"


def test_ps_lists_what_the_worker_has_loaded(tiny_worker: ServerProcess) -> None:
    running = requests.get(tiny_worker.url + "/api/ps", timeout=10).json()["models"]
    assert [(model["name"], model["context_length"], model["size_vram"]) for model in running] == \
        [("tiny-chat:latest", 512, 0), ("tiny-embed:latest", 512, 0)]
    assert created_at(running[0]["expires_at"]).year == 9999


def test_model_routes_with_the_official_client(client: ollama.Client, tiny_model_dir: Path) -> None:
    listed = client.list()
    assert [model.model for model in listed.models] == ["tiny-chat:latest", "tiny-embed:latest"]
    assert listed.models[0].size == (tiny_model_dir / TINY_CHAT).stat().st_size
    shown = client.show("tiny-chat")
    assert shown.modelinfo is not None and shown.modelinfo["llama.context_length"] == 512
    assert shown.details is not None and shown.details.quantization_level == "F32"
    assert [model.context_length for model in client.ps().models] == [512, 512]


# -- chat


def test_chat_reply_shape(tiny_worker: ServerProcess) -> None:
    response = chat(tiny_worker)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "tiny-chat" and body["message"] == {"role": "assistant", "content": TINY_CHAT_REPLY}
    created_at(body["created_at"])
    assert_stats(body, chat_prompt_tokens(("user", "Hello!")), 26, "stop")


def test_chat_streams_ndjson_by_default(tiny_worker: ServerProcess) -> None:
    lines = ndjson(post(tiny_worker, "/api/chat", {"model": "tiny-chat:latest", "messages": HELLO, "options": GREEDY}))
    *pieces, final = lines
    assert len(pieces) >= 2 and all(line["done"] is False and line["model"] == "tiny-chat:latest" for line in pieces)
    assert all(set(line) == {"model", "created_at", "message", "done"} for line in pieces)
    assert "".join(line["message"]["content"] for line in pieces) == TINY_CHAT_REPLY
    assert final["message"] == {"role": "assistant", "content": ""}
    assert_stats(final, chat_prompt_tokens(("user", "Hello!")), 26, "stop")


def test_chat_with_the_official_client(client: ollama.Client) -> None:
    reply = client.chat(model="tiny-chat", messages=HELLO, options={"temperature": 0})
    assert reply.message.content == TINY_CHAT_REPLY and reply.done_reason == "stop" and reply.eval_count == 26
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
               {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Hello!"}]
    reply = client.chat(model="tiny-chat", messages=history, options={"temperature": 0, "num_predict": 3})
    assert reply.message.content == "abc" and reply.done_reason == "length"
    assert reply.prompt_eval_count == chat_prompt_tokens(*((m["role"], m["content"]) for m in history))


def test_chat_stream_with_the_official_client(client: ollama.Client) -> None:
    parts = list(client.chat(model="tiny-chat", messages=HELLO, stream=True, options={"temperature": 0, "stop": ["k"]}))
    assert "".join(part.message.content or "" for part in parts) == "abcdefghij"
    assert [part.done for part in parts].count(True) == 1 and parts[-1].done_reason == "stop"


# -- generate


def test_generate_through_the_chat_template_with_a_system_message(tiny_worker: ServerProcess) -> None:
    body = post(tiny_worker, "/api/generate", {"model": "tiny-chat", "prompt": "Hello!", "system": "Be brief.",
                                               "stream": False, "options": GREEDY}).json()
    assert body["response"] == TINY_CHAT_REPLY and body["model"] == "tiny-chat"
    assert_stats(body, chat_prompt_tokens(("system", "Be brief."), ("user", "Hello!")), 26, "stop")
    assert "context" not in body


def test_generate_raw_sends_the_prompt_as_it_is(tiny_worker: ServerProcess) -> None:
    lines = ndjson(post(tiny_worker, "/api/generate", {"model": "tiny-chat", "prompt": "Hello", "raw": True,
                                                       "options": GREEDY}))
    assert "".join(line["response"] for line in lines) == "pqrstuvwxyz"  # after "o" comes "p"
    assert lines[-1]["response"] == "" and all(not line["done"] for line in lines[:-1])
    assert_stats(lines[-1], len("Hello"), 11, "stop")


def test_generate_with_the_official_client(client: ollama.Client) -> None:
    reply = client.generate(model="tiny-chat", prompt="Hello", raw=True, options={"temperature": 0, "num_predict": 4})
    assert reply.response == "pqrs" and reply.done_reason == "length" and reply.eval_count == 4
    parts = list(client.generate(model="tiny-chat", prompt="Hi", stream=True, options={"temperature": 0}))
    assert "".join(part.response for part in parts) == TINY_CHAT_REPLY and parts[-1].done


# -- options


@pytest.mark.parametrize(("options", "reply", "reason"), [
    ({"num_predict": 3}, "abc", "length"),
    ({"stop": ["d", "q"]}, "abc", "stop"),
    ({"stop": "e"}, "abcd", "stop"),
    ({"num_predict": -1}, TINY_CHAT_REPLY, "stop"),
    ({"num_predict": -2, "repeat_last_n": -1, "repeat_penalty": 1.0, "top_k": 1, "top_p": 0.5, "min_p": 0.1}, TINY_CHAT_REPLY,
     "stop"),
    ({"num_ctx": 512, "seed": 42, "mirostat": 2, "num_gpu": 99, "num_thread": 8, "made_up_option": [1]}, TINY_CHAT_REPLY,
     "stop"),
], ids=["num_predict", "stop-list", "stop-string", "no-limit", "sampling", "accepted-and-ignored"])
def test_options(tiny_worker: ServerProcess, options: dict[str, Any], reply: str, reason: str) -> None:
    body = chat(tiny_worker, options={"temperature": 0, **options}).json()
    assert body["message"]["content"] == reply and body["done_reason"] == reason


@pytest.mark.parametrize("keep_alive", ["5m", -1, 300, "0", 0])
def test_keep_alive_is_accepted(tiny_worker: ServerProcess, keep_alive: object) -> None:
    assert chat(tiny_worker, keep_alive=keep_alive).json()["message"]["content"] == TINY_CHAT_REPLY


@pytest.mark.parametrize(("path", "body", "reason"), [
    ("/api/chat", {"messages": []}, "load"),
    ("/api/chat", {"messages": [], "keep_alive": 0}, "unload"),
    ("/api/generate", {}, "load"),
    ("/api/generate", {"prompt": "", "keep_alive": "0s"}, "unload"),
])
def test_nothing_to_generate_answers_at_once(tiny_worker: ServerProcess, path: str, body: dict, reason: str) -> None:
    response = post(tiny_worker, path, {"model": "tiny-chat", **body})
    assert response.status_code == 200, response.text
    assert response.json()["done"] is True and response.json()["done_reason"] == reason


# -- embeddings


def test_embed_one_or_many_texts(tiny_worker: ServerProcess) -> None:
    one = post(tiny_worker, "/api/embed", {"model": "tiny-embed", "input": "hello world"}).json()
    many = post(tiny_worker, "/api/embed", {"model": "tiny-embed:latest", "input": ["the cat", "hello world"]}).json()
    assert one["model"] == "tiny-embed" and len(one["embeddings"]) == 1 and len(one["embeddings"][0]) == TINY_EMBEDDING_DIM
    assert len(many["embeddings"]) == 2
    assert many["embeddings"][1] == pytest.approx(one["embeddings"][0], abs=1e-5)  # batched: within float noise
    assert many["embeddings"][0] != many["embeddings"][1]
    assert one["prompt_eval_count"] > 0 and one["total_duration"] > 0 and one["load_duration"] == 0
    same = post(tiny_worker, "/api/embed", {"model": "tiny-embed", "input": "hello world", "dimensions": 32,
                                            "truncate": False}).json()
    assert same["embeddings"] == one["embeddings"]
    unset = post(tiny_worker, "/api/embed", {"model": "tiny-embed", "input": "hello world", "dimensions": 0}).json()
    assert unset["embeddings"] == one["embeddings"]  # 0 is Go's zero value: Ollama's clients mean "not given"
    assert post(tiny_worker, "/api/embed", {"model": "tiny-embed", "input": []}).json()["embeddings"] == []


def test_the_older_embeddings_route(tiny_worker: ServerProcess) -> None:
    old = post(tiny_worker, "/api/embeddings", {"model": "tiny-embed", "prompt": "hello world"}).json()
    new = post(tiny_worker, "/api/embed", {"model": "tiny-embed", "input": "hello world"}).json()
    assert list(old) == ["embedding"] and old["embedding"] == new["embeddings"][0]
    assert post(tiny_worker, "/api/embeddings", {"model": "tiny-embed", "prompt": ""}).json() == {"embedding": []}


def test_embeddings_with_the_official_client(client: ollama.Client) -> None:
    vectors = client.embed(model="tiny-embed", input=["hello world", "the cat"]).embeddings
    assert len(vectors) == 2 and len(vectors[0]) == TINY_EMBEDDING_DIM
    assert list(client.embeddings(model="tiny-embed", prompt="hello world").embedding) == pytest.approx(vectors[0], abs=1e-5)


# -- langchain-ollama


def test_langchain_chat_invoke_and_stream(tiny_worker: ServerProcess) -> None:
    model = ChatOllama(model="tiny-chat", base_url=tiny_worker.url, temperature=0, validate_model_on_init=True)
    reply = model.invoke("Hello!")
    assert reply.content == TINY_CHAT_REPLY
    assert reply.usage_metadata is not None and reply.usage_metadata["output_tokens"] == 26
    assert reply.response_metadata["done_reason"] == "stop"
    assert "".join(str(chunk.content) for chunk in model.stream("Hello!")) == TINY_CHAT_REPLY
    short = ChatOllama(model="tiny-chat:latest", base_url=tiny_worker.url, temperature=0, num_predict=3)
    assert short.invoke([("system", "Be brief."), ("human", "Hello!")]).content == "abc"


def test_langchain_llm_and_embeddings(tiny_worker: ServerProcess) -> None:
    llm = OllamaLLM(model="tiny-chat", base_url=tiny_worker.url, temperature=0)
    assert llm.invoke("Hello!") == TINY_CHAT_REPLY
    assert "".join(llm.stream("Hi")) == TINY_CHAT_REPLY
    embedder = OllamaEmbeddings(model="tiny-embed", base_url=tiny_worker.url)
    vectors = embedder.embed_documents(["hello world", "the cat"])
    assert len(vectors) == 2 and embedder.embed_query("hello world") == pytest.approx(vectors[0], abs=1e-5)


def test_langchain_refuses_a_model_that_is_not_installed(tiny_worker: ServerProcess) -> None:
    with pytest.raises(ValueError, match="not found"):
        ChatOllama(model="llama3", base_url=tiny_worker.url, validate_model_on_init=True)


# -- errors


@pytest.mark.parametrize(("path", "body"), [
    ("/api/chat", {"model": "llama3", "messages": HELLO}),
    ("/api/chat", {"model": "tiny-chat:7b", "messages": HELLO}),
    ("/api/chat", {"model": "llama3", "messages": []}),
    ("/api/chat", {"model": "llama3", "messages": HELLO, "options": {"num_ctx": 4096, "repeat_last_n": -1}}),
    ("/api/generate", {"model": "llama3", "prompt": "Hi"}),
    ("/api/show", {"model": "llama3"}),
    ("/api/embed", {"model": "llama3", "input": "x"}),
    ("/api/embeddings", {"model": "llama3", "prompt": "x"}),
    ("/api/show", {"model": "../etc/passwd"}),
])
def test_an_unknown_model_is_a_404(tiny_worker: ServerProcess, path: str, body: dict) -> None:
    response = post(tiny_worker, path, {"stream": False, **body})
    assert_ollama_error(response, 404, f"model '{body['model']}' not found")
    assert "tiny-chat:latest" in response.json()["error"]  # the installed ones, named as /api/tags names them


def test_the_official_client_raises_the_404(client: ollama.Client) -> None:
    with pytest.raises(ollama.ResponseError) as raised:
        client.chat(model="llama3", messages=HELLO)
    assert raised.value.status_code == 404 and "model 'llama3' not found" in raised.value.error


@pytest.mark.parametrize(("path", "body", "mentions"), [
    ("/api/chat", {"model": "tiny-chat", "messages": HELLO, "format": "json"}, "'format'"),
    ("/api/chat", {"model": "tiny-chat", "messages": HELLO, "format": {"type": "object"}}, "'format'"),
    ("/api/generate", {"model": "tiny-chat", "prompt": "Hi", "format": "json"}, "'format'"),
    ("/api/chat", {"model": "tiny-chat", "messages": HELLO, "tools": [{"type": "function", "function": {"name": "f"}}]},
     "'tools'"),
    ("/api/chat", {"model": "tiny-chat", "messages": [{"role": "user", "content": "?", "images": ["aGk="]}]},
     "'messages[0].images'"),
    ("/api/chat", {"model": "tiny-chat", "messages": [{"role": "assistant", "content": "", "tool_calls": [{}]}]},
     "'messages[0].tool_calls'"),
    ("/api/chat", {"model": "tiny-chat", "messages": [{"role": "tool", "content": "42"}]}, "'messages[0].role'"),
    ("/api/chat", {"model": "tiny-chat", "messages": HELLO, "think": True}, "'think'"),
    ("/api/chat", {"model": "tiny-chat", "messages": HELLO, "think": "high"}, "'think'"),
    ("/api/chat", {"model": "tiny-chat", "messages": HELLO, "logprobs": True}, "'logprobs'"),
    ("/api/generate", {"model": "tiny-chat", "prompt": "Hi", "images": ["aGk="]}, "'images'"),
    ("/api/generate", {"model": "tiny-chat", "prompt": "def f(", "suffix": "return 1"}, "'suffix'"),
    ("/api/generate", {"model": "tiny-chat", "prompt": "Hi", "template": "{{ .Prompt }}"}, "'template'"),
    ("/api/generate", {"model": "tiny-chat", "prompt": "Hi", "context": [1, 2, 3]}, "'context'"),
    ("/api/generate", {"model": "tiny-chat", "prompt": "Hi", "raw": True, "system": "x"}, "'system'"),
    ("/api/chat", {"model": "tiny-chat", "messages": HELLO, "options": {"num_ctx": 513}}, "'options.num_ctx' must be at most 512"),
    ("/api/chat", {"model": "tiny-chat", "messages": HELLO, "options": {"temperature": 3}}, "'options.temperature'"),
    ("/api/chat", {"model": "tiny-chat", "messages": HELLO, "options": {"num_predict": "10"}}, "'options.num_predict'"),
    ("/api/chat", {"model": "tiny-chat", "messages": HELLO, "options": {"stop": [1]}}, "'options.stop'"),
    ("/api/chat", {"model": "tiny-chat", "messages": HELLO, "options": "fast"}, "'options'"),
    ("/api/chat", {"model": "tiny-chat", "messages": HELLO, "keep_alive": [5]}, "'keep_alive'"),
    ("/api/chat", {"messages": HELLO}, "'model' is required"),
    ("/api/chat", {"model": " ", "messages": HELLO}, "'model' must not be empty"),
    ("/api/chat", {"model": "tiny-chat", "messages": "Hello"}, "'messages'"),
    ("/api/chat", {"model": "tiny-chat", "messages": [{"role": "user", "content": "x" * 600}]}, "context window"),
    ("/api/generate", {"model": "tiny-chat", "prompt": "x" * 600, "raw": True}, "context window"),
    ("/api/embed", {"model": "tiny-embed", "input": ["a", ""]}, "'input' must not contain empty strings"),
    ("/api/embed", {"model": "tiny-embed", "input": "a", "dimensions": 8}, "'dimensions' must be 32"),
    ("/api/embed", {"model": "tiny-embed", "input": [], "dimensions": -1}, "'dimensions' must be at least 0"),
    ("/api/embed", {"model": "tiny-embed", "input": 5}, "'input'"),
    ("/api/show", {}, "'model' is required"),
])
def test_what_cannot_be_honoured_is_a_400_naming_it(tiny_worker: ServerProcess, path: str, body: dict,
                                                    mentions: str) -> None:
    assert_ollama_error(post(tiny_worker, path, {"stream": False, **body}), 400, mentions)


def test_what_clients_send_by_default_is_accepted(tiny_worker: ServerProcess) -> None:
    """Empty tools, images and format, think false: what the official clients fill in when unused."""
    body = chat(tiny_worker, tools=[], format="", think=False, logprobs=False, top_logprobs=0,
                messages=[{"role": "user", "content": "Hello!", "images": [], "tool_calls": None}]).json()
    assert body["message"]["content"] == TINY_CHAT_REPLY


@pytest.mark.parametrize(("data", "mentions"), [(b"", "empty"), (b"{not json", "not valid JSON"), (b"[1]", "JSON object")])
def test_a_body_that_is_not_a_json_object_is_a_400(tiny_worker: ServerProcess, data: bytes, mentions: str) -> None:
    for path in ("/api/chat", "/api/generate", "/api/show", "/api/embed", "/api/embeddings"):
        response = requests.post(tiny_worker.url + path, data=data, headers={"Content-Type": "application/json"},
                                 timeout=10)
        assert_ollama_error(response, 400, mentions)


@pytest.fixture(scope="module")
def keyed_worker(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_worker(tiny_model_dir, tmp_path_factory.mktemp("ollama-keyed"), **tiny_settings(API_KEY=KEY)) as worker:
        yield worker


def test_the_official_client_sends_the_key_as_a_bearer_token(keyed_worker: ServerProcess) -> None:
    keyed = ollama.Client(host=keyed_worker.url, headers={"Authorization": f"Bearer {KEY}"})
    assert keyed.chat(model="tiny-chat", messages=HELLO, options={"temperature": 0}).message.content == TINY_CHAT_REPLY
    assert [model.model for model in keyed.list().models] == ["tiny-chat:latest", "tiny-embed:latest"]
    with pytest.raises(ollama.ResponseError) as raised:
        ollama.Client(host=keyed_worker.url).list()
    assert raised.value.status_code == 401 and "API key" in raised.value.error


@pytest.fixture(scope="module")
def hasty_worker(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    with running_worker(tiny_model_dir, tmp_path_factory.mktemp("ollama-hasty"),
                          **tiny_settings(REQUEST_TIMEOUT=1, STALL_TIMEOUT=1)) as worker:
        yield worker


def test_a_generation_over_request_timeout_is_a_504(hasty_worker: ServerProcess) -> None:
    assert_ollama_error(post(hasty_worker, "/api/generate", {**ENDLESS, "stream": False}), 504, "REQUEST_TIMEOUT")


def test_a_stream_over_request_timeout_ends_with_an_error_line(hasty_worker: ServerProcess) -> None:
    lines = ndjson(post(hasty_worker, "/api/generate", ENDLESS))  # 200: the status was sent with the first line
    assert len(lines) > 2 and all(line["done"] is False for line in lines[:-1])
    assert list(lines[-1]) == ["error"] and "REQUEST_TIMEOUT" in lines[-1]["error"]
    with pytest.raises(ollama.ResponseError, match="REQUEST_TIMEOUT"):
        for _part in ollama.Client(host=hasty_worker.url).generate(**ENDLESS, stream=True):
            pass


# -- a client that goes away mid-stream


def raw_request(path: str, body: dict) -> bytes:
    payload = json.dumps(body).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\n\r\n").encode() + payload


def stream_then_hang_up(worker: ServerProcess, path: str, body: dict, *, reset: bool) -> bytes:
    """Start a stream on a raw socket, read some of it, stop reading for a while (the worker's send
    buffers fill), then close the connection, abruptly (RST) or not."""
    connection = socket.socket()
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    connection.settimeout(10)
    connection.connect(("127.0.0.1", worker.port))
    try:
        connection.sendall(raw_request(path, body))
        received = b""
        while received.count(b"\n{") < 5:
            received += connection.recv(4096)
        time.sleep(1.5)
        if reset:
            connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    finally:
        connection.close()
    return received


def assert_the_model_is_free_again(worker: ServerProcess) -> None:
    """One generation at a time: this one can only run once the abandoned endless one has stopped."""
    started = time.monotonic()
    response = chat(worker)
    assert response.status_code == 200 and response.json()["message"]["content"] == TINY_CHAT_REPLY
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("reset", [False, True], ids=["close", "reset"])
def test_a_client_that_goes_away_mid_stream_stops_the_generation(tiny_worker: ServerProcess, reset: bool) -> None:
    """Only a raw prompt can make the tiny model endless (a chat prompt ends in "assistant\\n", and the
    alphabet after it ends); /api/chat streams through the same code."""
    received = stream_then_hang_up(tiny_worker, "/api/generate", ENDLESS, reset=reset)
    assert b"200 OK" in received and b"application/x-ndjson" in received and b'"done":false' in received
    assert_the_model_is_free_again(tiny_worker)


def test_a_pipelining_client_that_closed_stops_a_whole_reply_generation(tiny_worker: ServerProcess) -> None:
    """stream: false sends nothing until the end, and waitress reads no further while the second request
    waits: only a look at the socket shows the client is gone."""
    request = raw_request("/api/generate", {**ENDLESS, "stream": False})
    with socket.create_connection(("127.0.0.1", tiny_worker.port), timeout=10) as connection:
        connection.sendall(request + request)
        time.sleep(1)  # both requests read by the worker, the first one generating
    assert_the_model_is_free_again(tiny_worker)


# -- under the supervisor


def test_every_ollama_request_that_touches_a_model_meets_a_fresh_worker(start_service: Callable[..., Service]) -> None:
    service = start_service()
    session = requests.Session()  # keep-alive: each used worker closes the connection
    for path in ("/", "/api/version", "/api/tags", "/api/ps"):
        assert session.get(service.url + path, timeout=10).status_code == 200
    assert session.post(service.url + "/api/show", json={"model": "tiny-chat"}, timeout=10).status_code == 200
    idle = session.get(service.url + "/api/tags", timeout=10).headers["X-Worker-Pid"]
    assert service.sentinels()[int(idle)].requests_served == 0, "model listings do not recycle a worker"

    def text(response: requests.Response) -> str:
        lines = [json.loads(line) for line in response.text.splitlines()]
        return "".join(line.get("response") or line.get("message", {}).get("content", "") for line in lines)

    hello = {"model": "tiny-chat", "messages": HELLO, "options": GREEDY}
    cases = [("/api/chat", {**hello, "stream": False}, TINY_CHAT_REPLY), ("/api/chat", hello, TINY_CHAT_REPLY),
             ("/api/generate", {"model": "tiny-chat", "prompt": "Hello", "raw": True, "stream": False}, "pqrstuvwxyz"),
             ("/api/generate", {"model": "tiny-chat", "prompt": "Hello!", "options": GREEDY}, TINY_CHAT_REPLY)]
    pids = []
    for path, body, reply in cases:
        response = session.post(service.url + path, json=body, timeout=30)
        assert response.status_code == 200, response.text
        assert text(response) == reply
        pids.append(response.headers["X-Worker-Pid"])
    for path, body in [("/api/embed", {"model": "tiny-embed", "input": ["hello world"]}),
                       ("/api/embeddings", {"model": "tiny-embed", "prompt": "hello world"})]:
        response = session.post(service.url + path, json=body, timeout=30)
        assert response.status_code == 200, response.text
        pids.append(response.headers["X-Worker-Pid"])
    assert len(set(pids)) == len(pids) == 6
    service.wait_for(lambda: service.log().count("exited after serving 1 request(s)") >= 6, 15, "6 served exits")


# -- the bundled models, end to end


@pytest.mark.bundled
def test_the_bundled_models_as_ollama_lists_them(bundled_worker: ServerProcess) -> None:
    details = {model.model: model.details for model in ollama.Client(host=bundled_worker.url).list().models}
    chat_model, embedder = details["SmolLM2-135M-Instruct.Q4_1:latest"], details["all-MiniLM-L6-v2.f16:latest"]
    assert chat_model is not None and (chat_model.family, chat_model.parameter_size, chat_model.quantization_level) == \
        ("llama", "134.52M", "Q4_1")
    assert embedder is not None and (embedder.family, embedder.quantization_level) == ("bert", "F16")
    shown = ollama.Client(host=bundled_worker.url).show("SmolLM2-135M-Instruct.Q4_1")
    assert shown.parameters is not None and "num_ctx                        2048" in shown.parameters
    assert shown.template is not None and "<|im_start|>" in shown.template


@pytest.mark.bundled
def test_the_official_client_on_the_bundled_chat_model_knows_the_capital_of_france(bundled_worker: ServerProcess) -> None:
    client = ollama.Client(host=bundled_worker.url)
    messages = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": QUESTION}]
    options = {"temperature": 0, "num_predict": 40}
    reply = client.chat(model="SmolLM2-135M-Instruct.Q4_1", messages=messages, options=options)
    assert "Paris" in (reply.message.content or "")
    assert reply.done_reason == ("length" if reply.eval_count == 40 else "stop")
    streamed = "".join(part.message.content or "" for part in
                       client.chat(model="SmolLM2-135M-Instruct.Q4_1", messages=messages, options=options, stream=True))
    assert streamed == reply.message.content


@pytest.mark.bundled
def test_the_official_client_on_the_bundled_embedding_model(bundled_worker: ServerProcess) -> None:
    texts = ["The cat sits on the mat.", "A cat is sitting on the mat.", "Stock markets fell sharply today."]
    cat, paraphrase, stocks = ollama.Client(host=bundled_worker.url).embed(model="all-MiniLM-L6-v2.f16", input=texts).embeddings
    assert len(cat) == 384
    assert cosine(list(cat), list(paraphrase)) > cosine(list(cat), list(stocks)) + 0.3
