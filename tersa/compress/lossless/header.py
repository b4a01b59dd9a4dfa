"""The container header: JSON built from coded tensors, and parsed back with every field checked.

::

    {"format": "tersa-lossless", "version": 1, "metadata": {str: str},
     "tensors": [{"name": str, "dtype": "bfloat16", "shape": [int, ...], "crc32": int,
                  "codec": "raw" | "float" | "int", "params": {str: int},
                  "segments": [[kind, bytes, crc32, symbols], ...]}, ...]}

``crc32`` of a tensor is that of its decoded bytes; a segment's is that of its stored bytes.
Segments lie in the payload in the order listed, tensor after tensor.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from tersa.compress.lossless.segment import KINDS
from tersa.compress.lossless.spec import (
    DTYPES,
    FORMAT_NAME,
    MAX_NAME_CHARS,
    MAX_NDIM,
    MAX_SEGMENTS,
    MAX_TENSOR_BYTES,
    MAX_TENSORS,
    VERSION,
    DType,
)
from tersa.errors import ContainerError

CODECS = ("raw", "float", "int")
U32 = 1 << 32


@dataclass
class SegmentEntry:
    kind: str
    size: int
    crc32: int
    symbols: int


@dataclass
class TensorEntry:
    """One tensor as the header declares it (validated)."""

    name: str
    dtype: DType
    shape: tuple[int, ...]
    crc32: int
    codec: str
    params: dict[str, int] = field(default_factory=dict)
    segments: list[SegmentEntry] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    @property
    def stored_bytes(self) -> int:
        return sum(s.size for s in self.segments)


def dump_header(entries: list[TensorEntry], metadata: dict[str, str]) -> bytes:
    """The header bytes (compact JSON)."""
    tensors = [
        {
            "name": e.name,
            "dtype": e.dtype.name,
            "shape": list(e.shape),
            "crc32": e.crc32,
            "codec": e.codec,
            "params": e.params,
            "segments": [[s.kind, s.size, s.crc32, s.symbols] for s in e.segments],
        }
        for e in entries
    ]
    doc = {"format": FORMAT_NAME, "version": VERSION, "metadata": metadata, "tensors": tensors}
    return json.dumps(doc, separators=(",", ":")).encode()


def parse_header(raw: bytes) -> tuple[list[TensorEntry], dict[str, str]]:
    """Validate the header bytes; :class:`ContainerError` names the first problem."""
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, huge ints
        raise ContainerError(f"container header is not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT_NAME:
        raise ContainerError(f"container header does not declare format '{FORMAT_NAME}'")
    if doc.get("version") != VERSION:
        raise ContainerError(
            f"container header declares version {doc.get('version')!r}, not {VERSION}"
        )
    metadata = doc.get("metadata")
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise ContainerError("container header: metadata must map strings to strings")
    tensors = doc.get("tensors")
    if not isinstance(tensors, list):
        raise ContainerError("container header: 'tensors' must be a list")
    if len(tensors) > MAX_TENSORS:
        raise ContainerError(
            f"container header declares {len(tensors)} tensors, over the limit of {MAX_TENSORS}"
        )
    entries = [_tensor(t, i) for i, t in enumerate(tensors)]
    names = [e.name for e in entries]
    if len(set(names)) != len(names):
        raise ContainerError("container header names a tensor twice")
    total = sum(len(e.segments) for e in entries)
    if total > MAX_SEGMENTS:
        raise ContainerError(
            f"container header declares {total} segments, over the limit of {MAX_SEGMENTS}"
        )
    return entries, metadata


def _tensor(t: Any, i: int) -> TensorEntry:
    where = f"container header, tensor {i}"
    if not isinstance(t, dict) or set(t) != {
        "name", "dtype", "shape", "crc32", "codec", "params", "segments"
    }:  # fmt: skip
        raise ContainerError(
            f"{where}: expected the keys name, dtype, shape, crc32, codec, params, segments"
        )
    name = t["name"]
    if not isinstance(name, str) or not 0 < len(name) <= MAX_NAME_CHARS:
        raise ContainerError(f"{where}: the name must be a string of 1..{MAX_NAME_CHARS} chars")
    where = f"container header, tensor '{name}'"
    dtype = DTYPES.get(t["dtype"]) if isinstance(t["dtype"], str) else None
    if dtype is None:
        raise ContainerError(f"{where}: dtype {t['dtype']!r} is not one of {', '.join(DTYPES)}")
    shape = t["shape"]
    if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(_int(s) for s in shape):
        raise ContainerError(f"{where}: the shape must be a list of at most {MAX_NDIM} sizes ≥ 0")
    entry = TensorEntry(name, dtype, tuple(shape), 0, "raw")
    # the non-zero sizes alone must fit too: [0, 2**62] holds nothing but no array reshapes to it
    span = math.prod(s for s in shape if s) * dtype.itemsize
    if span > MAX_TENSOR_BYTES:
        raise ContainerError(
            f"{where}: declares {entry.nbytes} bytes (sizes {shape[:4]}{'...' if len(shape) > 4 else ''}), "
            f"over the limit of {MAX_TENSOR_BYTES}"
        )
    if not _int(t["crc32"], U32) or t["codec"] not in CODECS:
        raise ContainerError(f"{where}: crc32 or codec ({t['codec']!r}) is invalid")
    params = t["params"]
    if not isinstance(params, dict) or not all(_int(v, 256) for v in params.values()):
        raise ContainerError(f"{where}: params must map names to small integers")
    entry.crc32, entry.codec, entry.params = t["crc32"], t["codec"], params
    entry.segments = _segments(t["segments"], where)
    return entry


def _segments(segs: Any, where: str) -> list[SegmentEntry]:
    if not isinstance(segs, list) or len(segs) > MAX_SEGMENTS:
        raise ContainerError(f"{where}: segments must be a list of at most {MAX_SEGMENTS}")
    out = []
    for s in segs:
        ok = (
            isinstance(s, list)
            and len(s) == 4
            and s[0] in KINDS
            and _int(s[1], MAX_TENSOR_BYTES)
            and _int(s[2], U32)
            and _int(s[3], U32)
        )
        if not ok:
            raise ContainerError(
                f"{where}: segment {_short(s)} is not [kind, bytes, crc32, symbols]"
            )
        out.append(SegmentEntry(*s))
    return out


def _int(v: Any, below: int | None = None) -> bool:
    """A plain non-negative int (not a bool), below ``below`` when given."""
    return type(v) is int and v >= 0 and (below is None or v < below)


def _short(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."
