"""L2 layers in an export: the ``tersa.l2`` records and tensors, reloaded by ``load_export`` and
by ``from_pretrained`` (after ``import tersa``) with identical logits, listed by inspect, and
broken records or tensors refused with exact messages; a crashed run resumes to the same export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import AutoModelForCausalLM

import tersa  # noqa: F401  (registers quant_method "tersa" with transformers)
import tersa.compress.l2.stage as l2_stage
from tersa.compress.l2.layer import L2Linear
from tersa.errors import ExportError
from tersa.export.format import METRICS_FILE, WEIGHTS_FILE
from tersa.export.inspect import inspect_folder
from tersa.export.load import load_export
from tersa.export.save import save_export
from tersa.models.tiny import tiny_model
from tersa.pipeline import run_recipe
from tersa.recipe import parse_recipe
from tersa.workarea import work_area
from tests.helpers import tiny_recipe, tiny_setup
from tests.structured.helpers import calibration, run

FAST = {"rounds": 1, "transform_iters": 2, "reconstruct_iters": 2}
NAME = "model.layers.1.mlp.up_proj"


def l2_model(family: str) -> nn.Module:
    return run(tiny_model(family), [{"l2": FAST}])[0]


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_round_trip_gives_identical_logits(tmp_path: Path, family: str) -> None:
    model = l2_model(family)
    ids = calibration(2, 16)
    save_export(model, tmp_path)
    qc = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "tersa"
    layers = {n: m for n, m in model.named_modules() if isinstance(m, L2Linear)}
    assert set(qc["tersa"]["l2"]) == set(layers)
    name, layer = next(iter(layers.items()))
    assert qc["tersa"]["l2"][name] == {
        "in_features": layer.in_features,
        "out_features": layer.out_features,
        "bias": family == "gpt2",
        "codes_dtype": "int8",
    }
    for load in (load_export, lambda d: AutoModelForCausalLM.from_pretrained(d).eval()):
        again = load(tmp_path)
        reloaded = {n: m for n, m in again.named_modules() if isinstance(m, L2Linear)}
        assert set(reloaded) == set(layers)
        assert all(torch.equal(m.weight_codes, layers[n].weight_codes) for n, m in reloaded.items())
        assert torch.equal(logits(again, ids), logits(model, ids))
    rows = {r.name: r for r in inspect_folder(tmp_path).rows}
    assert rows[name].kind == "l2 int8"
    assert rows[name].params == layer.in_features * layer.out_features + (
        layer.out_features if family == "gpt2" else 0
    )


def test_recipe_run_records_metrics_and_exports(tmp_path: Path) -> None:
    model_dir, text = tiny_setup(tmp_path)
    out = tmp_path / "out"
    result = run_recipe(parse_recipe(tiny_recipe(model_dir, text, [{"l2": FAST}])), out)
    record = json.loads((out / METRICS_FILE).read_text())["stages"][0]["metrics"]
    assert NAME in record["layers"] and record["bits_per_weight"] > 0
    ids = calibration(2, 16)
    assert torch.equal(logits(load_export(out), ids), logits(result.model, ids))


def test_lossless_export_of_l2_codes(tmp_path: Path) -> None:
    model = l2_model("llama")
    save_export(model, tmp_path, lossless=True)
    ids = calibration(2, 16)
    assert torch.equal(logits(load_export(tmp_path), ids), logits(model, ids))


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("l2-export")
    save_export(l2_model("llama"), folder)
    return folder


def _edited(export: Path, tmp_path: Path, edit) -> Path:
    cfg = json.loads((export / "config.json").read_text())
    edit(cfg["quantization_config"]["tersa"]["l2"])
    for f in export.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    return tmp_path


def _message(folder: Path) -> str:
    with pytest.raises(ExportError) as e:
        load_export(folder)
    return str(e.value)


def test_unknown_codes_dtype_is_refused(export: Path, tmp_path: Path) -> None:
    folder = _edited(export, tmp_path, lambda l2: l2[NAME].update(codes_dtype="int4"))
    assert _message(folder) == (
        f"'{folder}': L2 layer '{NAME}' is invalid: codes_dtype 'int4' is not one of int8, "
        "int16, int32"
    )


def test_missing_key_is_refused(export: Path, tmp_path: Path) -> None:
    folder = _edited(export, tmp_path, lambda l2: l2[NAME].pop("bias"))
    assert _message(folder) == (
        f"'{folder}': L2 layer '{NAME}' is invalid: expected the keys in_features, "
        "out_features, bias, codes_dtype, got ['codes_dtype', 'in_features', 'out_features']"
    )


def test_sizes_that_disagree_with_the_model_are_refused(export: Path, tmp_path: Path) -> None:
    folder = _edited(export, tmp_path, lambda l2: l2[NAME].update(out_features=100))
    assert _message(folder) == (
        f"'{folder}': L2 layer '{NAME}' is 64 -> 100 but the model's layer is 64 -> 176"
    )


def test_a_name_the_model_lacks_is_refused(export: Path, tmp_path: Path) -> None:
    folder = _edited(export, tmp_path, lambda l2: l2.update({"model.layers.9.fc": l2[NAME]}))
    assert _message(folder) == (
        f"'{folder}': tersa.l2 names 'model.layers.9.fc', which this LlamaForCausalLM does not have"
    )


def test_codes_of_another_dtype_are_refused(export: Path, tmp_path: Path) -> None:
    folder = _edited(export, tmp_path, lambda l2: l2[NAME].update(codes_dtype="int16"))
    assert _message(folder) == (
        f"tensor '{NAME}.weight_codes' in '{folder}/model.safetensors' is (176, 64) "
        "torch.int8, the config needs (176, 64) torch.int16; re-export"
    )


def test_resume_skips_finished_blocks_and_gives_the_same_export(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir, text = tiny_setup(tmp_path)
    recipe = parse_recipe(tiny_recipe(model_dir, text, [{"l2": FAST}]))
    clean = run_recipe(recipe, tmp_path / "clean")
    original, titles = l2_stage.compress_block, []

    def crash_on_second(*args, **kwargs):
        titles.append(args[-1])
        if len(titles) == 2:
            raise KeyboardInterrupt("simulated crash")
        return original(*args, **kwargs)

    monkeypatch.setattr(l2_stage, "compress_block", crash_on_second)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, out)
    assert sorted(p.name for p in work_area(out).rglob("block-*")) == ["block-000.safetensors"]
    titles.clear()
    monkeypatch.setattr(
        l2_stage, "compress_block", lambda *a: (titles.append(a[-1]), original(*a))[1]
    )
    resumed = run_recipe(recipe, out, resume=True)
    assert titles == ["l2: block 2/2"]
    a, b = load_file(str(tmp_path / "clean" / WEIGHTS_FILE)), load_file(str(out / WEIGHTS_FILE))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    blocks = resumed.metrics["stages"][0]["metrics"]["blocks"]
    assert blocks[0]["resumed"] and "nmse_final" in blocks[1]
    assert resumed.metrics["compressed"]["ppl"] == clean.metrics["compressed"]["ppl"]
