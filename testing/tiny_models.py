"""Tiny GGUF models for the test suite: they load in gpt4all 2.8.2 in milliseconds and behave exactly.

Tiny chat model (`build_tiny_chat_model`): llama architecture, 2 layers, width 64, ~200 KB.

    Vocabulary: ids 0-255 are the 256 byte tokens of GPT-2's byte-level BPE (bytes_to_unicode),
    id 256 `<|endoftext|>` (BOS), 257 `<|im_start|>`, 258 `<|im_end|>` (EOS), all three CONTROL
    tokens, and id 259 the merge of bytes 0xFF 0xFE, which never occur in UTF-8 text (GGUF requires
    `tokenizer.ggml.merges` and cannot store an empty array, so there is exactly one merge that can
    never apply). Every byte of a prompt is therefore its own token; with special-token parsing
    (`prompt_model(..., special=True)`) `<|im_start|>` and `<|im_end|>` are single tokens.

    The attention output and FFN down projections are zero, so the residual stream at each position
    is just the current token's embedding, and the output matrix maps each token to one successor.
    Greedy decoding (temp 0 / top_k 1; any repeat penalty keeps the order) therefore depends only
    on the LAST token of the prompt and then follows the successor chain:

        "a" -> "b" -> ... -> "y" -> "z" -> <|im_end|>   (EOS: generation stops)
        "0" -> "1" -> ... -> "9" -> "0" -> ...          (an endless cycle, never EOS)
        anything else -> "a"   (newline, space, upper case, punctuation, other bytes, control tokens)

    So after a ChatML prompt that ends in "<|im_start|>assistant\\n" the reply is exactly
    TINY_CHAT_REPLY = "abcdefghijklmnopqrstuvwxyz" (26 tokens, then EOS); after "Hello" (last byte
    "o") it is "pqrstuvwxyz"; after "Hello!" it is the whole alphabet; after "...0" the model
    generates "1234567890123..." until max_tokens or a cancel.
    Metadata carries the standard ChatML chat template (the one SmolLM2-Instruct ships).

Tiny embedding model (`build_tiny_embedding_model`): BERT architecture, 2 layers, width 32,
2 heads, mean pooling, WordPiece vocabulary of [PAD] [UNK] [CLS] [SEP] [MASK], a few whole words,
and every lowercase letter, digit and ASCII punctuation mark both as a word start and as a "##"
continuation, so any lowercase ASCII text tokenizes without [UNK]. Weights are random with a fixed
seed: the same text always gives the same vector and different texts give different vectors.
"""

from __future__ import annotations

import shutil
import string
from collections.abc import Sequence
from pathlib import Path

import gguf
import numpy as np

from install.convert import llama_wordpiece_form, write_gguf

TINY_CHAT_REPLY: str = "abcdefghijklmnopqrstuvwxyz"
"""The exact greedy reply of the tiny chat model after a prompt that ends in a newline."""

TINY_CHAT_TEMPLATE: str = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""ChatML, as SmolLM2-Instruct ships it minus its default system message."""

TINY_RAW_TEMPLATE: str = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
"""A chat template that is just the messages' text: the reply then follows the last character."""

TINY_CHAT_NAME = "tiny-chat"
TINY_EMBEDDING_NAME = "tiny-embedding"
TINY_EMBEDDING_DIM = 32

BOS_ID = 256  # <|endoftext|>
IM_START_ID = 257
IM_END_ID = 258  # EOS
_N_VOCAB = 260

_CHAT_WIDTH = 64
_CHAT_LAYERS = 2
_CHAT_HEADS = 4
_CHAT_FF = 64


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible mapping of the 256 byte values to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def _successor(token_id: int) -> int:
    """The token the tiny chat model emits after `token_id` (see the module docstring)."""
    if ord("a") <= token_id < ord("z"):
        return token_id + 1
    if token_id == ord("z"):
        return IM_END_ID
    if ord("0") <= token_id <= ord("9"):
        return ord("0") + (token_id - ord("0") + 1) % 10
    return ord("a")


def _feature(token_id: int) -> int:
    """Embedding dimension that carries a token's class: one per letter, one per digit, one for the rest."""
    if ord("a") <= token_id <= ord("z"):
        return token_id - ord("a")  # 0..25
    if ord("0") <= token_id <= ord("9"):
        return 26 + token_id - ord("0")  # 26..35
    return 36


