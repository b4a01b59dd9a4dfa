"""The ``quantize`` stage: replace the linears of every decoder block by quantized linears."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field
from pydantic.dataclasses import dataclass
from torch import nn

from tersa.calib import BlockCache
from tersa.config import STRICT, Str
from tersa.context import StageContext
from tersa.models.adapters import resolve
from tersa.quant.qdrop import QDropConfig, reconstruct
from tersa.quant.qlinear import QuantLinear
from tersa.quant.replace import find_linears, name_matches, replace_linear
from tersa.quant.scheme import ActivationScheme, WeightScheme
from tersa.registry import register_stage

ACTIVATION_RANGES = "activation_ranges"  # ctx.info key: {module name: (min, max)} of linear inputs


@dataclass(config=STRICT)
class QuantizeConfig:
    """Quantize weights and/or activations of the linears inside the decoder blocks."""

    method: Annotated[
        Literal["rtn", "qdrop"],
        Field(description="rtn: round to nearest; qdrop: block reconstruction (see 'qdrop')"),
    ] = "rtn"
    weights: Annotated[
        WeightScheme | None, Field(description="weight scheme (null: keep float)")
    ] = Field(default_factory=WeightScheme)
    activations: Annotated[
        ActivationScheme | None, Field(description="input activation scheme (null: keep float)")
    ] = None
    ignore: Annotated[
        list[Str],
        Field(description="module names to leave alone: globs (*.down_proj) or re:REGEX"),
    ] = Field(default_factory=list)
    qdrop: Annotated[
        QDropConfig | None,
        Field(description="QDrop settings (method: qdrop; defaults when omitted)"),
    ] = None

    def __post_init__(self) -> None:
        if self.weights is None and self.activations is None:
            raise ValueError("set weights, activations or both; with neither nothing is quantized")
        if self.method == "rtn" and self.qdrop is not None:
            raise ValueError("a 'qdrop' section needs method: qdrop (the method is 'rtn')")
        if self.method == "qdrop" and self.qdrop is None:
            self.qdrop = QDropConfig()

    @property
    def needs_calibration(self) -> bool:
        """QDrop and static (per-tensor) activation scales use calibration data; RTN otherwise is
        data-free."""
        static = self.activations is not None and self.activations.granularity == "tensor"
        return self.method == "qdrop" or static


@register_stage("quantize", QuantizeConfig)
def quantize(model: nn.Module, cfg: QuantizeConfig, ctx: StageContext) -> nn.Module:
    """Quantize the linears of every decoder block, round-to-nearest or by QDrop reconstruction.

    RTN rounds weights to nearest, activations use static or dynamic scales; QDrop learns the
    rounding block by block (:mod:`tersa.quant.qdrop`).

    Static activation scales come from ``ctx.info["activation_ranges"][name] = (min, max)`` when an
    earlier stage chose that layer's input range, else from the min-max of the calibration inputs.
    """
    ranges: dict[str, tuple[float, float]] = ctx.info.get(ACTIVATION_RANGES, {})
    if cfg.method == "qdrop":
        assert cfg.qdrop is not None
        return reconstruct(model, ctx, cfg.weights, cfg.activations, cfg.ignore, cfg.qdrop, ranges)
    prefix = resolve(model, ctx.adapter, ctx.adapter.blocks)

    # Static input ranges chosen by an earlier stage (outlier_suppression's token-wise clipping),
    # by full module name; those layers skip the min-max observation.

    def process(i: int, block: nn.Module, cache: BlockCache | None) -> None:
        observed = []
        for name, linear in find_linears(block, ignore=[]).items():
            full = f"{prefix}.{i}.{name}"
            if name_matches(full, cfg.ignore):
                continue
            qlinear = QuantLinear.from_float(linear, cfg.weights, cfg.activations)
            replace_linear(block, name, qlinear)
            if qlinear.is_static and full in ranges:
                qlinear.set_input_range(*ranges[full])
            else:
                observed.append(qlinear)
        if cache is not None and observed:
            for q in observed:
                q.start_calibration()
            cache.run(block)
            for q in observed:
                q.finish_calibration()

    if cfg.needs_calibration:
        ctx.blockwise(model, process)
    else:
        ctx.each_block(model, process)
    return model
