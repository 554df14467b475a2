"""Model-file conversions the installer needs, with no knowledge of where the files come from.

- `copy_with_pre_tokenizer`: copies a GGUF chat model, rewriting a pre-tokenizer name that
  gpt4all 2.8.2's llama.cpp rejects to one it knows with the same regex (SmolLM2's `smollm`
  becomes `refact`), in place in the GGUF key/value header (see api/gguf_file.py).
- `convert_sentence_transformers_bert`: a sentence-transformers BERT directory (safetensors,
  vocab.txt) to a llama.cpp BERT GGUF, the way llama.cpp's convert_hf_to_gguf.py does it (f16
  matrices, f32 norms/biases/position and token-type embeddings, WordPiece vocabulary in
  llama.cpp's "phantom space" form), without torch.

Errors are `ConversionError`, one line each. numpy and gguf are imported only when converting.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

PRE_TOKENIZER_KEY = "tokenizer.ggml.pre"
PRE_TOKENIZER_RENAMES = {"smollm": "refact"}  # rejected by gpt4all 2.8.2 -> same regex, known there

EMBEDDING_SOURCE_FILES = ("model.safetensors", "vocab.txt", "config.json", "tokenizer_config.json")


class ConversionError(Exception):
    """A source model cannot be converted. The message is one line meant for a user."""


# --- chat model ----------------------------------------------------------------------------------


def copy_with_pre_tokenizer(source: Path, dest: Path) -> None:
    """Copy the GGUF `source` to `dest`, renaming a pre-tokenizer gpt4all cannot load."""
    from api.gguf_file import GGUFFormatError, patch_string_value, read_tensor_infos

    try:
        header, _, data_end = read_tensor_infos(source)
    except GGUFFormatError as e:
        raise ConversionError(f"the chat model source is not a usable GGUF file: {e}") from None
    size = source.stat().st_size
    if size < data_end:
        raise ConversionError(f"the chat model source {source} is truncated ({size} of {data_end} bytes)")
    shutil.copyfile(source, dest)
    old = header.get(PRE_TOKENIZER_KEY)
    if isinstance(old, str) and old in PRE_TOKENIZER_RENAMES:
        try:
            patch_string_value(dest, PRE_TOKENIZER_KEY, old, PRE_TOKENIZER_RENAMES[old])
        except (GGUFFormatError, KeyError) as e:
            raise ConversionError(f"cannot patch the chat model's pre-tokenizer: {e}") from None


# --- embedding model -----------------------------------------------------------------------------

_SAFETENSORS_DTYPES = {"F32": ("<f4", 4), "F16": ("<f2", 2), "BF16": ("<u2", 2), "I64": ("<i8", 8)}

# HF BERT tensor name -> (GGUF name, keep float32). Layer tensors use the {n} placeholder.
_BERT_TENSORS: dict[str, tuple[str, bool]] = {
    "embeddings.word_embeddings.weight": ("token_embd.weight", False),
    "embeddings.position_embeddings.weight": ("position_embd.weight", True),
    "embeddings.token_type_embeddings.weight": ("token_types.weight", True),
    "embeddings.LayerNorm.weight": ("token_embd_norm.weight", True),
    "embeddings.LayerNorm.bias": ("token_embd_norm.bias", True),
}
_BERT_LAYER_TENSORS: dict[str, str] = {
    "attention.self.query": "attn_q",
    "attention.self.key": "attn_k",
    "attention.self.value": "attn_v",
    "attention.output.dense": "attn_output",
    "attention.output.LayerNorm": "attn_output_norm",
    "intermediate.dense": "ffn_up",
    "output.dense": "ffn_down",
    "output.LayerNorm": "layer_output_norm",
}
_BERT_IGNORED = ("embeddings.position_ids", "pooler.dense.weight", "pooler.dense.bias")


def embedding_source_files(source_dir: Path) -> list[Path]:
    """The files of a sentence-transformers directory that the conversion reads."""
    files = [source_dir / n for n in EMBEDDING_SOURCE_FILES]
    modules = source_dir / "modules.json"
    files.append(source_dir / pooling_dir(source_dir) / "config.json")
    if modules.is_file():
        files.append(modules)
    return files


def pooling_dir(source_dir: Path) -> str:
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        for mod in json.loads((source_dir / "modules.json").read_text(encoding="utf-8")):
            if mod.get("type") == "sentence_transformers.models.Pooling":
                return str(mod["path"])
    return "1_Pooling"


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ConversionError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path} does not hold a JSON object")
    return data


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a .safetensors file as float32/int64 numpy arrays (no torch needed).

    Format: u64 little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
    then the raw little-endian data; offsets are relative to the end of the header.
    """
    import numpy as np

    def bad(why: str) -> ConversionError:
        return ConversionError(f"{path} is not a valid safetensors file: {why}")

    size = path.stat().st_size
    tensors: dict[str, np.ndarray] = {}
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise bad("too short")
        (n,) = struct.unpack("<Q", raw)
        if n > min(size - 8, 100 << 20):
            raise bad("implausible header length")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise bad(f"header is not JSON ({e})") from None
        if not isinstance(header, dict):
            raise bad("header is not a JSON object")
        base = 8 + n
        for name, info in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype, itemsize = _SAFETENSORS_DTYPES[info["dtype"]]
                shape = [int(d) for d in info["shape"]]
                start, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise bad(f"tensor {name!r} has an unsupported or malformed entry") from None
            count = math.prod(shape)
            if end - start != count * itemsize or start < 0 or base + end > size:
                raise bad(f"tensor {name!r} lies outside the file (truncated?)")
            f.seek(base + start)
            buf = f.read(end - start)
            if len(buf) != end - start:
                raise bad(f"tensor {name!r} is truncated")
            arr = np.frombuffer(buf, dtype=dtype).reshape(shape)
            if info["dtype"] == "BF16":
                arr = (arr.astype(np.uint32) << 16).view(np.float32)
            elif info["dtype"] == "F16":
                arr = arr.astype(np.float32)
            tensors[name] = arr
    return tensors


