"""Constants of the lossless container, version 2: magic, dtypes, the entropy coder's precision and
the hard limits every declared size is checked against before anything is allocated.

The byte layout (all integers little-endian)::

    offset 0   magic            8 bytes  b"\\x89TERSA\\r\\n"
    offset 8   version          u32      2
    offset 12  header length H  u32      at most MAX_HEADER_BYTES
    offset 16  header crc32     u32      zlib.crc32 of the header bytes
    offset 20  header           H bytes  UTF-8 JSON, see :mod:`tersa.compress.lossless.header`
    20 + H     payload          the segments of every tensor back to back, in header order; the
                                file ends exactly where the last segment does
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAGIC = b"\x89TERSA\r\n"  # the 0x89 byte and CR LF catch 7-bit and text-mode transfers, as in PNG
FORMAT_NAME = "tersa-lossless"
# Version 1 coded its ANS chunks with constriction (a different stream format); version 2 with
# tersa's own table-driven rANS (:mod:`tersa.compress.lossless.ans`). Nothing else changed.
VERSION = 2
SUPPORTED_VERSIONS = (2,)
RETIRED_VERSIONS = (1,)
PREAMBLE_BYTES = 20  # magic, version, header length, header crc32
CONTAINER_FILE = "model.tersa"

# Frequency tables sum to 2**PRECISION; the rANS coder uses them as stored (a 32K-entry lookup
# table per context decodes a symbol with one load).
PRECISION = 15
TOTAL = 1 << PRECISION
CHUNK_SYMBOLS = 1 << 22  # symbols per ANS chunk the encoder writes (4M: each decodes on its own)

# Hard limits, checked on the declared sizes before any allocation.
MAX_HEADER_BYTES = 64 << 20
MAX_TENSORS = 100_000
MAX_SEGMENTS = 1_000_000  # all tensors together
MAX_NDIM = 16
MAX_NAME_CHARS = 1024
MAX_CHUNK_SYMBOLS = 1 << 24
MAX_ALPHABET = 1 << 13  # the largest symbol a float tensor uses: 8 exponent + 4 mantissa bits
MAX_TENSOR_BYTES = 1 << 40
# Decoded bytes may exceed the file's size at most EXPANSION times, plus SLACK (constant tensors
# code to almost nothing; a whole model never compresses 64×); decoders may pass a lower bound.
EXPANSION = 64
SLACK_BYTES = 64 << 20


@dataclass(frozen=True)
class DType:
    """A stored element type: its torch dtype, bytes per element and, for floats, the exponent
    and mantissa widths (IEEE layout: sign, exponent, mantissa from the top bit down)."""

    name: str
    torch_dtype: torch.dtype
    itemsize: int
    exponent_bits: int = 0
    mantissa_bits: int = 0

    @property
    def is_float(self) -> bool:
        return self.exponent_bits > 0


DTYPES: dict[str, DType] = {
    d.name: d
    for d in (
        DType("bfloat16", torch.bfloat16, 2, 8, 7),
        DType("float16", torch.float16, 2, 5, 10),
        DType("float32", torch.float32, 4, 8, 23),
        DType("float64", torch.float64, 8),  # coded as bytes
        DType("int8", torch.int8, 1),
        DType("uint8", torch.uint8, 1),
        DType("int16", torch.int16, 2),
        DType("int32", torch.int32, 4),
        DType("int64", torch.int64, 8),
        DType("bool", torch.bool, 1),
    )
}
BY_TORCH = {d.torch_dtype: d for d in DTYPES.values()}
