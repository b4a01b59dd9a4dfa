"""The config of the ``l2`` stage (a strict pydantic dataclass, one field per recipe key).

The defaults were chosen on block 5 of the embedded SmolLM2-135M at 3.2 bits per weight (16
calibration sequences of 512 tokens; output NMSE of the block, 0.0058 at initialisation): 2 rounds
of 15 transform + 30 reconstruction steps reach 0.0019 in about 40 s on one CPU thread. With the
weights' learning rate at 0.02 or 0.01 steps per Δ instead of 0.005 the same budget gave 0.0039 and
0.0024 (0.001: 0.0023); without the transform phase (90 reconstruction steps) 0.0022; one sequence
per step against two: 0.0019 against 0.0018 at about 1.5x the time.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field
from pydantic.dataclasses import dataclass

from tersa.compress.l2.rate import Kernel
from tersa.config import STRICT, Float, Int, Str

FLOAT_BITS = 32  # target_ratio is against float32 weights: target bits = 32 / target_ratio


@dataclass(config=STRICT)
class L2Config:
    """L2: learned prune + quantize (EdgeScale) of block linears at a target entropy-coded size."""

    target_ratio: Annotated[
        Float,
        Field(
            ge=4.0,
            le=320.0,
            description="size of float32 weights over entropy-coded codes (10: 3.2 bits/weight)",
        ),
    ] = 10.0
    rounds: Annotated[Int, Field(ge=1, description="transform + reconstruct rounds per block")] = 2
    transform_iters: Annotated[
        Int, Field(ge=0, description="steps of the transform phase (learns e, Δ) per round")
    ] = 15
    reconstruct_iters: Annotated[
        Int, Field(ge=0, description="steps of the weight reconstruction phase per round")
    ] = 30
    transform_lr: Annotated[
        Float, Field(gt=0.0, description="Adam learning rate of log e and log Δ (relative)")
    ] = 0.02
    weight_lr: Annotated[
        Float,
        Field(gt=0.0, description="Adam learning rate of the weights, in units of the layer's Δ"),
    ] = 0.005
    batch_size: Annotated[
        Int, Field(ge=1, description="calibration sequences per step (at most a cached batch)")
    ] = 1
    init: Annotated[
        Literal["target", "paper"],
        Field(
            description=(
                "target: per layer the uniform quantizer (e = Δ/2) whose codes' entropy is the "
                "target; paper: e = Δ = (max − min)/256"
            )
        ),
    ] = "target"
    kernel: Annotated[Kernel, Field(description="rate estimate's smoothing kernel")] = "cos"
    kernel_width: Annotated[
        Float, Field(gt=0.0, le=4.0, description="kernel half-width, in code units")
    ] = 0.5
    rate_weight: Annotated[
        Float,
        Field(
            ge=0.0,
            description="rate term weight, in units of the slope 2 ln2 · NMSE (0: no rate term)",
        ),
    ] = 1.0
    ignore: Annotated[
        list[Str],
        Field(description="linears to leave float: globs (*.down_proj) or re:REGEX"),
    ] = Field(default_factory=list)
    seed: Annotated[Int, Field(description="seed of mini-batches and rate subsamples")] = 0

    def __post_init__(self) -> None:
        if self.init == "paper" and self.transform_iters == 0:
            raise ValueError(
                "init 'paper' starts near 8-bit codes and only the transform phase brings them to "
                "the target; set transform_iters > 0 or use init: target"
            )

    @property
    def target_bits(self) -> float:
        """Bits per weight after entropy coding: ``32 / target_ratio``."""
        return FLOAT_BITS / self.target_ratio

    @property
    def needs_calibration(self) -> bool:
        """Both phases fit block outputs on calibration data."""
        return True
