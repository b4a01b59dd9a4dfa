"""A matrix of integer symbols ↔ a table segment and ANS chunk segments, one frequency row per
context of a :class:`~tersa.compress.lossless.grouping.Grouping`.

Encoding maps the symbol values to indices into the tensor's alphabet (the values it uses), counts
them per context, quantizes the counts (:func:`~tersa.compress.lossless.tables.quantize`) and codes
each context's symbols in chunks (:mod:`~tersa.compress.lossless.ans`). Decoding checks every
declared count against the shape before it allocates or decodes anything.
"""

from __future__ import annotations

import numpy as np

from tersa.compress.lossless import ans
from tersa.compress.lossless.grouping import Grouping
from tersa.compress.lossless.segment import Segment
from tersa.compress.lossless.spec import MAX_CHUNK_SYMBOLS
from tersa.compress.lossless.tables import Table, check_rows, quantize, read_table, table_bytes
from tersa.errors import ContainerError


def encode_symbols(matrix: np.ndarray, grouping: Grouping, limit: int) -> list[Segment]:
    """Table and chunk segments of ``matrix`` [R, C] (integer symbols below ``limit``)."""
    seen = np.bincount(matrix.reshape(-1), minlength=limit) > 0
    alphabet = np.flatnonzero(seen)
    lookup = np.cumsum(seen, dtype=np.int32) - 1  # symbol value -> alphabet index
    parts = grouping.split(lookup[matrix])
    counts = np.stack([np.bincount(p, minlength=alphabet.size) for p in parts])
    freqs = quantize(counts)
    segments = [Segment("table", table_bytes(Table(alphabet.astype(np.uint16), freqs)))]
    for part, row in zip(parts, freqs, strict=True):
        segments += [Segment("ans", chunk, count) for chunk, count in ans.encode(part, row)]
    return segments


def decode_symbols(
    segments: list[Segment],
    grouping: Grouping,
    shape: tuple[int, int],
    limit: int,
    dtype: np.dtype,
    where: str,
) -> np.ndarray:
    """The [R, C] symbol values (``dtype``) of a table segment followed by its chunks."""
    if not segments or segments[0].kind != "table":
        raise ContainerError(f"{where}: the frequency table segment is missing")
    table = read_table(segments[0].data, grouping.contexts, limit, where)
    sizes = grouping.sizes(shape)
    check_rows(table, sizes, where)
    plan = _chunks_per_context(segments[1:], sizes, where)
    alphabet = table.alphabet.astype(dtype)
    parts = []
    for ctx, (chunks, size) in enumerate(zip(plan, sizes, strict=True)):
        part = np.empty(size, dtype)
        if chunks:
            m = ans.Model(table.freqs[ctx])
            start = 0
            for s in chunks:
                out = part[start : start + s.symbols]
                ans.decode(s.data, m, alphabet, out, f"{where}, context {ctx}")
                start += s.symbols
        parts.append(part)
    return grouping.join(parts, shape, dtype)


def _chunks_per_context(chunks: list[Segment], sizes: list[int], where: str) -> list[list[Segment]]:
    """Assign the chunks, in order, to the contexts their symbol counts add up to."""
    for s in chunks:
        if s.kind != "ans" or not 1 <= s.symbols <= MAX_CHUNK_SYMBOLS:
            raise ContainerError(
                f"{where}: expected ANS chunks of 1..{MAX_CHUNK_SYMBOLS} symbols, found a "
                f"'{s.kind}' segment of {s.symbols} symbols"
            )
    plan: list[list[Segment]] = []
    i = 0
    for ctx, size in enumerate(sizes):
        taken: list[Segment] = []
        total = 0
        while total < size and i < len(chunks):
            taken.append(chunks[i])
            total += chunks[i].symbols
            i += 1
        if total != size:
            raise ContainerError(
                f"{where}: the chunks of context {ctx} hold {total} symbols, not {size}"
            )
        plan.append(taken)
    if i != len(chunks):
        raise ContainerError(f"{where}: {len(chunks) - i} ANS chunks beyond the last context")
    return plan
