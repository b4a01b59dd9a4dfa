"""Healing: fine-tune a structured model on its calibration sequences (causal-LM loss, AdamW).

``self_guided`` (StructuredFFN §3.2) wraps every structured layer in a
:class:`~tersa.structured.self_guided.SelfGuided` whose guide is the dense layer it replaced, so
training starts from the uncompressed model's outputs; ``α`` follows
:func:`~tersa.structured.self_guided.cosine_alpha` from 1 to 0 over the first ``guided_fraction``
of the budget (steps, or seconds when ``max_seconds`` runs out first), then the guides are dropped
and the bare structured layers train on. The paper trains from scratch and so initialises the guide
from the factors; after compression the original dense weights are the natural guide. ``plain``
trains the structured model as it is.

``train: structured`` (default) trains only the structured layers' factors and biases and freezes
the rest of the model: the uncompressed weights were already trained and a small calibration set
would mostly overfit them. ``train: all`` trains every float parameter (the paper's setting).
Dropout stays off (the model stays in eval mode): the set is small and the goal is the fit.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from tersa.context import StageContext
from tersa.errors import RecipeError
from tersa.quant.replace import replace_linear
from tersa.structured.base import StructuredLinear
from tersa.structured.config import HealingConfig
from tersa.structured.self_guided import SelfGuided, cosine_alpha

# Gradient-norm clip: a freshly fitted factor can meet a large first gradient (the paper's loss
# spikes); 1.0 is the usual LM fine-tuning value.
CLIP_NORM = 1.0
# alpha's time schedule runs on milliseconds (cosine_alpha takes integer steps).
_MS = 1000


def check_healable(model: nn.Module, ctx: StageContext) -> None:
    """Refuse healing that cannot run: an encoder, or weights that are not all on the device."""
    if not ctx.adapter.causal:
        raise RecipeError(
            f"structured_ffn.healing trains on the causal-LM loss; a {ctx.adapter.model_type} "
            "model is not causal: set healing: null"
        )
    if any(p.device.type != ctx.device.type for p in model.parameters()):
        raise RecipeError(
            "structured_ffn.healing trains the whole model on the compute device, but its weights "
            "stay on the CPU (offload: true); set offload: false or healing: null"
        )


def lm_loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy of ``ids`` ``[B, T]`` (transformers shifts the labels)."""
    return model(input_ids=ids, labels=ids, use_cache=False).loss


def alpha_at(step: int, elapsed: float, cfg: HealingConfig) -> float:
    """``α`` after ``step`` steps and ``elapsed`` seconds: the lower of the step and time cosines."""
    alpha = cosine_alpha(step, max(1, round(cfg.guided_fraction * cfg.steps)))
    if cfg.max_seconds is not None:
        guided_ms = max(1, round(cfg.guided_fraction * cfg.max_seconds * _MS))
        alpha = min(alpha, cosine_alpha(int(elapsed * _MS), guided_ms))
    return alpha


@contextmanager
def only_trainable(model: nn.Module, params: list[nn.Parameter]) -> Iterator[None]:
    """``requires_grad`` on ``params`` only (every other parameter of ``model`` frozen), restored
    afterwards, gradients cleared."""
    saved = [(p, p.requires_grad) for p in model.parameters()]
    chosen = {id(p) for p in params}
    for p, _ in saved:
        p.requires_grad_(id(p) in chosen)
    try:
        yield
    finally:
        for p, flag in saved:
            p.requires_grad_(flag)
            p.grad = None


def _wrap(model: nn.Module, guides: dict[str, nn.Linear]) -> dict[str, SelfGuided]:
    wrapped = {}
    for name, guide in guides.items():
        layer = model.get_submodule(name)
        assert isinstance(layer, StructuredLinear), f"{name} is not structured"
        wrapped[name] = SelfGuided(guide, layer, alpha=1.0)
        replace_linear(model, name, wrapped[name])
    return wrapped


def _unwrap(model: nn.Module, wrapped: dict[str, SelfGuided]) -> None:
    for name, guided in wrapped.items():
        replace_linear(model, name, guided.finalize())
    wrapped.clear()


def _trainable(model: nn.Module, train: str) -> list[nn.Parameter]:
    if train == "all":
        return [p for p in model.parameters() if p.is_floating_point()]
    layers = [m for m in model.modules() if isinstance(m, StructuredLinear)]
    return [p for layer in layers for p in layer.parameters()]


def _batches(ids: torch.Tensor, size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless batches of ``size`` rows of ``ids`` ``[N, T]``, a fresh shuffle every epoch."""
    generator = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(ids.shape[0], generator=generator)
        for start in range(0, len(order) - size + 1, size):  # drops a last, partial batch
            yield ids[order[start : start + size]]


def heal(
    model: nn.Module, cfg: HealingConfig, ctx: StageContext, guides: dict[str, nn.Linear]
) -> dict[str, Any]:
    """Fine-tune ``model`` in place; returns the record for the stage metrics.

    :param guides: ``{structured layer name: the dense linear it replaced}`` (self_guided).
    :returns: ``mode``, ``steps`` (done), ``stopped_early`` (time budget), ``wall_s``,
        ``loss_before`` / ``loss_after`` (bare structured model on the first batch of
        calibration sequences), ``losses`` and ``alphas`` per step.
    """
    check_healable(model, ctx)
    assert ctx.calibration_ids is not None  # needs_calibration is set with healing
    ids = ctx.calibration_ids
    probe = ids[: cfg.batch_size].to(ctx.device)
    with torch.no_grad():
        loss_before = float(lm_loss(model, probe))
    wrapped = _wrap(model, guides) if cfg.mode == "self_guided" else {}
    losses: list[float] = []
    alphas: list[float] = []
    started = time.perf_counter()
    batches = _batches(ids, min(cfg.batch_size, ids.shape[0]), cfg.seed)
    try:
        params = _trainable(model, cfg.train)
        with (
            only_trainable(model, params),
            torch.enable_grad(),
            ctx.reporter.task(f"{ctx.stage_name}: healing ({cfg.mode})", cfg.steps) as update,
        ):
            opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
            for step in range(cfg.steps):
                elapsed = time.perf_counter() - started
                if cfg.max_seconds is not None and elapsed >= cfg.max_seconds:
                    break
                alpha = alpha_at(step, elapsed, cfg) if wrapped else 0.0
                if wrapped and alpha == 0.0:
                    _unwrap(model, wrapped)  # the guided phase is over: drop the guides
                for guided in wrapped.values():
                    guided.alpha = alpha
                loss = lm_loss(model, next(batches).to(ctx.device))
                # At α = 1 only the guide computes: with frozen guides nothing can learn yet.
                if loss.requires_grad:
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, CLIP_NORM)
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                losses.append(float(loss.detach()))
                alphas.append(alpha)
                update(step + 1, cfg.steps, note=f"loss {losses[-1]:.4f}  α {alpha:.2f}")
    finally:
        _unwrap(model, wrapped)
    with torch.no_grad():
        loss_after = float(lm_loss(model, probe))
    return {
        "mode": cfg.mode,
        "steps": len(losses),
        "stopped_early": len(losses) < cfg.steps,
        "wall_s": round(time.perf_counter() - started, 3),
        "loss_before": loss_before,
        "loss_after": loss_after,
        "losses": losses,
        "alphas": alphas,
    }
