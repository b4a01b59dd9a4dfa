"""One test per rejection of a bad container, each with its exact message."""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from tersa.compress.lossless import VERSION, decode_container, encode_container, read_index
from tersa.errors import ContainerError, ExportError


def _parts() -> list[bytes]:
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(64, 96, generator=g) * 0.02).to(torch.bfloat16)
    return encode_container({"w": w, "n": torch.ones(8)}, {"m": "1"})[0]


def _rebuild(parts: list[bytes], edit: Callable[[dict, list[bytes]], None] | None = None) -> bytes:
    """Reassemble a container after ``edit`` changed the header dict and the payload segments."""
    doc = json.loads(parts[1])
    payload = list(parts[2:])
    if edit:
        edit(doc, payload)
    header = json.dumps(doc, separators=(",", ":")).encode()
    return (
        struct.pack("<8sIII", parts[0][:8], VERSION, len(header), zlib.crc32(header))
        + header
        + b"".join(payload)
    )


def _error(data: bytes, **kwargs) -> str:
    with pytest.raises(ContainerError) as info:
        decode_container(data, **kwargs)
    assert isinstance(info.value, ExportError)
    return str(info.value)


def test_valid_rebuild_decodes() -> None:
    out, meta = decode_container(_rebuild(_parts()))
    assert meta == {"m": "1"} and list(out) == ["w", "n"]


def test_bad_magic() -> None:
    data = b"PK\x03\x04" + _rebuild(_parts())[4:]
    assert _error(data) == "not a tersa lossless container (magic bytes b'PK\\x03\\x04SA\\r\\n')"


def test_unknown_version() -> None:
    data = bytearray(_rebuild(_parts()))
    data[8:12] = (7).to_bytes(4, "little")
    assert _error(bytes(data)) == (
        "container format version 7 is not supported (this tersa reads 2); upgrade tersa"
    )


def test_retired_version() -> None:
    """Version 1 coded its chunks with constriction; its streams are not rANS streams."""
    data = bytearray(_rebuild(_parts()))
    data[8:12] = (1).to_bytes(4, "little")
    assert _error(bytes(data)) == (
        "container format version 1 was written by an earlier tersa and is no longer read "
        "(this tersa reads 2); export the model again"
    )


def _edit_chunk(change: Callable[[bytearray], bytes]) -> bytes:
    """The container with the first ANS chunk of 'w' replaced by ``change(chunk)``, its length
    and checksum updated so that only the ANS decoder can notice."""

    def edit(doc: dict, payload: list[bytes]) -> None:
        segs = doc["tensors"][0]["segments"]
        i = next(j for j, s in enumerate(segs) if s[0] == "ans")
        start = sum(s[1] for s in segs[:i])
        chunk = change(bytearray(payload[0][start : start + segs[i][1]]))
        payload[0] = payload[0][:start] + chunk + payload[0][start + segs[i][1] :]
        segs[i][1:3] = [len(chunk), zlib.crc32(chunk)]

    parts = _parts()
    return _rebuild([parts[0], parts[1], b"".join(parts[2:])], edit)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda c: bytes(c[:4]) + bytes(4) + bytes(c[8:]), "its initial state is below 2**32"),
        (lambda c: bytes(c[:-8]), "it ends before its symbols do"),
        (lambda c: bytes(c) + bytes(4), "it holds more data than its symbols"),
        (lambda c: bytes(c[:-1]), "ANS chunk of {n} bytes is not whole 32-bit words"),
    ],
)
def test_corrupt_ans_chunk(change: Callable[[bytearray], bytes], reason: str) -> None:
    """Every way a chunk can be wrong, found by the decoder (its checksum was made to match)."""
    message = _error(_edit_chunk(change))
    prefix = "tensor 'w', context 0: "
    if "{n}" in reason:
        n = int(message.removeprefix(prefix + "ANS chunk of ").split()[0])
        assert message == prefix + reason.format(n=n) and n % 4 == 3
    else:
        assert message == prefix + f"ANS chunk does not decode ({reason})"


def test_truncated_preamble() -> None:
    assert _error(b"\x89TERSA") == (
        "container is truncated: 6 bytes, shorter than its 20-byte preamble"
    )


def test_truncated_chunk() -> None:
    data = _rebuild(_parts())
    total = len(data) - 20 - int.from_bytes(data[12:16], "little")
    assert _error(data[:-5]) == (
        f"container is truncated: the header declares {total} payload bytes, "
        f"the file holds {total - 5}"
    )


def test_trailing_bytes() -> None:
    data = _rebuild(_parts())
    assert "container is longer than declared" in _error(data + b"\0")


def test_header_checksum_mismatch() -> None:
    data = bytearray(_rebuild(_parts()))
    data[25] ^= 0x01
    assert _error(bytes(data)) == "container header checksum mismatch: the file is corrupt"


def test_segment_checksum_mismatch() -> None:
    data = bytearray(_rebuild(_parts()))
    data[-40] ^= 0x10  # inside the raw bits of 'w'
    assert _error(bytes(data)) == "tensor 'w': checksum mismatch in segment 2 (bits)"


def test_decoded_checksum_mismatch() -> None:
    def edit(doc: dict, payload: list[bytes]) -> None:
        doc["tensors"][1]["crc32"] ^= 1

    assert _error(_rebuild(_parts(), edit)) == (
        "tensor 'n': checksum mismatch of the decoded tensor"
    )


