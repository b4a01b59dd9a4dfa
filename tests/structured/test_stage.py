"""The structured_ffn stage on tiny Llama (gate/up/down) and OPT / GPT-2 (fc1/fc2): sizes, the
dense first block, reported fit errors, pre-merge, composition with quantize, refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tersa.errors import ModelError, RecipeError
from tersa.models.adapters import get_adapter, get_blocks
from tersa.models.tiny import tiny_model
from tersa.quant.qlinear import QuantLinear
from tersa.quant.replace import find_linears
from tersa.quant.smoothed import SmoothedLinear
from tersa.recipe import parse_recipe
from tersa.structured.base import StructuredLinear
from tersa.structured.layers import BlockDense, BlockShuffle, LowRank
from tersa.structured.stage import INFO_KEY
from tests.structured.helpers import calibration, run

W8A8 = {
    "weights": {"bits": 8, "granularity": "channel"},
    "activations": {"bits": 8, "granularity": "token"},
}
CLASSES = {"lowrank": LowRank, "blockdense": BlockDense, "blockshuffle": BlockShuffle}


def mlp(model: nn.Module, block: int) -> dict[str, nn.Module]:
    b = get_blocks(model)[block]
    return {name: b.get_submodule(name) for name in get_adapter(model).mlp}


@pytest.mark.parametrize("family", ["llama", "opt", "gpt2"])
def test_fraction_dense_first_block_and_reported_errors(family: str) -> None:
    model, ctx, timings = run(tiny_model(family), [{"structured_ffn": {"fraction": 0.5}}])
    assert all(type(m).__name__ in ("Linear", "Conv1D") for m in mlp(model, 0).values())
    replaced = mlp(model, 1)
    assert all(isinstance(m, LowRank) for m in replaced.values())
    for layer in replaced.values():
        assert layer.weight_parameters() <= 0.5 * layer.in_features * layer.out_features
    record = ctx.info[INFO_KEY]
    assert timings[0]["metrics"] == record and record["error_on"] == "outputs"
    assert len(record["layers"]) == len(replaced)
    assert all(0.0 < row["init_error"] < 1.0 for row in record["layers"].values())
    assert record["replaced_fraction"] <= 0.5
    # block 0 keeps its dense MLP: the whole FFN is halfway between
    assert record["ffn_fraction"] == pytest.approx((1 + record["replaced_fraction"]) / 2)


@pytest.mark.parametrize("kind", ["blockdense", "blockshuffle"])
def test_block_kinds_fit_the_fraction(kind: str) -> None:
    fields = {"kind": kind, "fraction": 0.4, "fit_iters": 2}  # few rounds: many tiny solves
    model, ctx, _ = run(tiny_model("llama"), [{"structured_ffn": fields}])
    layers = list(mlp(model, 1).values())
    assert all(type(m) is CLASSES[kind] for m in layers)
    assert all(m.weight_parameters() <= 0.4 * m.in_features * m.out_features for m in layers)
    assert all(0.0 < r["init_error"] < 1.0 for r in ctx.info[INFO_KEY]["layers"].values())


def test_explicit_sizes_keep_dense_ignore_and_merge_below() -> None:
    fields = {"rank": 8, "keep_dense": [-1], "ignore": ["*.down_proj"], "merge_below": 16}
    model, ctx, _ = run(tiny_model("llama"), [{"structured_ffn": fields}])
    first, last = mlp(model, 0), mlp(model, 1)
    assert all(type(m) is nn.Linear for m in last.values())
    assert type(first["mlp.down_proj"]) is nn.Linear
    for name in ("mlp.gate_proj", "mlp.up_proj"):
        assert isinstance(first[name], LowRank) and first[name].rank == 8
        assert first[name].merge_below == 16
    assert set(ctx.info[INFO_KEY]["layers"]) == {
        "model.layers.0.mlp.gate_proj",
        "model.layers.0.mlp.up_proj",
    }


def test_data_free_fit_reports_the_weight_error() -> None:
    cfg = {"fraction": 0.5, "activation_aware": False}
    assert (
        not parse_recipe({"model": "m", "stages": [{"structured_ffn": cfg}]})
        .stages[0][1]
        .needs_calibration
    )
    model, ctx, _ = run(tiny_model("llama"), [{"structured_ffn": cfg}], ids=calibration())
    record = ctx.info[INFO_KEY]
    assert record["error_on"] == "weights"
    w = tiny_model("llama").model.layers[1].mlp.up_proj.weight.detach()
    fitted = model.model.layers[1].mlp.up_proj.dense_weight().detach()
    expected = float((fitted - w).norm() / w.norm())
    assert record["layers"]["model.layers.1.mlp.up_proj"]["init_error"] == pytest.approx(expected)


def block1_inputs(model: nn.Module, into: list[torch.Tensor]) -> None:
    model.model.layers[1].register_forward_pre_hook(
        lambda _m, args, kwargs: into.append(args[0] if args else kwargs["hidden_states"]),
        with_kwargs=True,
    )


def test_the_fit_follows_the_replaced_blocks_before_it() -> None:
    # Block 1 is fitted on block 0's outputs after block 0 was replaced, not the dense ones.
    ids = calibration()
    model, dense = tiny_model("llama"), tiny_model("llama")
    seen: list[torch.Tensor] = []
    block1_inputs(model, seen)
    run(model, [{"structured_ffn": {"fraction": 0.5, "keep_dense": []}}], ids=ids)
    fitted_on = seen[0]  # the first calibration batch, during the stage
    with torch.no_grad():
        model(ids[:4])
        block1_inputs(dense, seen)
        dense(ids[:4])
    torch.testing.assert_close(fitted_on, seen[-2])  # the structured model's block 1 input
    assert not torch.allclose(fitted_on, seen[-1])  # not the dense model's


def test_factors_are_quantized_by_a_following_quantize() -> None:
    ids = calibration()
    model, _, _ = run(tiny_model("llama"), [{"structured_ffn": {"fraction": 0.5}}], ids)
    with torch.no_grad():
        ref = model(ids[:2]).logits
    quantized, _, _ = run(model, [{"quantize": W8A8}], ids)
    structured = [m for m in quantized.modules() if isinstance(m, StructuredLinear)]
    assert len(structured) == 3 and all(m.quantized for m in structured)
    factors = [f for m in structured for f in m.factor_linears()]
    assert len(factors) == 6 and all(isinstance(f, QuantLinear) for f in factors)
    assert not find_linears(get_blocks(quantized)[1])  # nothing left in float
    with torch.no_grad():
        out = quantized(ids[:2]).logits
    assert float((out - ref).norm() / ref.norm()) < 0.05


def test_outlier_transforms_refuse_a_structured_mlp() -> None:
    model, _, _ = run(tiny_model("llama"), [{"structured_ffn": {"fraction": 0.5}}])
    for stage in ({"smoothquant": {}}, {"os_plus": {"weights": W8A8["weights"]}}):
        with pytest.raises(ModelError) as err:
            run(model, [stage])
        name = next(iter(stage))
        assert str(err.value) == (
            f"{name} cannot transform structured layers: 'model.layers.1.mlp.gate_proj' is a "
            f"LowRank (3 structured layers in all); run {name} before structured_ffn"
        )


def test_a_quantized_mlp_is_refused() -> None:
    model, _, _ = run(tiny_model("llama"), [{"quantize": W8A8}])
    with pytest.raises(ModelError) as err:
        run(model, [{"structured_ffn": {"fraction": 0.5}}])
    assert str(err.value) == (
        "structured_ffn replaces dense float linears, but 'model.layers.1.mlp.gate_proj' is a "
        "QuantLinear; run structured_ffn before quantize"
    )
    model, _, _ = run(tiny_model("llama"), [{"structured_ffn": {"rank": 4, "keep_dense": []}}])
    with pytest.raises(ModelError) as err:
        run(model, [{"structured_ffn": {"rank": 4, "keep_dense": []}}])
    assert str(err.value).endswith(
        "is a LowRank; it is structured already; leave it out with ignore"
    )


def test_size_errors_at_run_time_name_the_layer() -> None:
    with pytest.raises(RecipeError) as err:
        run(tiny_model("llama"), [{"structured_ffn": {"kind": "blockshuffle", "blocks": 3}}])
    assert str(err.value).startswith(
        "structured_ffn: cannot size 'model.layers.1.mlp.gate_proj' (64 -> 176): BlockShuffle: "
        "blocks=3 must divide in_features=64"
    )
    with pytest.raises(RecipeError) as err:
        run(tiny_model("llama"), [{"structured_ffn": {"rank": 60}}])
    assert str(err.value) == (
        "structured_ffn: lowrank with rank=60, blocks=None has 1.28x the parameters of "
        "'model.layers.1.mlp.gate_proj' (64 -> 176); choose a smaller size or set fraction"
    )
    with pytest.raises(RecipeError) as err:
        run(tiny_model("llama"), [{"structured_ffn": {"rank": 4, "keep_dense": [2]}}])
    assert str(err.value) == (
        "structured_ffn.keep_dense: block 2 is out of range; the model has 2 blocks (0..1, or "
        "-2..-1)"
    )


def test_a_smoothed_linear_is_refused() -> None:
    model = tiny_model("opt")
    block = model.model.decoder.layers[1]
    block.fc1 = SmoothedLinear.from_linear(block.fc1, shift=False)  # post-norm OS+ leaves these
    with pytest.raises(ModelError) as err:
        run(model, [{"structured_ffn": {"fraction": 0.5}}])
    assert str(err.value) == (
        "structured_ffn replaces dense float linears, but 'model.decoder.layers.1.fc1' is a "
        "SmoothedLinear; a post-norm outlier transform's input smoothing cannot move into a "
        "structured layer; leave it dense with ignore"
    )
