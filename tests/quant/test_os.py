"""Outlier Suppression: gamma migration is exact, token-wise clipping picks and hands over ranges."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from tersa.context import StageContext
from tersa.errors import RecipeError
from tersa.export.load import load_export
from tersa.models.adapters import get_adapter, get_blocks, group_norm
from tersa.models.tiny import tiny_model
from tersa.pipeline import run_recipe
from tersa.quant.os import OS_INFO, outlier_suppression
from tersa.quant.os_math import alpha_grid, clip_range, gamma_scale, token_extremes
from tersa.quant.primitives import compute_qparams
from tersa.quant.qlinear import QuantLinear
from tersa.quant.smoothed import SmoothedLinear
from tersa.quant.stage import ACTIVATION_RANGES, quantize
from tersa.recipe import Recipe, parse_recipe
from tests.helpers import tiny_recipe, tiny_setup

FAMILIES = [("llama", {}), ("opt", {}), ("opt", {"do_layer_norm_before": False}), ("bert", {})]


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _recipe(os_fields: dict, activations: dict | None) -> Recipe:
    quant = {"weights": {"bits": 8}, "activations": activations}
    return parse_recipe(
        {"model": "m", "stages": [{"outlier_suppression": os_fields}, {"quantize": quant}]}
    )


def _run(model: nn.Module, recipe: Recipe, calib: torch.Tensor) -> tuple[nn.Module, StageContext]:
    """The recipe's stages on an in-memory model, as the pipeline runs them."""
    ctx = StageContext(
        get_adapter(model), torch.device("cpu"), calibration_ids=calib, batch_size=4, recipe=recipe
    )
    os_cfg, quant_cfg = recipe.stages[0][1], recipe.stages[1][1]
    ctx.stage_name, ctx.stage_index = "outlier_suppression", 0
    model = outlier_suppression(model, os_cfg, ctx)
    ctx.stage_name, ctx.stage_index = "quantize", 1
    return quantize(model, quant_cfg, ctx), ctx


# ----------------------------------------------------------------------------------------- math


def test_gamma_scale_is_positive_and_floored() -> None:
    gamma = torch.tensor([2.0, -0.5, 0.0, 1e-9])
    assert gamma_scale(gamma).tolist() == pytest.approx([2.0, 0.5, 1e-5, 1e-5])


def test_clip_range_quantiles() -> None:
    t_max = torch.randn(1001).sort().values
    t_min = (-torch.rand(1001)).sort().values
    assert clip_range(t_max, t_min, 1.0) == (t_min[0].item(), t_max[-1].item())  # min-max
    lo, hi = clip_range(t_max, t_min, 0.9)
    assert hi == pytest.approx(torch.quantile(t_max, 0.9).item(), rel=1e-6)
    assert lo == pytest.approx(torch.quantile(t_min, 0.1).item(), rel=1e-6)


def test_token_extremes_and_alpha_grid() -> None:
    x = torch.tensor([[[1.0, -2.0, 3.0], [0.0, 5.0, -1.0]]])
    t_max, t_min = token_extremes(x)
    assert t_max.tolist() == [3.0, 5.0] and t_min.tolist() == [-2.0, -1.0]
    grid = alpha_grid(8)
    assert grid[0] == 1.0 and grid[-1] == 0.9 and len(grid) == 11
    assert len(alpha_grid(6)) == 31 and len(alpha_grid(4)) == 91
    assert alpha_grid(8, step=0.05, min_alpha=0.8) == [1.0, 0.95, 0.9, 0.85, 0.8]


# ----------------------------------------------------------------------------- gamma migration