def test_declared_size_over_the_limit() -> None:
    def edit(doc: dict, payload: list[bytes]) -> None:
        doc["tensors"][1]["shape"] = [1 << 40]

    assert _error(_rebuild(_parts(), edit)) == (
        "container header, tensor 'n': declares 4398046511104 bytes (sizes [1099511627776]), "
        "over the limit of 1099511627776"
    )


def test_empty_shape_with_a_huge_size() -> None:
    """Found by the fuzzer: zero elements, but no array can take that shape."""

    def edit(doc: dict, payload: list[bytes]) -> None:
        doc["tensors"][1]["shape"] = [0, 1 << 62]

    assert _error(_rebuild(_parts(), edit)) == (
        "container header, tensor 'n': declares 0 bytes (sizes [0, 4611686018427387904]), "
        "over the limit of 1099511627776"
    )


def test_declared_output_over_the_file_bound() -> None:
    """A shape that fits the per-tensor limit but not what the file's size allows."""

    def edit(doc: dict, payload: list[bytes]) -> None:
        doc["tensors"][1]["shape"] = [1 << 28]

    data = _rebuild(_parts(), edit)
    assert _error(data) == (
        f"container declares {(1 << 30) + 64 * 96 * 2} decoded bytes, over the limit of "
        f"{64 * len(data) + (64 << 20)} for a {len(data)}-byte file"
    )
    assert _error(_rebuild(_parts()), max_output_bytes=100) == (
        f"container declares {64 * 96 * 2 + 32} decoded bytes, over the limit of 100 for a "
        f"{len(_rebuild(_parts()))}-byte file"
    )


def test_header_length_over_the_limit() -> None:
    data = bytearray(_rebuild(_parts()))
    data[12:16] = (1 << 30).to_bytes(4, "little")
    assert _error(bytes(data)) == (
        "container header declares 1073741824 bytes, over the limit of 67108864"
    )


def test_frequency_table_that_does_not_sum() -> None:
    def edit(doc: dict, payload: list[bytes]) -> None:
        segs = doc["tensors"][0]["segments"]
        i = next(j for j, s in enumerate(segs) if s[0] == "table")
        start = sum(s[1] for s in segs[:i])
        raw = bytearray(zlib.decompress(payload[0][start : start + segs[i][1]]))
        a = int(np.frombuffer(raw[:2], "<u2")[0])
        pos = 4 + 2 * a + 2 * int(np.argmax(np.frombuffer(raw, "<u2", a, 4 + 2 * a)))
        raw[pos : pos + 2] = (int.from_bytes(raw[pos : pos + 2], "little") - 1).to_bytes(
            2, "little"
        )
        table = zlib.compress(bytes(raw))
        payload[0] = payload[0][:start] + table + payload[0][start + segs[i][1] :]
        segs[i][1:3] = [len(table), zlib.crc32(table)]

    parts = _parts()
    parts = [parts[0], parts[1], b"".join(parts[2:])]
    assert _error(_rebuild(parts, edit)) == (
        "tensor 'w': the frequency table of context 0 sums to 32767, not 32768; the file is corrupt"
    )


def test_header_not_json() -> None:
    parts = _parts()
    header = b"{not json"
    data = struct.pack("<8sIII", parts[0][:8], VERSION, len(header), zlib.crc32(header)) + header
    assert _error(data).startswith("container header is not valid JSON (")


def test_unknown_dtype_in_header() -> None:
    def edit(doc: dict, payload: list[bytes]) -> None:
        doc["tensors"][1]["dtype"] = "float8"

    assert _error(_rebuild(_parts(), edit)).startswith(
        "container header, tensor 'n': dtype 'float8' is not one of bfloat16, float16"
    )


def test_unsupported_dtype_on_write() -> None:
    with pytest.raises(ContainerError, match=r"has dtype torch\.complex64, which the lossless"):
        encode_container({"c": torch.zeros(3, dtype=torch.complex64)})


def test_index_reads_the_header_only(tmp_path: Path) -> None:
    path = tmp_path / "m.tersa"
    path.write_bytes(_rebuild(_parts()))
    infos, meta = read_index(path)
    assert meta == {"m": "1"} and [i.name for i in infos] == ["w", "n"]
    assert infos[0].coder.startswith("ans exp+m") and infos[1].coder == "raw"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ContainerError, match="container is truncated"):
        read_index(path)


def test_threaded_decode_reports_the_first_bad_tensor_in_file_order() -> None:
    """Two corrupt tensors: with any number of threads the error names the first one."""
    g = torch.Generator().manual_seed(1)
    tensors = {n: (torch.randn(64, 96, generator=g) * 0.02).to(torch.bfloat16) for n in "abcd"}
    parts = encode_container(tensors)[0]
    doc = json.loads(parts[1])
    data = bytearray(b"".join(parts))
    start = 20 + len(parts[1])
    for name in ("b", "d"):  # flip a byte in the last segment of b and of d
        i = "abcd".index(name)
        end = start + sum(s[1] for t in doc["tensors"][: i + 1] for s in t["segments"])
        data[end - 1] ^= 0xFF
    for workers in (1, 2, 4):
        assert _error(bytes(data), workers=workers) == (
            "tensor 'b': checksum mismatch in segment 2 (bits)"
        )
