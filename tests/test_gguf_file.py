"""Reading GGUF metadata: the values serving needs, and clean errors on bad files."""

from __future__ import annotations

from pathlib import Path

import pytest

from api.gguf_file import GGUFFormatError, read_metadata
from testing.tiny_models import TINY_CHAT_TEMPLATE


def test_reads_scalars_template_and_special_token_texts(tiny_model_dir: Path) -> None:
    metadata = read_metadata(tiny_model_dir / "tiny-chat.gguf")
    assert metadata["general.architecture"] == "llama"
    assert metadata["llama.context_length"] == 512
    assert metadata["tokenizer.chat_template"] == TINY_CHAT_TEMPLATE
    assert metadata["tokenizer.ggml.tokens"] is None  # arrays are skipped, not built
    assert metadata["eos_token"] == "<|im_end|>"


@pytest.mark.parametrize("content", [
    b"",
    b"GGML" + bytes(100),
    b"GGUF" + bytes(range(256)) * 40,  # lengths that would ask for gigabytes
])
def test_bad_files_raise_a_format_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    with pytest.raises(GGUFFormatError):
        read_metadata(path)


def test_truncated_header_is_a_format_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "cut.gguf"
    path.write_bytes((tiny_model_dir / "tiny-chat.gguf").read_bytes()[:300])
    with pytest.raises(GGUFFormatError, match="truncated or corrupt"):
        read_metadata(path)
