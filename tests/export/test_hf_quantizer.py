"""Exports with tersa-only parts: quant_method ``tersa``, loaded by transformers after
``import tersa`` into tersa's modules (packed weights kept), with the in-memory model's logits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM
from transformers.quantizers import auto as hf_auto

import tersa  # noqa: F401  (registers quant_method "tersa")
from tersa.context import StageContext
from tersa.export.save import save_export
from tersa.models.adapters import get_adapter
from tersa.models.tiny import tiny_model
from tersa.quant.norms import BiasedRMSNorm
from tersa.quant.osplus import OsPlusConfig, os_plus
from tersa.quant.qlinear import QuantLinear
from tersa.quant.scheme import ActivationScheme, WeightScheme
from tersa.quant.smoothed import SmoothedLinear
from tersa.quant.stage import QuantizeConfig, quantize

W6A6 = {"weights": {"bits": 6}, "activations": {"bits": 6}}


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _ctx(model: nn.Module, calib: torch.Tensor | None = None) -> StageContext:
    return StageContext(
        get_adapter(model), torch.device("cpu"), calibration_ids=calib, batch_size=4
    )


def _calib() -> torch.Tensor:
    return torch.randint(3, 300, (8, 32), generator=torch.Generator().manual_seed(1))


def _os_plus_w6a6(family: str, ignore: list[str] | None = None, **fields: object) -> nn.Module:
    """OS+ (searched for W6A6 per token) then W6A6 RTN on a tiny model."""
    model = tiny_model(family)
    cfg = OsPlusConfig(**{**W6A6, "grid": 8, "refine": 2, **fields})
    os_plus(model, cfg, _ctx(model, _calib()))
    return quantize(model, QuantizeConfig(**W6A6, ignore=ignore or []), _ctx(model))


def _quant_config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())["quantization_config"]


def test_os_plus_llama_loads_with_tersa_modules(tmp_path: Path) -> None:
    model = _os_plus_w6a6("llama", shift=True)
    save_export(model, tmp_path)
    qc = _quant_config(tmp_path)
    assert qc["quant_method"] == "tersa"
    assert qc["config_groups"]["group_0"]["format"] == "pack-quantized"  # the linears: CT layout
    assert qc["tersa"]["biased_norms"] and qc["tersa"]["added_biases"]

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    for name in qc["tersa"]["biased_norms"]:
        assert isinstance(loaded.get_submodule(name), BiasedRMSNorm)
    for name in qc["tersa"]["added_biases"]:
        assert loaded.get_submodule(name).bias is not None
    layers = [m for m in loaded.modules() if isinstance(m, QuantLinear)]
    assert len(layers) == 14
    assert all(m.weight_packed.dtype == torch.int32 for m in layers)
    ids = torch.randint(0, 300, (2, 17))
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


def test_post_norm_smoothing_loads_with_tersa_modules(tmp_path: Path) -> None:
    """BERT: OS+ smooths q/k/v on the block input; block 0's stay float (SmoothedLinear), block
    1's are quantized with their input transform (tersa.smooth)."""
    model = _os_plus_w6a6("bert", ignore=["*.0.attention.self.*"])
    save_export(model, tmp_path)
    qc = _quant_config(tmp_path)
    assert qc["quant_method"] == "tersa" and qc["tersa"]["smoothed"] and qc["tersa"]["smooth"]

    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path)
    for name in qc["tersa"]["smoothed"]:
        assert type(loaded.get_submodule(name)) is SmoothedLinear
    for name, kind in qc["tersa"]["smooth"].items():
        layer = loaded.get_submodule(name)
        assert isinstance(layer, QuantLinear) and layer.smooth == kind
    ids = torch.randint(3, 300, (2, 11))
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_layers_compressed_tensors_cannot_describe(tmp_path: Path, family: str) -> None:
    """Groups of 48 (the tiny Llama's in_features 64 and 176 are not multiples) and GPT-2's
    Conv1D layers are stored in tersa's layout; static inputs come back calibrated."""
    model = tiny_model(family)
    weights = WeightScheme(bits=4, granularity="group", group_size=48, symmetric=False)
    activations = ActivationScheme(granularity="tensor", symmetric=False)
    cfg = QuantizeConfig(weights=weights, activations=activations)
    model = quantize(model, cfg, _ctx(model, _calib()))
    save_export(model, tmp_path)
    qc = _quant_config(tmp_path)
    assert qc["quant_method"] == "tersa" and qc["config_groups"] == {}
    assert len(qc["tersa"]["layers"]) == sum(isinstance(m, QuantLinear) for m in model.modules())

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    ids = torch.randint(0, 300, (2, 13))
    assert torch.equal(_logits(loaded, ids), _logits(model, ids))


def test_transformers_without_tersa_does_not_load_it(tmp_path: Path, monkeypatch) -> None:
    """Without tersa's quantizer (a process that never imported tersa) transformers 5 does not
    raise on an unknown quant_method: it warns "Unknown quantization type, got tersa" and loads a
    plain model. Every quantized weight is then reported missing (randomly initialised), which is
    the loud failure quant_method "tersa" buys; "compressed-tensors" would drop the extensions with
    only a few unexpected biases to show for it."""
    save_export(_os_plus_w6a6("llama", shift=True), tmp_path)
    monkeypatch.delitem(hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING, "tersa")
    monkeypatch.delitem(hf_auto.AUTO_QUANTIZER_MAPPING, "tersa")
    model, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(isinstance(m, (QuantLinear, BiasedRMSNorm)) for m in model.modules())
    assert "model.layers.0.self_attn.q_proj.weight" in info["missing_keys"]
