"""rANS coding of symbol-index arrays under one static frequency row, in independent chunks.

A table-driven range-ANS coder compiled with numba. The ``constriction`` package (the format's
coder up to container version 1) decodes with a binary search per symbol: ``bench/size.py``
measured 46 MB/s of bf16 output on one core with it, 169–212 MB/s with this coder's slot →
symbol lookup table (the target is 100 MB/s).

Coder, per chunk (the parameters of Giesen's ``rans64``):

- frequencies quantized to ``TOTAL = 2**PRECISION`` (15 bits; :mod:`.tables`), used as stored;
- a 64-bit state ``x`` in ``[L, 2**64)`` with ``L = 2**32``, renormalised by whole 32-bit words,
  at most one word per symbol;
- two states interleaved: symbol ``i`` is coded by state ``i % 2``, both states share one word
  stream, so the decoder's two dependency chains overlap;
- decode: ``slot = x mod TOTAL``, ``s = lut[slot]``, ``x = f[s]·(x >> 15) + slot − c[s]``, then
  ``x = x << 32 | next word`` when ``x < L``.

A chunk's bytes are little-endian 32-bit words: state 0 and state 1 (low word first), then the
renormalisation words in decoding order. The encoder starts both states at ``L``, so a valid
chunk decodes back to ``L`` in both states with every word consumed: anything else is corrupt.
A chunk takes its ideal code length (:func:`~tersa.compress.lossless.tables.coded_bits`) plus
the 16 bytes of its states, within a few bytes (``tests/compress/lossless/test_ans.py``).
"""

from __future__ import annotations

import numba
import numpy as np

from tersa.compress.lossless.spec import CHUNK_SYMBOLS, PRECISION, TOTAL
from tersa.errors import ContainerError

_L = np.uint64(1 << 32)  # lower bound of the state
_SHIFT = np.uint64(PRECISION)
_MASK = np.uint64(TOTAL - 1)
_WORD = np.uint64(32)
_LOW32 = np.uint64(0xFFFFFFFF)
_BOUND_SHIFT = np.uint64(64 - PRECISION)  # the encoder's bound f·2**49, as x >> 49 >= f
STATE_WORDS = 4  # two 64-bit states at the head of every chunk

# Decoder status codes, turned into messages by :func:`decode`.
_OK, _BAD_STATE, _OVERRUN, _LEFTOVER, _NOT_FINAL = 0, 1, 2, 3, 4


