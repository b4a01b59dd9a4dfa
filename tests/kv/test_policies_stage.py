"""The ``kv`` recipe stage: validation, the export record, and loading that applies the policy
together with the quantized weights (tersa's loader and transformers after ``import tersa``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import tersa  # noqa: F401  (registers quant_method "tersa")
from tersa.errors import RecipeError
from tersa.export.load import load_export
from tersa.kv.policies import current_policy, kv_policy
from tersa.pipeline import run_recipe
from tersa.quant.qlinear import QuantLinear
from tersa.recipe import parse_recipe
from tests.helpers import tiny_recipe, tiny_setup

W8A8 = {"quantize": {"method": "rtn", "weights": {"bits": 8}, "activations": {"bits": 8}}}
QUEST = {"kv": {"policy": "quest", "budget": 0.25, "page": 4}}


def _logits(model, ids: torch.Tensor, prefill: int) -> torch.Tensor:
    with torch.no_grad(), kv_policy(model, current_policy(model), prefill=prefill):
        return model(input_ids=ids, use_cache=False).logits


def test_combined_export_reloads_weights_and_policy(tmp_path: Path) -> None:
    model_dir, text = tiny_setup(tmp_path)
    out = tmp_path / "out"
    result = run_recipe(parse_recipe(tiny_recipe(model_dir, text, [W8A8, QUEST])), out)
    stage = result.metrics["stages"][1]["metrics"]
    assert stage["policy"] == {
        "name": "quest",
        "budget": 0.25,
        "dense_layers": 0,
        "page": 4,
        "heads": "query",
    }
    # at 64 tokens: 16 keys (4 pages) read by each of the 2 query heads of a KV head, plus one
    # entry's worth of bounds per page (16 pages): (2·16 + 16) / 64; kept: (64 + 16) / 64
    assert (stage["kv_fraction_read"], stage["kv_fraction_kept"]) == (0.75, 1.25)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "tersa"  # compressed-tensors loaders would drop the policy
    assert qc["tersa"]["kv_policy"] == stage["policy"]

    ids = torch.randint(3, 300, (1, 48), generator=torch.Generator().manual_seed(0))
    want = _logits(result.model, ids, prefill=20)
    for loaded in (load_export(out), AutoModelForCausalLM.from_pretrained(out)):
        assert current_policy(loaded).to_dict() == stage["policy"]
        assert isinstance(loaded.model.layers[0].self_attn.q_proj, QuantLinear)
        torch.testing.assert_close(_logits(loaded, ids, prefill=20), want, rtol=1e-5, atol=1e-5)
        with kv_policy(loaded, None):  # the policy matters: dense differs after the prompt
            dense = loaded(input_ids=ids, use_cache=False).logits
        assert (dense[:, 20:] - want[:, 20:]).abs().max() > 1e-3


def test_policy_alone_exports_float_weights_and_the_policy(tmp_path: Path) -> None:
    model_dir, text = tiny_setup(tmp_path)
    out = tmp_path / "out"
    stage = {"kv": {"policy": "snapkv", "budget": 0.5, "window": 8}}
    result = run_recipe(parse_recipe(tiny_recipe(model_dir, text, [stage])), out)
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert (qc["quant_method"], qc["format"], qc["config_groups"]) == ("tersa", "dense", {})
    ids = torch.randint(3, 300, (1, 40), generator=torch.Generator().manual_seed(1))
    want = _logits(result.model, ids, prefill=30)
    for loaded in (load_export(out), AutoModelForCausalLM.from_pretrained(out)):
        assert current_policy(loaded).name == "snapkv"
        torch.testing.assert_close(_logits(loaded, ids, prefill=30), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("stage", "message"),
    [
        (
            {"kv": {"policy": "h2o"}},
            "recipe: stages[0].kv.policy: input should be 'dense', 'streaming', 'snapkv', "
            "'quest' or 'moba' (got 'h2o')",
        ),
        (
            {"kv": {"policy": "quest", "sinks": 4}},
            "recipe: stages[0].kv: unknown option(s) sinks for KV policy 'quest'; allowed: "
            "budget, dense_layers, page, heads",
        ),
        (
            {"kv": {"policy": "quest", "budget": 2.5}},
            "recipe: stages[0].kv: a fractional budget must be in (0, 1], got 2.5",
        ),
    ],
)
def test_bad_kv_stage_is_refused(stage: dict, message: str) -> None:
    with pytest.raises(RecipeError) as err:
        parse_recipe({"model": "embedded:smollm2-135m", "stages": [stage]})
    assert str(err.value) == message
