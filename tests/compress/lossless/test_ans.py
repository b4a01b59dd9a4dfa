"""The rANS coder alone: exact round trips at every length parity and alphabet shape, a size within
a few bytes of the ideal code length, and every corrupt-stream status."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

from tersa.compress.lossless import ans
from tersa.compress.lossless.spec import TOTAL
from tersa.compress.lossless.tables import coded_bits, quantize
from tersa.errors import ContainerError


def _sample(alphabet: int, n: int, seed: int, concentration: float = 0.3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.full(alphabet, concentration))
    return rng.choice(alphabet, size=n, p=p).astype(np.int32)


def _round_trip(indices: np.ndarray, dtype: type = np.uint16) -> tuple[np.ndarray, int, float]:
    """(decoded indices, coded bytes, ideal bytes) of ``indices`` under their own table."""
    counts = np.bincount(indices, minlength=int(indices.max()) + 1)[None]
    freqs = quantize(counts)[0]
    chunks = ans.encode(indices, freqs)
    model = ans.Model(freqs)
    alphabet = np.arange(freqs.size, dtype=dtype)
    out = np.empty(indices.size, dtype)
    start = 0
    for data, count in chunks:
        ans.decode(data, model, alphabet, out[start : start + count], "t")
        start += count
    assert start == indices.size
    return out, sum(len(c) for c, _ in chunks), coded_bits(counts, freqs[None]) / 8


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 1000, 1001, 65_537])
@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.uint32])
def test_round_trip_every_length_and_output_type(n: int, dtype: type) -> None:
    indices = _sample(37, n, n)
    out, _, _ = _round_trip(indices, dtype)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, indices)


def test_size_within_the_ideal_code_length_plus_the_states() -> None:
    """Two 64-bit states per chunk are the only overhead: within 16 bytes (and 4 of alignment) of
    the ideal code length, never more than 2 bytes under it."""
    for alphabet, n, seed in [(2, 50_000, 0), (40, 200_000, 1), (400, 1_000_000, 2)]:
        _, coded, ideal = _round_trip(_sample(alphabet, n, seed))
        assert ideal - 2 <= coded <= ideal + 20, (alphabet, coded, ideal)


def test_extreme_tables() -> None:
    """A one-symbol alphabet (frequency TOTAL: coding changes nothing) and symbols of frequency 1
    next to one of TOTAL − A + 1."""
    out, coded, _ = _round_trip(np.zeros(10_001, np.int32))
    assert coded == 16 and not out.any()
    skewed = np.zeros(300_000, np.int32)
    skewed[::50_000] = np.arange(1, 7)
    counts = np.bincount(skewed)[None]
    freqs = quantize(counts)[0]
    assert freqs[0] == TOTAL - 6 and (freqs[1:] == 1).all()
    out, _, _ = _round_trip(skewed)
    np.testing.assert_array_equal(out, skewed)


def test_chunks_split_at_the_chunk_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ans, "CHUNK_SYMBOLS", 999)
    indices = _sample(9, 5000, 3)
    freqs = quantize(np.bincount(indices)[None])[0]
    assert [c for _, c in ans.encode(indices, freqs)] == [999] * 5 + [5]
    out, _, _ = _round_trip(indices)
    np.testing.assert_array_equal(out, indices)


def _chunk() -> tuple[bytes, ans.Model, np.ndarray]:
    indices = _sample(20, 5000, 4)
    freqs = quantize(np.bincount(indices, minlength=20)[None])[0]
    ((data, _),) = ans.encode(indices, freqs)
    return data, ans.Model(freqs), indices


def _decode_error(data: bytes, count: int = 5000) -> str:
    _, model, _ = _chunk()
    out = np.empty(count, np.uint8)
    with pytest.raises(ContainerError) as info:
        ans.decode(data, model, np.arange(20, dtype=np.uint8), out, "t")
    return str(info.value)


def test_corrupt_streams() -> None:
    data, _, _ = _chunk()
    words = np.frombuffer(data, "<u4").copy()
    high = words.copy()
    high[1] = 0  # state 0 below 2**32
    assert _decode_error(high.tobytes()) == (
        "t: ANS chunk does not decode (its initial state is below 2**32)"
    )
    assert (
        _decode_error(data[:-4]) == "t: ANS chunk does not decode (it ends before its symbols do)"
    )
    assert (
        _decode_error(data[:12]) == "t: ANS chunk does not decode (it ends before its symbols do)"
    )
    assert _decode_error(data + bytes(4)) == (
        "t: ANS chunk does not decode (it holds more data than its symbols)"
    )
    flipped = words.copy()
    flipped[7] ^= 1 << 20
    assert _decode_error(flipped.tobytes()).startswith("t: ANS chunk does not decode (")
    n = len(data) - 1
    assert _decode_error(data[:-1]) == f"t: ANS chunk of {n} bytes is not whole 32-bit words"


def test_a_state_that_does_not_return_to_the_start() -> None:
    """Under a one-symbol table decoding never changes a state nor reads a word, so a chunk of two
    valid states other than 2**32 decodes every symbol and ends in the wrong state."""
    model = ans.Model(np.array([TOTAL]))
    states = np.array([1 << 32, 5 << 32], "<u8").tobytes()
    with pytest.raises(ContainerError) as info:
        ans.decode(states, model, np.zeros(1, np.uint8), np.empty(7, np.uint8), "t")
    assert str(info.value) == (
        "t: ANS chunk does not decode (its final state is not the encoder's initial state)"
    )


def test_random_bytes_never_crash() -> None:
    """Arbitrary words under a valid model: a clean error or (rarely) some symbols, never a crash
    or an out-of-alphabet value."""
    _, model, _ = _chunk()
    rng = np.random.default_rng(5)
    alphabet = np.arange(100, 120, dtype=np.uint8)
    for size in (4, 8, 64, 4096):
        for _ in range(25):
            data = rng.integers(0, 256, size * 4, dtype=np.uint8).tobytes()
            out = np.zeros(int(rng.integers(1, 3000)), np.uint8)
            with contextlib.suppress(ContainerError):
                ans.decode(data, model, alphabet, out, "t")
            assert ((out == 0) | ((out >= 100) & (out < 120))).all()
