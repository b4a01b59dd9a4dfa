"""Lossless entropy coding of export tensors in a checked container (``model.tersa``).

Float tensors code their exponent and top mantissa bits with static frequency tables (rANS,
:mod:`.ans`) and keep sign and low mantissa bits raw (:mod:`.floats`); integer tensors code
their bytes or 4-bit halves (:mod:`.ints`). The container (:mod:`.container`, layout and limits in
:mod:`.spec`) checks every declared size before allocating and every checksum before decoding.
"""

from tersa.compress.lossless.container import (
    TensorInfo,
    decode_container,
    encode_container,
    read_container,
    read_index,
    read_some,
    write_container,
)
from tersa.compress.lossless.spec import CONTAINER_FILE, VERSION

__all__ = [
    "CONTAINER_FILE",
    "VERSION",
    "TensorInfo",
    "decode_container",
    "encode_container",
    "read_container",
    "read_index",
    "read_some",
    "write_container",
]
