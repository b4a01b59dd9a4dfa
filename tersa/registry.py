"""The explicit stage registry.

A stage is one config dataclass plus one function ``fn(model, cfg, ctx) -> model``. Stage modules
register themselves with :func:`register_stage`; :func:`stages` imports the built-in stage modules by
name (no package walking), so the registry is complete whenever it is read.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from torch import nn

    from tersa.context import StageContext

StageKind = Literal["transform", "quantize"]
StageFn = Callable[["nn.Module", Any, "StageContext"], "nn.Module"]

# Modules that define built-in stages; importing one registers its stages.
_BUILTIN_MODULES = (
    "tersa.quant.stage",
    "tersa.quant.smoothquant",
    "tersa.quant.os",
    "tersa.quant.osplus",
    "tersa.structured.stage",
    "tersa.compress.l2.stage",
    "tersa.kv.policies.stage",
)

_REGISTRY: dict[str, Stage] = {}


@dataclass(frozen=True)
class Stage:
    """A registered stage: its recipe name, config class, function and one-line doc."""

    name: str
    config: type
    fn: StageFn
    doc: str
    kind: StageKind = "quantize"
    follows: tuple[str, ...] = ()


def register_stage(
    name: str, config: type, kind: StageKind = "quantize", follows: tuple[str, ...] = ()
) -> Callable[[StageFn], StageFn]:
    """Register ``fn`` as the stage ``name`` configured by the dataclass ``config``.

    ``kind`` orders stages in a recipe: ``transform`` stages rewrite the float model (outlier
    suppression) and must come before every ``quantize`` stage. ``follows`` names stages that,
    when a recipe has them, must come before this one (they cannot handle what it builds).
    """

    def decorate(fn: StageFn) -> StageFn:
        if name in _REGISTRY and _REGISTRY[name].fn is not fn:
            raise RuntimeError(f"stage '{name}' is registered twice")
        doc = (fn.__doc__ or "").strip().splitlines()
        _REGISTRY[name] = Stage(name, config, fn, doc[0] if doc else "", kind, follows)
        return fn

    return decorate


def stages() -> dict[str, Stage]:
    """Every registered stage, by name (built-ins imported on first use)."""
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)
    return dict(sorted(_REGISTRY.items()))


def get_stage(name: str) -> Stage:
    """The stage registered as ``name``; ``KeyError`` when there is none."""
    return stages()[name]