def _read_wordpiece_vocab(path: Path) -> list[str]:
    """vocab.txt the way transformers' BertTokenizer reads it: one token per "\\n"-terminated line."""
    try:
        with open(path, encoding="utf-8") as f:  # universal newlines, as transformers opens it
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ConversionError(f"cannot read {path}: {e}") from None
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def llama_wordpiece_form(token: str) -> str:
    """llama.cpp's WordPiece form: word starts get U+2581, "##" continuations lose the marker."""
    if token.startswith("[") and token.endswith("]"):
        return token
    if token.startswith("##"):
        return token[2:]
    return "\u2581" + token


def unique_vocab(tokens: list[str]) -> list[str]:
    """Make entries unique (llama.cpp aborts on a duplicate) the way transformers resolves them.

    transformers' vocab dict keeps the LAST id of a repeated string, so that id keeps the text and
    each earlier occurrence becomes the unreachable "[unused-duplicate-<id>]".
    """
    last = {t: i for i, t in enumerate(tokens)}
    out = [t if last[t] == i else f"[unused-duplicate-{i}]" for i, t in enumerate(tokens)]
    taken = set(out)
    if len(taken) != len(out):  # only if the vocabulary itself holds such names: number on
        seen: set[str] = set()
        for i, t in enumerate(out):
            while t in seen:
                t = f"[unused-duplicate-{i}-{len(seen)}]"
            seen.add(t)
            out[i] = t
    return out


