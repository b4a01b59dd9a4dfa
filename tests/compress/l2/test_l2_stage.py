"""The l2 stage on tiny Llama / GPT-2 models: what it replaces, what it records, that it lowers
the block-output error from its start at the target rate, that a higher target ratio gives fewer
bits, and the refusals (config keys, smoothed linears, no calibration data)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tersa.compress.l2.layer import L2Linear
from tersa.compress.l2.stage import INFO_KEY, block_linears
from tersa.context import StageContext
from tersa.errors import ModelError, RecipeError
from tersa.models.adapters import get_adapter, get_blocks
from tersa.models.tiny import tiny_model
from tersa.pipeline import apply_stage_list
from tersa.quant.replace import find_linears
from tersa.quant.smoothed import SmoothedLinear
from tersa.recipe import parse_recipe
from tests.structured.helpers import run

FAST = {"rounds": 1, "transform_iters": 4, "reconstruct_iters": 8}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_every_block_linear_becomes_l2_and_the_stage_reports(family: str) -> None:
    model = tiny_model(family)
    embed = model.get_input_embeddings().weight.detach().clone()
    model, ctx, timings = run(model, [{"l2": FAST}])
    for block in get_blocks(model):
        assert find_linears(block) == {}  # no float linear left in a block
        assert any(isinstance(m, L2Linear) for m in block.modules())
    assert type(model.get_output_embeddings()) is nn.Linear
    assert torch.equal(model.get_input_embeddings().weight, embed)
    record = ctx.info[INFO_KEY]
    assert timings[0]["metrics"] == record
    n_layers = sum(isinstance(m, L2Linear) for m in model.modules())
    assert len(record["layers"]) == n_layers == len(find_linears(tiny_model(family))) - 1
    row = next(iter(record["layers"].values()))
    assert set(row) == {
        "edge", "step", "estimated_bits", "entropy_bits", "prune_fraction", "max_code",
        "codes_dtype", "params",
    }  # fmt: skip
    assert record["target_bits"] == pytest.approx(3.2)
    assert record["bits_per_weight"] == pytest.approx(3.2, abs=0.25)
    assert record["ratio"] == pytest.approx(32 / record["bits_per_weight"])
    assert record["estimated_bits_per_weight"] == pytest.approx(record["bits_per_weight"], rel=0.1)
    assert 0 < record["prune_fraction"] < 1
    for block in record["blocks"]:
        assert block["nmse_final"] < block["nmse_init"]


def test_a_higher_target_ratio_gives_fewer_bits() -> None:
    bits = {}
    for ratio in (5.0, 20.0):
        _, ctx, _ = run(tiny_model("llama"), [{"l2": {**FAST, "target_ratio": ratio}}])
        bits[ratio] = ctx.info[INFO_KEY]
    assert bits[20.0]["bits_per_weight"] < 2.0 < 5.0 < bits[5.0]["bits_per_weight"]
    assert bits[20.0]["estimated_bits_per_weight"] < bits[5.0]["estimated_bits_per_weight"]
    assert bits[20.0]["prune_fraction"] > bits[5.0]["prune_fraction"]


def test_ignore_and_the_paper_init() -> None:
    fields = {**FAST, "ignore": ["*.mlp.down_proj"], "init": "paper"}
    model, ctx, _ = run(tiny_model("llama"), [{"l2": fields}])
    for block in get_blocks(model):
        assert type(block.mlp.down_proj) is nn.Linear
        assert isinstance(block.mlp.up_proj, L2Linear)
    assert not any("down_proj" in n for n in ctx.info[INFO_KEY]["layers"])
    assert ctx.info[INFO_KEY]["bits_per_weight"] == pytest.approx(3.2, abs=0.3)


def test_smoothed_linears_are_refused() -> None:
    block = nn.Module()
    block.fc = SmoothedLinear(8, 6)
    with pytest.raises(ModelError) as e:
        block_linears(block, "model.layers.3", [])
    assert str(e.value) == (
        "l2 compresses dense float linears, but 'model.layers.3.fc' is a SmoothedLinear (its "
        "input transform would be lost); leave it float with ignore"
    )
    assert block_linears(block, "model.layers.3", ["*.fc"]) == []


def test_calibration_data_is_required() -> None:
    model = tiny_model("llama")
    stages = parse_recipe({"model": "m", "stages": [{"l2": FAST}]}).stages
    ctx = StageContext(adapter=get_adapter(model), device=torch.device("cpu"), stage_name="l2")
    with pytest.raises(RecipeError) as e:
        apply_stage_list(model, stages, ctx)
    assert str(e.value) == "stage 'l2' needs calibration data; add a 'calibration' section"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"target_ratio": 2},
            "stages[0].l2.target_ratio: input should be greater than or equal to 4 (got 2)",
        ),
        (
            {"target_ratio": "10"},
            "stages[0].l2.target_ratio: input should be a valid number (got '10')",
        ),
        ({"rounds": 0}, "stages[0].l2.rounds: input should be greater than or equal to 1 (got 0)"),
        (
            {"kernel": "gauss"},
            "stages[0].l2.kernel: input should be 'cos' or 'linear' (got 'gauss')",
        ),
        (
            {"kernel_width": 0},
            "stages[0].l2.kernel_width: input should be greater than 0 (got 0)",
        ),
        (
            {"init": "paper", "transform_iters": 0},
            "stages[0].l2: init 'paper' starts near 8-bit codes and only the transform phase "
            "brings them to the target; set transform_iters > 0 or use init: target",
        ),
        (
            {"lambda": 1},
            "stages[0].l2.lambda: unknown key 'lambda'; allowed: target_ratio, rounds, "
            "transform_iters, reconstruct_iters, transform_lr, weight_lr, batch_size, init, "
            "kernel, kernel_width, rate_weight, ignore, seed",
        ),
    ],
)
def test_bad_config_values_are_refused_at_parse(fields: dict, message: str) -> None:
    with pytest.raises(RecipeError) as e:
        parse_recipe({"model": "m", "stages": [{"l2": fields}]})
    assert str(e.value) == f"recipe: {message}"
