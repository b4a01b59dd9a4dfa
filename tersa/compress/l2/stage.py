"""The ``l2`` stage: every decoder block's linears become L2 layers (integer codes + e, Δ).

Block by block (:func:`tersa.calib.run_blockwise`): the block's inputs come through the blocks
already compressed before it, its targets are the float block's outputs on the float model's own
activations (carried alongside, as QDrop does), and :func:`tersa.compress.l2.train.compress_block`
learns the transform and the weights. Embeddings and the LM head are outside the blocks and never
touched; ``ignore`` leaves more linears float.

The stage records, per layer, the final ``e`` and ``Δ``, the estimated and the exact (empirical
entropy) bits per weight of the codes and the share of pruned (zero) codes; per block the
normalised output error before and after and the final rate weight; and the totals, in
``ctx.metrics`` (metrics.json) and ``ctx.info["l2"]``.

With a work area (a run writing an output folder), each finished block is saved; ``--resume``
reloads those blocks instead of training them again (their rows say ``"resumed": true`` and have no
output errors; their estimated bits are taken from the stored codes).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from tersa.calib import BlockCache, run_blockwise
from tersa.compress.l2.config import FLOAT_BITS, L2Config
from tersa.compress.l2.layer import L2Linear
from tersa.compress.l2.rate import estimated_bits, sample_indices
from tersa.compress.l2.train import BlockData, BlockResult, compress_block
from tersa.context import StageContext
from tersa.errors import ModelError, RecipeError
from tersa.models.adapters import resolve
from tersa.quant.replace import find_linears, linear_weight, name_matches, replace_linear
from tersa.registry import register_stage
from tersa.workarea import BlockStore

INFO_KEY = "l2"  # ctx.info and the stage metrics


def block_linears(block: nn.Module, path: str, ignore: list[str]) -> list[str]:
    """Names (in ``block``) of the linears to compress: every ``nn.Linear`` / ``Conv1D`` whose
    full name ``path.NAME`` no ``ignore`` pattern matches.

    :raises ModelError: one carries more than a dense weight (a smoothed linear's input scale).
    """
    names = []
    for name, module in find_linears(block).items():
        full = f"{path}.{name}"
        if name_matches(full, ignore):
            continue
        if type(module) not in (nn.Linear, Conv1D):
            raise ModelError(
                f"l2 compresses dense float linears, but '{full}' is a {type(module).__name__} "
                "(its input transform would be lost); leave it float with ignore"
            )
        names.append(name)
    return names


def layer_row(layer: L2Linear, estimated: float) -> dict[str, Any]:
    """The metrics of one hardened layer."""
    return {
        "edge": float(layer.edge),
        "step": float(layer.step),
        "estimated_bits": estimated,
        "entropy_bits": layer.entropy(),
        "prune_fraction": layer.prune_fraction(),
        "max_code": int(layer.weight_codes.abs().max()),
        "codes_dtype": str(layer.weight_codes.dtype).removeprefix("torch."),
        "params": layer.weight_codes.numel(),
    }


@register_stage("l2", L2Config)
def l2(model: nn.Module, cfg: L2Config, ctx: StageContext) -> nn.Module:
    """L2: learned prune + quantize of the block linears to integer codes at a target size."""
    if ctx.calibration_ids is None:
        raise RecipeError(
            f"stage '{ctx.stage_name}' needs calibration data; add a 'calibration' section"
        )
    prefix = resolve(model, ctx.adapter, ctx.adapter.blocks)
    blocks = ctx.blocks(model)
    rows: dict[str, dict[str, Any]] = {}
    block_rows: list[dict[str, Any]] = []
    fp_inputs: list = []

    store = None
    if ctx.workdir is not None:
        store = BlockStore(ctx.workdir / f"{ctx.stage_index:02d}-{ctx.stage_name}")

    def process(i: int, block: nn.Module, cache: BlockCache) -> None:
        nonlocal fp_inputs
        if i == 0:
            fp_inputs = cache.hidden  # the first block sees the same inputs on both paths
        fp_cache = BlockCache(fp_inputs, cache.kwargs, cache.device, cache.storage, cache.dtype)
        targets = fp_cache.run(block)
        names = block_linears(block, f"{prefix}.{i}", cfg.ignore)
        fp_inputs = targets  # the next block's float inputs
        if not names:
            return
        title = f"{ctx.stage_name}: block {i + 1}/{len(blocks)}"
        if store is not None and ctx.resume and store.has(i):
            load_block(block, names, store.load(i))
            estimated = {n: codes_estimate(block.get_submodule(n), cfg) for n in names}
            row: dict[str, Any] = {"block": i, "resumed": True}
            ctx.reporter.info(f"{title} resumed from {store.folder}")
        else:
            data = BlockData(cache, targets)
            result = compress_block(block, names, data, cfg, cfg.seed + i, ctx.reporter, title)
            estimated, row = result.estimated_bits, block_row(i, result)
            if store is not None:
                store.save(i, block_state(block, names))
        block_layers = {n: layer_row(block.get_submodule(n), estimated[n]) for n in names}
        rows.update({f"{prefix}.{i}.{n}": r for n, r in block_layers.items()})
        row["bits_per_weight"] = _total_bits(block_layers)
        block_rows.append(row)
        if "nmse_final" in row:
            ctx.reporter.info(
                f"{title}: output nmse {row['nmse_init']:.4g} -> {row['nmse_final']:.4g}, "
                f"{row['bits_per_weight']:.3f} bits/weight (target {cfg.target_bits:.3f})"
            )

    run_blockwise(
        model, blocks, ctx.calibration_ids, process, batch_size=ctx.batch_size, device=ctx.device
    )
    record = summary(cfg, rows, block_rows)
    ctx.reporter.info(
        f"{ctx.stage_name}: {len(rows)} layers at {record['bits_per_weight']:.3f} bits/weight "
        f"(ratio {record['ratio']:.2f} against float32, target {cfg.target_ratio:g}), "
        f"{100 * record['prune_fraction']:.1f}% pruned"
    )
    ctx.info[INFO_KEY] = record
    ctx.metrics.update(record)
    return model


def block_row(i: int, result: BlockResult) -> dict[str, Any]:
    """The metrics of one trained block."""
    return {
        "block": i,
        "nmse_init": result.nmse_init,
        "nmse_final": result.nmse_final,
        "rate_weight": result.rate_weight,
        "wall_s": round(result.wall_s, 3),
    }


def block_state(block: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """The L2 layers' tensors ``{"<name>.<tensor>": tensor}`` (what the work area keeps)."""
    return {f"{n}.{k}": v for n in names for k, v in block.get_submodule(n).state_dict().items()}


def load_block(block: nn.Module, names: list[str], state: dict[str, torch.Tensor]) -> None:
    """Replace ``block``'s linears ``names`` by L2 layers holding a saved :func:`block_state`."""
    for n in names:
        own = {k[len(n) + 1 :]: v for k, v in state.items() if k.startswith(f"{n}.")}
        w = linear_weight(block.get_submodule(n))
        codes = own.get("weight_codes")
        if codes is None or tuple(codes.shape) != tuple(w.shape):
            raise RecipeError(
                f"--resume: the saved block has no codes of shape {list(w.shape)} for '{n}'; "
                "rerun without --resume to start over"
            )
        layer = L2Linear(w.shape[1], w.shape[0], "bias" in own, codes.dtype, w.dtype, w.device)
        try:
            layer.load_state_dict(own, strict=True)
        except RuntimeError as e:
            raise RecipeError(
                f"--resume: saved block does not match layer '{n}' ({e}); "
                "rerun without --resume to start over"
            ) from e
        replace_linear(block, n, layer)


@torch.no_grad()
def codes_estimate(layer: L2Linear, cfg: L2Config) -> float:
    """The rate estimate of stored codes (a resumed block's: its continuous codes are gone)."""
    codes = layer.weight_codes.reshape(-1)
    idx = sample_indices(codes.numel(), torch.Generator().manual_seed(cfg.seed))
    sample = (codes if idx is None else codes[idx.to(codes.device)]).float()
    return float(estimated_bits(sample, cfg.kernel_width, cfg.kernel))


def _total_bits(rows: dict[str, dict[str, Any]]) -> float:
    params = sum(r["params"] for r in rows.values())
    return sum(r["entropy_bits"] * r["params"] for r in rows.values()) / params if params else 0.0


def summary(
    cfg: L2Config, rows: dict[str, dict[str, Any]], block_rows: list[dict[str, Any]]
) -> dict[str, Any]:
    """The stage record: the per-layer and per-block rows and the totals over all L2 layers
    (``bits_per_weight``: empirical entropy of the codes, tables and e, Δ excluded)."""
    params = sum(r["params"] for r in rows.values())
    bits = _total_bits(rows)
    estimated = sum(r["estimated_bits"] * r["params"] for r in rows.values()) / max(params, 1)
    pruned = sum(r["prune_fraction"] * r["params"] for r in rows.values()) / max(params, 1)
    return {
        "target_ratio": cfg.target_ratio,
        "target_bits": cfg.target_bits,
        "params": params,
        "bits_per_weight": bits,
        "estimated_bits_per_weight": estimated,
        "ratio": FLOAT_BITS / bits if bits else None,
        "prune_fraction": pruned,
        "blocks": block_rows,
        "layers": rows,
    }
