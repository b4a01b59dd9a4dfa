"""One test per way a broken export is refused, each with its exact message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tersa.context import StageContext
from tersa.errors import ExportError
from tersa.export.load import load_export
from tersa.export.save import save_export
from tersa.models.adapters import get_adapter
from tersa.models.tiny import tiny_model
from tersa.quant.stage import QuantizeConfig, quantize


@pytest.fixture
def export(tmp_path: Path) -> Path:
    model = tiny_model("llama")
    ctx = StageContext(adapter=get_adapter(model), device=torch.device("cpu"))
    save_export(quantize(model, QuantizeConfig(), ctx), tmp_path)
    return tmp_path


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
    _edit_config(export, lambda c: c["quantization_config"].update(version=7))
    assert _message(export) == (
        f"'{export}' has tersa format version 7; this tersa reads versions 0 — upgrade tersa or re-export"
    )


def test_foreign_quant_method(export: Path) -> None:
    _edit_config(export, lambda c: c["quantization_config"].update(quant_method="gptq"))
    assert _message(export) == (
        f"'{export}' uses quant_method 'gptq', not a tersa export; load it with transformers or the tool that wrote it"
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


def test_broken_layer_entry(export: Path) -> None:
    _edit_config(
        export,
        lambda c: c["quantization_config"]["layers"]["model.layers.0.mlp.up_proj"].pop("bias"),
    )
    assert (
        _message(export)
        == "quantized layer 'model.layers.0.mlp.up_proj' in the config is invalid: 'bias'"
    )
