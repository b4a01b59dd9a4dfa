"""Structured layers in an export: the ``tersa.structured`` records, float or quantized factors,
reloaded by ``load_export`` and by ``AutoModelForCausalLM.from_pretrained`` after ``import tersa``
with identical logits; broken records are refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import tersa  # noqa: F401  (registers quant_method "tersa" with transformers)
from tersa.errors import ExportError
from tersa.export.format import METRICS_FILE
from tersa.export.load import load_export
from tersa.export.save import save_export
from tersa.models.tiny import tiny_model
from tersa.pipeline import run_recipe
from tersa.quant.qlinear import QuantLinear
from tersa.recipe import parse_recipe
from tersa.structured.base import StructuredLinear
from tests.helpers import tiny_recipe, tiny_setup
from tests.structured.helpers import calibration, run

W8A8 = {
    "weights": {"bits": 8, "granularity": "channel"},
    "activations": {"bits": 8, "granularity": "token"},
}
W4G16 = {"weights": {"bits": 4, "granularity": "group", "group_size": 16, "symmetric": False}}
CASES = {
    "llama-lowrank-float": ("llama", {"fraction": 0.5, "merge_below": 8}, None),
    "llama-blockdense-w8a8": ("llama", {"kind": "blockdense", "rank": 16, "blocks": 2}, W8A8),
    "gpt2-blockshuffle-w4": ("gpt2", {"kind": "blockshuffle", "blocks": 4}, W4G16),
}


def structured_model(family: str, fields: dict, quant: dict | None) -> nn.Module:
    stages = [{"structured_ffn": {**fields, "fit_iters": 1}}]
    stages += [{"quantize": quant}] if quant else []
    return run(tiny_model(family), stages)[0]


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("case", list(CASES))
def test_round_trip_gives_identical_logits(tmp_path: Path, case: str) -> None:
    family, fields, quant = CASES[case]
    model = structured_model(family, fields, quant)
    ids = calibration(2, 16)
    few = ids[:1, :3]  # below merge_below: the merged path
    save_export(model, tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "tersa"  # compressed-tensors alone cannot build these layers
    records = qc["tersa"]["structured"]
    names = {n for n, m in model.named_modules() if isinstance(m, StructuredLinear)}
    assert set(records) == names and len(names) == (3 if family == "llama" else 2)
    for load in (load_export, lambda d: AutoModelForCausalLM.from_pretrained(d).eval()):
        again = load(tmp_path)
        layers = {n: m for n, m in again.named_modules() if isinstance(m, StructuredLinear)}
        assert set(layers) == names
        assert all(m.quantized == (quant is not None) for m in layers.values())
        assert all(
            isinstance(f, QuantLinear) for m in layers.values() if quant for f in m.factor_linears()
        )
        assert torch.equal(logits(again, ids), logits(model, ids))
        assert torch.equal(logits(again, few), logits(model, few))
    if case == "llama-lowrank-float":
        assert next(iter(records.values()))["merge_below"] == 8


def test_recipe_run_reports_and_exports(tmp_path: Path) -> None:
    model_dir, text = tiny_setup(tmp_path)
    stages = [{"structured_ffn": {"fraction": 0.5, "healing": {"steps": 2, "batch_size": 2}}}]
    out = tmp_path / "out"
    result = run_recipe(parse_recipe(tiny_recipe(model_dir, text, stages)), out)
    metrics = json.loads((out / METRICS_FILE).read_text())
    record = metrics["stages"][0]["metrics"]
    assert set(record["layers"]) == {f"model.layers.1.mlp.{p}_proj" for p in ("gate", "up", "down")}
    assert record["healing"]["steps"] == 2 and record["replaced_fraction"] <= 0.5
    assert metrics["compressed"]["size_bytes"] < metrics["baseline"]["size_bytes"]
    ids = calibration(2, 16)
    assert torch.equal(logits(load_export(out), ids), logits(result.model, ids))


@pytest.fixture
def export(tmp_path: Path) -> Path:
    save_export(structured_model("llama", {"rank": 4}, None), tmp_path)
    return tmp_path


def _edit_record(folder: Path, edit) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    edit(cfg["quantization_config"])
    (folder / "config.json").write_text(json.dumps(cfg))


def _message(folder: Path) -> str:
    with pytest.raises(ExportError) as e:
        load_export(folder)
    return str(e.value)


def test_malformed_record_is_refused(export: Path) -> None:
    name = "model.layers.1.mlp.up_proj"
    _edit_record(export, lambda qc: qc["tersa"]["structured"][name].update(kind="sparse"))
    assert _message(export) == (
        f"'{export}': structured layer '{name}' is invalid: unknown structured kind 'sparse'; "
        "tersa has lowrank, blockdense, blockshuffle"
    )


def test_record_of_another_shape_is_refused(export: Path) -> None:
    name = "model.layers.1.mlp.up_proj"
    _edit_record(export, lambda qc: qc["tersa"]["structured"][name].update(in_features=32))
    assert _message(export) == (
        f"'{export}': structured layer '{name}' is 32 -> 176 but the model's layer is 64 -> 176"
    )


def test_record_for_a_missing_layer_is_refused(export: Path) -> None:
    def edit(qc: dict) -> None:
        qc["tersa"]["structured"]["model.layers.7.mlp.up_proj"] = qc["tersa"]["structured"].pop(
            "model.layers.1.mlp.up_proj"
        )

    _edit_record(export, edit)
    assert _message(export) == (
        f"'{export}': tersa.structured names 'model.layers.7.mlp.up_proj', which this "
        "LlamaForCausalLM does not have"
    )


def test_structured_under_compressed_tensors_is_refused(export: Path) -> None:
    _edit_record(export, lambda qc: qc.update(quant_method="compressed-tensors"))
    assert _message(export) == (
        f"'{export}' has tersa-only parts but quant_method 'compressed-tensors', so other loaders "
        "would build a different model; re-export it with tersa"
    )
