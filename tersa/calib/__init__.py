"""Shared block-by-block calibration machinery."""

from tersa.calib.blockwise import BlockCache, capture_block_inputs, run_blockwise

__all__ = ["BlockCache", "capture_block_inputs", "run_blockwise"]
