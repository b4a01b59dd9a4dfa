"""QDrop (Wei et al., ICLR 2022) for decoder blocks: block-wise reconstruction of the quantized
model, with activation quantization randomly dropped while the rounding is learned.

For each block in order (one block's activations held at a time, see :mod:`tersa.calib`):

1. The cache holds the block's inputs from the already-quantized previous blocks (``x_q``) and
   from the full-precision model (``x_fp``); the float block's outputs on ``x_fp`` are the
   targets ``y_fp`` (and the next block's ``x_fp``).
2. Its linears become :class:`~tersa.quant.qdrop_linear.QDropLinear` (AdaRound weights, per-token
   or LSQ static inputs). For ``iters`` steps on mini-batches of cached sequences: the input is
   ``where(u < drop_prob, x_q, x_fp)`` elementwise, every input quantizer mixes the same way, and
   Adam minimises ``Σ_hidden (ŷ − y_fp)²`` (mean over tokens) ``+ λ·Σ(1 − |2h(V) − 1|^β)``, the
   regulariser off for the warm-up, then β annealed linearly from ``beta_start`` to
   ``beta_end``. Rounding parameters use a constant learning rate, steps a cosine decay.
3. The rounding is hardened into the same :class:`~tersa.quant.qlinear.QuantLinear` storage as
   round-to-nearest; inputs are then always quantized, and the block's outputs on ``x_q`` become
   the next block's ``x_q``.

With a work area (a run writing an output folder), each finished block is saved; ``--resume``
reloads those blocks instead of training them again.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal

import torch
from accelerate.utils import send_to_device
from pydantic import Field
from pydantic.dataclasses import dataclass
from torch import nn

from tersa.calib import BlockCache, run_blockwise
from tersa.calib.blockwise import first_output, select_rows
from tersa.config import STRICT, Float, Int
from tersa.context import StageContext
from tersa.errors import DataError
from tersa.models.adapters import resolve
from tersa.progress import Reporter
from tersa.quant.adaround import beta_schedule, cosine_lr, rounding_regularizer
from tersa.quant.qdrop_linear import QDropLinear
from tersa.quant.qlinear import QuantLinear
from tersa.quant.replace import find_linears, name_matches, replace_linear
from tersa.quant.scheme import ActivationScheme, WeightScheme
from tersa.workarea import BlockStore

QDROP_INFO = "qdrop"  # ctx.info key: {"losses": [final reconstruction loss of each block]}


@dataclass(config=STRICT)
class QDropConfig:
    """QDrop block reconstruction (``quantize`` with ``method: qdrop``)."""

    iters: Annotated[Int, Field(ge=1, description="optimisation steps per block")] = 100
    batch_size: Annotated[
        Int,
        Field(ge=1, description="sequences per step (at most the calibration batch size)"),
    ] = 1
    drop_prob: Annotated[
        Float,
        Field(
            ge=0.0,
            le=1.0,
            description=(
                "probability that an activation element keeps its quantized value during "
                "reconstruction (named after the official code's drop_prob, but it is the "
                "chance of keeping quantization); 1.0: always quantized (BRECQ-style), 0.5: QDrop"
            ),
        ),
    ] = 0.5
    lr: Annotated[Float, Field(gt=0, description="Adam learning rate of the rounding V")] = 1e-2
    scale_lr: Annotated[
        Float, Field(gt=0, description="Adam learning rate of static input steps (cosine decay)")
    ] = 4e-5
    round_weight: Annotated[
        Float, Field(ge=0, description="λ of the rounding regulariser λ·Σ(1 − |2h(V) − 1|^β)")
    ] = 0.01
    warmup: Annotated[
        Float, Field(ge=0.0, lt=1.0, description="fraction of steps before the regulariser starts")
    ] = 0.2
    beta_start: Annotated[Float, Field(gt=0, description="β at the end of the warm-up")] = 20.0
    beta_end: Annotated[Float, Field(gt=0, description="β at the last step")] = 2.0
    weight_observer: Annotated[
        Literal["mse", "minmax"],
        Field(
            description="initial weight grid: rounding-MSE search over clipped ranges, or min-max"
        ),
    ] = "mse"
    cache_dtype: Annotated[
        Literal["model", "float32", "bfloat16", "float16"],
        Field(description="storage dtype of the cached block inputs and targets"),
    ] = "model"
    seed: Annotated[Int, Field(description="seed of mini-batch sampling and drop masks")] = 1005

    def __post_init__(self) -> None:
        if self.beta_end > self.beta_start:
            raise ValueError(
                f"beta_end ({self.beta_end}) must not exceed beta_start ({self.beta_start}): "
                "β is annealed downwards"
            )


def reconstruct(
    model: nn.Module,
    ctx: StageContext,
    weights: WeightScheme | None,
    activations: ActivationScheme | None,
    ignore: list[str],
    cfg: QDropConfig,
    ranges: dict[str, tuple[float, float]],
) -> nn.Module:
    """Quantize every decoder block's linears by QDrop reconstruction (see the module doc).

    :param ranges: static input ranges chosen by an earlier stage (``{full name: (lo, hi)}``);
        those layers start their step there instead of at the observed min-max.
    """
    if ctx.calibration_ids is None:
        raise DataError(f"stage '{ctx.stage_name}' (qdrop) needs calibration data")
    prefix = resolve(model, ctx.adapter, ctx.adapter.blocks)
    blocks = ctx.blocks(model)
    store = None
    if ctx.workdir is not None:
        store = BlockStore(ctx.workdir / f"{ctx.stage_index:02d}-{ctx.stage_name}")
    compute = next(model.parameters()).dtype
    storage = compute if cfg.cache_dtype == "model" else getattr(torch, cfg.cache_dtype)
    losses: list[float] = []
    fp_inputs: list[torch.Tensor] = []

    def process(i: int, block: nn.Module, cache: BlockCache) -> None:
        nonlocal fp_inputs
        cache.dtype = compute
        cache.hidden = [h.to(storage) for h in cache.hidden]  # x_q of this block
        if i == 0:
            fp_inputs = cache.hidden  # the first block sees the same inputs on both paths
        fp_cache = BlockCache(fp_inputs, cache.kwargs, cache.device, cache.storage, compute)
        targets = [t.to(storage) for t in fp_cache.run(block)]
        full = {n: f"{prefix}.{i}.{n}" for n in find_linears(block)}
        names = [n for n in full if not name_matches(full[n], ignore)]
        title = f"{ctx.stage_name}: block {i + 1}/{len(blocks)}"
        if store is not None and ctx.resume and store.has(i):
            load_block(block, names, store.load(i), weights, activations)
            ctx.reporter.info(f"{title} resumed from {store.folder}")
            losses.append(float("nan"))
        else:
            block_ranges = {n: ranges[full[n]] for n in names if full[n] in ranges}
            loss = reconstruct_block(
                block,
                names,
                cache,
                fp_inputs,
                targets,
                weights,
                activations,
                cfg,
                seed=cfg.seed + i,
                ranges=block_ranges,
                ctx=ctx,
                title=title,
            )
            losses.append(loss)
            if store is not None:
                store.save(i, block_state(block, names))
        fp_inputs = targets

    run_blockwise(
        model, blocks, ctx.calibration_ids, process, batch_size=ctx.batch_size, device=ctx.device
    )
    ctx.info[QDROP_INFO] = {"losses": losses}
    return model


def reconstruct_block(
    block: nn.Module,
    names: list[str],
    cache: BlockCache,
    fp_inputs: list[torch.Tensor],
    targets: list[torch.Tensor],
    weights: WeightScheme | None,
    activations: ActivationScheme | None,
    cfg: QDropConfig,
    seed: int,
    ranges: dict[str, tuple[float, float]] | None = None,
    ctx: StageContext | None = None,
    title: str = "qdrop",
) -> float:
    """Learn the rounding (and static steps) of ``block``'s linears ``names`` so that the block on
    (mixed) quantized inputs ``cache.hidden`` reproduces ``targets`` (the float block on
    ``fp_inputs``); replace them by hardened QuantLinears. Returns the last steps' mean
    reconstruction loss."""
    torch.manual_seed(seed)
    dtype = next(block.parameters()).dtype
    block.float()
    for p in block.parameters():
        p.requires_grad_(False)
    layers = {
        n: QDropLinear(
            block.get_submodule(n), weights, activations, cfg.drop_prob, cfg.weight_observer
        )
        for n in names
    }
    for n, layer in layers.items():
        replace_linear(block, n, layer)
    _init_steps(block, layers, cache, ranges or {})
    rounding = [l.rounding for l in layers.values() if l.rounding is not None]
    steps = [l.input_step for l in layers.values() if l.input_step is not None]
    groups = [{"params": rounding, "lr": cfg.lr}, {"params": steps, "lr": cfg.scale_lr}]
    opt = torch.optim.Adam([g for g in groups if g["params"]])
    schedules = [lambda s: 1.0, lambda s: cosine_lr(s, cfg.iters)]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, [f for g, f in zip(groups, schedules, strict=True) if g["params"]]
    )
    recent: list[float] = []
    for layer in layers.values():
        layer.dropping = True
    reporter = ctx.reporter if ctx is not None else Reporter(quiet=True)
    device = next(block.parameters()).device
    with reporter.task(title, cfg.iters) as update:
        for step in range(cfg.iters):
            x, kwargs, y = _minibatch(cache, fp_inputs, targets, cfg, device)
            out = first_output(block(x, **kwargs))
            rec = (out.float() - y).pow(2).sum(-1).mean()
            beta = beta_schedule(step, cfg.iters, cfg.warmup, cfg.beta_start, cfg.beta_end)
            loss = rec
            if beta is not None and rounding and cfg.round_weight > 0:
                loss = rec + cfg.round_weight * sum(rounding_regularizer(v, beta) for v in rounding)
            opt.zero_grad(set_to_none=True)
            if loss.requires_grad:
                loss.backward()
                opt.step()
            sched.step()
            if not math.isfinite(rec.item()):
                raise DataError(
                    f"{title}: the reconstruction loss became {rec.item()} at step {step}; "
                    "lower qdrop.lr or check the calibration data"
                )
            recent = [*recent[-9:], rec.item()]
            update(step + 1, cfg.iters, f"loss {sum(recent) / len(recent):.4g}")
    for n, layer in layers.items():
        replace_linear(block, n, layer.harden())
    block.to(dtype)
    return sum(recent) / max(len(recent), 1)


def block_state(block: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """The hardened layers' state ``{"<name>.<tensor>": tensor}`` (what the work area keeps)."""
    return {f"{n}.{k}": v for n in names for k, v in block.get_submodule(n).state_dict().items()}


