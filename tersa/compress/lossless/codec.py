"""One tensor ↔ its coded form: floats (bf16, fp16, fp32) by :mod:`.floats`, everything else by
:mod:`.ints`, and any tensor the coders would not shrink stored raw."""

from __future__ import annotations

import math

import numpy as np
import torch

from tersa.compress.lossless.floats import decode_float, encode_float
from tersa.compress.lossless.ints import decode_int, encode_int
from tersa.compress.lossless.segment import Encoded, Segment
from tersa.compress.lossless.spec import BY_TORCH, DType
from tersa.errors import ContainerError

MIN_CODED = 64  # elements: below this, tables and segment headers cost more than they save


def as_bytes(tensor: torch.Tensor) -> np.ndarray:
    """[numel · itemsize] uint8 view of a contiguous CPU tensor (little-endian, as stored)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.to(torch.uint8)
    return flat.view(torch.uint8).numpy()


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """[R, C] a tensor is coded as: R = shape[0], C = the rest (1-D and scalars: one row)."""
    if len(shape) < 2:
        return 1, math.prod(shape)
    return shape[0], math.prod(shape[1:])


def encode_tensor(tensor: torch.Tensor) -> Encoded:
    """The smallest coded form of ``tensor`` (any allowlisted dtype; see ``spec.DTYPES``)."""
    dt = BY_TORCH[tensor.dtype]
    data = as_bytes(tensor)
    raw = Encoded("raw", {}, [Segment("raw", data.tobytes())])
    if tensor.numel() < MIN_CODED:
        return raw
    if dt.is_float:
        utype = np.uint16 if dt.itemsize == 2 else np.uint32
        coded = encode_float(data.view(utype), dt, matrix_shape(tuple(tensor.shape)))
    else:
        coded = encode_int(data, dt.itemsize)
    return coded if coded.nbytes < raw.nbytes else raw


def decode_tensor(enc: Encoded, dt: DType, shape: tuple[int, ...], where: str) -> torch.Tensor:
    """The tensor ``enc`` codes; ``shape`` and ``dt`` have been checked against the limits."""
    numel = math.prod(shape)
    nbytes = numel * dt.itemsize
    if enc.codec == "raw":
        if len(enc.segments) != 1 or enc.segments[0].kind != "raw" or enc.params:
            raise ContainerError(f"{where}: a raw tensor has exactly one 'raw' segment")
        if len(enc.segments[0].data) != nbytes:
            raise ContainerError(
                f"{where}: the raw segment holds {len(enc.segments[0].data)} bytes, "
                f"not the {nbytes} of {list(shape)} {dt.name}"
            )
        data = np.frombuffer(enc.segments[0].data, np.uint8).copy()
    elif enc.codec == "float" and dt.is_float:
        bits = decode_float(enc, dt, matrix_shape(shape), where)
        data = bits.view(np.uint8)
    elif enc.codec == "int" and not dt.is_float:
        data = decode_int(enc, nbytes, dt.itemsize, where)
    else:
        raise ContainerError(f"{where}: codec '{enc.codec}' cannot hold a {dt.name} tensor")
    if numel == 0:
        return torch.empty(shape, dtype=dt.torch_dtype)
    out = torch.from_numpy(data)
    if dt.torch_dtype == torch.bool:
        return out.view(torch.uint8).to(torch.bool).reshape(shape)
    return out.view(dt.torch_dtype).reshape(shape)
