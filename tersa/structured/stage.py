"""The ``structured_ffn`` stage: MLP linears become structured layers fitted to them.

Block by block (:func:`tersa.calib.run_blockwise`, so a block's inputs come through the blocks
already replaced before it), the second moment of each MLP linear's calibration inputs is gathered
with forward hooks (:mod:`tersa.structured.moments`): for gate/up the post-attention norm output,
for down ``act(gate)·up``, for fc1/fc2 likewise. Each linear is then replaced by a LowRank,
BlockDense or BlockShuffle layer fitted to its weight on those inputs (activation-aware SVD, or
least squares for the block kinds) and its relative output error is reported. All linears of a
block are fitted on the dense block's inputs in one pass. The first block stays dense by default
(``keep_dense: [0]``, as in the paper). Optional healing fine-tunes the result
(:mod:`tersa.structured.healing`); self-guided healing keeps the replaced dense linears, its
guides, in memory until it ends.

The factors are ordinary linears (:mod:`tersa.structured.factors`), so a later ``quantize`` stage
quantizes them like any other. Outlier transforms (``smoothquant``, ``outlier_suppression``,
``os_plus``) cannot fold into structured layers and must come before this stage.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from tersa.calib import BlockCache
from tersa.context import StageContext
from tersa.errors import ModelError, RecipeError
from tersa.models.adapters import resolve
from tersa.quant.replace import is_linear, linear_weight, name_matches, replace_linear
from tersa.registry import register_stage
from tersa.structured.base import StructuredLinear
from tersa.structured.build import make_layer, spec_for
from tersa.structured.config import StructuredFFNConfig
from tersa.structured.healing import check_healable, heal
from tersa.structured.moments import observe_moments
from tersa.structured.sizes import StructureSpec

INFO_KEY = "structured_ffn"  # ctx.info and the stage metrics: per-layer fits, sizes, healing
OUTLIER_STAGES = ("smoothquant", "outlier_suppression", "os_plus")


def replaced_blocks(n_blocks: int, keep_dense: list[int]) -> list[int]:
    """Indices of the blocks whose MLP is replaced: all but ``keep_dense`` (negative from the end).

    :raises RecipeError: an index outside the model.
    """
    for k in keep_dense:
        if not -n_blocks <= k < n_blocks:
            raise RecipeError(
                f"structured_ffn.keep_dense: block {k} is out of range; the model has {n_blocks} "
                f"blocks (0..{n_blocks - 1}, or -{n_blocks}..-1)"
            )
    kept = {k % n_blocks for k in keep_dense}
    return [i for i in range(n_blocks) if i not in kept]


_NOT_DENSE_HINTS = {
    "QuantLinear": "run structured_ffn before quantize",
    "SmoothedLinear": (
        "a post-norm outlier transform's input smoothing cannot move into a structured layer; "
        "leave it dense with ignore"
    ),
}


def mlp_linears(
    block: nn.Module, mlp: tuple[str, ...], path: str, ignore: list[str]
) -> dict[str, nn.Module]:
    """``{name in block: linear}`` of the block's MLP linears not matched by ``ignore``.

    :raises ModelError: one is not a dense float linear (already structured, quantized, or
        carrying an input transform that a structured layer could not keep).
    """
    out = {}
    for name in mlp:
        full = f"{path}.{name}"
        if name_matches(full, ignore):
            continue
        module = block.get_submodule(name)
        if type(module) not in (nn.Linear, Conv1D):
            kind = type(module).__name__
            hint = _NOT_DENSE_HINTS.get(kind, "leave it dense with ignore")
            if isinstance(module, StructuredLinear):
                hint = "it is structured already; leave it out with ignore"
            raise ModelError(
                f"structured_ffn replaces dense float linears, but '{full}' is a {kind}; {hint}"
            )
        out[name] = module
    return out


def layer_spec(dense: nn.Module, full: str, cfg: StructuredFFNConfig) -> StructureSpec:
    """The structure of the replacement of ``dense`` (called ``full`` in messages)."""
    m, n = linear_weight(dense).shape
    try:
        spec = spec_for(n, m, cfg.kind, cfg.fraction, cfg.rank, cfg.blocks, cfg.rank_multiple)
    except ValueError as e:
        raise RecipeError(f"structured_ffn: cannot size '{full}' ({n} -> {m}): {e}") from None
    if spec.fraction > 1.0:
        raise RecipeError(
            f"structured_ffn: {spec.kind} with rank={spec.rank}, blocks={spec.blocks} has "
            f"{spec.fraction:.3g}x the parameters of '{full}' ({n} -> {m}); choose a smaller "
            "size or set fraction"
        )
    return spec


@torch.no_grad()
def fit_layer(
    dense: nn.Module, spec: StructureSpec, cfg: StructuredFFNConfig, moment: torch.Tensor | None
) -> tuple[StructuredLinear, float]:
    """The structured replacement of ``dense`` and its relative error: on the outputs when the
    inputs' second ``moment`` ``[in, in]`` is given, else on the weight."""
    w = linear_weight(dense).detach()  # [out, in]
    layer = make_layer(spec, dense.bias is not None, cfg.merge_below, w.device, w.dtype)
    bias = None if dense.bias is None else dense.bias.detach()
    if moment is None:
        err = layer.init_from_dense(w, bias, damp=cfg.damp, iters=cfg.fit_iters)
    else:
        err = layer.init_from_moment(w, bias, moment, damp=cfg.damp, iters=cfg.fit_iters)
    return layer, err


