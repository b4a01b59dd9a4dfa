"""The os_plus stage: exact in float, searched for the quantize stage after it, exported faithfully."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from tersa.calib.stats import observe_inputs
from tersa.context import StageContext
from tersa.errors import RecipeError
from tersa.eval.numerics import sqnr_db
from tersa.export.load import load_export
from tersa.export.save import save_export
from tersa.models.adapters import get_adapter, get_blocks
from tersa.models.tiny import tiny_model
from tersa.pipeline import run_recipe
from tersa.quant.norms import BiasedRMSNorm
from tersa.quant.osplus import INFO_KEY, OsPlusConfig, os_plus
from tersa.quant.qlinear import QuantLinear
from tersa.quant.smoothed import SmoothedLinear
from tersa.quant.stage import QuantizeConfig, quantize
from tersa.recipe import parse_recipe
from tersa.registry import get_stage
from tests.helpers import tiny_recipe, tiny_setup

W6A6 = {"weights": {"bits": 6}, "activations": {"bits": 6}}


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _ctx(model: nn.Module, calib: torch.Tensor, recipe: object = None) -> StageContext:
    ctx = StageContext(get_adapter(model), torch.device("cpu"), calibration_ids=calib, batch_size=4)
    ctx.recipe, ctx.stage_name = recipe, "os_plus"  # type: ignore[assignment]
    return ctx


def _calib(n: int = 8, seq: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, 300, (n, seq), generator=torch.Generator().manual_seed(seed))


def _os_plus(model: nn.Module, calib: torch.Tensor, **fields: object) -> StageContext:
    """os_plus alone, its target scheme given by override fields (W6A6 per token)."""
    ctx = _ctx(model, calib)
    os_plus(model, OsPlusConfig(**{**W6A6, "grid": 12, "refine": 2, **fields}), ctx)
    return ctx


@pytest.mark.parametrize(
    ("family", "shift", "overrides"),
    [
        ("llama", None, {}),
        ("llama", True, {}),
        ("qwen2", None, {}),
        ("opt", None, {}),
        ("opt", None, {"do_layer_norm_before": False}),  # post-norm (OPT-350m)
        ("gpt2", None, {}),  # fused c_attn
        ("bert", None, {}),  # post-norm encoder
    ],
)
def test_float_model_is_unchanged(family: str, shift: bool | None, overrides: dict) -> None:
    model = tiny_model(family, **overrides)
    ids = _calib(2, 17, seed=5)
    ref = _logits(model, ids)
    ctx = _os_plus(model, _calib(), shift=shift)
    assert _rel(_logits(model, ids), ref) < 1e-4
    assert not any(m._forward_pre_hooks for m in model.modules())  # observation hooks removed
    adapter = get_adapter(model)
    records = ctx.info[INFO_KEY]
    per_block = len(adapter.norm_groups_for(model.config)) + len(adapter.scale_pairs)
    assert len(records) == 2 * per_block
    assert [r["block"] for r in records] == [0] * per_block + [1] * per_block
    assert any(r["scaled"] > 0 for r in records)  # the test is not vacuous
    for r in records:
        assert r["loss_after"] <= r["loss_before"]
        assert (r["t"] is None) == (r["scaled"] == 0 and not r["shift"])
    # auto: only norms with a bias (LayerNorm) shift; Llama's RMSNorm gets one when forced
    assert any(r["shift"] for r in records) == (family not in ("llama", "qwen2") or bool(shift))
    if family == "llama":
        biased = [m for m in model.modules() if isinstance(m, BiasedRMSNorm)]
        assert bool(biased) == bool(shift)
    if family == "bert":  # q/k/v read the block input: named by the norm that produced it
        names = [r["name"] for r in records]
        assert names[0] == "bert.embeddings.LayerNorm"
        assert names[per_block] == "bert.encoder.layer.0.output.LayerNorm"
        for block in get_blocks(model):
            for layer in (block.attention.self.query, block.attention.self.value):
                # the search may keep s = 1 and only shift (LayerNorm has a bias)
                assert isinstance(layer, SmoothedLinear) and layer.smooth_shift is not None
                assert layer.smooth_shift.abs().amax() > 0


def test_bert_block_input_group_exports(tmp_path: Path) -> None:
    """q/k/v smoothed on the block input survive export: float ones in ``smoothed``, quantized
    ones with their transform; the reload gives the same logits."""
    model = tiny_model("bert")
    _os_plus(model, _calib())
    ignore = ["*.0.attention.self.*"]
    quantize(model, QuantizeConfig(**W6A6, ignore=ignore), _ctx(model, None))
    save_export(model, tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    qkv0 = [f"bert.encoder.layer.0.attention.self.{n}" for n in ("query", "key", "value")]
    assert qc["tersa"]["smoothed"] == qc["tersa"]["smoothed_shifts"] == qkv0
    qkv1 = [n.replace(".0.", ".1.") for n in qkv0]
    assert all(qc["tersa"]["smooth"][n] == "scale_shift" for n in qkv1)
    ids = _calib(2, 17, seed=5)
    assert torch.equal(_logits(load_export(tmp_path), ids), _logits(model, ids))


def test_one_observation_pass_suffices() -> None:
    # Group folds are exact, so the pair consumers' inputs after them are the ones observed before.
    model = tiny_model("llama")
    block = get_blocks(model)[0]
    ids = _calib()

    def consumer_ranges() -> list[torch.Tensor]:
        mods = {n: block.get_submodule(n) for n in ("self_attn.o_proj", "mlp.down_proj")}
        with observe_inputs(mods) as stats, torch.no_grad():
            model(input_ids=ids, use_cache=False)
        return [t for s in stats.values() for t in (s.min, s.max)]

    before = consumer_ranges()
    _os_plus(model, ids, shift=True, pairs=False)
    for a, b in zip(before, consumer_ranges(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_planted_outlier_channel_beats_rtn() -> None:
    torch.manual_seed(0)
    fp = tiny_model("llama")
    with torch.no_grad():
        for block in get_blocks(fp):
            block.input_layernorm.weight[7] *= 50  # a massive activation channel into q/k/v
    ids = _calib(2, 33, seed=5)
    ref = _logits(fp, ids)
    quant = QuantizeConfig(**W6A6)

    rtn = quantize(_copy(fp), quant, _ctx(fp, None))
    model = _copy(fp)
    _os_plus(model, _calib(16, 64), grid=20, refine=4)
    smoothed = quantize(model, quant, _ctx(fp, None))
    gain = sqnr_db(ref, _logits(smoothed, ids)) - sqnr_db(ref, _logits(rtn, ids))
    assert gain > 8.0  # measured: RTN 14.6 dB, OS+ 27.2 dB


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def test_export_reloads_to_identical_logits(tmp_path: Path) -> None:
    model_dir, text = tiny_setup(tmp_path)
    stages = [{"os_plus": {"shift": True, "grid": 8, "refine": 2}}, {"quantize": W6A6}]
    recipe = parse_recipe({**tiny_recipe(model_dir, text, stages), "evaluation": None})
    result = run_recipe(recipe, tmp_path / "out")
    assert [s["name"] for s in result.metrics["stages"]] == ["os_plus", "quantize"]
    exported = load_export(tmp_path / "out")
    assert sum(isinstance(m, BiasedRMSNorm) for m in exported.modules()) >= 1
    assert sum(isinstance(m, QuantLinear) for m in exported.modules()) == 14
    ids = torch.randint(0, 300, (2, 17))
    assert torch.equal(_logits(exported, ids), _logits(result.model, ids))


def test_scheme_comes_from_the_following_quantize_stage() -> None:
    recipe = parse_recipe(
        {
            "model": "m",
            "stages": [
                {"os_plus": {"activations": {"bits": 8, "granularity": "tensor"}}},
                {"quantize": {**W6A6, "ignore": ["*.mlp.*"]}},
            ],
        }
    )
    model = tiny_model("llama")
    ctx = _ctx(model, _calib(4, 32), recipe)
    os_plus(model, recipe.stages[0][1], ctx)
    names = [r["name"] for r in ctx.info[INFO_KEY]]
    # the MLP is left float by the quantize stage: nothing to search there
    assert names == ["input_layernorm", "self_attn.v_proj->self_attn.o_proj"] * 2


def test_without_a_following_quantize_stage_is_refused() -> None:
    model = tiny_model("llama")
    with pytest.raises(RecipeError) as e:
        os_plus(model, OsPlusConfig(), _ctx(model, _calib()))
    assert str(e.value) == (
        "os_plus searches its scales for the quantization that follows; add a quantize stage "
        "after it or set weights/activations in os_plus"
    )


def test_registered_as_a_calibrated_transform() -> None:
    stage = get_stage("os_plus")
    assert stage.kind == "transform" and stage.config is OsPlusConfig
    assert stage.doc.startswith("OS+:")
    assert OsPlusConfig().needs_calibration
    with pytest.raises(RecipeError, match="must come before 'quantize'"):
        parse_recipe({"model": "m", "stages": [{"quantize": W6A6}, {"os_plus": {}}]})
    with pytest.raises(RecipeError) as e:
        parse_recipe({"model": "m", "stages": [{"os_plus": {"grids": 3}}]})
    assert str(e.value) == (
        "recipe: stages[0].os_plus.grids: unknown key 'grids'; allowed: shift, pairs, grid, "
        "refine, search_tokens, weights, activations"
    )
