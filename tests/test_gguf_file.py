"""Reading GGUF metadata: the values serving needs, and clean errors on bad files."""

from __future__ import annotations

from pathlib import Path

import pytest

from api.gguf_file import FINGERPRINT_HEAD_BYTES, GGUFFormatError, file_fingerprint, read_metadata
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


def test_the_fingerprint_follows_the_file_name_size_and_header(tiny_model_dir: Path, tmp_path: Path) -> None:
    original = tiny_model_dir / "tiny-chat.gguf"
    fingerprint = file_fingerprint(original)
    assert fingerprint.startswith("fp_") and len(fingerprint) == 13 and int(fingerprint[3:], 16) >= 0
    data = original.read_bytes()
    same = tmp_path / "tiny-chat.gguf"
    same.write_bytes(data)
    assert file_fingerprint(same) == fingerprint  # a copy elsewhere is the same model
    renamed = tmp_path / "other.gguf"
    renamed.write_bytes(data)
    longer = tmp_path / "a" / "tiny-chat.gguf"
    longer.parent.mkdir()
    longer.write_bytes(data + b"\0")
    edited = tmp_path / "b" / "tiny-chat.gguf"
    edited.parent.mkdir()
    edited.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    past_the_head = tmp_path / "c" / "tiny-chat.gguf"
    past_the_head.parent.mkdir()
    past_the_head.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert len(data) > FINGERPRINT_HEAD_BYTES
    assert len({fingerprint, file_fingerprint(renamed), file_fingerprint(longer), file_fingerprint(edited)}) == 4
    assert file_fingerprint(past_the_head) == fingerprint  # by design: only the head is read, never the whole file
