"""The tiny test models load in real gpt4all 2.8.2 and behave exactly as testing/tiny_models.py documents."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from gpt4all import Embed4All, GPT4All
from gpt4all._pyllmodel import llmodel

from api.gguf_file import read_gguf_header
from testing.tiny_models import (
    IM_END_ID,
    TINY_CHAT_REPLY,
    TINY_CHAT_TEMPLATE,
    TINY_EMBEDDING_DIM,
    build_tiny_chat_model,
    build_tiny_embedding_model,
)

CHATML_PROMPT = "<|im_start|>user\nHi there!<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tiny")
    build_tiny_chat_model(d / "tiny-chat.gguf")
    build_tiny_embedding_model(d / "tiny-embedding.gguf")
    return d


@pytest.fixture(scope="module")
def chat(model_dir: Path) -> Iterator[GPT4All]:
    started = time.monotonic()
    model = GPT4All("tiny-chat.gguf", model_path=model_dir, allow_download=False, device="cpu", n_ctx=512, n_threads=1)
    assert time.monotonic() - started < 2.0  # milliseconds in practice
    assert llmodel.llmodel_isModelLoaded(model.model.model)
    yield model
    model.close()


@pytest.fixture(scope="module")
def embedder(model_dir: Path) -> Iterator[Embed4All]:
    e = Embed4All("tiny-embedding.gguf", model_path=model_dir, allow_download=False, device="cpu", n_threads=1)
    assert llmodel.llmodel_isModelLoaded(e.gpt4all.model.model)
    yield e
    e.close()


def generate(model: GPT4All, prompt: str, n_predict: int = 64, stop_after: int | None = None) -> list[tuple[int, str]]:
    """Greedy generation through prompt_model with special tokens parsed; returns (token id, text) pairs."""
    got: list[tuple[int, str]] = []

    def on_token(token_id: int, text: str) -> bool:
        got.append((token_id, text))
        return stop_after is None or len(got) < stop_after

    model.model.prompt_model(
        prompt, "%1%2", on_token, n_predict=n_predict, temp=0, top_k=1, n_batch=128, reset_context=True, special=True
    )
    return got


def text_of(tokens: list[tuple[int, str]]) -> str:
    assert all(tid != -1 for tid, _ in tokens), tokens
    return "".join(t for _, t in tokens)


def test_chatml_prompt_gives_the_documented_reply(chat: GPT4All) -> None:
    tokens = generate(chat, CHATML_PROMPT)
    assert text_of(tokens) == TINY_CHAT_REPLY == "abcdefghijklmnopqrstuvwxyz"
    assert len(tokens) == 26  # one token per letter; EOS (<|im_end|>) stops without being emitted
    assert IM_END_ID not in [tid for tid, _ in tokens]


@pytest.mark.parametrize(
    ("prompt", "reply"),
    [
        ("Hello", "pqrstuvwxyz"),  # last byte "o"
        ("Hello!", TINY_CHAT_REPLY),  # anything that is not a lowercase letter or digit -> "a"
        ("HELLO", TINY_CHAT_REPLY),
        ("x", "yz"),
        ("z", ""),  # straight to EOS
    ],
)
def test_reply_depends_only_on_the_last_token(chat: GPT4All, prompt: str, reply: str) -> None:
    assert text_of(generate(chat, prompt)) == reply


def test_digits_cycle_until_n_predict(chat: GPT4All) -> None:
    assert text_of(generate(chat, "count: 0", n_predict=25)) == "1234567890123456789012345"


def test_callback_false_cancels(chat: GPT4All) -> None:
    assert text_of(generate(chat, "count: 0", n_predict=1000, stop_after=5)) == "12345"
    # ...and the model is fine for the next request.
    assert text_of(generate(chat, CHATML_PROMPT)) == TINY_CHAT_REPLY


def test_metadata(model_dir: Path, tmp_path: Path) -> None:
    header = read_gguf_header(model_dir / "tiny-chat.gguf")
    assert header.get("general.architecture") == "llama"
    assert header.get("tokenizer.chat_template") == TINY_CHAT_TEMPLATE
    assert header.get("tokenizer.ggml.eos_token_id") == IM_END_ID
    assert header.get("llama.context_length") == 512
    long_ctx = build_tiny_chat_model(tmp_path / "long.gguf", context_length=4096)
    assert read_gguf_header(long_ctx).get("llama.context_length") == 4096
    emb = read_gguf_header(model_dir / "tiny-embedding.gguf")
    assert emb.get("general.architecture") == "bert"
    assert emb.get("bert.pooling_type") == 1


def test_builders_are_deterministic(model_dir: Path, tmp_path: Path) -> None:
    assert build_tiny_chat_model(tmp_path / "c.gguf").read_bytes() == (model_dir / "tiny-chat.gguf").read_bytes()
    assert build_tiny_embedding_model(tmp_path / "e.gguf").read_bytes() == (model_dir / "tiny-embedding.gguf").read_bytes()


def test_embeddings_are_deterministic_and_distinct(embedder: Embed4All) -> None:
    a1 = embedder.embed("the cat sits on the mat", prefix="")
    a2 = embedder.embed("the cat sits on the mat", prefix="")
    b = embedder.embed("stock markets fell today", prefix="")
    batch = embedder.embed(["the cat sits on the mat", "stock markets fell today"], prefix="")
    assert len(a1) == TINY_EMBEDDING_DIM
    assert all(math.isfinite(x) for x in a1 + b)
    assert a1 == a2  # bit-identical for the same text
    # In a batch the texts share one llama.cpp batch: equal up to float rounding.
    assert max(abs(x - y) for x, y in zip(a1, batch[0], strict=True)) < 1e-5
    assert max(abs(x - y) for x, y in zip(b, batch[1], strict=True)) < 1e-5
    assert max(abs(x - y) for x, y in zip(a1, b, strict=True)) > 1e-3
    # Anything ASCII tokenizes (every character is in the vocabulary) and comes back unit-length.
    odd = embedder.embed("Zebra-42 & QUUX?!", prefix="")
    assert abs(math.sqrt(sum(x * x for x in odd)) - 1.0) < 1e-4
