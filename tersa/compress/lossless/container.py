"""The lossless container file: write coded tensors, read them back bit-identical, or read the index.

See :mod:`tersa.compress.lossless.spec` for the byte layout and the limits, and
:mod:`tersa.compress.lossless.header` for the header. Reading checks, in order: the preamble
(magic, version, header length and crc32), every header field, that the declared segments fill the
payload exactly, that the declared output fits the limits, then per tensor each segment's crc32
before it is decoded and the decoded bytes' crc32. Every problem raises
:class:`~tersa.errors.ContainerError`.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import BinaryIO

import torch

from tersa.compress.lossless.codec import as_bytes, decode_tensor, encode_tensor
from tersa.compress.lossless.header import SegmentEntry, TensorEntry, dump_header, parse_header
from tersa.compress.lossless.segment import Encoded, Segment
from tersa.compress.lossless.spec import (
    BY_TORCH,
    EXPANSION,
    MAGIC,
    MAX_HEADER_BYTES,
    PREAMBLE_BYTES,
    RETIRED_VERSIONS,
    SLACK_BYTES,
    SUPPORTED_VERSIONS,
    VERSION,
)
from tersa.errors import ContainerError

_PREAMBLE = struct.Struct("<8sIII")


@dataclass
class TensorInfo:
    """One stored tensor: what it is, how it is coded and the bytes it takes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    coder: str
    stored_bytes: int
    numel: int

    @property
    def bits_per_param(self) -> float:
        return 8 * self.stored_bytes / self.numel if self.numel else 0.0


def describe(codec: str, params: Mapping[str, int]) -> str:
    """Short name of a coder: ``raw``, ``ans exp+m3 ctx 2x8``, ``ans int4 lanes 8``."""
    if codec == "float":
        ctx = (
            f" ctx {params.get('rows')}x{params.get('cols')}"
            if params.get("rows", 1) * params.get("cols", 1) > 1
            else ""
        )
        return f"ans exp+m{params.get('k')}{ctx}"
    if codec == "int":
        lanes = f" lanes {params.get('lanes')}" if params.get("lanes", 1) > 1 else ""
        return f"ans int{params.get('unit')}{lanes}"
    return codec


