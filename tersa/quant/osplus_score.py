"""How ``os_plus`` scores a candidate ``(s, z)``: the error of a group's quantized output.

- :class:`LinearScore`: on the outputs of linears that read the group input directly (the MLP
  group's gate+up or fc1, a pair's consumer).
- :class:`AttentionScore`: on the attention output (o_proj's input) of sampled sequences, the block
  running with its q/k/v replaced by :class:`MigratedLinear`, so RoPE, GQA and q/k norms run
  through the model's own attention code.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass as plain_dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tersa.calib import BlockCache
from tersa.calib.blockwise import select_rows
from tersa.calib.stats import ChannelStats
from tersa.errors import ModelError
from tersa.quant.osplus_math import migrated_input, migrated_range, migrated_weight, output_loss
from tersa.quant.replace import linear_weight, replace_linear
from tersa.quant.scheme import ActivationScheme, WeightScheme
from tersa.quant.smoothed import input_transform, smooth_input


class StopBlock(Exception):
    """Raised by the o_proj pre-hook: the attention output is known, the rest of the block is not
    needed."""


@plain_dataclass
class GroupInputs:
    """A linear's input as its weight sees it: channel range ``[C]`` over all calibration tokens
    and the sampled rows ``[N, C]`` (float32)."""

    min: torch.Tensor
    max: torch.Tensor
    sample: torch.Tensor

    @classmethod
    def of(cls, stats: ChannelStats, module: nn.Module, device: torch.device) -> GroupInputs:
        # A post-norm layer that already smooths its input (SmoothedLinear) multiplies
        # (x − z₁)/s₁, not x; s₁ > 0 keeps min and max in place.
        assert stats.min is not None and stats.max is not None
        scale, shift = input_transform(module)
        lo, hi = (smooth_input(t.float().to(device), scale, shift) for t in (stats.min, stats.max))
        return cls(lo, hi, smooth_input(stats.sample().to(device), scale, shift))


Schemes = tuple[WeightScheme | None, ActivationScheme | None]


class LinearScore:
    """Loss of ``(s, z)`` on the outputs of linears that read the sampled input directly."""

    def __init__(
        self, linears: dict[str, nn.Module], schemes: dict[str, Schemes], x: GroupInputs
    ) -> None:
        self.x = x
        self.layers = [
            (linear_weight(m).float(), float_bias(m), schemes[n]) for n, m in linears.items()
        ]
        self.refs = [F.linear(x.sample, w, b) for w, b, _ in self.layers]  # [N, out] each

    def __call__(self, s: torch.Tensor, z: torch.Tensor | None) -> float:
        x_range = migrated_range(self.x.min, self.x.max, s, z)
        loss, xq = 0.0, {}
        for (w, b, (w_scheme, a_scheme)), ref in zip(self.layers, self.refs, strict=True):
            key = repr(a_scheme)
            if key not in xq:  # one quantized input per activation scheme
                xq[key] = migrated_input(self.x.sample, s, z, a_scheme, x_range)
            wq, bz = migrated_weight(w, b, s, z, w_scheme)
            loss += output_loss(ref, F.linear(xq[key], wq, bz))
        return loss


def float_bias(module: nn.Module) -> torch.Tensor | None:
    return None if module.bias is None else module.bias.detach().float()


class MigratedLinear(nn.Module):
    """Stands in for a group linear during the attention search: ``Q(W·diag(s))·Q((X − z)/s) + b
    + W·z`` on the input the block gives it, in float32, returned in the input's dtype."""

    def __init__(
        self,
        linear: nn.Module,
        s: torch.Tensor,
        z: torch.Tensor | None,
        schemes: Schemes,
        x_range: tuple[torch.Tensor, torch.Tensor],
    ) -> None:
        super().__init__()
        self.transform = input_transform(linear)
        self.s, self.z, self.act, self.x_range = s, z, schemes[1], x_range
        self.w, self.b = migrated_weight(
            linear_weight(linear), float_bias(linear), s, z, schemes[0]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = migrated_input(
            smooth_input(x, *self.transform), self.s, self.z, self.act, self.x_range
        )
        return F.linear(xq, self.w, self.b).to(x.dtype)


class AttentionScore:
    """Loss of ``(s, z)`` on the attention output (o_proj's input) of the sampled sequences, the
    block running with its q/k/v linears replaced by :class:`MigratedLinear`."""

    def __init__(
        self,
        block: nn.Module,
        linears: dict[str, nn.Module],
        schemes: dict[str, Schemes],
        o_name: str,
        sequences: list[tuple[torch.Tensor, dict[str, Any]]],
        x: GroupInputs,
    ) -> None:
        self.block, self.linears, self.schemes, self.o_name = block, linears, schemes, o_name
        self.sequences, self.x = sequences, x
        self.refs = self._outputs()

    def __call__(self, s: torch.Tensor, z: torch.Tensor | None) -> float:
        x_range = migrated_range(self.x.min, self.x.max, s, z)
        swaps = {
            n: MigratedLinear(m, s, z, self.schemes[n], x_range) for n, m in self.linears.items()
        }
        with swapped(self.block, swaps):
            outs = self._outputs()
        total = sum(
            output_loss(r, o) * r.shape[:-1].numel() for r, o in zip(self.refs, outs, strict=True)
        )
        return total / sum(r.shape[:-1].numel() for r in self.refs)

    def _outputs(self) -> list[torch.Tensor]:
        """o_proj's input ``[b, T, heads·head_dim]`` for each batch of sampled sequences."""
        captured: list[torch.Tensor] = []

        def hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            captured.append(args[0] if args else kwargs["input"])
            raise StopBlock

        handle = self.block.get_submodule(self.o_name).register_forward_pre_hook(
            hook, with_kwargs=True
        )
        try:
            for h, kw in self.sequences:
                try:
                    self.block(h, **kw)
                except StopBlock:
                    continue
                raise ModelError(
                    f"the block never called '{self.o_name}'; the architecture adapter does not "
                    "match this model"
                )
        finally:
            handle.remove()
        return captured


@contextmanager
def swapped(block: nn.Module, modules: dict[str, nn.Module]) -> Iterator[None]:
    """Put ``modules`` at their dotted paths in ``block`` for the duration, then restore."""
    old = {name: replace_linear(block, name, new) for name, new in modules.items()}
    try:
        yield
    finally:
        for name, module in old.items():
            replace_linear(block, name, module)


def first_sequences(cache: BlockCache, n: int) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """The first ``n`` cached sequences ``[b, T, H]`` with their block kwargs, batch by batch (on
    the cache's storage device)."""
    out = []
    for h, kw in zip(cache.hidden, cache.kwargs, strict=True):
        if n <= 0:
            break
        k = min(n, h.shape[0])
        out.append((h[:k].clone(), select_rows(kw, torch.arange(k), h.shape[0])))
        n -= k
    return out
