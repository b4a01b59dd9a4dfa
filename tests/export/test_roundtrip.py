"""Export → tersa's load gives bit-identical logits; the stored layout is what the format says."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tersa.context import StageContext
from tersa.export.load import is_tersa_export, load_export
from tersa.export.save import save_export
from tersa.models.adapters import get_adapter
from tersa.models.tiny import tiny_model
from tersa.quant.qlinear import QuantLinear
from tersa.quant.scheme import ActivationScheme, WeightScheme
from tersa.quant.stage import QuantizeConfig, quantize

SCHEMES = {
    "w8-channel": (WeightScheme(), None),
    "w4-g48-asym": (
        WeightScheme(bits=4, granularity="group", group_size=48, symmetric=False),
        None,
    ),
    "w3-tensor": (WeightScheme(bits=3, granularity="tensor"), None),
    "w8a8-token": (WeightScheme(), ActivationScheme()),
    "a6-only": (None, ActivationScheme(bits=6, symmetric=False)),
}


def _quantized(family: str, weights, activations) -> torch.nn.Module:
    model = tiny_model(family)
    ctx = StageContext(adapter=get_adapter(model), device=torch.device("cpu"))
    return quantize(model, QuantizeConfig(weights=weights, activations=activations), ctx)


def _stored_bytes(path: Path) -> int:
    with safe_open(str(path), framework="pt") as f:
        return sum(f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys())  # noqa: SIM118


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2", "ratplus"])
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_round_trip_logits_identical(tmp_path: Path, family: str, scheme: str) -> None:
    model = _quantized(family, *SCHEMES[scheme])
    size = save_export(model, tmp_path)
    assert is_tersa_export(tmp_path)
    loaded = load_export(tmp_path)
    ids = torch.randint(0, 300, (2, 13))
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))
    assert size == _stored_bytes(tmp_path / "model.safetensors")
    assert not any(t.is_meta for t in loaded.state_dict().values())


def test_layout_and_config(tmp_path: Path) -> None:
    """W4 g32 asym on the tiny Llama: down_proj (in 176, not a multiple of 32) is stored in tersa's
    layout under ``tersa.layers``, the other linears as compressed-tensors pack-quantized."""
    model = _quantized(
        "llama", WeightScheme(bits=4, granularity="group", group_size=32, symmetric=False), None
    )
    save_export(model, tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    down = [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    others = [
        f"model.layers.{i}.{n}"
        for i in range(2)
        for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj")
    ]  # fmt: skip
    assert qc == {
        "quant_method": "tersa",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": others,
                "weights": {
                    "num_bits": 4, "type": "int", "symmetric": False, "group_size": 32,
                    "strategy": "group", "dynamic": False,
                },
                "input_activations": None,
                "output_activations": None,
                "format": "pack-quantized",
            }
        },
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
        "global_compression_ratio": None,
        "moe_sparsity_config": None,
        "tersa": {
            "format": "tersa",
            "version": 1,
            "layers": {
                name: {
                    "in_features": 176, "out_features": 64, "bias": False, "activations": None,
                    "weights": {"bits": 4, "granularity": "group", "group_size": 32,
                                "symmetric": False},
                }
                for name in down
            },
        },
    }  # fmt: skip
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "tersa_version": "1"}
        q = "model.layers.1.self_attn.q_proj."
        assert f.get_tensor(q + "weight_packed").dtype == torch.int32
        assert f.get_tensor(q + "weight_packed").shape == (64, 8)  # 64 codes · 4 bits / 32
        assert f.get_tensor(q + "weight_shape").tolist() == [64, 64]
        assert f.get_tensor(q + "weight_scale").shape == (64, 2)
        zp = f.get_tensor(q + "weight_zero_point")  # packed along the output dimension
        assert zp.dtype == torch.int32 and zp.shape == (8, 2)
        d = "model.layers.1.mlp.down_proj."
        assert f.get_tensor(d + "weight_packed").shape == (64, 22)  # tersa: 8 codes per word
        assert f.get_tensor(d + "weight_scale").shape == (64, 6)  # groups 32 × 5 + 16
        assert f.get_tensor(d + "weight_zero_point").dtype == torch.int8
        assert d + "weight_shape" not in f.keys()  # noqa: SIM118
        assert q + "weight" not in f.keys()  # noqa: SIM118


def test_tied_embeddings_stored_once(tmp_path: Path) -> None:
    model = tiny_model("llama", tie_word_embeddings=True)
    ctx = StageContext(adapter=get_adapter(model), device=torch.device("cpu"))
    model = quantize(model, QuantizeConfig(), ctx)
    save_export(model, tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
    loaded = load_export(tmp_path)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    ids = torch.randint(0, 300, (1, 5))
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


def test_loaded_linears_keep_packed_weights(tmp_path: Path) -> None:
    save_export(_quantized("llama", *SCHEMES["w4-g48-asym"]), tmp_path)
    loaded = load_export(tmp_path)
    q = loaded.model.layers[0].self_attn.q_proj
    assert isinstance(q, QuantLinear) and q.weight_packed.dtype == torch.int32
    assert not hasattr(q, "weight") or q.weight is None