def load_block(
    block: nn.Module,
    names: list[str],
    state: dict[str, torch.Tensor],
    weights: WeightScheme | None,
    activations: ActivationScheme | None,
) -> None:
    """Replace ``block``'s linears ``names`` by QuantLinears holding a saved :func:`block_state`."""
    for n in names:
        layer = QuantLinear.from_float(block.get_submodule(n), weights, activations)
        own = {k[len(n) + 1 :]: v for k, v in state.items() if k.startswith(f"{n}.")}
        try:
            layer.load_state_dict(own, strict=True)
        except RuntimeError as e:
            raise DataError(
                f"--resume: saved block does not match layer '{n}' ({e}); "
                "rerun without --resume to start over"
            ) from e
        replace_linear(block, n, layer)


@torch.no_grad()
def _init_steps(
    block: nn.Module,
    layers: dict[str, QDropLinear],
    cache: BlockCache,
    ranges: dict[str, tuple[float, float]],
) -> None:
    """Start static input steps at the given ranges, else at the min-max observed on ``cache``."""
    observed = [l for n, l in layers.items() if l.is_static and n not in ranges]
    for n, l in layers.items():
        if l.is_static and n in ranges:
            l.init_input_step(*ranges[n])
    if not observed:
        return
    for l in observed:
        l.start_observing()
    for h, kw in cache.batches():
        block(h.float(), **_float_kwargs(kw))
    for l in observed:
        l.init_input_step()


