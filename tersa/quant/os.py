"""The ``outlier_suppression`` stage (OS, Wei et al., NeurIPS 2022): gamma migration, then
token-wise clipping of static activation ranges.

1. **Gamma migration** (data-free): every norm → linears group of the adapter migrates ``|γ|`` into
   the linears' input columns (``migrate_group`` with ``s = |γ|``, no shift). Pre-norm, the norm
   then emits ``x′ = LN(x)/|γ|`` (weight ``sign(γ)``, bias ``β/|γ|``); post-norm (BERT, OPT-350m),
   the norm and the residual keep ``LN(x)`` and the consumers compute ``x′`` on their input. A
   block-input group (BERT's query/key/value) takes the ``γ`` of the norm that produced the block
   input: the previous block's last norm, or the embeddings' norm for block 0.
2. **Token-wise clipping, coarse stage** (only before a ``quantize`` stage with static per-tensor
   activations): the per-token maxima and minima of every quantized linear's input are gathered
   block by block, the blocks quantized as ``quantize`` will do it (min-max input ranges) as the
   pass goes; for each ``α`` on a grid from 1.0 down, every layer's range is
   ``[quantile(token minima, 1−α), quantile(token maxima, α)]``, the model runs quantized as the
   next stage will quantize it on ``search_samples`` calibration sequences, and the ``α`` with the
   smallest MSE of the final outputs (logits) against full precision wins. The chosen ranges go to
   ``ctx.info["activation_ranges"]``, where ``quantize`` takes them instead of min-max.

The paper's fine stage (learning the step size with LSQ+) is not implemented.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from typing import Annotated, Any, ClassVar

import torch
from pydantic import Field
from pydantic.dataclasses import dataclass
from torch import nn

from tersa.calib import BlockCache
from tersa.config import STRICT, Bool, Float, Int
from tersa.context import StageContext
from tersa.errors import DataError
from tersa.models.adapters import group_norm, resolve
from tersa.offload import offloaded
from tersa.quant.fold import migrate_group
from tersa.quant.os_math import alpha_grid, clip_range, gamma_scale, output_mse, token_extremes
from tersa.quant.qlinear import QuantLinear
from tersa.quant.replace import find_linears, name_matches, replace_linear
from tersa.quant.smoothed import effective_input
from tersa.quant.stage import ACTIVATION_RANGES, QuantizeConfig
from tersa.registry import register_stage
from tersa.structured.guard import refuse_structured

OS_INFO = "outlier_suppression"  # ctx.info key: {"alpha", "losses"} of the clipping search


@dataclass(config=STRICT)
class OsConfig:
    """Outlier Suppression: gamma migration and token-wise clipping of static activation ranges."""

    # Clipping only runs before a static-activation quantize stage, which needs calibration data
    # itself; gamma migration is data-free.
    needs_calibration: ClassVar[bool] = False

    gamma_migration: Annotated[
        Bool, Field(description="move the norm gains into the next linears' input columns")
    ] = True
    clipping: Annotated[
        Bool,
        Field(description="token-wise clipping of static (per-tensor) activation ranges"),
    ] = True
    search_samples: Annotated[
        Int, Field(ge=1, description="calibration sequences per clipping candidate")
    ] = 4
    step: Annotated[
        Float, Field(gt=0.0, le=0.5, description="quantile step of the clipping search")
    ] = 0.01
    min_alpha: Annotated[
        Float | None,
        Field(
            gt=0.0,
            le=1.0,
            description="lowest quantile searched (default by bits: 8: 0.9, 6: 0.7, 4: 0.1)",
        ),
    ] = None


@register_stage("outlier_suppression", OsConfig, kind="transform")
def outlier_suppression(model: nn.Module, cfg: OsConfig, ctx: StageContext) -> nn.Module:
    """Outlier Suppression: gamma migration, then token-wise clipping of static input ranges."""
    refuse_structured(model, "outlier_suppression")
    if cfg.gamma_migration:
        migrate_gammas(model, ctx)
    quant = ctx.next_config("quantize")
    if cfg.clipping and isinstance(quant, QuantizeConfig) and quant.needs_calibration:
        ranges = clip_activations(model, ctx, cfg, quant)
        ctx.info.setdefault(ACTIVATION_RANGES, {}).update(ranges)
    return model


def migrate_gammas(model: nn.Module, ctx: StageContext) -> None:
    """Migrate each norm group's ``|γ|`` into its consumers (see the module doc)."""
    groups = ctx.adapter.norm_groups_for(model.config)
    pre_norm = ctx.adapter.is_pre_norm(model.config)

    def process(i: int, block: nn.Module, _cache: BlockCache | None) -> None:
        for g in groups:
            # Post-norm, norms are never changed, so an earlier block's γ is still the original.
            norm = group_norm(model, ctx.adapter, g, i)[1]
            scale = gamma_scale(norm.weight)
            outside = norm if g.block_input else None
            migrate_group(block, g.norm, g.linears, scale, None, pre_norm, norm=outside)

    ctx.each_block(model, process)