@pytest.mark.parametrize(("family", "overrides"), FAMILIES)
def test_gamma_migration_alone_is_exact(family: str, overrides: dict) -> None:
    model = tiny_model(family, **overrides)
    adapter = get_adapter(model)
    g = torch.Generator().manual_seed(3)
    n_blocks = len(get_blocks(model, adapter))
    with torch.no_grad():  # a non-trivial γ, one entry negative
        for i in range(n_blocks):
            for group in adapter.norm_groups_for(model.config):
                w = group_norm(model, adapter, group, i)[1].weight
                w.copy_(torch.rand(w.shape, generator=g) * 3 + 0.1)
                w[0] = -w[0]
    ids = torch.randint(3, 300, (2, 17))
    ref = _logits(model, ids)
    recipe = parse_recipe({"model": "m", "stages": ["outlier_suppression"]})
    ctx = StageContext(adapter, torch.device("cpu"), recipe=recipe)
    model = outlier_suppression(model, recipe.stages[0][1], ctx)
    assert _rel(_logits(model, ids), ref) < 1e-4
    assert ACTIVATION_RANGES not in ctx.info  # no static quantize follows: no clipping
    for i, block in enumerate(get_blocks(model, adapter)):
        for group in adapter.norm_groups_for(model.config):
            norm = group_norm(model, adapter, group, i)[1]
            if adapter.is_pre_norm(model.config):
                expected = torch.ones_like(norm.weight)
                expected[0] = -1.0
                assert torch.equal(norm.weight, expected)
            else:  # post-norm: the consumers divide by |γ| on their input
                for name in group.linears:
                    consumer = block.get_submodule(name)
                    assert isinstance(consumer, SmoothedLinear)
                    torch.testing.assert_close(consumer.smooth_scale, norm.weight.abs())
    if family == "bert":  # q/k/v take the γ of the norm before the block (embeddings' for 0)
        gammas = [
            model.bert.embeddings.LayerNorm.weight,
            model.bert.encoder.layer[0].output.LayerNorm.weight,
        ]
        for block, gamma in zip(get_blocks(model, adapter), gammas, strict=True):
            for layer in (
                block.attention.self.query,
                block.attention.self.key,
                block.attention.self.value,
            ):
                assert isinstance(layer, SmoothedLinear)
                torch.testing.assert_close(layer.smooth_scale, gamma.abs())


def test_gamma_migration_makes_llama_norms_ones() -> None:
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[0].input_layernorm.weight.uniform_(0.5, 2.0)
    recipe = parse_recipe({"model": "m", "stages": ["outlier_suppression"]})
    model = outlier_suppression(
        model, recipe.stages[0][1], StageContext(get_adapter(model), torch.device("cpu"))
    )
    for block in model.model.layers:
        for norm in (block.input_layernorm, block.post_attention_layernorm):
            assert torch.equal(norm.weight, torch.ones(64))


# ------------------------------------------------------------------------------------- clipping


def _outlier_token_llama() -> tuple[nn.Module, torch.Tensor]:
    """A tiny llama whose token 7 is one-hot in channel 3, present once in the calibration data:
    after every RMSNorm it reaches √64 = 8 where other tokens stay near 2.5."""
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.embed_tokens.weight[7] = 0.0
        model.model.embed_tokens.weight[7, 3] = 1.0
    calib = torch.randint(10, 300, (8, 32), generator=torch.Generator().manual_seed(5))
    calib[0, 10] = 7
    return model, calib


def test_clipping_picks_alpha_below_one_and_quantize_uses_the_ranges() -> None:
    model, calib = _outlier_token_llama()
    static6 = {"bits": 6, "granularity": "tensor"}
    model, ctx = _run(model, _recipe({"min_alpha": 0.95}, static6), calib)
    info = ctx.info[OS_INFO]
    assert list(info["losses"]) == [1.0, 0.99, 0.98, 0.97, 0.96, 0.95]
    assert info["alpha"] < 1.0 and info["losses"][info["alpha"]] < info["losses"][1.0]
    ranges = ctx.info[ACTIVATION_RANGES]
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert set(ranges) == set(layers) and len(layers) == 14
    for name, layer in layers.items():
        scale, _ = compute_qparams(
            torch.tensor(ranges[name][0]), torch.tensor(ranges[name][1]), 6, True
        )
        assert torch.equal(layer.input_scale, scale.reshape(1)), name


def test_clipping_is_skipped_before_dynamic_activations() -> None:
    model, calib = _outlier_token_llama()
    _, ctx = _run(model, _recipe({}, {"bits": 8, "granularity": "token"}), calib)
    assert OS_INFO not in ctx.info and ACTIVATION_RANGES not in ctx.info


@pytest.mark.parametrize("family", ["llama", "bert"])
def test_os_then_static_w8a8_export_reloads(tmp_path: Path, family: str) -> None:
    model_dir, text = tiny_setup(tmp_path, family)
    static = {"weights": {"bits": 8}, "activations": {"bits": 8, "granularity": "tensor"}}
    stages = [{"outlier_suppression": {"min_alpha": 0.98}}, {"quantize": static}]
    recipe = tiny_recipe(model_dir, text, stages)
    if family == "bert":
        recipe["evaluation"] = None  # perplexity is for causal LMs
    out = tmp_path / "out"
    result = run_recipe(parse_recipe(recipe), out)
    ids = torch.randint(3, 300, (2, 17))
    assert torch.equal(_logits(load_export(out), ids), _logits(result.model, ids))


def test_os_after_quantize_is_refused() -> None:
    with pytest.raises(RecipeError) as e:
        parse_recipe({"model": "m", "stages": ["quantize", "outlier_suppression"]}, "r.yaml")
    assert str(e.value) == (
        "r.yaml: stages[1]: 'outlier_suppression' transforms the float model and must come "
        "before 'quantize' (stages[0]); move it up"
    )
