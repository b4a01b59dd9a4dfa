"""One decoder block through L2: initialise e and Δ, alternate the two phases, harden.

The block's compressed linears become :class:`~tersa.compress.l2.layer.L2TrainLinear`. Each of
``rounds`` rounds runs

1. the transform phase: Adam on every layer's ``(log e, log Δ)``, loss ``NMSE + λ·R``, where
   ``NMSE`` is the block-output MSE against the float block's outputs, normalised by their mean
   square, and ``R`` the estimated bits per weight of the block (the layers' estimates weighted by
   their sizes). After every step the block is put back on its budget: all ``e`` and ``Δ`` are
   scaled by ``2^(H − target)``, ``H`` being the block's measured code entropy (to first order a
   doubling of the step costs one bit), so the phase moves bits between layers and between pruning
   and resolution but holds the block at the target rate;
2. the weight reconstruction phase: Adam on the layers' float weights (and biases) with ``e`` and
   ``Δ`` fixed, loss ``NMSE``; each layer's learning rate is ``weight_lr·Δ``, so a step moves a
   weight by a set share of its quantization step whatever the layer's scale.

``λ = rate_weight · 2 ln 2 · NMSE`` (``NMSE`` a running average): the slope of the high-rate
rate-distortion curve ``D ∝ 2^(−2R)``, the exchange rate between bits and error at which moving
a bit from one layer to another pays off. The paper uses a fixed ``λ`` on raw bits, divided by 100
once the rate is under the target; a fixed ``λ`` does not carry over between blocks whose output
errors differ by orders of magnitude, and with Adam's normalised steps the on/off rule lands
wherever the last switch left it. Here the target holds by construction and ``λ`` only prices the
trade-offs.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate.utils import send_to_device
from torch import nn

from tersa.calib import BlockCache
from tersa.calib.blockwise import first_output, select_rows
from tersa.compress.l2.config import L2Config
from tersa.compress.l2.edgescale import paper_init, target_init
from tersa.compress.l2.layer import L2TrainLinear
from tersa.errors import DataError
from tersa.progress import Reporter
from tersa.quant.replace import linear_weight, replace_linear

# The entropy that holds the budget each transform step is measured on every ENTROPY_STRIDE-th
# weight: on the embedded model's 110k-885k weight layers that is within ~0.01 bit of the full
# count at an eighth of the cost (the final figures use every weight).
ENTROPY_STRIDE = 8
NMSE_DECAY = 0.9  # running average of the mini-batch NMSE that sets λ


@dataclass
class BlockData:
    """A block's training data: inputs ``cache.hidden[k]`` ``[B, T, H]`` (from the compressed
    blocks before it) with their kwargs, and the float block's outputs ``targets[k]``."""

    cache: BlockCache
    targets: list[torch.Tensor]
    scale: float = field(init=False)  # mean square of the targets: the NMSE denominator

    def __post_init__(self) -> None:
        total = sum(float(t.double().pow(2).sum()) for t in self.targets)
        self.scale = max(total / max(sum(t.numel() for t in self.targets), 1), 1e-30)

    def sample(
        self, batch_size: int, generator: torch.Generator, device: torch.device
    ) -> tuple[torch.Tensor, dict[str, Any], torch.Tensor]:
        """Random rows of one cached batch: inputs, kwargs and targets, float32 on ``device``."""
        k = int(torch.randint(len(self.targets), (), generator=generator))
        n = self.cache.hidden[k].shape[0]
        rows = torch.randperm(n, generator=generator)[: min(batch_size, n)]
        x = self.cache.hidden[k][rows].to(device, torch.float32)
        kwargs = float_kwargs(send_to_device(select_rows(self.cache.kwargs[k], rows, n), device))
        return x, kwargs, self.targets[k][rows].to(device, torch.float32)

    @torch.no_grad()
    def nmse(self, block: nn.Module, device: torch.device) -> float:
        """The block's output MSE over all cached batches, over the targets' mean square."""
        total, count = 0.0, 0
        for k, target in enumerate(self.targets):
            x = self.cache.hidden[k].to(device, torch.float32)
            kwargs = float_kwargs(send_to_device(self.cache.kwargs[k], device))
            out = first_output(block(x, **kwargs)).float()
            total += float((out - target.to(device, torch.float32)).double().pow(2).sum())
            count += target.numel()
        return total / max(count, 1) / self.scale


@dataclass
class BlockResult:
    """What compressing one block measured: its NMSE before and after, the final ``λ``, and per
    layer (name in the block) the estimated bits per weight of its last codes."""

    nmse_init: float
    nmse_final: float
    rate_weight: float
    estimated_bits: dict[str, float]
    wall_s: float


def compress_block(
    block: nn.Module,
    names: list[str],
    data: BlockData,
    cfg: L2Config,
    seed: int,
    reporter: Reporter | None = None,
    title: str = "l2",
) -> BlockResult:
    """Replace ``block``'s linears ``names`` by trained
    :class:`~tersa.compress.l2.layer.L2Linear` layers (see the module doc); the block ends in its
    original dtype."""
    started = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    dtype = next(block.parameters()).dtype
    device = next(block.parameters()).device
    block.float()
    for p in block.parameters():
        p.requires_grad_(False)
    layers = {n: _train_layer(block.get_submodule(n), cfg) for n in names}
    for n, layer in layers.items():
        replace_linear(block, n, layer)
    nmse_init = data.nmse(block, device)
    total = cfg.rounds * (cfg.transform_iters + cfg.reconstruct_iters)
    with (reporter or Reporter(quiet=True)).task(title, total) as update:
        trainer = _Trainer(block, layers, data, cfg, gen, device, nmse_init, update)
        for _ in range(cfg.rounds):
            trainer.transform()
            trainer.reconstruct()
    with torch.no_grad():
        estimated = {n: float(_estimate(layer, cfg, gen)) for n, layer in layers.items()}
    for n, layer in layers.items():
        replace_linear(block, n, layer.harden(dtype))
    nmse_final = data.nmse(block, device)
    block.to(dtype)
    return BlockResult(
        nmse_init, nmse_final, trainer.rate_weight, estimated, time.perf_counter() - started
    )