def build_tiny_chat_model(path: Path, *, context_length: int = 512, pre_tokenizer: str = "default",
                          chat_template: str = TINY_CHAT_TEMPLATE) -> Path:
    """Write the tiny llama chat model to `path` (a file name ending in .gguf) and return the path.

    pre_tokenizer: `tokenizer.ggml.pre`; a name gpt4all's llama.cpp does not know makes a model that
    fails to load (useful to test error paths).
    chat_template: the template in its metadata; TINY_RAW_TEMPLATE makes a model whose chat prompt is
    the messages' text alone, so a conversation ending in "0" counts digits forever (endless streams).
    """
    path = Path(path)
    b2u = bytes_to_unicode()
    tokens = [b2u[b] for b in range(256)] + ["<|endoftext|>", "<|im_start|>", "<|im_end|>", b2u[0xFF] + b2u[0xFE]]
    token_types = [int(gguf.TokenType.NORMAL)] * 256 + [int(gguf.TokenType.CONTROL)] * 3 + [int(gguf.TokenType.NORMAL)]
    merges = [f"{b2u[0xFF]} {b2u[0xFE]}"]
    assert len(tokens) == _N_VOCAB

    rng = np.random.default_rng(1234)
    # Embeddings: a one-hot class feature, so RMS norm maps every token to 8 * e_feature exactly.
    embd = np.zeros((_N_VOCAB, _CHAT_WIDTH), dtype=np.float32)
    for t in range(_N_VOCAB):
        embd[t, _feature(t)] = 1.0
    # Output: logit(successor) = 8 * 4 = 32 for the token's class, 0 for every other token.
    out = np.zeros((_N_VOCAB, _CHAT_WIDTH), dtype=np.float32)
    for t in range(_N_VOCAB):
        out[_successor(t), _feature(t)] = 4.0

    w = gguf.GGUFWriter(path, arch="llama")
    w.add_name(TINY_CHAT_NAME)
    w.add_context_length(context_length)
    w.add_embedding_length(_CHAT_WIDTH)
    w.add_block_count(_CHAT_LAYERS)
    w.add_feed_forward_length(_CHAT_FF)
    w.add_head_count(_CHAT_HEADS)
    w.add_head_count_kv(_CHAT_HEADS)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(_CHAT_WIDTH // _CHAT_HEADS)
    w.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre_tokenizer)
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(merges)
    w.add_bos_token_id(BOS_ID)
    w.add_eos_token_id(IM_END_ID)
    w.add_pad_token_id(IM_END_ID)
    w.add_add_bos_token(False)
    w.add_add_eos_token(False)
    w.add_chat_template(chat_template)

    w.add_tensor("token_embd.weight", embd)
    w.add_tensor("output_norm.weight", np.ones(_CHAT_WIDTH, dtype=np.float32))
    w.add_tensor("output.weight", out)
    for i in range(_CHAT_LAYERS):
        def rand(rows: int, cols: int) -> np.ndarray:
            return (rng.standard_normal((rows, cols)) * 0.1).astype(np.float32)

        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(_CHAT_WIDTH, dtype=np.float32))
        w.add_tensor(f"blk.{i}.attn_q.weight", rand(_CHAT_WIDTH, _CHAT_WIDTH))
        w.add_tensor(f"blk.{i}.attn_k.weight", rand(_CHAT_WIDTH, _CHAT_WIDTH))
        w.add_tensor(f"blk.{i}.attn_v.weight", rand(_CHAT_WIDTH, _CHAT_WIDTH))
        w.add_tensor(f"blk.{i}.attn_output.weight", np.zeros((_CHAT_WIDTH, _CHAT_WIDTH), dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(_CHAT_WIDTH, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", rand(_CHAT_FF, _CHAT_WIDTH))
        w.add_tensor(f"blk.{i}.ffn_up.weight", rand(_CHAT_FF, _CHAT_WIDTH))
        w.add_tensor(f"blk.{i}.ffn_down.weight", np.zeros((_CHAT_WIDTH, _CHAT_FF), dtype=np.float32))
    _write(w, path)
    return path


# --- tiny BERT ---------------------------------------------------------------------------------

_EMB_LAYERS = 2
_EMB_HEADS = 2
_EMB_FF = 64
_EMB_CONTEXT = 512
_EMB_WORDS = (
    "the", "a", "an", "is", "are", "was", "be", "to", "of", "and", "in", "on", "at", "it", "this", "that",
    "cat", "dog", "sits", "sat", "mat", "hello", "world", "good", "bad", "day", "night",
    "stock", "market", "markets", "fell", "rose", "today", "sun", "moon",
)


def tiny_embedding_vocab() -> list[str]:
    """The tiny BERT's WordPiece vocabulary in vocab.txt form ("##" marks a continuation)."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = string.ascii_lowercase + string.digits + string.punctuation
    vocab += list(chars)
    vocab += ["##" + c for c in chars]
    vocab += [w for w in _EMB_WORDS if w not in vocab]
    assert len(vocab) == len(set(vocab))
    return vocab


def build_tiny_embedding_model(path: Path, *, vocab: Sequence[str] | None = None) -> Path:
    """Write the tiny BERT embedding model to `path` (a file name ending in .gguf) and return the path.

    vocab: a vocabulary in vocab.txt form to use instead of `tiny_embedding_vocab()`; its first five
    entries must be [PAD] [UNK] [CLS] [SEP] [MASK]. It is written as given, so a test can build a
    deliberately broken model (gpt4all aborts the process on a duplicate entry).
    """
    path = Path(path)
    vocab = [llama_wordpiece_form(t) for t in (tiny_embedding_vocab() if vocab is None else vocab)]
    token_types = [
        int(gguf.TokenType.CONTROL) if t.startswith("[") and t.endswith("]") else int(gguf.TokenType.NORMAL) for t in vocab
    ]
    d, ff = TINY_EMBEDDING_DIM, _EMB_FF
    rng = np.random.default_rng(4321)

    def rand(*shape: int, scale: float = 0.2) -> np.ndarray:
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    w = gguf.GGUFWriter(path, arch="bert")
    w.add_name(TINY_EMBEDDING_NAME)
    w.add_context_length(_EMB_CONTEXT)
    w.add_embedding_length(d)
    w.add_block_count(_EMB_LAYERS)
    w.add_feed_forward_length(ff)
    w.add_head_count(_EMB_HEADS)
    w.add_layer_norm_eps(1e-12)
    w.add_causal_attention(False)
    w.add_pooling_type(gguf.PoolingType.MEAN)
    w.add_file_type(int(gguf.LlamaFileType.ALL_F32))
    w.add_tokenizer_model("bert")
    w.add_token_list(vocab)
    w.add_token_types(token_types)
    w.add_token_type_count(2)
    w.add_unk_token_id(1)
    w.add_uint32("tokenizer.ggml.cls_token_id", 2)
    w.add_sep_token_id(3)
    w.add_pad_token_id(0)
    w.add_mask_token_id(4)
    w.add_bos_token_id(2)
    w.add_eos_token_id(3)

    w.add_tensor("token_embd.weight", rand(len(vocab), d, scale=1.0))
    w.add_tensor("token_types.weight", rand(2, d))
    w.add_tensor("position_embd.weight", rand(_EMB_CONTEXT, d))
    w.add_tensor("token_embd_norm.weight", np.ones(d, dtype=np.float32))
    w.add_tensor("token_embd_norm.bias", np.zeros(d, dtype=np.float32))
    for i in range(_EMB_LAYERS):
        for name in ("attn_q", "attn_k", "attn_v", "attn_output"):
            w.add_tensor(f"blk.{i}.{name}.weight", rand(d, d))
            w.add_tensor(f"blk.{i}.{name}.bias", rand(d, scale=0.02))
        w.add_tensor(f"blk.{i}.attn_output_norm.weight", np.ones(d, dtype=np.float32))
        w.add_tensor(f"blk.{i}.attn_output_norm.bias", np.zeros(d, dtype=np.float32))
        w.add_tensor(f"blk.{i}.ffn_up.weight", rand(ff, d))
        w.add_tensor(f"blk.{i}.ffn_up.bias", rand(ff, scale=0.02))
        w.add_tensor(f"blk.{i}.ffn_down.weight", rand(d, ff))
        w.add_tensor(f"blk.{i}.ffn_down.bias", rand(d, scale=0.02))
        w.add_tensor(f"blk.{i}.layer_output_norm.weight", np.ones(d, dtype=np.float32))
        w.add_tensor(f"blk.{i}.layer_output_norm.bias", np.zeros(d, dtype=np.float32))
    _write(w, path)
    return path


def _write(w: gguf.GGUFWriter, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_gguf(w)


TINY_CHAT = "tiny-chat.gguf"
TINY_EMBED = "tiny-embed.gguf"


def copy_tiny_models(source: Path, folder: Path) -> Path:
    """A private copy of the tiny models in `folder` (created), for a test that breaks, moves or
    overwrites a model file without touching the shared one."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in (TINY_CHAT, TINY_EMBED):
        shutil.copy(source / name, folder / name)
    return folder


def tiny_settings(**overrides: object) -> dict[str, object]:
    """Settings that run a worker or the daemon on the tiny models (in a folder built by the
    tiny_model_dir fixture), one thread each."""
    settings: dict[str, object] = {"MODEL_NAME": TINY_CHAT, "EMBEDDING_MODEL_NAME": TINY_EMBED, "N_THREADS": 1}
    settings.update(overrides)
    return settings
