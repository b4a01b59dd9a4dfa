"""Finding the linear layers of a model and swapping them for other modules.

A "linear" is an ``nn.Linear`` or a transformers ``Conv1D`` (GPT-2 style, weight stored
``[in, out]``). Layers are addressed by dotted names relative to the module searched
(``model.layers.0.mlp.up_proj``) and skipped with ignore patterns: a plain pattern is an fnmatch
glob matched against the whole dotted name (``*.mlp.down_proj``, ``lm_head``), a pattern starting
with ``re:`` is a Python regex found anywhere in the name with ``re.search`` (``re:.*down_proj$``).
"""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Iterable

import torch
from torch import nn


@functools.cache
def _linear_types() -> tuple[type[nn.Module], ...]:
    # Imported lazily: transformers takes seconds to import and most of tersa.quant doesn't need it.
    from transformers.pytorch_utils import Conv1D

    return (nn.Linear, Conv1D)


def is_linear(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and transformers ``Conv1D`` (subclasses included)."""
    return isinstance(module, _linear_types())


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The weight of a linear as ``[out, in]``: ``Conv1D`` stores ``[in, out]`` and is transposed.

    Returns a view, not a copy.
    """
    if isinstance(module, nn.Linear):
        return module.weight
    if is_linear(module):  # Conv1D
        return module.weight.t()
    raise TypeError(f"expected nn.Linear or transformers Conv1D, got {type(module).__name__}")


def name_matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether the dotted ``name`` matches any pattern (fnmatch glob, or ``re:<regex>``)."""
    for pattern in patterns:
        if pattern.startswith("re:"):
            if re.search(pattern[3:], name):
                return True
        elif fnmatch.fnmatchcase(name, pattern):
            return True
    return False


def find_linears(module: nn.Module, ignore: Iterable[str] = ()) -> dict[str, nn.Module]:
    """Every linear under ``module`` whose dotted name matches none of the ``ignore`` patterns.

    :returns: ``{dotted name relative to module: layer}`` in ``named_modules`` order. ``module``
        itself, when it is a linear, is listed under the name ``""``.
    """
    ignore = list(ignore)
    return {
        name: sub
        for name, sub in module.named_modules()
        if is_linear(sub) and not name_matches(name, ignore)
    }


def replace_linear(parent: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at the dotted path ``name`` under ``parent`` and return the module it replaced.

    The path must already exist (``AttributeError`` otherwise), so a typo cannot add a stray module.
    """
    if not name:
        raise ValueError(
            "replace_linear needs a non-empty dotted name; a module cannot replace itself"
        )
    old = parent.get_submodule(name)  # raises AttributeError naming the missing part
    owner_name, _, attr = name.rpartition(".")
    owner = parent.get_submodule(owner_name) if owner_name else parent
    setattr(owner, attr, new)
    return old
