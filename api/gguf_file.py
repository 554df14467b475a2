"""GGUF files: fast reading of the key/value header, and same-length patches of one string value.

`gguf.GGUFReader` parses every array (tokens, merges) and every tensor description: about 2 s on a
100 MB model. This reader walks only the key/value section, skips arrays without decoding them
(unless asked), and remembers where each value lives in the file, so that a metadata string can be
rewritten in place when its length does not change (the only edit that leaves every later offset,
and therefore the tensor data, untouched).

GGUF layout (versions 2 and 3, little-endian):
    magic "GGUF" | version u32 | tensor_count u64 | kv_count u64 | kv_count x (key, type u32, value)
    key / string = length u64 + UTF-8 bytes; array = element type u32 + count u64 + elements.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import struct
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)

# GGUF value types.
T_UINT8, T_INT8, T_UINT16, T_INT16, T_UINT32, T_INT32, T_FLOAT32, T_BOOL = range(8)
T_STRING, T_ARRAY, T_UINT64, T_INT64, T_FLOAT64 = range(8, 13)

_SCALAR_FORMATS: dict[int, str] = {
    T_UINT8: "<B",
    T_INT8: "<b",
    T_UINT16: "<H",
    T_INT16: "<h",
    T_UINT32: "<I",
    T_INT32: "<i",
    T_FLOAT32: "<f",
    T_BOOL: "<?",
    T_UINT64: "<Q",
    T_INT64: "<q",
    T_FLOAT64: "<d",
}
_SCALAR_SIZES: dict[int, int] = {t: struct.calcsize(f) for t, f in _SCALAR_FORMATS.items()}

# Sanity limits so a corrupt header fails fast instead of allocating or looping forever.
_MAX_KV = 1 << 20
_MAX_STRING = 1 << 30


class GGUFFormatError(ValueError):
    """The file is not a GGUF file this reader understands, or its header is corrupt."""


@dataclass(frozen=True)
class GGUFField:
    """One metadata key/value.

    `value` is the decoded value: an int/float/bool/str for scalars, a list for arrays that were
    loaded, or None for arrays that were skipped (`count` and `element_type` still say what they hold).
    `value_offset` is the file offset of the value's payload (for a string: of its u64 length).
    """

    key: str
    type: int
    value: Any
    value_offset: int
    element_type: int | None = None
    count: int | None = None


@dataclass
class GGUFHeader:
    version: int
    tensor_count: int
    fields: dict[str, GGUFField] = field(default_factory=dict)
    kv_end_offset: int = 0  # first byte after the key/value section (tensor infos start here)

    def get(self, key: str, default: Any = None) -> Any:
        f = self.fields.get(key)
        return default if f is None else f.value


class _Cursor:
    def __init__(self, buf: mmap.mmap | bytes, path: Path) -> None:
        self.buf = buf
        self.pos = 0
        self.size = len(buf)
        self.path = path

    def need(self, n: int) -> None:
        if n < 0 or self.pos + n > self.size:
            raise GGUFFormatError(f"{self.path.name}: GGUF header is truncated or corrupt (at byte {self.pos})")

    def scalar(self, vtype: int) -> Any:
        size = _SCALAR_SIZES[vtype]
        self.need(size)
        (v,) = struct.unpack_from(_SCALAR_FORMATS[vtype], self.buf, self.pos)
        self.pos += size
        return v

    def string_bytes(self) -> bytes:
        n = self.scalar(T_UINT64)
        if n > _MAX_STRING:
            raise GGUFFormatError(f"{self.path.name}: implausible string length {n} at byte {self.pos - 8}")
        self.need(n)
        b = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        return b

    def string(self) -> str:
        raw = self.string_bytes()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="replace")

    def skip_string(self) -> None:
        n = self.scalar(T_UINT64)
        self.need(n)
        self.pos += n


def _read_value(cur: _Cursor, vtype: int, load_array: bool) -> tuple[Any, int | None, int | None]:
    if vtype in _SCALAR_FORMATS:
        return cur.scalar(vtype), None, None
    if vtype == T_STRING:
        return cur.string(), None, None
    if vtype != T_ARRAY:
        raise GGUFFormatError(f"{cur.path.name}: unknown GGUF value type {vtype} at byte {cur.pos - 4}")
    etype = cur.scalar(T_UINT32)
    count = cur.scalar(T_UINT64)
    if etype in _SCALAR_FORMATS:
        size = _SCALAR_SIZES[etype] * count
        cur.need(size)
        if load_array:
            fmt = f"<{count}{_SCALAR_FORMATS[etype][1]}"
            values: Any = list(struct.unpack_from(fmt, cur.buf, cur.pos))
        else:
            values = None
        cur.pos += size
        return values, etype, count
    if etype == T_STRING:
        if load_array:
            values = [cur.string() for _ in range(count)]
        else:
            values = None
            for _ in range(count):
                cur.skip_string()
        return values, etype, count
    if etype == T_ARRAY:
        # Nested arrays exist in the spec but no model we handle uses them.
        nested = [_read_value(cur, T_ARRAY, load_array)[0] for _ in range(count)]
        return (nested if load_array else None), etype, count
    raise GGUFFormatError(f"{cur.path.name}: unknown GGUF array element type {etype}")


@contextlib.contextmanager
def _mapped(path: str | os.PathLike[str]) -> Iterator[tuple[mmap.mmap, Path]]:
    """The file mapped read-only (headers of large models are read without copying them)."""
    p = Path(path)
    with open(p, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 24:
            raise GGUFFormatError(f"{p.name}: too small to be a GGUF file ({size} bytes)")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            yield mm, p


SPECIAL_TOKEN_TEXT_KEYS = {"bos_token": "tokenizer.ggml.bos_token_id", "eos_token": "tokenizer.ggml.eos_token_id"}


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The header's values by key (arrays skipped: None), plus the text of the BOS and EOS tokens
    as "bos_token" and "eos_token", which chat templates use, looked up without decoding the
    whole token array."""
    with _mapped(path) as (mm, p):
        header = _parse_header(mm, p, False)
        metadata = {key: found.value for key, found in header.fields.items()}
        tokens = header.fields.get("tokenizer.ggml.tokens")
        if tokens is not None and tokens.element_type == T_STRING:
            for name, id_key in SPECIAL_TOKEN_TEXT_KEYS.items():
                token_id = metadata.get(id_key)
                if isinstance(token_id, int) and 0 <= token_id < (tokens.count or 0):
                    metadata[name] = _string_array_item(_Cursor(mm, p), tokens.value_offset + 12, token_id)
    return metadata


