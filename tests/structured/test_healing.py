"""Healing after the fits: self-guided (cosine α, guides dropped) and plain fine-tuning both lower
the calibration loss; only the structured factors train by default; refusals."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tersa.errors import RecipeError
from tersa.models.tiny import tiny_model
from tersa.structured.base import StructuredLinear
from tersa.structured.config import HealingConfig
from tersa.structured.healing import alpha_at
from tersa.structured.self_guided import SelfGuided, cosine_alpha
from tersa.structured.stage import INFO_KEY
from tests.structured.helpers import calibration, run

HEAL = {"steps": 8, "lr": 3e-3, "batch_size": 4, "guided_fraction": 0.5}


def heal(mode: str, **fields: object) -> tuple[nn.Module, dict]:
    stage = {"fraction": 0.5, "healing": {**HEAL, "mode": mode, **fields}}
    model, ctx, _ = run(tiny_model("llama"), [{"structured_ffn": stage}], calibration(8, 32))
    return model, ctx.info[INFO_KEY]["healing"]


@pytest.mark.parametrize("mode", ["self_guided", "plain"])
def test_healing_lowers_the_calibration_loss(mode: str) -> None:
    model, record = heal(mode)
    assert record["mode"] == mode and record["steps"] == 8 and not record["stopped_early"]
    assert record["loss_after"] < record["loss_before"]
    assert not any(isinstance(m, SelfGuided) for m in model.modules())  # guides dropped
    assert sum(isinstance(m, StructuredLinear) for m in model.modules()) == 3
    assert all(p.requires_grad for p in model.parameters())  # flags restored


def test_self_guided_follows_the_cosine_schedule() -> None:
    _, record = heal("self_guided")
    guided = 4  # guided_fraction 0.5 of 8 steps
    assert record["alphas"] == [cosine_alpha(s, guided) for s in range(8)]
    assert record["alphas"][0] == 1.0 and record["alphas"][guided:] == [0.0] * 4
    _, plain = heal("plain")
    assert plain["alphas"] == [0.0] * 8


def test_only_the_structured_layers_train_by_default() -> None:
    before = tiny_model("llama").state_dict()
    model, _ = heal("plain")
    after = model.state_dict()
    for name in ("model.layers.1.self_attn.q_proj.weight", "model.embed_tokens.weight"):
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=0)
    model, _ = heal("plain", train="all")
    assert not torch.equal(model.state_dict()["model.layers.1.self_attn.q_proj.weight"],
                           before["model.layers.1.self_attn.q_proj.weight"])  # fmt: skip


def test_time_budget_stops_early_and_bends_alpha() -> None:
    _, record = heal("self_guided", max_seconds=1e-9)
    assert record["stopped_early"] and record["steps"] == 0 and record["losses"] == []
    cfg = HealingConfig(steps=100, guided_fraction=0.5, max_seconds=10.0)
    assert alpha_at(0, 0.0, cfg) == 1.0
    assert alpha_at(10, 5.0, cfg) == 0.0  # half the time spent: the guided phase is over
    assert alpha_at(25, 1.0, cfg) == cosine_alpha(25, 50)  # steps ahead of the clock


def test_healing_refuses_an_encoder() -> None:
    stage = {"fraction": 0.5, "healing": HEAL}
    with pytest.raises(RecipeError) as err:
        run(tiny_model("bert"), [{"structured_ffn": stage}])
    assert str(err.value) == (
        "structured_ffn.healing trains on the causal-LM loss; a bert model is not causal: set "
        "healing: null"
    )