@torch.no_grad()
def block_moments(
    block: nn.Module, linears: dict[str, nn.Module], cache: BlockCache, cfg: StructuredFFNConfig
) -> dict[str, torch.Tensor]:
    """``{name: XᵀX/n}`` of each linear's inputs over (up to ``max_tokens`` of) the cache."""
    total = sum(h.shape[:-1].numel() for h in cache.hidden)
    keep = 1.0 if cfg.max_tokens is None else min(1.0, cfg.max_tokens / max(total, 1))
    with observe_moments(linears, keep) as sums:
        for hidden, kwargs in cache.batches():
            block(hidden, **kwargs)
    return {name: s.moment() for name, s in sums.items()}


def as_guide(dense: nn.Module) -> nn.Linear:
    """The replaced layer as an ``nn.Linear`` (a ``Conv1D`` stores its weight transposed)."""
    if isinstance(dense, nn.Linear):
        return dense
    w = linear_weight(dense).detach()
    guide = nn.Linear(w.shape[1], w.shape[0], bias=dense.bias is not None)
    guide = guide.to(device=w.device, dtype=w.dtype)
    with torch.no_grad():
        guide.weight.copy_(w)
        if dense.bias is not None:
            guide.bias.copy_(dense.bias)
    return guide


def _row(spec: StructureSpec, layer: StructuredLinear, err: float) -> dict[str, Any]:
    return {
        "kind": spec.kind,
        "rank": spec.rank,
        "blocks": spec.blocks,
        "params": layer.weight_parameters(),
        "dense_params": spec.in_features * spec.out_features,
        "init_error": err,
    }


def mlp_params(model: nn.Module, ctx: StageContext) -> int:
    """Weight parameters of every block's MLP linears (as the adapter names them), now."""
    total = 0
    for block in ctx.blocks(model):
        for name in ctx.adapter.mlp:
            m = block.get_submodule(name)
            if isinstance(m, StructuredLinear):
                total += m.weight_parameters()
            elif is_linear(m):
                total += linear_weight(m).numel()
            else:  # a quantized layer (refused later, with a message)
                total += m.in_features * m.out_features
    return total


@register_stage("structured_ffn", StructuredFFNConfig, kind="transform", follows=OUTLIER_STAGES)
def structured_ffn(model: nn.Module, cfg: StructuredFFNConfig, ctx: StageContext) -> nn.Module:
    """Structured FFN: MLP linears become LowRank / BlockDense / BlockShuffle layers fitted to them."""
    if cfg.healing is not None:
        check_healable(model, ctx)  # before the fits, which take a while
    chosen = set(replaced_blocks(len(ctx.blocks(model)), cfg.keep_dense))
    prefix = resolve(model, ctx.adapter, ctx.adapter.blocks)
    dense_total = mlp_params(model, ctx)
    rows: dict[str, dict[str, Any]] = {}
    guides: dict[str, nn.Linear] = {}
    keep_guides = cfg.healing is not None and cfg.healing.mode == "self_guided"

    def process(i: int, block: nn.Module, cache: BlockCache | None) -> None:
        if i not in chosen:
            return
        linears = mlp_linears(block, ctx.adapter.mlp, f"{prefix}.{i}", cfg.ignore)
        specs = {n: layer_spec(m, f"{prefix}.{i}.{n}", cfg) for n, m in linears.items()}
        moments = block_moments(block, linears, cache, cfg) if cache is not None else {}
        errors = []
        for name, dense in linears.items():
            layer, err = fit_layer(dense, specs[name], cfg, moments.get(name))
            replace_linear(block, name, layer)
            full = f"{prefix}.{i}.{name}"
            rows[full] = _row(specs[name], layer, err)
            if keep_guides:
                guides[full] = as_guide(dense)
            errors.append(f"{name.rpartition('.')[2]} {err:.4f}")
        ctx.reporter.info(f"{ctx.stage_name}: block {i}: init error {', '.join(errors)}")

    if cfg.activation_aware:
        ctx.blockwise(model, process)
    else:
        ctx.each_block(model, process)
    record = _summary(cfg, rows, dense_total, mlp_params(model, ctx))
    ctx.reporter.info(
        f"{ctx.stage_name}: {len(rows)} {cfg.kind} layers at {record['replaced_fraction']:.3f} of "
        f"their parameters (FFN {record['ffn_fraction']:.3f}); relative "
        f"{'output' if cfg.activation_aware else 'weight'} error mean {record['mean_init_error']:.4f}, max {record['max_init_error']:.4f}"
    )
    if cfg.healing is not None:
        record["healing"] = heal(model, cfg.healing, ctx, guides)
        h = record["healing"]
        ctx.reporter.info(
            f"{ctx.stage_name}: healing ({h['mode']}) {h['steps']} steps in {h['wall_s']:.0f} s: "
            f"calibration loss {h['loss_before']:.4f} -> {h['loss_after']:.4f}"
        )
    ctx.info[INFO_KEY] = record
    ctx.metrics.update(record)
    return model


def _summary(
    cfg: StructuredFFNConfig, rows: dict[str, dict[str, Any]], dense_total: int, now_total: int
) -> dict[str, Any]:
    """The stage record: per-layer rows and the totals (``ffn_fraction`` counts the kept-dense
    blocks' MLPs too; ``replaced_fraction`` only the replaced layers)."""
    params = sum(r["params"] for r in rows.values())
    dense = sum(r["dense_params"] for r in rows.values())
    errors = [r["init_error"] for r in rows.values()]
    return {
        "kind": cfg.kind,
        "error_on": "outputs" if cfg.activation_aware else "weights",
        "layers": rows,
        "replaced_fraction": params / dense if dense else 1.0,
        "ffn_fraction": now_total / dense_total if dense_total else 1.0,
        "mean_init_error": sum(errors) / len(errors) if errors else 0.0,
        "max_init_error": max(errors, default=0.0),
    }
