"""The starting model of a recipe with ``init``: a pretrained Llama-family checkpoint converted to
RAT+ (:func:`tersa.kv.llama_to_ratplus`), trained with the checkpoint's own tokenizer.

A fresh start opens ``init.source`` (:func:`tersa.loading.open_model`, fp32), converts it and keeps
the converted config and the tokenizer in the work area (``out/.name.work/init/``). A resumed run
builds the model from that config alone: its weights come from the training checkpoint, so the
source is neither reopened nor converted again (and may have changed or gone meanwhile).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from tersa.errors import ModelError, RecipeError
from tersa.kv.configuration_ratplus import RatPlusConfig
from tersa.kv.convert import SUPPORTED_TYPES, llama_to_ratplus
from tersa.kv.modeling_ratplus import RatPlusForCausalLM
from tersa.kv.train.dist import Dist
from tersa.kv.train.recipe import TrainRecipe
from tersa.loading import open_model

INIT_FOLDER = "init"


def convert_source(recipe: TrainRecipe) -> tuple[RatPlusForCausalLM, PreTrainedTokenizerBase]:
    """``(model, tokenizer)``: ``init.source`` converted to RAT+ with the recipe's forget gate
    bias, and its tokenizer; :class:`RecipeError` when the source does not convert or is too small
    for the recipe."""
    init = recipe.init
    assert init is not None
    try:
        source, tokenizer, _ = open_model(init.source, dtype=torch.float32)
    except ModelError as e:
        raise ModelError(f"init.source: {e}") from None
    kind = getattr(source.config, "model_type", None)
    if kind not in SUPPORTED_TYPES:
        raise RecipeError(
            f"init.source: '{init.source}' is a {kind} model; only Llama-family checkpoints "
            f"convert to RAT+ (model_type {' or '.join(SUPPORTED_TYPES)})"
        )
    torch.manual_seed(recipe.training.seed)  # the gates are set, but the build draws first
    try:
        model = llama_to_ratplus(source, forget_gate_bias=init.forget_gate_bias_init)
    except ValueError as e:
        raise RecipeError(f"init.source: '{init.source}' does not convert to RAT+: {e}") from None
    check_fits(recipe, model.config)
    return model, tokenizer


def check_fits(recipe: TrainRecipe, config: RatPlusConfig) -> None:
    """The recipe's checks against the model's sizes, for a model that came from ``init``."""
    if recipe.training.seq_len > config.max_position_embeddings:
        raise RecipeError(
            f"training.seq_len ({recipe.training.seq_len}) exceeds the max_position_embeddings "
            f"of init.source ({config.max_position_embeddings})"
        )
    layers = None if recipe.adapt is None else recipe.adapt.layers
    if layers is not None and len(layers) != config.num_hidden_layers:
        raise RecipeError(
            f"adapt.layers needs one pattern per layer, {config.num_hidden_layers} (the layers "
            f"of init.source), got {len(layers)}"
        )


def start_converted(
    recipe: TrainRecipe, work: Path, d: Dist, restoring: bool
) -> tuple[PreTrainedTokenizerBase, RatPlusForCausalLM]:
    """``(tokenizer, model)`` of a run with ``init``.

    :param restoring: a checkpoint will overwrite every weight: build the model from the config
        kept in the work area instead of converting the source again.
    """
    folder = work / INIT_FOLDER
    if restoring and (folder / "config.json").is_file():
        model = RatPlusForCausalLM(RatPlusConfig.from_pretrained(folder, local_files_only=True))
    else:
        model, tokenizer = convert_source(recipe)
        if d.main:
            tmp = Path(tempfile.mkdtemp(prefix=".init.tmp-", dir=work))
            model.config.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            # a resumed run stopped before its first checkpoint left one: convert afresh
            shutil.rmtree(folder, ignore_errors=True)
            tmp.rename(folder)
    d.barrier()
    return AutoTokenizer.from_pretrained(folder, local_files_only=True), model
