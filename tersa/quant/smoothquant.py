"""The ``smoothquant`` stage: migrate activation outliers into the weights (Xiao et al., 2023).

For each norm → linears group the linears' input channel ``j`` is divided by
``s_j = max|X_j|^α / max|W_{:,j}|^(1−α)`` (the weight maximum over every linear of the group) and
their weight columns multiplied by it, through :func:`~tersa.quant.fold.migrate_group`: exact in
float, folded into the norm (pre-norm) or kept on the linears' inputs (post-norm, including
BERT's query/key/value, which read the block input: a block-input group). With ``pairs``
the adapter's scale pairs (v → o, up → down) are smoothed the same way, the consumer's input being
the producer's output.

Statistics are per-channel absolute maxima over every calibration token, gathered block by block.
"""

from __future__ import annotations

from typing import Annotated, ClassVar

import torch
from pydantic import Field
from pydantic.dataclasses import dataclass
from torch import nn

from tersa.calib import BlockCache
from tersa.calib.stats import ChannelStats, observe_inputs
from tersa.config import STRICT, Bool, Float
from tersa.context import StageContext
from tersa.models.adapters import group_norm
from tersa.models.layout import Adapter, ScalePair
from tersa.quant.fold import fold_scale_pair, migrate_group
from tersa.quant.replace import linear_weight
from tersa.quant.smoothed import effective_range
from tersa.registry import register_stage
from tersa.structured.guard import refuse_structured

# s is kept inside [1e-5, 1e5] (SmoothQuant's own floor): a wider range only moves rounding error
# from one side to the other, and a channel that never fires (max |X| = 0) keeps s = 1.
SCALE_MIN, SCALE_MAX = 1e-5, 1e5


@dataclass(config=STRICT)
class SmoothQuantConfig:
    """Divide activation channels by s = max|X|^α / max|W|^(1−α), folded into the weights."""

    needs_calibration: ClassVar[bool] = True

    alpha: Annotated[
        Float,
        Field(ge=0.0, le=1.0, description="migration strength: 0 keeps X, 1 moves all into W"),
    ] = 0.5
    pairs: Annotated[
        Bool, Field(description="also smooth the scale pairs (v -> o, up -> down)")
    ] = False


def smoothing_scale(
    act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float
) -> torch.Tensor:
    """``s = max|X|^α / max|W|^(1−α)`` per channel ``[C]``, clamped to ``[1e-5, 1e5]``; channels
    with no activation or no weight get ``s = 1``."""
    a, w = act_absmax.double(), weight_absmax.double()
    s = a.clamp(min=SCALE_MIN).pow(alpha) / w.clamp(min=SCALE_MIN).pow(1.0 - alpha)
    s = torch.where((a > 0) & (w > 0), s, torch.ones_like(s))
    return s.clamp(SCALE_MIN, SCALE_MAX).float()


def column_absmax(linears: list[nn.Module]) -> torch.Tensor:
    """``max_i |W_i[:, j]|`` over the linears' input columns ``[in]``."""
    return torch.stack([linear_weight(m).detach().abs().amax(0).float() for m in linears]).amax(0)


def effective_absmax(module: nn.Module, stats: ChannelStats) -> torch.Tensor:
    """Per-channel ``max |x|`` of what ``module``'s weight multiplies (after its smoothing)."""
    assert stats.min is not None and stats.max is not None, f"no inputs seen at {stats.name}"
    lo, hi = effective_range(module, stats.min, stats.max)
    return torch.maximum(lo.abs(), hi.abs())


def pair_heads(adapter: Adapter, config: object, pair: ScalePair) -> tuple[int | None, int]:
    """``(head_dim, n_rep)`` for ``fold_scale_pair``: GQA repeats v channels for o_proj."""
    heads = adapter.attention
    if pair.producer != heads.v:
        return None, 1
    n_rep = heads.num_heads(config) // heads.num_kv_heads(config)
    return heads.head_dim(config), n_rep


def reduce_heads(t: torch.Tensor, head_dim: int | None, n_rep: int) -> torch.Tensor:
    """``[kv_heads·n_rep·head_dim]`` → ``[kv_heads·head_dim]``: the maximum over each kv head's
    copies (inverse of :func:`~tersa.quant.fold.expand_for_heads`)."""
    if n_rep == 1:
        return t
    assert head_dim is not None
    return t.view(-1, n_rep, head_dim).amax(1).reshape(-1)


@register_stage("smoothquant", SmoothQuantConfig, kind="transform")
def smoothquant(model: nn.Module, cfg: SmoothQuantConfig, ctx: StageContext) -> nn.Module:
    """SmoothQuant: per-channel scales migrate activation outliers into the weights."""
    refuse_structured(model, "smoothquant")
    adapter, config = ctx.adapter, model.config
    groups = adapter.norm_groups_for(config)
    pairs = adapter.scale_pairs if cfg.pairs else ()
    pre_norm = adapter.is_pre_norm(config)

    def process(i: int, block: nn.Module, cache: BlockCache) -> None:
        # One module per input: a group's linears share it (and their smoothing), so the first.
        watched = [g.linears[0] for g in groups] + [p.consumer for p in pairs]
        modules = {name: block.get_submodule(name) for name in dict.fromkeys(watched)}
        with observe_inputs(modules) as stats:
            cache.run(block)
        for g in groups:
            first = g.linears[0]
            act = effective_absmax(block.get_submodule(first), stats[first])
            weight = column_absmax([block.get_submodule(n) for n in g.linears])
            scale = smoothing_scale(act, weight, cfg.alpha)
            norm = group_norm(model, adapter, g, i)[1] if g.block_input else None
            migrate_group(block, g.norm, g.linears, scale, None, pre_norm, norm=norm)
        for p in pairs:
            consumer = block.get_submodule(p.consumer)
            head_dim, n_rep = pair_heads(adapter, config, p)
            act = reduce_heads(effective_absmax(consumer, stats[p.consumer]), head_dim, n_rep)
            weight = reduce_heads(column_absmax([consumer]), head_dim, n_rep)
            scale = smoothing_scale(act, weight, cfg.alpha)
            fold_scale_pair(block.get_submodule(p.producer), consumer, scale, head_dim, n_rep)

    ctx.blockwise(model, process)
    return model