def encode_container(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> tuple[list[bytes], list[TensorInfo]]:
    """The container's parts (write them in order) and what each tensor became."""
    entries, payload, infos = [], [], []
    for name, tensor in tensors.items():
        if tensor.dtype not in BY_TORCH:
            raise ContainerError(
                f"tensor '{name}' has dtype {tensor.dtype}, which the lossless container does not "
                f"store (it stores {', '.join(d.name for d in BY_TORCH.values())})"
            )
        enc = encode_tensor(tensor)
        segs = [
            SegmentEntry(s.kind, len(s.data), zlib.crc32(s.data), s.symbols) for s in enc.segments
        ]
        entry = TensorEntry(
            name,
            BY_TORCH[tensor.dtype],
            tuple(tensor.shape),
            zlib.crc32(as_bytes(tensor)),
            enc.codec,
            enc.params,
            segs,
        )
        entries.append(entry)
        payload += [s.data for s in enc.segments]
        infos.append(_info(entry))
    header = dump_header(entries, dict(metadata or {}))
    if len(header) > MAX_HEADER_BYTES:
        raise ContainerError(f"the header takes {len(header)} bytes, over {MAX_HEADER_BYTES}")
    preamble = _PREAMBLE.pack(MAGIC, VERSION, len(header), zlib.crc32(header))
    return [preamble, header, *payload], infos


def write_container(
    path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> list[TensorInfo]:
    """Write ``tensors`` (CPU tensors of the allowlisted dtypes) to ``path``."""
    parts, infos = encode_container(tensors, metadata)
    with open(path, "wb") as f:
        for part in parts:
            f.write(part)
    return infos


def decode_container(
    data: bytes | memoryview, max_output_bytes: int | None = None, workers: int = 1
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of a container held in memory.

    :param max_output_bytes: refuse containers that declare more decoded bytes (default:
        ``EXPANSION`` × the container's size + ``SLACK_BYTES``).
    :param workers: tensors decoded at once, in threads (the rANS loop, numpy and crc32 release
        the GIL). Errors are the same whatever the count: the first bad tensor in file order.
    """
    view = memoryview(data)
    entries, metadata = _index(view[:PREAMBLE_BYTES], view, len(view))
    limit = EXPANSION * len(view) + SLACK_BYTES if max_output_bytes is None else max_output_bytes
    declared = sum(e.nbytes for e in entries)
    if declared > limit:
        raise ContainerError(
            f"container declares {declared} decoded bytes, over the limit of {limit} "
            f"for a {len(view)}-byte file"
        )
    start = PREAMBLE_BYTES + _header_length(view)
    offsets = list(accumulate((e.stored_bytes for e in entries), initial=start))  # [n + 1]
    if workers <= 1 or len(entries) < 2:
        decoded = [_decode_entry(e, view, o) for e, o in zip(entries, offsets, strict=False)]
    else:
        with ThreadPoolExecutor(min(workers, len(entries))) as pool:
            futures = [
                pool.submit(_decode_entry, e, view, o)
                for e, o in zip(entries, offsets, strict=False)
            ]
            try:
                decoded = [f.result() for f in futures]  # in file order: the first error wins
            finally:
                for f in futures:
                    f.cancel()
    return {e.name: t for e, t in zip(entries, decoded, strict=True)}, metadata


def read_container(
    path: Path, max_output_bytes: int | None = None, workers: int = 1
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of the container file ``path`` (``workers``: see
    :func:`decode_container`)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise ContainerError(f"cannot read '{path}': {e}") from None
    return decode_container(data, max_output_bytes, workers)


def read_some(
    path: Path, names: Collection[str], max_bytes: int = 1 << 20
) -> dict[str, torch.Tensor]:
    """Decode only the tensors ``names`` (those present) of ``path``, reading only their segments;
    together they may declare at most ``max_bytes`` decoded bytes."""
    try:
        with open(path, "rb") as f:
            preamble, header, size = _read_header(f)
            length = len(header)
            entries, _ = _index(memoryview(preamble), memoryview(preamble + header), size)
            wanted = [e for e in entries if e.name in set(names)]
            wanted_names = {e.name for e in wanted}
            declared = sum(e.nbytes for e in wanted)
            if declared > max_bytes:
                raise ContainerError(
                    f"'{path}': the tensors asked for declare {declared} bytes, over {max_bytes}"
                )
            out, offset = {}, PREAMBLE_BYTES + length
            for e in entries:
                if e.name in wanted_names:
                    f.seek(offset)
                    out[e.name] = _decode_entry(e, memoryview(f.read(e.stored_bytes)), 0)
                offset += e.stored_bytes
    except OSError as e:
        raise ContainerError(f"cannot read '{path}': {e}") from None
    return out


def read_index(path: Path) -> tuple[list[TensorInfo], dict[str, str]]:
    """What ``path`` stores (names, dtypes, shapes, coders, sizes) from its header alone."""
    try:
        with open(path, "rb") as f:
            preamble, header, size = _read_header(f)
    except OSError as e:
        raise ContainerError(f"cannot read '{path}': {e}") from None
    entries, metadata = _index(memoryview(preamble), memoryview(preamble + header), size)
    return [_info(e) for e in entries], metadata


def _read_header(f: BinaryIO) -> tuple[bytes, bytes, int]:
    """``(preamble, header, file size)`` of the open container ``f``, the preamble checked."""
    size = f.seek(0, 2)
    f.seek(0)
    preamble = f.read(PREAMBLE_BYTES)
    header = f.read(_check_preamble(memoryview(preamble), size))
    return preamble, header, size


def _info(e: TensorEntry) -> TensorInfo:
    return TensorInfo(
        e.name, e.dtype.name, e.shape, describe(e.codec, e.params), e.stored_bytes, e.numel
    )


def _header_length(view: memoryview) -> int:
    return _PREAMBLE.unpack(view[:PREAMBLE_BYTES])[2]


def _check_preamble(preamble: memoryview, size: int) -> int:
    """The header length, after checking magic, version and that the header fits the file."""
    if size < PREAMBLE_BYTES:
        raise ContainerError(
            f"container is truncated: {size} bytes, shorter than its {PREAMBLE_BYTES}-byte preamble"
        )
    magic, version, length, _ = _PREAMBLE.unpack(preamble)
    if magic != MAGIC:
        raise ContainerError(f"not a tersa lossless container (magic bytes {magic!r})")
    if version in RETIRED_VERSIONS:
        raise ContainerError(
            f"container format version {version} was written by an earlier tersa and is no "
            f"longer read (this tersa reads {', '.join(map(str, SUPPORTED_VERSIONS))}); "
            "export the model again"
        )
    if version not in SUPPORTED_VERSIONS:
        raise ContainerError(
            f"container format version {version} is not supported (this tersa reads "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))}); upgrade tersa"
        )
    if length > MAX_HEADER_BYTES:
        raise ContainerError(
            f"container header declares {length} bytes, over the limit of {MAX_HEADER_BYTES}"
        )
    if PREAMBLE_BYTES + length > size:
        raise ContainerError(
            f"container is truncated: the header needs {length} bytes, the file holds "
            f"{size - PREAMBLE_BYTES} after the preamble"
        )
    return length


def _index(
    preamble: memoryview, data: memoryview, size: int
) -> tuple[list[TensorEntry], dict[str, str]]:
    """Validated header entries; ``data`` holds at least the preamble and the header."""
    length = _check_preamble(preamble, size)
    header = data[PREAMBLE_BYTES : PREAMBLE_BYTES + length]
    if zlib.crc32(header) != _PREAMBLE.unpack(preamble)[3]:
        raise ContainerError("container header checksum mismatch: the file is corrupt")
    entries, metadata = parse_header(bytes(header))
    payload = size - PREAMBLE_BYTES - length
    declared = sum(e.stored_bytes for e in entries)
    if declared != payload:
        state = "truncated" if declared > payload else "longer than declared"
        raise ContainerError(
            f"container is {state}: the header declares {declared} payload bytes, "
            f"the file holds {payload}"
        )
    return entries, metadata


def _decode_entry(entry: TensorEntry, view: memoryview, offset: int) -> torch.Tensor:
    where = f"tensor '{entry.name}'"
    segments = []
    for i, s in enumerate(entry.segments):
        data = view[offset : offset + s.size]
        if zlib.crc32(data) != s.crc32:
            raise ContainerError(f"{where}: checksum mismatch in segment {i} ({s.kind})")
        segments.append(Segment(s.kind, data, s.symbols))  # type: ignore[arg-type]
        offset += s.size
    tensor = decode_tensor(
        Encoded(entry.codec, entry.params, segments), entry.dtype, entry.shape, where
    )
    if zlib.crc32(as_bytes(tensor)) != entry.crc32:
        raise ContainerError(f"{where}: checksum mismatch of the decoded tensor")
    return tensor