def quantized_targets(model: nn.Module, ctx: StageContext, quant: QuantizeConfig) -> list[str]:
    """Full names of the linears the ``quantize`` stage will quantize (its ``ignore`` applied)."""
    prefix = resolve(model, ctx.adapter, ctx.adapter.blocks)
    names = []
    for i, block in enumerate(ctx.blocks(model)):
        for name in find_linears(block):
            full = f"{prefix}.{i}.{name}"
            if not name_matches(full, quant.ignore):
                names.append(full)
    return names


def clip_activations(
    model: nn.Module, ctx: StageContext, cfg: OsConfig, quant: QuantizeConfig
) -> dict[str, tuple[float, float]]:
    """Token-wise clipping: ``{full linear name: (lo, hi)}`` of the searched ``α``.

    The linears are temporarily the QuantLinears ``quant`` will build. Token statistics are
    gathered block by block as ``quantize`` calibrates: each block's inputs come from the blocks
    before it quantized with min-max ranges, so the ``α = 1`` candidate is exactly what
    ``quantize`` would do on its own, and clipping is chosen only when it beats that.
    """
    assert ctx.calibration_ids is not None
    ids = ctx.calibration_ids[: cfg.search_samples]
    with _whole_model(model, ctx.device):
        reference = _outputs(model, ids, ctx)
    targets = quantized_targets(model, ctx, quant)
    with _quantized(model, targets, quant) as layers:
        extremes = gather_token_extremes(model, ctx, layers)
        # Swap first, then (when offloading) hook the model: hooks attach to the modules present.
        with _whole_model(model, ctx.device):
            return search_clipping(model, ids, ctx, cfg, quant, layers, extremes, reference)


