"""Configs of the ``structured_ffn`` stage and of its optional healing.

The size of each structured layer comes from exactly one of ``fraction`` (at most that share of
the dense weight's parameters, per layer, hence also for the whole FFN) or an explicit ``rank``
(LowRank, BlockDense) / ``blocks`` (BlockShuffle). ``__post_init__`` rejects every other
combination with a message that names the keys.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field
from pydantic.dataclasses import dataclass

from tersa.config import STRICT, Bool, Float, Int, Str
from tersa.structured.base import FIT_ITERS, MOMENT_DAMP

# Calibration tokens per block whose second moments the fits use. The moment of a 1536-wide input
# needs a few thousand tokens to be well conditioned; 16k keeps the per-block pass cheap on a CPU
# (two fp32 Gram updates of [tokens, in] per MLP input) while using most of a default calibration
# set (128 x 512 tokens) for small models.
DEFAULT_MAX_TOKENS = 16384


@dataclass(config=STRICT)
class HealingConfig:
    """Fine-tune on the calibration sequences (causal-LM loss, AdamW) after the fits.

    ``self_guided``: each structured layer runs as ``α·dense + (1 − α)·structured``, the guide
    being the dense layer it replaced; ``α`` decays from 1 to 0 on a cosine over the first
    ``guided_fraction`` of the budget, then the guides are dropped. ``plain``: the structured
    model is trained as it is (the comparison).
    """

    mode: Annotated[
        Literal["self_guided", "plain"],
        Field(description="self_guided: dense guide decayed 1 -> 0; plain: no guide"),
    ] = "self_guided"
    steps: Annotated[Int, Field(ge=1, description="optimizer steps (the step budget)")] = 100
    lr: Annotated[Float, Field(gt=0.0, description="AdamW learning rate (constant)")] = 1e-4
    guided_fraction: Annotated[
        Float,
        Field(gt=0.0, le=1.0, description="share of the budget over which alpha decays (guided)"),
    ] = 0.5
    batch_size: Annotated[Int, Field(ge=1, description="calibration sequences per step")] = 4
    train: Annotated[
        Literal["structured", "all"],
        Field(description="structured: only the new factors and biases; all: every float weight"),
    ] = "structured"
    weight_decay: Annotated[Float, Field(ge=0.0, description="AdamW weight decay")] = 0.0
    max_seconds: Annotated[
        Float | None,
        Field(gt=0.0, description="time budget: stop early once spent (null: steps only)"),
    ] = None
    seed: Annotated[Int, Field(description="seed of the batch order")] = 0


@dataclass(config=STRICT)
class StructuredFFNConfig:
    """Replace MLP linears by LowRank / BlockDense / BlockShuffle layers fitted to them."""

    kind: Annotated[
        Literal["lowrank", "blockdense", "blockshuffle"],
        Field(description="the parameterisation of every replaced linear"),
    ] = "lowrank"
    fraction: Annotated[
        Float | None,
        Field(gt=0.0, le=1.0, description="keep at most this share of each layer's weights"),
    ] = None
    rank: Annotated[Int | None, Field(ge=1, description="explicit rank (lowrank, blockdense)")] = (
        None
    )
    blocks: Annotated[
        Int | None,
        Field(ge=1, description="diagonal blocks (blockshuffle; blockdense, default 4)"),
    ] = None
    rank_multiple: Annotated[
        Int, Field(ge=1, description="round a rank from fraction down to a multiple of this")
    ] = 1
    keep_dense: Annotated[
        list[Int],
        Field(description="decoder blocks whose MLP stays dense (negative: from the end)"),
    ] = Field(default_factory=lambda: [0])
    ignore: Annotated[
        list[Str],
        Field(description="MLP linears to leave dense: globs (*.down_proj) or re:REGEX"),
    ] = Field(default_factory=list)
    activation_aware: Annotated[
        Bool, Field(description="fit the outputs on calibration inputs (false: the weights)")
    ] = True
    max_tokens: Annotated[
        Int | None,
        Field(ge=1, description="calibration tokens per block for the fits (null: all)"),
    ] = DEFAULT_MAX_TOKENS
    fit_iters: Annotated[
        Int, Field(ge=0, description="alternating least-squares rounds (block kinds)")
    ] = FIT_ITERS
    damp: Annotated[
        Float, Field(ge=0.0, description="ridge on the input second moment, times its mean")
    ] = MOMENT_DAMP
    merge_below: Annotated[
        Int | None,
        Field(ge=0, description="pre-merge: fewer tokens per call use the dense product"),
    ] = None
    healing: Annotated[
        HealingConfig | None, Field(description="fine-tuning after the fits (null: none)")
    ] = None

    def __post_init__(self) -> None:
        kind, size = self.kind, "blocks" if self.kind == "blockshuffle" else "rank"
        if self.fraction is not None and self.rank is not None:
            raise ValueError(
                f"give fraction or rank, not both (fraction={self.fraction}, rank={self.rank})"
            )
        if kind == "lowrank" and self.blocks is not None:
            raise ValueError(
                f"lowrank takes no blocks (got blocks={self.blocks}); set fraction or rank"
            )
        if kind == "blockshuffle" and self.rank is not None:
            raise ValueError(
                f"blockshuffle takes no rank (got rank={self.rank}); set fraction or blocks"
            )
        if kind == "blockshuffle" and self.fraction is not None and self.blocks is not None:
            raise ValueError(
                f"give fraction or blocks, not both (fraction={self.fraction}, "
                f"blocks={self.blocks}): blockshuffle's block count sets its size"
            )
        if self.fraction is None and getattr(self, size) is None:
            raise ValueError(f"set fraction (e.g. 0.63) or {size} to size the {kind} layers")
        if self.fraction is None and self.rank_multiple != 1:
            raise ValueError(
                f"rank_multiple ({self.rank_multiple}) rounds a rank derived from fraction; "
                f"drop it or set fraction instead of {size}"
            )

    @property
    def needs_calibration(self) -> bool:
        """Activation-aware fits and healing both read the calibration data."""
        return self.activation_aware or self.healing is not None
