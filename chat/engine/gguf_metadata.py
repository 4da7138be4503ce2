"""Reading the key/value metadata of a GGUF file header (no tensors), with the standard library only.

Used before handing a file to a backend, e.g. to tell why ctransformers cannot read it, and to find
the chat template and special tokens that ctransformers does not expose.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any, BinaryIO

GGUF_MAGIC = b"GGUF"

# GGUF value type ids -> struct format of scalar types.
_SCALAR_FORMATS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


class NotGGUF(ValueError):
    """The file is not a GGUF file (or is truncated)."""


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """Return the metadata of a GGUF file as a dict (arrays as lists, strings decoded)."""
    with open(path, "rb") as file:
        if file.read(4) != GGUF_MAGIC:
            raise NotGGUF(f"{path} is not a GGUF file")
        (version,) = _unpack(file, "I")
        count_format = "I" if version == 1 else "Q"
        _tensor_count, kv_count = _unpack(file, count_format * 2)
        metadata = {}
        for _ in range(kv_count):
            key = _read_string(file, count_format)
            (value_type,) = _unpack(file, "I")
            metadata[key] = _read_value(file, value_type, count_format)
        return metadata


def _unpack(file: BinaryIO, fmt: str) -> tuple:
    size = struct.calcsize("<" + fmt)
    data = file.read(size)
    if len(data) != size:
        raise NotGGUF("truncated GGUF header")
    return struct.unpack("<" + fmt, data)


def _read_string(file: BinaryIO, count_format: str) -> str:
    (length,) = _unpack(file, count_format)
    data = file.read(length)
    if len(data) != length:
        raise NotGGUF("truncated GGUF header")
    return data.decode("utf-8", errors="replace")


def _read_value(file: BinaryIO, value_type: int, count_format: str) -> Any:
    if value_type == _STRING:
        return _read_string(file, count_format)
    if value_type == _ARRAY:
        item_type, count = _unpack(file, "I" + count_format)
        if item_type in _SCALAR_FORMATS:  # read numeric arrays in one go
            return list(_unpack(file, _SCALAR_FORMATS[item_type] * count)) if count else []
        return [_read_value(file, item_type, count_format) for _ in range(count)]
    if value_type in _SCALAR_FORMATS:
        return _unpack(file, _SCALAR_FORMATS[value_type])[0]
    raise NotGGUF(f"unknown GGUF value type {value_type}")
