"""Static frequency tables: counts quantized to integers summing to 2**PRECISION, their bytes, and
the cost in bits of coding with them.

A tensor's table block holds its alphabet (the symbol values it uses, increasing) and one frequency
row per context over that alphabet. Stored as ``zlib(u16 A, u16 K, u16 alphabet[A], u16 freqs[K, A])``
(little-endian): a row sums to exactly ``TOTAL`` when its context has symbols, else is all zero.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from tersa.compress.lossless.spec import MAX_ALPHABET, TOTAL
from tersa.errors import ContainerError


@dataclass
class Table:
    """``alphabet`` [A] uint16 (increasing symbol values), ``freqs`` [K, A] int64 (rows sum to
    ``TOTAL`` or are zero)."""

    alphabet: np.ndarray
    freqs: np.ndarray


def quantize(counts: np.ndarray) -> np.ndarray:
    """Frequencies [K, A] summing to ``TOTAL`` per non-empty row, every seen symbol at least 1.

    :param counts: [K, A] non-negative symbol counts per context.
    """
    counts = counts.astype(np.int64)
    freqs = np.zeros_like(counts)
    for row, c in zip(freqs, counts, strict=True):
        total = int(c.sum())
        if total == 0:
            continue
        f = c * TOTAL // total
        f[(c > 0) & (f == 0)] = 1
        deficit = TOTAL - int(f.sum())  # > 0: flooring lost mass; < 0: the forced ones added some
        while deficit < 0:
            i = int(np.argmax(f))
            take = min(-deficit, int(f[i]) - 1)
            f[i] -= take
            deficit += take
        f[np.argmax(f)] += deficit
        row[:] = f
    return freqs


def coded_bits(counts: np.ndarray, freqs: np.ndarray) -> float:
    """Bits that ``counts`` [K, A] cost under ``freqs`` [K, A] (ideal code length; ANS is within a
    few words of it per chunk)."""
    mask = counts > 0
    return float(-(counts[mask] * np.log2(freqs[mask] / TOTAL)).sum())


def table_bytes(table: Table) -> bytes:
    """The stored (zlib-compressed) table block."""
    k, a = table.freqs.shape
    raw = (
        np.array([a, k], "<u2").tobytes()
        + table.alphabet.astype("<u2").tobytes()
        + table.freqs.astype("<u2").tobytes()
    )
    return zlib.compress(raw, 9)


def read_table(data: bytes, contexts: int, symbol_limit: int, where: str) -> Table:
    """Parse and check a table block of ``contexts`` rows whose symbols are below ``symbol_limit``.

    Row sums are checked by :func:`check_rows` once the caller knows which contexts are empty.
    """
    limit = 4 + 2 * MAX_ALPHABET * (1 + contexts)
    d = zlib.decompressobj()
    try:
        raw = d.decompress(data, limit)
    except zlib.error as e:
        raise ContainerError(f"{where}: the frequency table is not valid zlib data ({e})") from None
    if not d.eof or d.unconsumed_tail or d.unused_data:
        raise ContainerError(f"{where}: the frequency table is larger than the limit or truncated")
    if len(raw) < 4:
        raise ContainerError(f"{where}: the frequency table is shorter than its 4-byte size")
    a, k = (int(v) for v in np.frombuffer(raw[:4], "<u2"))
    if k != contexts or not 1 <= a <= MAX_ALPHABET or len(raw) != 4 + 2 * a * (1 + k):
        raise ContainerError(
            f"{where}: the frequency table declares {a} symbols × {k} contexts in {len(raw)} "
            f"bytes; expected {contexts} contexts and 1..{MAX_ALPHABET} symbols"
        )
    alphabet = np.frombuffer(raw, "<u2", a, 4).astype(np.int64)
    freqs = np.frombuffer(raw, "<u2", a * k, 4 + 2 * a).astype(np.int64).reshape(k, a)
    if np.any(np.diff(alphabet) <= 0) or alphabet[-1] >= symbol_limit:
        raise ContainerError(
            f"{where}: the table's alphabet is not increasing below {symbol_limit}; "
            "the file is corrupt"
        )
    return Table(alphabet.astype(np.uint16), freqs)


def check_rows(table: Table, sizes: list[int], where: str) -> None:
    """Every context with symbols has a row summing to ``TOTAL``; empty contexts have zero rows."""
    sums = table.freqs.sum(axis=1)
    for ctx, (total, size) in enumerate(zip(sums.tolist(), sizes, strict=True)):
        want = TOTAL if size else 0
        if total != want:
            raise ContainerError(
                f"{where}: the frequency table of context {ctx} sums to {total}, not {want}; "
                "the file is corrupt"
            )
