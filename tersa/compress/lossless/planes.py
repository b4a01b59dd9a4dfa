"""Bit packing of w-bit unsigned values (the raw part of float tensors) as byte-aligned planes.

A value of ``w`` bits is cut from its low end into planes of 8, then 4, 2 and 1 bits
(``w = 5``: a 4-bit plane and a 1-bit plane). A plane of ``b`` bits packs ``8 // b`` values per byte,
value ``i`` at bit ``(i % (8 // b)) · b`` of byte ``i // (8 // b)``; planes follow each other in
that order. Each plane packs and unpacks with a few whole-array numpy operations.
"""

from __future__ import annotations

import numpy as np


def plane_widths(width: int) -> list[int]:
    """Plane widths for ``width``-bit values, low bits first: 21 → [8, 8, 4, 1]."""
    planes = [8] * (width // 8)
    rest = width % 8
    planes += [b for b in (4, 2, 1) if rest & b]
    return planes


def packed_size(count: int, width: int) -> int:
    """Bytes that ``count`` values of ``width`` bits take."""
    return sum(-(-count // (8 // b)) for b in plane_widths(width))


def pack(values: np.ndarray, width: int) -> bytes:
    """Pack [N] unsigned integers below ``2**width``."""
    parts, shift = [], 0
    for b in plane_widths(width):
        plane = ((values >> shift) & ((1 << b) - 1)).astype(np.uint8)
        parts.append(_pack_plane(plane, b))
        shift += b
    return b"".join(parts)


def unpack(data: bytes, count: int, width: int, dtype: np.dtype) -> np.ndarray:
    """The [count] values of ``dtype`` (wide enough for ``width`` bits); ``data`` must hold exactly
    ``packed_size(count, width)`` bytes (the caller checks)."""
    out = np.zeros(count, dtype)
    wide = np.empty(count, dtype)  # one reused buffer for each plane widened and shifted
    offset, shift = 0, 0
    for b in plane_widths(width):
        size = -(-count // (8 // b))
        plane = np.frombuffer(data, np.uint8, size, offset)
        wide[:] = _unpack_plane(plane, b, count)
        wide <<= dtype.type(shift)
        out |= wide
        offset += size
        shift += b
    return out


def _pack_plane(plane: np.ndarray, b: int) -> bytes:
    if b == 8:
        return plane.tobytes()
    if b == 1:
        return np.packbits(plane, bitorder="little").tobytes()
    per = 8 // b
    padded = np.zeros(-(-plane.size // per) * per, np.uint8)
    padded[: plane.size] = plane
    grid = padded.reshape(-1, per)  # [bytes, per]
    out = grid[:, 0].copy()
    for i in range(1, per):
        out |= grid[:, i] << (i * b)
    return out.tobytes()


def _unpack_plane(plane: np.ndarray, b: int, count: int) -> np.ndarray:
    if b == 8:
        return plane
    if b == 1:
        return np.unpackbits(plane, count=count, bitorder="little")
    per = 8 // b
    grid = np.empty((plane.size, per), np.uint8)
    mask = (1 << b) - 1
    for i in range(per):
        grid[:, i] = (plane >> (i * b)) & mask
    return grid.reshape(-1)[:count]