def _string_array_item(cur: _Cursor, items_offset: int, index: int) -> str:
    """The index-th string of a string array whose items start at items_offset (after type and count)."""
    cur.pos = items_offset
    for _ in range(index):
        cur.skip_string()
    return cur.string()


FINGERPRINT_HEAD_BYTES = 1 << 16


def file_fingerprint(path: str | os.PathLike[str]) -> str:
    """A short stable id of a model file, OpenAI's `system_fingerprint` ("fp_" and 10 hex digits): a
    hash of the file's name, its size and its first 64 KiB (the GGUF header's start: version, counts,
    architecture, quantization). Cheap enough to compute at every model load, unlike a hash of the
    whole file; a different file of the same name almost always differs in size or header."""
    file = Path(path)
    with open(file, "rb") as stream:
        head = stream.read(FINGERPRINT_HEAD_BYTES)
    identity = hashlib.sha256(f"{file.name}\0{file.stat().st_size}\0".encode() + head)
    return "fp_" + identity.hexdigest()[:10]


def read_gguf_header(path: str | os.PathLike[str], *, load_arrays: bool | Collection[str] = False) -> GGUFHeader:
    """Read the key/value header of a GGUF file.

    load_arrays: False (skip every array), True (decode all) or a collection of keys whose arrays
    should be decoded (e.g. {"tokenizer.ggml.tokens"}).
    Raises GGUFFormatError for a file that is not GGUF or whose header is corrupt; OSError if unreadable.
    """
    with _mapped(path) as (mm, p):
        return _parse_header(mm, p, load_arrays)