@numba.njit(cache=True, nogil=True)
def _encode(indices, freqs, cums, out):  # pragma: no cover - compiled
    """Code ``indices`` [n] into the tail of ``out`` [n + 4] (uint32); returns where it starts."""
    x0 = _L
    x1 = _L
    pos = out.size
    for i in range(indices.size - 1, -1, -1):
        s = indices[i]
        f = np.uint64(freqs[s])
        x = x0 if i % 2 == 0 else x1
        # The state must be below f·2**49 before coding s (so that it stays below 2**64 after);
        # the comparison is made on x >> 49 so that f = TOTAL cannot overflow the bound.
        if (x >> _BOUND_SHIFT) >= f:
            pos -= 1
            out[pos] = np.uint32(x & _LOW32)
            x = x >> _WORD
        x = ((x // f) << _SHIFT) + (x % f) + np.uint64(cums[s])
        if i % 2 == 0:
            x0 = x
        else:
            x1 = x
    pos -= STATE_WORDS
    out[pos] = np.uint32(x0 & _LOW32)
    out[pos + 1] = np.uint32(x0 >> _WORD)
    out[pos + 2] = np.uint32(x1 & _LOW32)
    out[pos + 3] = np.uint32(x1 >> _WORD)
    return pos


@numba.njit(cache=True, nogil=True)
def _decode(words, lut, freqs, cums, alphabet, out):  # pragma: no cover - compiled
    """Decode ``out.size`` symbols of the chunk ``words`` (uint32) into ``out`` (alphabet values);
    returns a status code."""
    if words.size < STATE_WORDS:
        return _OVERRUN
    x0 = np.uint64(words[0]) | (np.uint64(words[1]) << _WORD)
    x1 = np.uint64(words[2]) | (np.uint64(words[3]) << _WORD)
    if x0 < _L or x1 < _L:
        return _BAD_STATE
    pos = STATE_WORDS
    n = out.size
    nw = words.size
    for i in range(0, n - 1, 2):
        slot = x0 & _MASK
        s = lut[slot]
        x0 = np.uint64(freqs[s]) * (x0 >> _SHIFT) + slot - np.uint64(cums[s])
        out[i] = alphabet[s]
        slot = x1 & _MASK
        t = lut[slot]
        x1 = np.uint64(freqs[t]) * (x1 >> _SHIFT) + slot - np.uint64(cums[t])
        out[i + 1] = alphabet[t]
        if x0 < _L:
            if pos >= nw:
                return _OVERRUN
            x0 = (x0 << _WORD) | np.uint64(words[pos])
            pos += 1
        if x1 < _L:
            if pos >= nw:
                return _OVERRUN
            x1 = (x1 << _WORD) | np.uint64(words[pos])
            pos += 1
    if n % 2:
        slot = x0 & _MASK
        s = lut[slot]
        x0 = np.uint64(freqs[s]) * (x0 >> _SHIFT) + slot - np.uint64(cums[s])
        out[n - 1] = alphabet[s]
        if x0 < _L:
            if pos >= nw:
                return _OVERRUN
            x0 = (x0 << _WORD) | np.uint64(words[pos])
            pos += 1
    if pos != nw:
        return _LEFTOVER
    if x0 != _L or x1 != _L:
        return _NOT_FINAL
    return _OK


class Model:
    """What decoding one context needs: ``lut`` [TOTAL] uint16 (slot → alphabet index), ``freqs``
    and ``cums`` [A] uint32 (frequency and cumulative frequency of each index)."""

    __slots__ = ("cums", "freqs", "lut")

    def __init__(self, freqs: np.ndarray) -> None:
        """:param freqs: [A] integer frequencies summing to ``TOTAL`` (the caller checks)."""
        self.freqs = np.ascontiguousarray(freqs, np.uint32)
        self.cums = (np.cumsum(self.freqs, dtype=np.uint32) - self.freqs).astype(np.uint32)
        self.lut = np.repeat(np.arange(self.freqs.size, dtype=np.uint16), self.freqs)


def encode(indices: np.ndarray, freqs: np.ndarray) -> list[tuple[bytes, int]]:
    """(chunk, symbols) of chunks of at most ``CHUNK_SYMBOLS`` symbols, each a complete stream.

    :param indices: [N] alphabet indices, each with a non-zero frequency.
    :param freqs: [A] frequencies summing to ``TOTAL``.
    """
    if indices.size == 0:
        return []  # an empty context: its frequency row is all zero, no model exists for it
    m = Model(freqs)
    chunks = []
    for start in range(0, indices.size, CHUNK_SYMBOLS):
        part = np.ascontiguousarray(indices[start : start + CHUNK_SYMBOLS], np.int32)
        out = np.empty(part.size + STATE_WORDS, np.uint32)
        begin = _encode(part, m.freqs, m.cums, out)
        chunks.append((out[begin:].astype("<u4").tobytes(), part.size))
    return chunks


def decode(
    data: bytes | memoryview, m: Model, alphabet: np.ndarray, out: np.ndarray, where: str
) -> None:
    """Decode ``out.size`` symbols of one chunk into ``out`` as values of ``alphabet`` [A] (same
    dtype as ``out``); the chunk must end exactly after them, both states back at their start."""
    if len(data) % 4:
        raise ContainerError(f"{where}: ANS chunk of {len(data)} bytes is not whole 32-bit words")
    words = np.frombuffer(data, "<u4").astype(np.uint32)  # a copy: aligned, native order
    status = _decode(words, m.lut, m.freqs, m.cums, alphabet, out)
    if status != _OK:
        raise ContainerError(f"{where}: ANS chunk does not decode ({_MESSAGES[status]})")


_MESSAGES = {
    _BAD_STATE: "its initial state is below 2**32",
    _OVERRUN: "it ends before its symbols do",
    _LEFTOVER: "it holds more data than its symbols",
    _NOT_FINAL: "its final state is not the encoder's initial state",
}