def _minibatch(
    cache: BlockCache,
    fp_inputs: list[torch.Tensor],
    targets: list[torch.Tensor],
    cfg: QDropConfig,
    device: torch.device,
) -> tuple[torch.Tensor, dict[str, Any], torch.Tensor]:
    """Random sequences of one cached batch: the QDrop-mixed input ``[b, T, H]``, the kwargs for
    those rows and the float targets ``[b, T, H]``, float32 on ``device``."""
    k = int(torch.randint(len(cache.hidden), ()))
    n = cache.hidden[k].shape[0]
    rows = torch.randperm(n)[: min(cfg.batch_size, n)]
    x_q = cache.hidden[k][rows].to(device, torch.float32)
    if cfg.drop_prob < 1.0:
        x_fp = fp_inputs[k][rows].to(device, torch.float32)
        x_q = torch.where(torch.rand_like(x_q) < cfg.drop_prob, x_q, x_fp)
    kwargs = _float_kwargs(send_to_device(select_rows(cache.kwargs[k], rows, n), device))
    return x_q, kwargs, targets[k][rows].to(device, torch.float32)


def _float_kwargs(value: Any) -> Any:
    """Floating tensors (position embeddings, additive masks) in float32, like the block."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: _float_kwargs(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return type(value)(_float_kwargs(v) for v in value)
    return value
