"""Folding a per-channel shift and scale through norms and linear pairs keeps the model exact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tersa.calib.stats import observe_inputs
from tersa.errors import DataError, ModelError
from tersa.export.load import load_export
from tersa.export.save import save_export
from tersa.models.adapters import get_adapter, get_blocks
from tersa.models.tiny import tiny_model
from tersa.quant.fold import fold_norm_group, fold_scale_pair
from tersa.quant.norms import BiasedRMSNorm


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _rel(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


def _fold_everything(model, shift: bool) -> None:
    adapter = get_adapter(model)
    g = torch.Generator().manual_seed(1)
    for block in get_blocks(model, adapter):
        for group in adapter.norm_groups_for(model.config):
            c = block.get_submodule(group.norm).weight.shape[0]
            scale = torch.rand(c, generator=g) * 4 + 0.25
            z = torch.randn(c, generator=g) if shift else None
            fold_norm_group(block, group.norm, group.linears, scale, z)
        for pair in adapter.scale_pairs:
            producer = block.get_submodule(pair.producer)
            n = producer.weight.shape[0]
            heads = adapter.attention
            n_rep = heads.num_heads(model.config) // heads.num_kv_heads(model.config)
            fold_scale_pair(
                producer,
                block.get_submodule(pair.consumer),
                torch.rand(n, generator=g) * 4 + 0.25,
                head_dim=heads.head_dim(model.config),
                n_rep=n_rep if pair.producer == heads.v else 1,
            )


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "mistral", "opt"])
@pytest.mark.parametrize("shift", [False, True])
def test_random_shift_and_scale_keep_logits(family: str, shift: bool) -> None:
    model = tiny_model(family)
    ids = torch.randint(0, 300, (2, 17))
    ref = _logits(model, ids)
    _fold_everything(model, shift)
    assert _rel(_logits(model, ids), ref) < 1e-5


def test_shift_on_rmsnorm_swaps_in_biased_norm_and_biases() -> None:
    model = tiny_model("llama")
    block = get_blocks(model)[0]
    fold_norm_group(block, "input_layernorm", ["self_attn.q_proj"], None, torch.ones(64))
    assert isinstance(block.input_layernorm, BiasedRMSNorm)
    assert block.self_attn.q_proj.bias is not None and block.self_attn.k_proj.bias is None


def test_biased_rmsnorm_matches_hf_rmsnorm_at_zero_bias() -> None:
    norm = tiny_model("llama").model.layers[0].input_layernorm
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2)
    x = torch.randn(3, 5, 64)
    assert torch.equal(BiasedRMSNorm.from_norm(norm)(x), norm(x))


def test_shifted_llama_exports_and_reloads(tmp_path: Path) -> None:
    model = tiny_model("llama")
    _fold_everything(model, shift=True)
    save_export(model, tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "tersa" and qc["config_groups"] == {}
    assert "layers" not in qc["tersa"]
    assert qc["tersa"]["biased_norms"] == [
        f"model.layers.{i}.{n}"
        for i in range(2)
        for n in ("input_layernorm", "post_attention_layernorm")
    ]
    assert "model.layers.0.self_attn.q_proj" in qc["tersa"]["added_biases"]
    assert "model.layers.0.mlp.down_proj" not in qc["tersa"]["added_biases"]
    ids = torch.randint(0, 300, (1, 9))
    assert torch.equal(_logits(load_export(tmp_path), ids), _logits(model, ids))


def test_group_shape_mismatch_is_named() -> None:
    model = tiny_model("llama")
    block = get_blocks(model)[0]
    with pytest.raises(ModelError) as e:
        fold_norm_group(block, "input_layernorm", ["mlp.down_proj"], torch.ones(64))
    assert str(e.value) == (
        "input_layernorm: 'mlp.down_proj' takes 176 inputs but the norm before it has 64 channels; "
        "the architecture adapter does not match this model"
    )


def test_observe_inputs_ranges_and_nan() -> None:
    lin = torch.nn.Linear(4, 2)
    with observe_inputs({"lin": lin}, keep_tokens=3) as stats:
        lin(torch.tensor([[1.0, -2.0, 0.0, 5.0], [3.0, 1.0, -1.0, 0.0]]))
        lin(torch.tensor([[0.0, 0.0, 9.0, -7.0]]))
    assert stats["lin"].max.tolist() == [3.0, 1.0, 9.0, 5.0]
    assert stats["lin"].absmax.tolist() == [3.0, 2.0, 9.0, 7.0]
    assert stats["lin"].tokens == 3 and stats["lin"].sample().shape == (3, 4)
    with (
        pytest.raises(
            DataError, match=r"non-finite activations \(NaN or inf\) at the input of 'lin'"
        ),
        observe_inputs({"lin": lin}),
    ):
        lin(torch.tensor([[float("nan"), 0.0, 0.0, 0.0]]))
