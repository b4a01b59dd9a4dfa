"""Fused low-bit matmul and sparse decode-attention kernels.

Each op lives in ``kernels/<op>/``: ``reference.py`` (pure torch: the spec, the test oracle and the
CPU path), ``triton.py`` (the Triton kernel and its launcher) and ``__init__.py`` (the public
function, which runs Triton on CUDA tensors and the reference everywhere else).

- :func:`tersa.kernels.w4a16_matmul.w4a16_matmul`: packed 4-bit weights, float activations.
- :func:`tersa.kernels.w8a8_matmul.w8a8_matmul`: int8 weights, per-token int8 activations.
- :func:`tersa.kernels.ratplus_decode.ratplus_decode`: RAT+ decode attention over a compact cache.
- :func:`tersa.kernels.quest_decode.quest_attention`: Quest page scoring and decode attention over
  the selected pages only.
"""