def _parse_header(buf: mmap.mmap, path: Path, load_arrays: bool | Collection[str]) -> GGUFHeader:
    cur = _Cursor(buf, path)
    cur.need(4)
    if bytes(buf[0:4]) != GGUF_MAGIC:
        raise GGUFFormatError(f"{path.name}: not a GGUF file (bad magic {bytes(buf[0:4])!r})")
    cur.pos = 4
    version = cur.scalar(T_UINT32)
    if version not in SUPPORTED_VERSIONS:
        raise GGUFFormatError(f"{path.name}: unsupported GGUF version {version}")
    tensor_count = cur.scalar(T_UINT64)
    kv_count = cur.scalar(T_UINT64)
    if kv_count > _MAX_KV:
        raise GGUFFormatError(f"{path.name}: implausible key/value count {kv_count}")
    header = GGUFHeader(version=version, tensor_count=tensor_count)
    for _ in range(kv_count):
        key = cur.string()
        vtype = cur.scalar(T_UINT32)
        offset = cur.pos
        load = load_arrays if isinstance(load_arrays, bool) else key in load_arrays
        value, etype, count = _read_value(cur, vtype, load)
        if key in header.fields:
            raise GGUFFormatError(f"{path.name}: duplicate metadata key {key!r}")
        header.fields[key] = GGUFField(key, vtype, value, offset, etype, count)
    header.kv_end_offset = cur.pos
    return header


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    shape: tuple[int, ...]  # ggml order (ne0 first)
    ggml_type: int
    offset: int  # relative to the start of the tensor data section
    nbytes: int


def read_tensor_infos(path: str | os.PathLike[str]) -> tuple[GGUFHeader, list[GGUFTensorInfo], int]:
    """Header, tensor descriptions and the byte size the file must have to hold all tensor data.

    Lets a caller reject a truncated model file before handing it to llama.cpp (which may load a
    truncated file "successfully" and then generate nothing). Imports `gguf` for the type sizes.
    """
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    with _mapped(path) as (mm, p):
        header = _parse_header(mm, p, False)
        cur = _Cursor(mm, p)
        cur.pos = header.kv_end_offset
        infos: list[GGUFTensorInfo] = []
        for _ in range(header.tensor_count):
            name = cur.string()
            n_dims = cur.scalar(T_UINT32)
            if n_dims > 8:
                raise GGUFFormatError(f"{p.name}: tensor {name!r} has {n_dims} dimensions")
            dims = tuple(cur.scalar(T_UINT64) for _ in range(n_dims))
            ggml_type = cur.scalar(T_UINT32)
            offset = cur.scalar(T_UINT64)
            try:
                block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
            except (ValueError, KeyError):
                raise GGUFFormatError(f"{p.name}: tensor {name!r} has unknown type {ggml_type}") from None
            n = 1
            for d in dims:
                n *= d
            if n % block:
                raise GGUFFormatError(f"{p.name}: tensor {name!r} size {n} is not a multiple of its block {block}")
            infos.append(GGUFTensorInfo(name, dims, ggml_type, offset, n // block * type_size))
        end_of_infos = cur.pos
    alignment = header.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0:
        raise GGUFFormatError(f"{p.name}: invalid general.alignment {alignment!r}")
    data_start = -(-end_of_infos // alignment) * alignment
    data_end = data_start + max((t.offset + t.nbytes for t in infos), default=0)
    return header, infos, data_end


def patch_string_value(path: str | os.PathLike[str], key: str, expected: str, replacement: str) -> bool:
    """Rewrite the string value of `key` from `expected` to `replacement` in place.

    Both must have the same UTF-8 length, so no offset in the file moves. Returns True if the file
    was changed, False if the value already was `replacement`. Raises KeyError if the key is absent,
    GGUFFormatError if it is not a string or holds something other than `expected`/`replacement`.
    The caller is responsible for working on a copy and for fsync.
    """
    old_b, new_b = expected.encode("utf-8"), replacement.encode("utf-8")
    if len(old_b) != len(new_b):
        raise ValueError(f"replacement {replacement!r} must have the same byte length as {expected!r}")
    p = Path(path)
    header = read_gguf_header(p)
    fld = header.fields.get(key)
    if fld is None:
        raise KeyError(f"{p.name}: no metadata key {key!r}")
    if fld.type != T_STRING:
        raise GGUFFormatError(f"{p.name}: metadata {key!r} is not a string (type {fld.type})")
    if fld.value == replacement:
        return False
    if fld.value != expected:
        raise GGUFFormatError(f"{p.name}: metadata {key!r} is {fld.value!r}, expected {expected!r}")
    start = fld.value_offset + 8  # skip the u64 length
    with open(p, "r+b") as f:
        f.seek(start)
        if f.read(len(old_b)) != old_b:  # the header parse and the bytes must agree
            raise GGUFFormatError(f"{p.name}: metadata {key!r} bytes are not where the header says")
        f.seek(start)
        f.write(new_b)
        f.flush()
    return True
