"""Block-by-block calibration: only one decoder block's activations are held at a time.

The model's embeddings run once to capture the first block's inputs (hidden states plus the keyword
arguments the model passes every block: position embeddings, masks). Then, for each block in order,
the block moves to the compute device, a stage works on it, and its outputs on the cached inputs
become the next block's inputs. Peak memory stays near the model's size plus one block's
activations, and the weights of a model larger than the accelerator stay on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import send_to_device
from torch import nn

from tersa.offload import onloaded


class _StopForward(Exception):
    """Raised by the capture hook so the model stops after the first block's inputs are known."""


@dataclass
class BlockCache:
    """The inputs of one block for every calibration batch.

    ``hidden[b]`` is ``[B, T, H]`` (batch ``b`` of the calibration samples); ``kwargs[b]`` holds the
    keyword arguments the model passed the block for that batch (position embeddings, masks).
    Tensors live on ``storage`` (CPU by default) and move to the compute device batch by batch.
    """

    hidden: list[torch.Tensor] = field(default_factory=list)
    kwargs: list[dict[str, Any]] = field(default_factory=list)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    storage: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # dtype the hidden states are cast to on the compute device (None: as stored); set when they
    # are stored in a narrower dtype than the blocks compute in.
    dtype: torch.dtype | None = None

    def __len__(self) -> int:
        return len(self.hidden)

    def batches(self) -> Iterator[tuple[torch.Tensor, dict[str, Any]]]:
        """Each batch's (hidden ``[B, T, H]``, kwargs), on the compute device."""
        for h, kw in zip(self.hidden, self.kwargs, strict=True):
            h = h.to(self.device) if self.dtype is None else h.to(self.device, self.dtype)
            yield h, send_to_device(kw, self.device)

    @torch.no_grad()
    def run(self, block: nn.Module) -> list[torch.Tensor]:
        """The block's outputs for every batch (``[B, T, H]`` each, on the storage device)."""
        return [first_output(block(h, **kw)).to(self.storage) for h, kw in self.batches()]

    def advance(self, block: nn.Module) -> None:
        """Replace the cached inputs by the block's outputs: the next block's inputs."""
        self.hidden = self.run(block)


def select_rows(kwargs: Any, rows: torch.Tensor, batch: int) -> Any:
    """Block keyword arguments (tensors nested in dicts, tuples, lists) cut to the batch rows
    ``rows`` of ``batch``: tensors of at least 2 dimensions whose leading one is the batch are
    indexed; the rest (RoPE tables shared by the batch ``[1, T, D]``, per-token cache positions
    ``[T]``, flags) is kept."""
    if isinstance(kwargs, torch.Tensor):
        if kwargs.dim() >= 2 and kwargs.shape[0] == batch:
            return kwargs[rows.to(kwargs.device)]
        return kwargs
    if isinstance(kwargs, dict):
        return {k: select_rows(v, rows, batch) for k, v in kwargs.items()}
    if isinstance(kwargs, tuple | list):
        return type(kwargs)(select_rows(v, rows, batch) for v in kwargs)
    return kwargs


def first_output(output: Any) -> torch.Tensor:
    # Decoder layers return a tensor in recent transformers, a tuple in older ones and some families.
    return output[0] if isinstance(output, tuple | list) else output


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    blocks: nn.ModuleList,
    input_ids: torch.Tensor,
    batch_size: int,
    device: torch.device,
) -> BlockCache:
    """Run the model up to its first block for each batch of ``input_ids`` ``[N, T]``."""
    cache = BlockCache(device=device)

    def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        cache.hidden.append(hidden.to(cache.storage))
        kept = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        cache.kwargs.append(send_to_device(kept, cache.storage))
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with _onloaded_except(model, blocks, device):
            for start in range(0, input_ids.shape[0], batch_size):
                batch = input_ids[start : start + batch_size].to(device)
                with suppress(_StopForward):
                    model(input_ids=batch, use_cache=False)
    finally:
        handle.remove()
    return cache


@contextmanager
def _onloaded_except(model: nn.Module, blocks: nn.ModuleList, device: torch.device) -> Iterator:
    """Move everything but the blocks to ``device`` for the capture pass, then back."""
    moved: list[tuple[nn.Module, torch.device]] = []
    block_ids = {id(b) for b in blocks}
    for module in _leaf_owners(model, block_ids):
        home = next(iter(module.parameters(recurse=False)), None)
        home = home if home is not None else next(iter(module.buffers(recurse=False)), None)
        if home is not None and home.device != device:
            moved.append((module, home.device))
            module.to(device)
    try:
        yield
    finally:
        for module, home_device in moved:
            module.to(home_device)


def _leaf_owners(root: nn.Module, skip: set[int]) -> Iterator[nn.Module]:
    """Modules owning tensors directly, outside the skipped subtrees."""
    if id(root) in skip:
        return
    if any(True for _ in root.parameters(recurse=False)) or any(
        True for _ in root.buffers(recurse=False)
    ):
        yield root
    for child in root.children():
        yield from _leaf_owners(child, skip)


BlockFn = Callable[[int, nn.Module, BlockCache], None]


def run_blockwise(
    model: nn.Module,
    blocks: nn.ModuleList,
    input_ids: torch.Tensor,
    process: BlockFn,
    batch_size: int = 8,
    device: torch.device | None = None,
    on_block: Callable[[int, int], None] | None = None,
) -> None:
    """Capture block inputs, then for each block: onload, ``process(i, block, cache)``, propagate.

    ``process`` may replace modules inside the block; the outputs the next block sees come from the
    block as ``process`` left it (quantized blocks feed quantized activations forward, as in
    sequential PTQ). ``on_block(done, total)`` reports progress.
    """
    device = device or next(model.parameters()).device
    cache = capture_block_inputs(model, blocks, input_ids, batch_size, device)
    for i, block in enumerate(blocks):
        with onloaded(block, device):
            process(i, block, cache)
            if i + 1 < len(blocks):
                cache.advance(block)
        if on_block is not None:
            on_block(i + 1, len(blocks))
