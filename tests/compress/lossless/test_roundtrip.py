"""Containers give back every tensor bit for bit: every dtype, odd sizes, several chunks."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch

from tersa.compress.lossless import ans, decode_container, encode_container
from tersa.compress.lossless.planes import pack, packed_size, unpack
from tersa.compress.lossless.spec import MAGIC, TOTAL
from tersa.compress.lossless.tables import quantize


def _blob(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    return b"".join(encode_container(tensors, metadata)[0])


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical: same dtype, shape and bytes (NaN payloads and -0.0 included)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if not a.numel():
        return True
    return a.reshape(-1).view(torch.uint8).equal(b.reshape(-1).view(torch.uint8))


def _weights(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Bell-shaped weights whose rows and columns have different scales (so contexts pay)."""
    w = torch.randn(shape) * 0.02
    if len(shape) == 2:
        w = w * torch.logspace(-1, 1, shape[0])[:, None] * torch.logspace(0, 1, shape[1])[None, :]
    return w.to(dtype)


def _codes(shape: tuple[int, ...]) -> torch.Tensor:
    """int32 words packing 4-bit codes (a bell around 8, as RTN codes are), code i at bit 4·i."""
    codes = (torch.randn(*shape, 8) * 2.5 + 8).round().clamp(0, 15).to(torch.int64)
    words = sum(codes[..., i] << (4 * i) for i in range(8))
    return torch.tensor(np.asarray(words, np.int64).astype(np.uint32).view(np.int32))


DTYPE_CASES = {
    "bf16": lambda: _weights((96, 80), torch.bfloat16),
    "fp16": lambda: _weights((70, 33), torch.float16),
    "fp32": lambda: _weights((40, 50), torch.float32),
    "fp64": lambda: torch.randn(300, dtype=torch.float64),
    "int8": lambda: torch.randint(-8, 8, (64, 48), dtype=torch.int8),
    "uint8": lambda: torch.randint(0, 200, (500,), dtype=torch.uint8),
    "int16": lambda: torch.randint(-300, 300, (257,), dtype=torch.int16),
    "int32-packed": lambda: _codes((32, 16)),
    "int64": lambda: torch.randint(0, 5000, (3, 100), dtype=torch.int64),
    "bool": lambda: torch.rand(1000) > 0.8,
    "bf16-3d": lambda: _weights((4, 5, 67), torch.bfloat16),
}


@pytest.mark.parametrize("case", list(DTYPE_CASES))
def test_round_trip_every_dtype(case: str) -> None:
    tensors = {"t": DTYPE_CASES[case]()}
    out, meta = decode_container(_blob(tensors, {"k": "v"}))
    assert meta == {"k": "v"} and _same(out["t"], tensors["t"])


@pytest.mark.parametrize("shape", [(0,), (0, 7), (1,), (), (1, 1), (63,), (5, 123, 123)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.int32])
def test_round_trip_odd_sizes(shape: tuple[int, ...], dtype: torch.dtype) -> None:
    t = (
        torch.randn(shape).to(dtype)
        if dtype.is_floating_point
        else torch.randint(0, 9, shape, dtype=dtype)
    )
    out, _ = decode_container(_blob({"x": t}))
    assert _same(out["x"], t)


def test_special_values_and_constant_tensors() -> None:
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, -3.5] * 20)
    tensors = {
        "special": special.to(torch.bfloat16),
        "special32": special,
        "ones": torch.ones(4096, dtype=torch.bfloat16),  # one symbol: an empty ANS stream
        "zeros": torch.zeros(2000, dtype=torch.int8),
    }
    out, _ = decode_container(_blob(tensors))
    assert all(_same(out[k], v) for k, v in tensors.items())


def test_chunks_that_do_not_divide(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ans, "CHUNK_SYMBOLS", 1000)
    tensors = {"w": _weights((64, 81), torch.bfloat16), "q": _codes((9, 31))}
    parts, infos = encode_container(tensors)
    out, _ = decode_container(b"".join(parts))
    assert all(_same(out[k], v) for k, v in tensors.items())
    assert "ctx" in infos[0].coder  # row / column classes chosen for the scaled weights


