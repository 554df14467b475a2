"""Read the key/value metadata at the head of a GGUF file, quickly.

`gguf.GGUFReader` parses every array (the tokenizer's 50k strings, all tensor infos) and takes
about 2 s on a 100 MB model. Serving needs only a few scalars and the chat template, so this
reader walks the header and skips arrays without building them: about 50 ms for the same file.
Format: https://github.com/ggml-org/ggml/blob/master/docs/gguf.md
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import BinaryIO

GGUF_MAGIC = b"GGUF"

# value type -> struct format of one scalar of that type
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class GGUFFormatError(ValueError):
    """The file is not a readable GGUF file."""


_MAX_STRING_BYTES = 16 * 1024 * 1024  # a chat template is a few KB; a larger length means a corrupt file


def _read(stream: BinaryIO, size: int) -> bytes:
    if size > _MAX_STRING_BYTES:
        raise GGUFFormatError("the header holds an impossible length (corrupt file?)")
    data = stream.read(size)
    if len(data) != size:
        raise GGUFFormatError("the file ends inside its header (truncated?)")
    return data


def _unpack(stream: BinaryIO, fmt: str) -> object:
    return struct.unpack(fmt, _read(stream, struct.calcsize(fmt)))[0]


def _read_string(stream: BinaryIO) -> str:
    length = int(_unpack(stream, "<Q"))  # type: ignore[call-overload]
    return _read(stream, length).decode("utf-8", errors="replace")


def _skip_array(stream: BinaryIO, item_type: int, count: int) -> None:
    if count > _MAX_STRING_BYTES:
        raise GGUFFormatError("the header holds an impossible array length (corrupt file?)")
    if item_type in _SCALARS:
        stream.seek(struct.calcsize(_SCALARS[item_type]) * count, 1)
    elif item_type == _STRING:
        for _ in range(count):
            stream.seek(int(_unpack(stream, "<Q")), 1)  # type: ignore[call-overload]
    elif item_type == _ARRAY:
        for _ in range(count):
            inner_type, inner_count = int(_unpack(stream, "<I")), int(_unpack(stream, "<Q"))  # type: ignore[call-overload]
            _skip_array(stream, inner_type, inner_count)
    else:
        raise GGUFFormatError(f"unknown array item type {item_type}")


def _read_value(stream: BinaryIO, value_type: int) -> object:
    if value_type in _SCALARS:
        return _unpack(stream, _SCALARS[value_type])
    if value_type == _STRING:
        return _read_string(stream)
    if value_type == _ARRAY:
        item_type, count = int(_unpack(stream, "<I")), int(_unpack(stream, "<Q"))  # type: ignore[call-overload]
        _skip_array(stream, item_type, count)
        return None  # arrays are skipped: nothing we serve needs them
    raise GGUFFormatError(f"unknown value type {value_type}")


_TOKENS_KEY = "tokenizer.ggml.tokens"
SPECIAL_TOKEN_TEXT_KEYS = {"bos_token": "tokenizer.ggml.bos_token_id", "eos_token": "tokenizer.ggml.eos_token_id"}


def _string_array_item(stream: BinaryIO, array_offset: int, index: int) -> str | None:
    """The index-th string of the string array whose items start at array_offset."""
    stream.seek(array_offset)
    for _ in range(index):
        stream.seek(int(_unpack(stream, "<Q")), 1)  # type: ignore[call-overload]
    try:
        return _read_string(stream)
    except GGUFFormatError:
        return None


def read_metadata(path: Path) -> dict[str, object]:
    """Return the header's scalar and string values; array values are present with value None.

    Also returns the text of the BOS and EOS tokens as "bos_token" and "eos_token" (chat templates
    refer to them), looked up in the token array without building it.
    """
    with open(path, "rb") as stream:
        if _read(stream, 4) != GGUF_MAGIC:
            raise GGUFFormatError(f"{path.name} is not a GGUF file")
        version = int(_unpack(stream, "<I"))  # type: ignore[call-overload]
        if version < 2:
            raise GGUFFormatError(f"{path.name}: GGUF version {version} is not supported")
        _tensor_count, kv_count = _unpack(stream, "<Q"), int(_unpack(stream, "<Q"))  # type: ignore[call-overload]
        if kv_count > 100_000:
            raise GGUFFormatError(f"{path.name}: the header claims {kv_count} metadata entries (corrupt file?)")
        metadata: dict[str, object] = {}
        tokens_offset: int | None = None
        for _ in range(kv_count):
            key = _read_string(stream)
            value_type = int(_unpack(stream, "<I"))  # type: ignore[call-overload]
            if key == _TOKENS_KEY and value_type == _ARRAY:
                tokens_offset = stream.tell() + 12  # after the item type (u32) and count (u64)
            metadata[key] = _read_value(stream, value_type)
        for name, id_key in SPECIAL_TOKEN_TEXT_KEYS.items():
            token_id = metadata.get(id_key)
            if tokens_offset is not None and isinstance(token_id, int):
                metadata[name] = _string_array_item(stream, tokens_offset, token_id)
        return metadata
