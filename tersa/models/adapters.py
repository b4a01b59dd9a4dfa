"""Architecture adapters: look up a model's family and find its blocks, norms and linears.

``get_adapter(model)`` returns the frozen ``Adapter`` for ``model.config.model_type`` (see
``tersa.models.families`` for the table); ``get_blocks`` and ``resolve`` turn its dotted paths into
modules on either the task model (``LlamaForCausalLM``) or the bare one (``LlamaModel``).
"""

from __future__ import annotations

from torch import nn
from transformers import PretrainedConfig

from tersa.errors import ModelError
from tersa.models.families import ADAPTERS
from tersa.models.layout import Adapter, AttentionLayout, NormGroup, ScalePair
from tersa.quant.replace import linear_weight

__all__ = [
    "Adapter",
    "AttentionLayout",
    "NormGroup",
    "ScalePair",
    "get_adapter",
    "get_blocks",
    "get_submodule",
    "group_norm",
    "linear_weight",
    "resolve",
    "supported_model_types",
]


def supported_model_types() -> list[str]:
    """The HF ``model_type`` values tersa has adapters for, sorted."""
    return sorted(ADAPTERS)


def get_adapter(model_or_config: nn.Module | PretrainedConfig | str) -> Adapter:
    """The adapter for a model, its config, or a ``model_type`` string.

    :raises ModelError: the model_type has no adapter (the message lists the supported ones).
    """
    if isinstance(model_or_config, str):
        model_type: object = model_or_config
    else:
        config = getattr(model_or_config, "config", model_or_config)
        model_type = getattr(config, "model_type", None)
        if not model_type:
            raise ModelError(
                f"cannot tell the architecture of a {type(model_or_config).__name__}: it has no "
                "config.model_type; pass a transformers model or its config"
            )
    adapter = ADAPTERS.get(str(model_type))
    if adapter is None:
        raise ModelError(
            f"unsupported model_type {str(model_type)!r}; "
            f"tersa supports: {', '.join(supported_model_types())}"
        )
    return adapter


def get_submodule(root: nn.Module, dotted: str) -> nn.Module:
    """``root.get_submodule(dotted)``; the empty string is ``root`` itself.

    :raises AttributeError: no module at that path (torch's error, naming the missing part).
    """
    return root.get_submodule(dotted)


def resolve(model: nn.Module, adapter: Adapter, dotted: str | None) -> str | None:
    """The path of a top-level adapter module on ``model``, or None when it has none.

    Tries ``dotted`` as written (task model), then without ``adapter.base`` (bare model), so
    ``bert.encoder.layer`` resolves to ``encoder.layer`` on a ``BertModel``. A module that is
    absent or set to None (OPT ``project_in`` when unused) resolves to None.
    """
    if dotted is None:
        return None
    candidates = [dotted]
    prefix = adapter.base + "."
    if dotted.startswith(prefix):
        candidates.append(dotted[len(prefix) :])
    for path in candidates:
        try:
            model.get_submodule(path)
        except AttributeError:
            continue
        return path
    return None


def get_blocks(model: nn.Module, adapter: Adapter | None = None) -> nn.ModuleList:
    """The model's decoder (or encoder) blocks, in order.

    :raises ModelError: the blocks are not where the adapter says (a model of another class).
    """
    adapter = adapter or get_adapter(model)
    path = resolve(model, adapter, adapter.blocks)
    blocks = model.get_submodule(path) if path is not None else None
    if not isinstance(blocks, nn.ModuleList):
        bare = adapter.blocks.removeprefix(adapter.base + ".")
        raise ModelError(
            f"cannot find the {adapter.model_type} blocks on a {type(model).__name__}: "
            f"looked for '{adapter.blocks}' and '{bare}'; load the model with "
            "tersa.models.load.load_model or a transformers Auto class"
        )
    return blocks


def group_norm(
    model: nn.Module, adapter: Adapter, group: NormGroup, index: int
) -> tuple[str, nn.Module]:
    """``(path on model, module)`` of the norm whose output feeds ``group`` in block ``index``.

    For an in-block group that is ``group.norm`` in that block. A block-input group
    (:attr:`NormGroup.block_input`) reads the block's input: ``group.norm`` of block ``index − 1``,
    or ``group.first_norm`` (resolved on the task or the bare model) for block 0.

    :raises ModelError: no such block, or the norm is not where the adapter says.
    """
    n_blocks = len(get_blocks(model, adapter))
    if not 0 <= index < n_blocks:
        raise ModelError(f"block {index} out of range: the model has {n_blocks} blocks")
    if group.block_input and index == 0:
        assert group.first_norm is not None  # NormGroup checks it
        path = resolve(model, adapter, group.first_norm)
        if path is None:
            raise ModelError(
                f"cannot find '{group.first_norm}', the norm before the first "
                f"{adapter.model_type} block, on a {type(model).__name__}"
            )
    else:
        owner = index - 1 if group.block_input else index
        path = f"{resolve(model, adapter, adapter.blocks)}.{owner}.{group.norm}"
    return path, model.get_submodule(path)