def _train_layer(linear: nn.Module, cfg: L2Config) -> L2TrainLinear:
    w = linear_weight(linear).detach()
    edge, step = paper_init(w) if cfg.init == "paper" else target_init(w, cfg.target_bits)
    return L2TrainLinear(linear, edge, step)


def block_entropy(layers: dict[str, L2TrainLinear], stride: int = 1) -> float:
    """Bits per weight of the block's current codes: each layer's empirical entropy (of every
    ``stride``-th weight), weighted by its size."""
    sizes = {n: l.weight.numel() for n, l in layers.items()}
    bits = sum(l.entropy(stride) * sizes[n] for n, l in layers.items())
    return bits / max(sum(sizes.values()), 1)


@torch.no_grad()
def hold_rate(layers: dict[str, L2TrainLinear], target: float, bits: float) -> None:
    """Scale every layer's ``e`` and ``Δ`` by ``2^(bits − target)``: a first-order step from the
    measured ``bits`` per weight back to ``target``."""
    shift = math.log(2) * (bits - target)
    for layer in layers.values():
        layer.log_edge += shift
        layer.log_step += shift


def _estimate(layer: L2TrainLinear, cfg: L2Config, gen: torch.Generator) -> torch.Tensor:
    return layer.estimated_bits(cfg.kernel_width, cfg.kernel, gen)


class _Trainer:
    """The two phases over one block's layers; ``update(done, total, note)`` reports progress."""

    def __init__(
        self,
        block: nn.Module,
        layers: dict[str, L2TrainLinear],
        data: BlockData,
        cfg: L2Config,
        gen: torch.Generator,
        device: torch.device,
        nmse: float,
        update: Callable[..., None],
    ) -> None:
        self.block, self.layers, self.data, self.cfg = block, layers, data, cfg
        self.gen, self.device, self.update = gen, device, update
        self.nmse_avg = nmse
        self.done = 0
        self.total = cfg.rounds * (cfg.transform_iters + cfg.reconstruct_iters)
        sizes = torch.tensor([float(l.weight.numel()) for l in layers.values()])
        self.share = (sizes / sizes.sum()).tolist()

    @property
    def rate_weight(self) -> float:
        """``λ = rate_weight · 2 ln 2 · NMSE``."""
        return self.cfg.rate_weight * 2 * math.log(2) * self.nmse_avg

    def _nmse(self) -> torch.Tensor:
        x, kwargs, y = self.data.sample(self.cfg.batch_size, self.gen, self.device)
        out = first_output(self.block(x, **kwargs)).float()
        nmse = (out - y).pow(2).mean() / self.data.scale
        if not math.isfinite(nmse.item()):
            raise DataError(
                f"l2: the block-output error became {nmse.item()}; lower l2.transform_lr or "
                "l2.weight_lr, or check the calibration data"
            )
        self.nmse_avg = NMSE_DECAY * self.nmse_avg + (1 - NMSE_DECAY) * nmse.item()
        return nmse

    def _train_only(self, params: list[nn.Parameter]) -> None:
        chosen = {id(p) for p in params}
        for layer in self.layers.values():
            for p in layer.parameters():
                p.requires_grad_(id(p) in chosen)

    def transform(self) -> None:
        """Adam on ``(log e, log Δ)``, loss ``NMSE + λ·R``, the budget held after each step."""
        cfg, layers = self.cfg, self.layers
        params = [p for l in layers.values() for p in (l.log_edge, l.log_step)]
        self._train_only(params)
        opt = torch.optim.Adam(params, lr=cfg.transform_lr)
        for _ in range(cfg.transform_iters):
            nmse = self._nmse()
            loss = nmse
            if cfg.rate_weight > 0:
                estimates = [_estimate(l, cfg, self.gen) for l in layers.values()]
                rate = sum(s * e for s, e in zip(self.share, estimates, strict=True))
                loss = nmse + self.rate_weight * rate
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            bits = block_entropy(layers, ENTROPY_STRIDE)
            hold_rate(layers, cfg.target_bits, bits)
            self.done += 1
            self.update(
                self.done, self.total, f"transform: nmse {nmse.item():.3g}, {bits:.3f} bits"
            )

    def reconstruct(self) -> None:
        """Adam on the weights and biases (``lr = weight_lr·Δ`` per layer), loss ``NMSE``."""
        groups = [
            {
                "params": [p for p in (l.weight, l.bias) if p is not None],
                "lr": self.cfg.weight_lr * float(l.step.detach()),
            }
            for l in self.layers.values()
        ]
        self._train_only([p for g in groups for p in g["params"]])
        opt = torch.optim.Adam(groups)
        for _ in range(self.cfg.reconstruct_iters):
            nmse = self._nmse()
            opt.zero_grad(set_to_none=True)
            nmse.backward()
            opt.step()
            self.done += 1
            self.update(self.done, self.total, f"reconstruct: nmse {nmse.item():.3g}")


def float_kwargs(value: Any) -> Any:
    """Floating tensors (position embeddings, additive masks) in float32, like the block."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.is_floating_point() else value
    if isinstance(value, dict):
        return {k: float_kwargs(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return type(value)(float_kwargs(v) for v in value)
    return value
