"""Model names: what a client may ask for, and which installed file that means.

A model name is a bare `.gguf` file name inside MODEL_PATH. Anything that could reach outside that
folder (separators, `..`, absolute paths, drive letters) is refused before any file is touched.
Clients may leave out the `.gguf` suffix, as OpenAI-style model ids usually do.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from api.gguf_file import GGUFFormatError, read_metadata

MODEL_SUFFIX = ".gguf"
EMBEDDING_ARCHITECTURES = frozenset({"bert", "nomic-bert"})
MAX_NAME_LENGTH = 200
_SAFE_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._+\-]{{0,{MAX_NAME_LENGTH - 1}}}")
REQUESTED_MODEL_FILE_SCHEMA = {
    "pattern": r"^[A-Za-z0-9][A-Za-z0-9_+\-]*(?:\.[A-Za-z0-9_+\-]+)*$",
    "anyOf": [{"maxLength": MAX_NAME_LENGTH - len(MODEL_SUFFIX)},
              {"maxLength": MAX_NAME_LENGTH, "pattern": r"\.[Gg][Gg][Uu][Ff]$"}],
}
"""What file_name_for accepts, as JSON Schema keywords for the OpenAPI document: a letter or digit,
then letters, digits, '_', '+', '-' and single dots between them; at most 200 characters once
.gguf is added if it was left out. (A trailing dot would make '..' with the suffix added.)"""


class ModelNameError(ValueError):
    """A model name that is not a bare .gguf file name."""


def check_model_file_name(name: str) -> str:
    """Return `name` if it is a bare .gguf file name, else raise ModelNameError."""
    if not _SAFE_NAME.fullmatch(name) or ".." in name or not name.lower().endswith(MODEL_SUFFIX):
        raise ModelNameError("a bare .gguf file name (letters, digits, '.', '_', '-', '+'; no folders)")
    return name


def model_id(file_name: str) -> str:
    """The id a model is listed under: its file name without the .gguf suffix."""
    return file_name[: -len(MODEL_SUFFIX)] if file_name.lower().endswith(MODEL_SUFFIX) else file_name


def file_name_for(requested: str) -> str:
    """Map a requested model (with or without .gguf) to a file name, refusing unsafe names."""
    name = requested if requested.lower().endswith(MODEL_SUFFIX) else requested + MODEL_SUFFIX
    return check_model_file_name(name)


@dataclass(frozen=True)
class InstalledModel:
    file_name: str
    path: Path
    architecture: str
    size_bytes: int
    created: int

    @property
    def id(self) -> str:
        return model_id(self.file_name)

    @property
    def is_embedding(self) -> bool:
        return self.architecture in EMBEDDING_ARCHITECTURES


def describe(path: Path) -> InstalledModel | None:
    """Describe one model file, or None if it is not a readable GGUF model."""
    try:
        check_model_file_name(path.name)
        architecture = str(read_metadata(path).get("general.architecture", "unknown"))
        stat = path.stat()
    except (ModelNameError, GGUFFormatError, OSError):
        return None
    return InstalledModel(path.name, path, architecture, stat.st_size, int(stat.st_mtime))


def installed_models(model_dir: Path) -> list[InstalledModel]:
    """The readable .gguf models directly inside model_dir, sorted by name."""
    if not model_dir.is_dir():
        return []
    found = (describe(path) for path in sorted(model_dir.glob("*" + MODEL_SUFFIX)) if path.is_file())
    return [model for model in found if model is not None]
