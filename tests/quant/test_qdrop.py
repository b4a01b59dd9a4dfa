"""QDrop block reconstruction: config checks, block error against RTN, the stage, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tersa.quant.qdrop as qdrop_module
from tersa.calib import capture_block_inputs
from tersa.errors import RecipeError
from tersa.models.adapters import get_adapter, get_blocks
from tersa.models.tiny import tiny_model
from tersa.pipeline import run_recipe
from tersa.quant.qdrop import QDropConfig, reconstruct_block
from tersa.quant.qlinear import QuantLinear
from tersa.quant.replace import find_linears, replace_linear
from tersa.quant.scheme import ActivationScheme, WeightScheme
from tersa.recipe import parse_recipe
from tersa.workarea import work_area
from tests.helpers import tiny_recipe, tiny_setup

W3G = WeightScheme(bits=3, granularity="group", group_size=16)
A4T = ActivationScheme(bits=4, granularity="token")
QDROP_W3A4 = {
    "quantize": {
        "method": "qdrop",
        "weights": {"bits": 3, "granularity": "group", "group_size": 16},
        "activations": {"bits": 4},
        "qdrop": {"iters": 12},
    }
}


def _block_setup(family: str = "llama"):
    model = tiny_model(family, seed=0).eval()
    adapter = get_adapter(model)
    blocks = get_blocks(model, adapter)
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (8, 32))
    cache = capture_block_inputs(model, blocks, ids, 4, torch.device("cpu"))
    block = blocks[0]
    targets = cache.run(block)
    return block, cache, targets


def _block_error(block, cache, targets) -> float:
    outs = cache.run(block)
    return sum((o - t).pow(2).sum().item() for o, t in zip(outs, targets, strict=True))


def _rtn(block) -> None:
    for name, lin in find_linears(block).items():
        replace_linear(block, name, QuantLinear.from_float(lin, W3G, A4T))


def _reconstructed_error(cfg: QDropConfig) -> float:
    block, cache, targets = _block_setup()
    names = list(find_linears(block))
    reconstruct_block(block, names, cache, cache.hidden, targets, W3G, A4T, cfg, seed=0)
    assert all(isinstance(block.get_submodule(n), QuantLinear) for n in names)
    return _block_error(block, cache, targets)


@pytest.mark.parametrize("drop_prob", [1.0, 0.5])
def test_reconstruction_lowers_block_error_against_rtn(drop_prob: float) -> None:
    rtn_block, cache, targets = _block_setup()
    _rtn(rtn_block)
    rtn_error = _block_error(rtn_block, cache, targets)
    # The starting point: the MSE-observer grid with nearest rounding (no step really moves V).
    start = _reconstructed_error(QDropConfig(iters=1, lr=1e-12, drop_prob=drop_prob))
    learned = _reconstructed_error(QDropConfig(iters=60, batch_size=4, drop_prob=drop_prob))
    print(f"drop_prob {drop_prob}: RTN {rtn_error:.4g}, start {start:.4g}, learned {learned:.4g}")
    assert learned < 0.7 * rtn_error
    assert learned < 0.85 * start


def test_qdrop_config_errors_name_the_key() -> None:
    def error(q: dict) -> str:
        with pytest.raises(RecipeError) as info:
            parse_recipe({"model": "m", "stages": [{"quantize": q}]})
        return str(info.value)

    at = "recipe: stages[0].quantize"
    assert error({"qdrop": {"iters": 3}}) == (
        f"{at}: a 'qdrop' section needs method: qdrop (the method is 'rtn')"
    )
    assert error({"method": "qdrop", "qdrop": {"drop_prob": 1.5}}) == (
        f"{at}.qdrop.drop_prob: input should be less than or equal to 1 (got 1.5)"
    )
    assert error({"method": "qdrop", "qdrop": {"beta_start": 2.0, "beta_end": 5.0}}) == (
        f"{at}.qdrop: beta_end (5.0) must not exceed beta_start (2.0): β is annealed downwards"
    )
    unknown = error({"method": "qdrop", "qdrop": {"keep_prob": 0.5}})
    assert unknown.startswith(f"{at}.qdrop.keep_prob: unknown key 'keep_prob'; allowed: iters,")
    assert "drop_prob" in unknown
    cfg = parse_recipe({"model": "m", "stages": [{"quantize": {"method": "qdrop"}}]}).stages[0][1]
    assert cfg.qdrop == QDropConfig() and cfg.needs_calibration


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_qdrop_stage_quantizes_every_block_and_beats_rtn(tmp_path: Path, family: str) -> None:
    model_dir, text = tiny_setup(tmp_path, family)
    keep = ("weights", "activations")
    rtn = {"quantize": {k: v for k, v in QDROP_W3A4["quantize"].items() if k in keep}}
    base = tiny_recipe(model_dir, text, [rtn])
    rtn_ppl = run_recipe(parse_recipe(base), None).metrics["compressed"]["ppl"]
    result = run_recipe(parse_recipe({**base, "stages": [QDROP_W3A4]}), None)
    fresh = tiny_model(family)
    in_blocks = sum(len(find_linears(b)) for b in get_blocks(fresh, get_adapter(fresh)))
    quantized = [m for m in result.model.modules() if isinstance(m, QuantLinear)]
    assert len(quantized) == in_blocks
    assert all(q.weights == W3G and q.activations == A4T for q in quantized)
    fp = result.metrics["baseline"]["ppl"]
    # Random tiny models sit near uniform perplexity; QDrop stays at least as close to float.
    assert abs(result.metrics["compressed"]["ppl"] - fp) <= abs(rtn_ppl - fp) + 0.05 * fp


def test_resume_skips_finished_blocks_and_gives_the_same_export(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir, text = tiny_setup(tmp_path)
    recipe = parse_recipe(tiny_recipe(model_dir, text, [QDROP_W3A4]))
    clean = run_recipe(recipe, tmp_path / "clean")

    calls: list[str] = []
    original = qdrop_module.reconstruct_block

    def crash_on_second(*args, **kwargs):
        calls.append(kwargs["title"])
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated crash")
        return original(*args, **kwargs)

    monkeypatch.setattr(qdrop_module, "reconstruct_block", crash_on_second)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        run_recipe(recipe, out)
    assert not out.exists()
    saved = sorted(p.name for p in work_area(out).rglob("block-*.safetensors"))
    assert saved == ["block-000.safetensors"]

    calls.clear()
    monkeypatch.setattr(qdrop_module, "reconstruct_block", original)
    counted: list[str] = []
    monkeypatch.setattr(
        qdrop_module,
        "reconstruct_block",
        lambda *a, **k: (counted.append(k["title"]), original(*a, **k))[1],
    )
    resumed = run_recipe(recipe, out, resume=True)
    n_blocks = resumed.model.config.num_hidden_layers
    assert len(counted) == n_blocks - 1 and "block 1/" not in counted[0]
    assert not work_area(out).exists()
    a = load_file(str(tmp_path / "clean" / "model.safetensors"))
    b = load_file(str(out / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert json.loads((out / "metrics.json").read_text())["compressed"]["ppl"] == pytest.approx(
        clean.metrics["compressed"]["ppl"]
    )


def test_resume_refuses_a_work_area_of_another_recipe(tmp_path: Path) -> None:
    model_dir, text = tiny_setup(tmp_path)
    out = tmp_path / "out"
    area = work_area(out)
    area.mkdir()
    (area / "manifest.json").write_text('{"fingerprint": "0000"}')
    recipe = parse_recipe(tiny_recipe(model_dir, text, [QDROP_W3A4]))
    with pytest.raises(RecipeError, match="made by a different recipe"):
        run_recipe(recipe, out, resume=True)
    run_recipe(recipe, out)  # without --resume the stale area is cleared
    assert (out / "model.safetensors").exists() and not area.exists()