def gather_token_extremes(
    model: nn.Module, ctx: StageContext, layers: dict[str, QuantLinear]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``{name: (ascending token maxima [N], ascending token minima [N])}`` of each layer's
    effective input over all calibration tokens, gathered block by block while each block's layers
    calibrate min-max input ranges (the next block then sees quantized inputs)."""
    prefix = resolve(model, ctx.adapter, ctx.adapter.blocks)
    seen: dict[str, tuple[list[torch.Tensor], list[torch.Tensor]]] = {n: ([], []) for n in layers}

    def process(i: int, block: nn.Module, cache: BlockCache) -> None:
        here = {
            f"{prefix}.{i}.{name}": module
            for name, module in block.named_modules()
            if f"{prefix}.{i}.{name}" in layers
        }
        handles = []
        for full, module in here.items():
            module.start_calibration()
            hook = _extremes_hook(full, seen[full])
            handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
        try:
            cache.run(block)
        finally:
            for h in handles:
                h.remove()
        for module in here.values():
            module.finish_calibration()

    ctx.blockwise(model, process)
    return {
        n: (torch.cat(mx).sort().values, torch.cat(mn).sort().values)
        for n, (mx, mn) in seen.items()
    }


def _extremes_hook(name: str, into: tuple[list[torch.Tensor], list[torch.Tensor]]) -> Any:
    def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
        x = effective_input(module, args[0] if args else kwargs["input"])
        if not torch.isfinite(x).all():
            raise DataError(
                f"non-finite activations (NaN or inf) at the input of '{name}' during "
                "calibration; use float32 or bfloat16 and check the checkpoint"
            )
        t_max, t_min = token_extremes(x)
        into[0].append(t_max.cpu())
        into[1].append(t_min.cpu())

    return hook


@torch.no_grad()
def search_clipping(
    model: nn.Module,
    ids: torch.Tensor,
    ctx: StageContext,
    cfg: OsConfig,
    quant: QuantizeConfig,
    layers: dict[str, QuantLinear],
    extremes: dict[str, tuple[torch.Tensor, torch.Tensor]],
    reference: list[torch.Tensor],
) -> dict[str, tuple[float, float]]:
    """The per-layer ranges at the ``α`` whose quantized model output on ``ids`` is closest to
    the float ``reference`` (MSE); ``ctx.info["outlier_suppression"]`` records every loss."""
    assert quant.activations is not None
    grid = alpha_grid(quant.activations.bits, cfg.step, cfg.min_alpha)
    losses: dict[float, float] = {}
    with ctx.reporter.task(f"{ctx.stage_name}: clipping search", len(grid)) as update:
        for k, alpha in enumerate(grid):
            for name, layer in layers.items():
                layer.set_input_range(*clip_range(*extremes[name], alpha))
            outputs = _outputs(model, ids, ctx)
            losses[alpha] = sum(map(output_mse, reference, outputs)) / len(outputs)
            update(k + 1, len(grid))
    best = min(grid, key=lambda a: (losses[a], -a))  # ties: the milder clipping
    ctx.info[OS_INFO] = {"alpha": best, "losses": losses}
    return {name: clip_range(*extremes[name], best) for name in layers}


@torch.no_grad()
def _outputs(model: nn.Module, ids: torch.Tensor, ctx: StageContext) -> list[torch.Tensor]:
    """The model's final outputs for ``ids`` ``[N, T]``, batch by batch, on the CPU: logits, or
    the last hidden state of a headless encoder (sentence-embedding models)."""
    out = []
    for start in range(0, ids.shape[0], ctx.batch_size):
        batch = ids[start : start + ctx.batch_size].to(ctx.device)
        result = model(input_ids=batch, use_cache=False)
        final = result.logits if hasattr(result, "logits") else result[0]
        out.append(final.float().cpu())
    return out


@contextmanager
def _whole_model(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Whole-model forwards on ``device``; through offload hooks when weights stay elsewhere."""
    on_device = all(_same_device(p.device, device) for p in model.parameters())
    with nullcontext() if on_device else offloaded(model, device):
        yield


def _same_device(have: torch.device, want: torch.device) -> bool:
    # "cuda" names the current device, "cuda:0" an explicit one; either matches a tensor there.
    return have.type == want.type and (want.index is None or have.index == want.index)


@contextmanager
def _quantized(
    model: nn.Module, targets: list[str], quant: QuantizeConfig
) -> Iterator[dict[str, QuantLinear]]:
    """Temporarily swap the targets for the QuantLinears the ``quantize`` stage will build."""
    originals = {name: model.get_submodule(name) for name in targets}
    layers = {
        name: QuantLinear.from_float(m, quant.weights, quant.activations)
        for name, m in originals.items()
    }
    for name, layer in layers.items():
        replace_linear(model, name, layer)
    try:
        yield layers
    finally:
        for name, original in originals.items():
            replace_linear(model, name, original)
