"""RAT+ models go through compression recipes like any family (``models/families.py`` RATPLUS):
OS+ and W8A8 calibrate block by block, the export reloads with tersa's quantized linears, and
``tersa eval`` scores the export exactly as the run scored the model in memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tersa.cli import main
from tersa.kv import RatPlusForCausalLM
from tersa.loading import open_model
from tersa.pipeline import run_recipe
from tersa.quant.qlinear import QuantLinear
from tersa.recipe import parse_recipe
from tests.helpers import tiny_recipe, tiny_setup

W8A8 = {
    "method": "rtn",
    "weights": {"bits": 8, "granularity": "channel"},
    "activations": {"bits": 8, "granularity": "token"},
}


@pytest.mark.parametrize("attention", ["ratplus", "attention"])
def test_osplus_w8a8_export_reloads_and_evaluates_the_same(
    tmp_path: Path, attention: str, capsys
) -> None:
    checkpoint, text = tiny_setup(tmp_path, family="ratplus")
    if attention != "ratplus":  # the plain-attention twin: no forget gate in the norm group
        config = checkpoint / "config.json"
        config.write_text(config.read_text().replace('"ratplus"', '"attention"', 1))
    loaded, _, _ = open_model(str(checkpoint))
    assert loaded.config.attention == attention
    stages = [{"os_plus": {"grid": 8, "refine": 1}}, {"quantize": W8A8}]
    out = tmp_path / "out"
    result = run_recipe(parse_recipe(tiny_recipe(checkpoint, text, stages)), out)
    gates = [m.self_attn.out_gate_proj for m in result.model.model.layers]
    assert all(isinstance(g, QuantLinear) for g in gates)

    model, _, folder = open_model(str(out))
    assert folder == out and isinstance(model, RatPlusForCausalLM)
    assert isinstance(model.model.layers[0].self_attn.q_proj, QuantLinear)
    ids = torch.randint(3, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = result.model(input_ids=ids, use_cache=False).logits
        assert torch.equal(model(input_ids=ids, use_cache=False).logits, want)

    capsys.readouterr()
    argv = [
        "eval",
        str(out),
        "--data",
        str(text),
        "--seq-len",
        "64",
        "--max-windows",
        "6",
        "--spread",
        "-q",
    ]
    assert main(argv) == 0
    ppl = float(capsys.readouterr().out.split("ppl=")[1].split()[0])
    assert ppl == pytest.approx(result.metrics["compressed"]["ppl"], abs=1e-4)
