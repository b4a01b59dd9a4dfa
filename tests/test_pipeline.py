"""The recipe pipeline end to end on tiny random models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from tersa.errors import ExportError
from tersa.eval.numerics import sqnr_db
from tersa.export.load import load_export
from tersa.models.load import load_model
from tersa.pipeline import apply_stages, run_recipe
from tersa.quant.qlinear import QuantLinear
from tersa.recipe import parse_recipe
from tests.helpers import tiny_recipe, tiny_setup

W8A8 = {"quantize": {"weights": {"bits": 8}, "activations": {"bits": 8, "granularity": "token"}}}
STATIC = {"quantize": {"weights": {"bits": 8}, "activations": {"bits": 8, "granularity": "tensor"}}}


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_w8a8_run_writes_export_that_reloads_to_same_logits(tmp_path: Path, family: str) -> None:
    model_dir, text = tiny_setup(tmp_path, family)
    recipe = parse_recipe(tiny_recipe(model_dir, text, [W8A8]))
    out = tmp_path / "out"
    result = run_recipe(recipe, out)

    m = json.loads((out / "metrics.json").read_text())
    assert m == result.metrics
    assert m["model"] == str(model_dir)
    assert m["baseline"]["eval_tokens"] == m["compressed"]["eval_tokens"] == 6 * 63
    assert m["compressed"]["size_bytes"] < m["baseline"]["size_bytes"]
    assert [s["name"] for s in m["stages"]] == ["quantize"]
    assert m["peak_rss_bytes"] > 0 and m["wall_s"] > 0
    # Random tiny models are near-uniform predictors: int8 barely moves their perplexity.
    assert m["compressed"]["ppl"] == pytest.approx(m["baseline"]["ppl"], rel=0.02)
    assert (
        yaml.safe_load((out / "recipe.yaml").read_text())["stages"][0]["quantize"]["weights"][
            "bits"
        ]
        == 8
    )
    assert not list(tmp_path.glob(".out.tmp-*"))

    exported = load_export(out)
    n_quant = sum(isinstance(mod, QuantLinear) for mod in exported.modules())
    assert n_quant == 2 * 6 + (1 if family == "llama" else 0) * 2  # q k v o + 2 or 3 mlp, per block
    ids = torch.randint(0, 300, (2, 17))
    assert torch.equal(_logits(exported, ids), _logits(result.model, ids))


def test_quantization_error_is_small_against_float(tmp_path: Path) -> None:
    model_dir, text = tiny_setup(tmp_path)
    recipe = parse_recipe(tiny_recipe(model_dir, text, [W8A8]))
    fp, _, _ = load_model(str(model_dir))
    ids = torch.randint(0, 300, (2, 33))
    assert sqnr_db(_logits(fp, ids), _logits(apply_stages(recipe), ids)) > 30


def test_static_activations_are_calibrated_block_by_block(tmp_path: Path) -> None:
    model_dir, text = tiny_setup(tmp_path)
    recipe = parse_recipe(tiny_recipe(model_dir, text, [STATIC]))
    model = apply_stages(recipe)
    scales = [m.input_scale for m in model.modules() if isinstance(m, QuantLinear)]
    assert len(scales) == 14 and all(s.item() > 0 for s in scales)
    fp, _, _ = load_model(str(model_dir))
    ids = torch.randint(0, 300, (2, 33))
    assert sqnr_db(_logits(fp, ids), _logits(model, ids)) > 20


def test_ignore_patterns_keep_layers_float(tmp_path: Path) -> None:
    model_dir, text = tiny_setup(tmp_path)
    stage = {
        "quantize": {
            "weights": {"bits": 4},
            "ignore": ["*.mlp.down_proj", "re:layers\\.0\\.self_attn"],
        }
    }
    model = apply_stages(parse_recipe(tiny_recipe(model_dir, text, [stage])))
    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    assert "model.layers.1.mlp.gate_proj" in quantized
    assert not any(n.endswith("down_proj") for n in quantized)
    assert not any(n.startswith("model.layers.0.self_attn") for n in quantized)
    assert len(quantized) == 14 - 2 - 4


def test_existing_output_is_refused_before_any_work(tmp_path: Path) -> None:
    model_dir, text = tiny_setup(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    recipe = parse_recipe(tiny_recipe(model_dir, text, [W8A8]))
    with pytest.raises(ExportError) as e:
        run_recipe(recipe, out)
    assert (
        str(e.value) == f"output '{out}' already exists; pass --overwrite or choose another folder"
    )
    assert (out / "keep.txt").read_text() == "mine"


def test_overwrite_replaces_whole_folder(tmp_path: Path) -> None:
    model_dir, text = tiny_setup(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    run_recipe(parse_recipe(tiny_recipe(model_dir, text, [W8A8])), out, overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()


def test_output_equal_to_input_is_refused(tmp_path: Path) -> None:
    model_dir, text = tiny_setup(tmp_path)
    recipe = parse_recipe(tiny_recipe(model_dir, text, [W8A8]))
    with pytest.raises(ExportError, match="would overwrite the input model"):
        run_recipe(recipe, model_dir, overwrite=True)
    assert (model_dir / "config.json").is_file()


def test_no_stages_exports_a_float_model_plain_transformers_loads(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    model_dir, text = tiny_setup(tmp_path)
    out = tmp_path / "fp"
    run_recipe(parse_recipe(tiny_recipe(model_dir, text, [])), out)
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg
    ids = torch.randint(0, 300, (1, 9))
    plain = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    fp, _, _ = load_model(str(model_dir))
    assert torch.equal(_logits(plain, ids), _logits(fp, ids))


def test_offload_gives_the_same_model_and_perplexity(tmp_path: Path) -> None:
    # On the CPU the offload hooks move nothing, but they run the same code path as on a GPU:
    # weights held by accelerate's hooks, one block at a time on the compute device.
    model_dir, text = tiny_setup(tmp_path)
    stages = [STATIC]
    plain = run_recipe(parse_recipe(tiny_recipe(model_dir, text, stages)), None).metrics
    off = run_recipe(parse_recipe(tiny_recipe(model_dir, text, stages, offload=True)), None)
    assert off.metrics["baseline"]["ppl"] == plain["baseline"]["ppl"]
    assert off.metrics["compressed"]["ppl"] == plain["compressed"]["ppl"]
    assert not any(t.is_meta for t in off.model.state_dict().values())
    assert not any(hasattr(m, "_hf_hook") for m in off.model.modules())


def test_bert_encoder_is_quantized_and_exported_without_evaluation(tmp_path: Path) -> None:
    from tersa.errors import DataError

    model_dir, text = tiny_setup(tmp_path, "bert")
    with pytest.raises(DataError) as e:
        run_recipe(parse_recipe(tiny_recipe(model_dir, text, [W8A8])), None)
    assert str(e.value) == (
        "perplexity needs a causal language model; 'bert' is an encoder. "
        "Set 'evaluation: null' in the recipe to compress it without evaluation"
    )
    out = tmp_path / "out"
    result = run_recipe(parse_recipe(tiny_recipe(model_dir, text, [W8A8], evaluation=None)), out)
    assert "ppl" not in result.metrics["compressed"]
    loaded = load_export(out)
    n_quant = sum(isinstance(m, QuantLinear) for m in loaded.modules())
    assert n_quant == 2 * 6  # query, key, value, attention output, intermediate, output per layer
    ids = torch.randint(0, 300, (2, 9))
    assert torch.equal(_logits(loaded, ids), _logits(result.model, ids))
