"""One test per way a broken export is refused, each with its exact message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import tersa  # noqa: F401  (registers quant_method "tersa" with transformers)
from tersa.context import StageContext
from tersa.errors import ExportError
from tersa.export.load import load_export
from tersa.export.save import save_export
from tersa.models.adapters import get_adapter
from tersa.models.tiny import tiny_model
from tersa.quant.scheme import WeightScheme
from tersa.quant.stage import QuantizeConfig, quantize


@pytest.fixture
def export(tmp_path: Path) -> Path:
    model = tiny_model("llama")
    ctx = StageContext(adapter=get_adapter(model), device=torch.device("cpu"))
    save_export(quantize(model, QuantizeConfig(), ctx), tmp_path)
    return tmp_path


def _native_export_model() -> torch.nn.Module:
    """W4 in groups of 48, which divide none of the tiny Llama's in_features: tersa's layout."""
    model = tiny_model("llama")
    ctx = StageContext(adapter=get_adapter(model), device=torch.device("cpu"))
    weights = WeightScheme(bits=4, granularity="group", group_size=48)
    return quantize(model, QuantizeConfig(weights=weights), ctx)


def _edit_config(folder: Path, edit) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg)
    (folder / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(folder: Path, edit) -> None:
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def _message(folder: Path) -> str:
    with pytest.raises(ExportError) as e:
        load_export(folder)
    return str(e.value)


def test_unsupported_version(export: Path) -> None:
    _edit_config(export, lambda c: c["quantization_config"]["tersa"].update(version=7))
    assert _message(export) == (
        f"'{export}' has tersa format version 7; this tersa reads versions 1 — upgrade tersa or re-export"
    )


def test_version_0_is_no_longer_read(export: Path) -> None:
    old = {"quant_method": "tersa", "version": 0, "layers": {}}
    _edit_config(export, lambda c: c.update(quantization_config=old))
    assert _message(export) == (
        f"'{export}' has tersa format version 0, which this tersa no longer reads (it reads 1); "
        "re-export the model"
    )


def test_unknown_format_name(export: Path) -> None:
    _edit_config(export, lambda c: c["quantization_config"]["tersa"].update(format="zipnn"))
    assert _message(export) == (
        f"'{export}' has export format 'zipnn', not 'tersa'; load it with the tool that wrote it"
    )


def test_unknown_compressed_tensors_format(export: Path) -> None:
    _edit_config(export, lambda c: c["quantization_config"].update(format="nvfp4-pack-quantized"))
    assert _message(export) == (
        f"'{export}' stores weights in format 'nvfp4-pack-quantized', which tersa does not read "
        "(it reads pack-quantized, int-quantized, dense); load it with transformers"
    )


def test_group_format_that_does_not_fit(export: Path) -> None:
    _edit_config(
        export,
        lambda c: c["quantization_config"]["config_groups"]["group_0"].update(format="dense"),
    )
    assert _message(export) == (
        f"'{export}': config group 'group_0' is not supported: format 'dense' does not fit this scheme"
    )


def test_scheme_tersa_does_not_have(export: Path) -> None:
    _edit_config(
        export,
        lambda c: c["quantization_config"]["config_groups"]["group_0"]["weights"].update(
            type="float"
        ),
    )
    assert _message(export) == (
        f"'{export}': config group 'group_0' is not supported: weights must be static integers, "
        "got float 8-bit channel (dynamic=False)"
    )


def test_target_the_model_lacks(export: Path) -> None:
    _edit_config(
        export,
        lambda c: c["quantization_config"]["config_groups"]["group_0"]["targets"].append(
            "model.layers.9.mlp.up_proj"
        ),
    )
    assert _message(export) == (
        f"'{export}': config group 'group_0' targets 'model.layers.9.mlp.up_proj', which this "
        "LlamaForCausalLM does not have"
    )


def test_foreign_quant_method(export: Path) -> None:
    _edit_config(export, lambda c: c["quantization_config"].update(quant_method="gptq"))
    assert _message(export) == (
        f"'{export}' uses quant_method 'gptq', not a tersa export; load it with transformers or the tool that wrote it"
    )


def test_tersa_parts_under_compressed_tensors(tmp_path: Path) -> None:
    save_export(_native_export_model(), tmp_path)
    _edit_config(
        tmp_path, lambda c: c["quantization_config"].update(quant_method="compressed-tensors")
    )
    assert _message(tmp_path) == (
        f"'{tmp_path}' has tersa-only parts but quant_method 'compressed-tensors', so other "
        "loaders would build a different model; re-export it with tersa"
    )


def test_shape_mismatch(export: Path) -> None:
    name = "model.layers.0.mlp.up_proj.weight_scale"
    _edit_tensors(export, lambda t: t.update({name: t[name][:10]}))
    assert _message(export) == (
        f"tensor '{name}' in '{export}/model.safetensors' is (10, 1) torch.float32, "
        "the config needs (176, 1) torch.float32; re-export"
    )


def test_dtype_mismatch(export: Path) -> None:
    name = "model.layers.0.mlp.up_proj.weight_packed"
    _edit_tensors(export, lambda t: t.update({name: t[name].to(torch.int64)}))
    assert "is (176, 16) torch.int64, the config needs (176, 16) torch.int32" in _message(export)


def test_missing_tensor(export: Path) -> None:
    _edit_tensors(export, lambda t: t.pop("model.norm.weight"))
    assert _message(export) == (
        f"'{export}/model.safetensors' lacks tensors: model.norm.weight; the export is incomplete"
    )


def test_unknown_tensor(export: Path) -> None:
    _edit_tensors(export, lambda t: t.update({"model.extra": torch.zeros(2)}))
    assert _message(export) == (
        f"'{export}/model.safetensors' holds tensors the config does not describe: model.extra"
    )


def test_truncated_file(export: Path) -> None:
    data = (export / "model.safetensors").read_bytes()
    (export / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert _message(export).startswith(
        f"'{export}/model.safetensors' is not a readable safetensors file"
    )


def test_missing_weights_file(export: Path) -> None:
    (export / "model.safetensors").unlink()
    assert _message(export) == f"'{export}' has no model.safetensors; the export is incomplete"


def test_tampered_weight_shape(export: Path) -> None:
    name = "model.layers.0.mlp.up_proj.weight_shape"
    _edit_tensors(export, lambda t: t.update({name: torch.tensor([176, 60])}))
    assert _message(export) == (
        f"layer 'model.layers.0.mlp.up_proj' in '{export}' is inconsistent: weight_shape is "
        "[176, 60], the layer is [176, 64]"
    )


def test_broken_layer_entry(tmp_path: Path) -> None:
    save_export(_native_export_model(), tmp_path)
    _edit_config(
        tmp_path,
        lambda c: c["quantization_config"]["tersa"]["layers"]["model.layers.0.mlp.up_proj"].pop(
            "bias"
        ),
    )
    assert (
        _message(tmp_path)
        == "quantized layer 'model.layers.0.mlp.up_proj' in the config is invalid: 'bias'"
    )


def test_transformers_quantizer_checks_shapes(tmp_path: Path) -> None:
    """The quant_method "tersa" path of from_pretrained refuses a tensor of the wrong shape."""
    save_export(_native_export_model(), tmp_path)
    name = "model.layers.0.mlp.up_proj.weight_scale"
    _edit_tensors(tmp_path, lambda t: t.update({name: t[name][:10]}))
    with pytest.raises(ExportError) as e:
        AutoModelForCausalLM.from_pretrained(tmp_path)
    assert str(e.value) == (
        f"tensor '{name}' in '{tmp_path}' is (10, 2) torch.float32, the config needs "
        "(176, 2) torch.float32; re-export"
    )


def test_transformers_quantizer_needs_every_tensor(tmp_path: Path) -> None:
    save_export(_native_export_model(), tmp_path)
    _edit_tensors(tmp_path, lambda t: t.pop("model.layers.1.mlp.down_proj.weight_packed"))
    with pytest.raises(ExportError) as e:
        AutoModelForCausalLM.from_pretrained(tmp_path)
    assert str(e.value) == (
        f"'{tmp_path}' lacks tensors: model.layers.1.mlp.down_proj.weight_packed; "
        "the export is incomplete"
    )
