"""Integer tensors (int8 codes, int32 words of packed 4-bit codes, zero points, int64 shapes, bool):
their bytes, or their 4-bit halves, entropy-coded.

A tensor's little-endian bytes are cut into units of ``unit`` = 8 bits (bytes) or 4 bits (nibbles,
the low one of each byte first). For int32 words that pack 4-bit codes with code ``i`` at bit
``4·i`` (compressed-tensors ``pack-quantized`` and tersa's layout alike), nibbles are exactly the
codes and bytes are pairs of codes (an alphabet of up to 256 that also catches any dependence
between neighbours); for int8 codes, bytes are the codes. With ``lanes`` > 1 the unit's position
inside its element is the context (an int64 holding small values has mostly-zero high bytes), i.e.
the units form a matrix [N / lanes, lanes] with one column class per lane. The encoder picks the
unit and whether to use lanes by the estimated size, preferring bytes (see ``NIBBLE_GAIN``).
"""

from __future__ import annotations

import numpy as np

from tersa.compress.lossless.grouping import Grouping
from tersa.compress.lossless.segment import Encoded
from tersa.compress.lossless.symbols import decode_symbols, encode_symbols
from tersa.errors import ContainerError

SEGMENT_OVERHEAD = 40  # header bytes per segment, counted in the size estimate
# Nibbles must save this much to be chosen over bytes. W4-g128 RTN codes of the embedded model
# (bench/size.py): bytes 3.631 bits per code, nibbles 3.627 (entropy 3.622). The coder decodes a
# byte symbol as fast as a nibble one, so bytes give twice the output per decoded symbol.
NIBBLE_GAIN = 0.005


def units(data: np.ndarray, unit: int) -> np.ndarray:
    """[N·8/unit] uint8 units of the bytes ``data`` [N]."""
    if unit == 8:
        return data
    out = np.empty(data.size * 2, np.uint8)
    out[0::2] = data & 0xF
    out[1::2] = data >> 4
    return out


def encode_int(data: np.ndarray, itemsize: int) -> Encoded:
    """Code the bytes ``data`` [N] (uint8) of an integer tensor of ``itemsize``-byte elements."""
    unit, lanes = _choose(data, itemsize)
    sym = units(data, unit)
    matrix = sym.reshape(-1, lanes)
    cols = np.arange(lanes, dtype=np.uint8) if lanes > 1 else None
    grouping = Grouping(None, cols, 1, lanes)
    return Encoded(
        "int", {"unit": unit, "lanes": lanes}, encode_symbols(matrix, grouping, 1 << unit)
    )


def decode_int(enc: Encoded, nbytes: int, itemsize: int, where: str) -> np.ndarray:
    """The [nbytes] uint8 bytes of an integer tensor coded by :func:`encode_int`."""
    unit, lanes = enc.params.get("unit"), enc.params.get("lanes")
    if unit not in (4, 8) or lanes not in (1, itemsize * 8 // unit):
        raise ContainerError(f"{where}: int codec parameters {enc.params} are not supported")
    count = nbytes * 8 // unit
    cols = np.arange(lanes, dtype=np.uint8) if lanes > 1 else None
    grouping = Grouping(None, cols, 1, lanes)
    shape = (count // lanes, lanes)
    sym = decode_symbols(enc.segments, grouping, shape, 1 << unit, np.dtype(np.uint8), where)
    sym = sym.reshape(-1)
    return sym if unit == 8 else sym[0::2] | (sym[1::2] << 4)


def _choose(data: np.ndarray, itemsize: int) -> tuple[int, int]:
    """(unit, lanes) with the smallest estimated size; bytes unless nibbles save over
    ``NIBBLE_GAIN`` (a byte decodes as fast as a nibble, so bytes decode twice the output)."""
    costs: dict[tuple[int, int], float] = {}
    for unit in (8, 4):
        sym = units(data, unit)
        full = itemsize * 8 // unit
        for lanes in sorted({1, full}):
            lane = np.arange(sym.size, dtype=np.int64) % lanes if lanes > 1 else 0
            counts = np.bincount(lane * (1 << unit) + sym, minlength=lanes << unit)
            costs[unit, lanes] = _estimate(counts.reshape(lanes, 1 << unit))
    best = min(costs, key=costs.__getitem__)
    bytes_best = min((k for k in costs if k[0] == 8), key=costs.__getitem__)
    return bytes_best if costs[bytes_best] <= (1 + NIBBLE_GAIN) * costs[best] else best


def _estimate(counts: np.ndarray) -> float:
    """Estimated bytes of the coded units, the table and the segments; counts [lanes, symbols]."""
    counts = counts[:, counts.sum(axis=0) > 0].astype(np.float64)
    totals = counts.sum(axis=1)
    nz = counts[counts > 0]
    t = totals[totals > 0]
    bits = float((t * np.log2(t)).sum() - (nz * np.log2(nz)).sum())
    table = 4 + 2 * counts.shape[1] + 1.5 * nz.size + 0.1 * (counts.size - nz.size)
    return bits / 8 + table + SEGMENT_OVERHEAD * (t.size + 1)