def convert_sentence_transformers_bert(source_dir: Path, dest: Path, *, model_name: str = "all-MiniLM-L6-v2") -> None:
    """Convert a sentence-transformers BERT directory to a llama.cpp BERT GGUF at `dest` (f16).

    model_name becomes general.name; gpt4all recognises "all-MiniLM-L6-v2" (no task prefix needed).
    """
    import gguf

    config = _read_json(source_dir / "config.json")
    tok_config = _read_json(source_dir / "tokenizer_config.json")
    pooling = _read_json(source_dir / pooling_dir(source_dir) / "config.json")

    if config.get("model_type", "bert") != "bert" or config.get("position_embedding_type", "absolute") != "absolute":
        raise ConversionError("the embedding model source is not a plain BERT model")
    if config.get("hidden_act", "gelu") not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
        raise ConversionError(f"unsupported BERT activation {config.get('hidden_act')!r}")
    try:
        n_embd = int(config["hidden_size"])
        n_layer = int(config["num_hidden_layers"])
        n_head = int(config["num_attention_heads"])
        n_ff = int(config["intermediate_size"])
        n_ctx = int(config.get("max_position_embeddings", 512))
        eps = float(config.get("layer_norm_eps", 1e-12))
        n_type = int(config.get("type_vocab_size", 2))
    except (KeyError, TypeError, ValueError) as e:
        raise ConversionError(f"the embedding model's config.json lacks or garbles {e}") from None
    if pooling.get("pooling_mode_mean_tokens"):
        pooling_type = gguf.PoolingType.MEAN
    elif pooling.get("pooling_mode_cls_token"):
        pooling_type = gguf.PoolingType.CLS
    else:
        raise ConversionError("only mean or CLS pooling is supported for the embedding model")

    weights = read_safetensors(source_dir / "model.safetensors")
    # Some exports prefix every name with "bert."; strip it.
    weights = {k.removeprefix("bert."): v for k, v in weights.items()}

    vocab_txt = _read_wordpiece_vocab(source_dir / "vocab.txt")
    emb = weights.get("embeddings.word_embeddings.weight")
    if emb is None or emb.ndim != 2 or emb.shape[1] != n_embd:
        raise ConversionError("the embedding model's word embeddings are missing or misshapen")
    n_vocab = emb.shape[0]
    if len(vocab_txt) > n_vocab:
        raise ConversionError(f"vocab.txt has {len(vocab_txt)} entries but the model only {n_vocab} embeddings")
    n_listed = len(vocab_txt)
    # Rows without a vocab.txt line get an UNUSED placeholder, as convert_hf_to_gguf.py does.
    vocab_txt += [f"[PAD{i}]" for i in range(n_listed, n_vocab)]
    tokens = unique_vocab([llama_wordpiece_form(t) for t in vocab_txt])

    specials: dict[str, int] = {}
    for kind, default in (("unk", "[UNK]"), ("cls", "[CLS]"), ("sep", "[SEP]"), ("pad", "[PAD]"), ("mask", "[MASK]")):
        text = tok_config.get(f"{kind}_token", default)
        if isinstance(text, dict):  # an AddedToken serialization
            text = text.get("content", default)
        if text in vocab_txt:
            specials[kind] = vocab_txt.index(text)
    for kind in ("unk", "cls", "sep"):
        if kind not in specials:
            raise ConversionError(f"vocab.txt has no {kind.upper()} token")
    special_ids = set(specials.values())
    token_types = [
        int(gguf.TokenType.CONTROL) if i in special_ids
        else int(gguf.TokenType.UNUSED) if i >= n_listed
        else int(gguf.TokenType.NORMAL)
        for i in range(n_vocab)
    ]

    w = gguf.GGUFWriter(dest, arch="bert")
    w.add_name(model_name)
    w.add_context_length(n_ctx)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_layer_norm_eps(eps)
    w.add_causal_attention(False)
    w.add_pooling_type(pooling_type)
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_F16))
    w.add_tokenizer_model("bert")
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_type_count(n_type)
    w.add_unk_token_id(specials["unk"])
    w.add_uint32("tokenizer.ggml.cls_token_id", specials["cls"])
    w.add_sep_token_id(specials["sep"])
    w.add_bos_token_id(specials["cls"])
    w.add_eos_token_id(specials["sep"])
    if "pad" in specials:
        w.add_pad_token_id(specials["pad"])
    if "mask" in specials:
        w.add_mask_token_id(specials["mask"])

    for name, arr in _map_bert_tensors(weights, n_layer):
        w.add_tensor(name, arr)
    write_gguf(w)


def write_gguf(writer: Any) -> None:
    """Write everything a gguf.GGUFWriter holds (header, metadata, tensors) and close it."""
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def _map_bert_tensors(weights: dict[str, np.ndarray], n_layer: int) -> Iterator[tuple[str, np.ndarray]]:
    import numpy as np

    mapping: dict[str, tuple[str, bool]] = dict(_BERT_TENSORS)
    for n in range(n_layer):
        for hf, gg in _BERT_LAYER_TENSORS.items():
            mapping[f"encoder.layer.{n}.{hf}.weight"] = (f"blk.{n}.{gg}.weight", gg.endswith("_norm"))
            mapping[f"encoder.layer.{n}.{hf}.bias"] = (f"blk.{n}.{gg}.bias", True)
    unknown = sorted(k for k in weights if k not in mapping and k not in _BERT_IGNORED)
    if unknown:
        raise ConversionError(f"the embedding model has tensors this converter does not know: {unknown[0]}")
    missing = [k for k in mapping if k not in weights]
    if missing:
        raise ConversionError(f"the embedding model lacks the tensor {missing[0]}")
    for hf, (gg, keep_f32) in mapping.items():
        arr = np.asarray(weights[hf], dtype=np.float32)
        if not np.isfinite(arr).all():
            raise ConversionError(f"the embedding model's tensor {hf} holds non-finite values")
        if arr.ndim == 2 and not keep_f32:
            arr16 = arr.astype(np.float16)
            if not np.isfinite(arr16).all():
                raise ConversionError(f"the embedding model's tensor {hf} overflows float16")
            yield gg, arr16
        else:
            yield gg, np.ascontiguousarray(arr)