def test_contexts_in_use_and_compression() -> None:
    """Bell-shaped bf16 with scaled rows and columns codes well below 16 bits and uses contexts;
    4-bit codes come within 2 % of their empirical entropy plus the table."""
    w = _weights((256, 512), torch.bfloat16)
    q = _codes((256, 64))  # 131,072 codes
    _, infos = encode_container({"w": w, "q": q})
    assert infos[0].coder.startswith("ans exp+m") and "ctx" in infos[0].coder
    assert infos[0].bits_per_param < 12.5
    codes = np.asarray(q).view(np.uint8).reshape(-1)
    nibbles = np.concatenate([codes & 15, codes >> 4])
    p = np.bincount(nibbles, minlength=16) / nibbles.size
    entropy_bytes = -(p[p > 0] * np.log2(p[p > 0])).sum() * nibbles.size / 8
    assert infos[1].coder in ("ans int4", "ans int8")  # nibbles, or bytes within 0.5 %
    assert infos[1].stored_bytes < 1.02 * entropy_bytes + 100


def test_golden_preamble_and_header() -> None:
    """The fixed bytes of a small container: magic, version, header length and crc32, header."""
    blob = _blob({"a": torch.arange(4, dtype=torch.int8)}, {"m": "1"})
    header = (
        b'{"format":"tersa-lossless","version":2,"metadata":{"m":"1"},"tensors":[{"name":"a",'
        b'"dtype":"int8","shape":[4],"crc32":2344191507,"codec":"raw","params":{},'
        b'"segments":[["raw",4,2344191507,0]]}]}'
    )
    assert blob[:8] == MAGIC == b"\x89TERSA\r\n"
    assert blob[8:12] == (2).to_bytes(4, "little")
    assert int.from_bytes(blob[12:16], "little") == len(header)
    assert int.from_bytes(blob[16:20], "little") == zlib.crc32(header)
    assert blob[20:] == header + bytes([0, 1, 2, 3])


def test_tensor_order_is_kept() -> None:
    tensors = {n: torch.randn(70).to(torch.bfloat16) for n in ("z", "a", "m")}
    out, _ = decode_container(_blob(tensors))
    assert list(out) == ["z", "a", "m"]


@pytest.mark.parametrize("width", [1, 4, 5, 7, 10, 21, 23])
def test_planes_round_trip(width: int) -> None:
    values = np.random.default_rng(width).integers(0, 1 << width, 1001, dtype=np.uint32)
    data = pack(values, width)
    assert len(data) == packed_size(values.size, width)
    assert np.array_equal(unpack(data, values.size, width, np.dtype(np.uint32)), values)


def test_quantized_tables_sum_exactly() -> None:
    counts = np.array([[5, 0, 1, 10_000_000, 1, 1], [0, 0, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1]])
    freqs = quantize(counts)
    assert freqs.sum(axis=1).tolist() == [TOTAL, 0, TOTAL]
    assert np.all(freqs[counts > 0] >= 1) and np.all(freqs[counts == 0] == 0)


def test_a_context_without_symbols_round_trips() -> None:
    """Row x column classes can leave a context empty (found on an RTN W3 weight_scale [576, 12]):
    it gets a zero frequency row and no chunk."""
    from tersa.compress.lossless.grouping import Grouping
    from tersa.compress.lossless.symbols import decode_symbols, encode_symbols

    assert ans.encode(np.zeros(0, np.int32), np.zeros(3, np.int64)) == []
    matrix = np.arange(12, dtype=np.int64).reshape(4, 3) % 5
    rows = np.array([0, 0, 2, 2], np.uint8)  # class 1 has no rows
    grouping = Grouping(rows, None, n_rows=3)
    segments = encode_symbols(matrix, grouping, 5)
    assert sum(s.kind == "ans" for s in segments) == 2
    out = decode_symbols(segments, grouping, (4, 3), 5, np.int64, "t")
    np.testing.assert_array_equal(out, matrix)


def test_threaded_decode_gives_the_same_tensors_in_order() -> None:
    tensors = {
        f"t{i}": _weights((37 + i, 64), torch.bfloat16) if i % 2 else _codes((9, 5 + i))
        for i in range(7)
    }
    blob = _blob(tensors)
    for workers in (2, 3, 16):
        out, _ = decode_container(blob, workers=workers)
        assert list(out) == list(tensors)
        assert all(_same(out[k], v) for k, v in tensors.items())
