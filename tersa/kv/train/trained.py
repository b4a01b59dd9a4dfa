"""Trained RAT+ models by name: ``trained:ratplus-shakespeare`` is ``$TERSA_CACHE/models/<name>``.

``make models`` trains the shipped twins (``tersa/recipes/ratplus-shakespeare.yaml`` and
``attention-shakespeare.yaml``) into that cache, next to the converted embedded SmolLM2; any
``tersa train`` output folder loads the same way by its path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from tersa.errors import ModelError
from tersa.kv.modeling_ratplus import RatPlusForCausalLM
from tersa.models.embedded import cache_dir

TRAINED_PREFIX = "trained:"
SHIPPED = ("ratplus-shakespeare", "attention-shakespeare")  # built by `make models`


def trained_dir(name: str) -> Path:
    """Where the trained model ``name`` lives: ``$TERSA_CACHE/models/<name>``."""
    return cache_dir() / "models" / name


def resolve_trained(spec: str) -> Path:
    """The folder of ``trained:NAME`` or of a path; :class:`ModelError` when it is not there."""
    if not spec.startswith(TRAINED_PREFIX):
        folder = Path(spec).expanduser()
        if not (folder / "config.json").is_file():
            raise ModelError(f"'{spec}' is not a model folder (no config.json); check the path")
        return folder
    name = spec.removeprefix(TRAINED_PREFIX)
    folder = trained_dir(name)
    if (folder / "config.json").is_file():
        return folder
    if name in SHIPPED:
        raise ModelError(f"{spec} is not built yet ({folder} is missing); run `make models`")
    raise ModelError(
        f"no trained model '{name}' in {folder.parent}; train one with "
        f"`tersa train RECIPE --output {folder}` (shipped: {', '.join(SHIPPED)})"
    )


def is_ratplus_folder(folder: Path) -> bool:
    """Whether ``folder`` holds a ``model_type: ratplus`` checkpoint."""
    try:
        return json.loads((folder / "config.json").read_text()).get("model_type") == "ratplus"
    except (OSError, ValueError, AttributeError):
        return False


def load_trained(
    spec: str, dtype: torch.dtype = torch.float32, kv_pattern: Any = None
) -> tuple[RatPlusForCausalLM, PreTrainedTokenizerBase, Path]:
    """``(model, tokenizer, folder)`` of a trained RAT+ / attention-twin model, in eval mode.

    :param spec: ``trained:NAME`` or a ``tersa train`` output folder.
    :param kv_pattern: the inference pattern to load with (:meth:`set_kv_pattern` values); None
        keeps the saved one.
    """
    folder = resolve_trained(spec)
    if not is_ratplus_folder(folder):
        raise ModelError(f"'{folder}' is not a RAT+ model (model_type is not 'ratplus')")
    kwargs = {} if kv_pattern is None else {"kv_pattern": kv_pattern}
    try:
        model = RatPlusForCausalLM.from_pretrained(
            folder, dtype=dtype, local_files_only=True, **kwargs
        )
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load '{folder}': {e}; retrain it or run `make models`") from e
    return model.eval(), tokenizer, folder
