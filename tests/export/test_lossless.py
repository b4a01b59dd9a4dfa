"""Lossless exports (``export: {lossless: true}``): model.tersa instead of model.safetensors,
identical logits through tersa's loader, a clear refusal from plain transformers, inspect's coders."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import tersa  # noqa: F401  (registers quant_method "tersa")
from tersa.cli import main
from tersa.context import StageContext
from tersa.errors import ContainerError, ExportError
from tersa.export.inspect import inspect_folder
from tersa.export.load import load_export
from tersa.export.save import save_export
from tersa.models.adapters import get_adapter
from tersa.models.tiny import tiny_model
from tersa.quant.scheme import WeightScheme
from tersa.quant.stage import QuantizeConfig, quantize
from tests.helpers import tiny_recipe, tiny_setup, write_recipe

W4 = WeightScheme(bits=4, granularity="group", group_size=32, symmetric=False)


def _w4_model() -> torch.nn.Module:
    model = tiny_model("llama")
    ctx = StageContext(adapter=get_adapter(model), device=torch.device("cpu"))
    return quantize(model, QuantizeConfig(weights=W4, activations=None), ctx)


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def _qc(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())["quantization_config"]


def test_quantized_round_trip_identical_logits(tmp_path: Path) -> None:
    model = _w4_model()
    size = save_export(model, tmp_path, lossless=True)
    assert (tmp_path / "model.tersa").stat().st_size == size
    assert not (tmp_path / "model.safetensors").exists()
    qc = _qc(tmp_path)
    assert qc["quant_method"] == "tersa"
    assert qc["tersa"]["lossless"] == {"file": "model.tersa", "version": 2}
    ids = torch.randint(0, 300, (2, 13))
    assert torch.equal(_logits(load_export(tmp_path), ids), _logits(model, ids))


def test_unquantized_bf16_round_trip(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    model = tiny_model("llama").to(torch.bfloat16)
    model.config.dtype = torch.bfloat16  # what the loader builds the skeleton in
    save_export(model, tmp_path, lossless=True)
    qc = _qc(tmp_path)
    assert qc["quant_method"] == "tersa" and qc["config_groups"] == {} and qc["format"] == "dense"
    loaded = load_export(tmp_path)
    assert all(
        torch.equal(a.view(torch.int16), b.view(torch.int16))
        for a, b in zip(loaded.state_dict().values(), model.state_dict().values(), strict=True)
    )
    # model.to(bf16) also casts non-persistent buffers (rotary inv_freq) that a loaded model keeps
    # in float32, so compare with the same model exported to safetensors and loaded the same way
    save_export(model, tmp_path / "plain")
    ids = torch.randint(0, 300, (1, 9))
    assert torch.equal(_logits(loaded, ids), _logits(load_export(tmp_path / "plain"), ids))


def test_transformers_refuses_with_the_way_to_load(tmp_path: Path) -> None:
    save_export(_w4_model(), tmp_path, lossless=True)
    with pytest.raises(ExportError) as info:
        AutoModelForCausalLM.from_pretrained(tmp_path)
    assert str(info.value) == (
        "this export stores its tensors entropy-coded in model.tersa (export: {lossless: true}), "
        "which transformers cannot read; load it with tersa.export.load.load_export(folder)"
    )


def test_corrupt_container_and_bad_record(tmp_path: Path) -> None:
    save_export(_w4_model(), tmp_path, lossless=True)
    path = tmp_path / "model.tersa"
    good = path.read_bytes()
    path.write_bytes(good[:-3])
    with pytest.raises(ContainerError, match="container is truncated"):
        load_export(tmp_path)
    path.write_bytes(good)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"]["tersa"]["lossless"] = {"file": "../x.tersa", "version": 2}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError, match=r"tersa\.lossless must be"):
        load_export(tmp_path)
    config["quantization_config"]["tersa"]["lossless"] = {"file": "model.tersa", "version": 1}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ExportError) as info:
        load_export(tmp_path)
    assert str(info.value) == (
        f"'{tmp_path}' stores its tensors in lossless container version 1, written by an earlier "
        "tersa and no longer read (this tersa reads 2); export the model again"
    )


def test_recipe_run_and_inspect_show_the_coders(tmp_path: Path, capsys) -> None:
    model, text = tiny_setup(tmp_path)
    stages = [{"quantize": {"weights": {"bits": 4, "granularity": "group", "group_size": 32}}}]
    recipe = tiny_recipe(model, text, stages, export={"lossless": True}, evaluation=None)
    out = tmp_path / "out"
    assert main(["run", str(write_recipe(tmp_path / "r.yaml", recipe)), "-o", str(out), "-q"]) == 0
    info = inspect_folder(out)
    coders = {t.name: t.coder for t in info.tensors}
    assert coders["model.layers.0.self_attn.q_proj.weight_packed"] in ("ans int4", "ans int8")
    assert info.size_bytes == sum(t.stored_bytes for t in info.tensors)
    capsys.readouterr()
    assert main(["inspect", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "lossless container (model.tersa)" in stdout and "ans int" in stdout
