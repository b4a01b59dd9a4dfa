"""ANS coding of symbol-index arrays under one static frequency row, in independent chunks.

Uses ``constriction``'s stack coder (``AnsCoder``, 32-bit words) with a ``Categorical`` model built
from the integer frequencies (``perfect=False``, so encoder and decoder quantize them the same way).
Every chunk is its own ANS stream: chunks decode in any order, or in parallel.
"""

from __future__ import annotations

import constriction
import numpy as np

from tersa.compress.lossless.spec import CHUNK_SYMBOLS
from tersa.errors import ContainerError

# constriction is a compiled module whose submodules are attributes, not importable paths.
Categorical = constriction.stream.model.Categorical
AnsCoder = constriction.stream.stack.AnsCoder


def model(freqs: np.ndarray) -> Categorical:
    """The constriction model of one frequency row [A] (padded to two entries: constriction needs
    at least two; the padding has frequency 0 and is never decoded from a valid stream)."""
    probs = np.zeros(max(2, freqs.size), np.float64)
    probs[: freqs.size] = freqs
    return Categorical(probs, perfect=False)


def encode(indices: np.ndarray, freqs: np.ndarray) -> list[tuple[bytes, int]]:
    """(chunk, symbols) of chunks of at most ``CHUNK_SYMBOLS`` symbols, each a complete ANS stream.

    :param indices: [N] int32 alphabet indices, each with a non-zero frequency.
    :param freqs: [A] frequencies summing to ``TOTAL``.
    """
    if indices.size == 0:
        return []  # an empty context: its frequency row is all zero, no model exists for it
    m = model(freqs)
    chunks = []
    for start in range(0, indices.size, CHUNK_SYMBOLS):
        part = np.ascontiguousarray(indices[start : start + CHUNK_SYMBOLS], np.int32)
        coder = AnsCoder()
        coder.encode_reverse(part, m)
        chunks.append((coder.get_compressed().astype("<u4").tobytes(), part.size))
    return chunks


def decode(data: bytes, m: Categorical, count: int, alphabet_size: int, where: str) -> np.ndarray:
    """The [count] int32 alphabet indices of one chunk; the chunk must end exactly after them."""
    if len(data) % 4:
        raise ContainerError(f"{where}: ANS chunk of {len(data)} bytes is not whole 32-bit words")
    words = np.frombuffer(data, "<u4").astype(np.uint32)
    try:
        coder = AnsCoder(words)
        out = coder.decode(m, count)
        consumed = coder.is_empty()
    except Exception as e:  # constriction reports bad streams as ValueError or KeyError
        raise ContainerError(f"{where}: ANS chunk does not decode ({e})") from None
    if not consumed:
        raise ContainerError(f"{where}: ANS chunk holds more data than its {count} symbols")
    if alphabet_size < 2 and out.size and int(out.max()) >= alphabet_size:
        raise ContainerError(f"{where}: ANS chunk decodes to a symbol outside the alphabet")
    return out
