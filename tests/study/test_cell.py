"""The study's cell evaluator on a tiny model: every metric, budget 1.0 equal to dense, a small
budget that changes what the policy touches and nothing else."""

from __future__ import annotations

import pytest

from tersa.models.tiny import tiny_model, tiny_tokenizer
from tersa.study.cell import evaluate_cell
from tersa.study.schema import (
    Cell,
    NeedleTask,
    PasskeyTask,
    PplTask,
    RecallTask,
    TasksConfig,
)

TASKS = TasksConfig(
    passkey=PasskeyTask(n=2),
    needle=NeedleTask(n=2, keys=2),
    recall=RecallTask(n=2, passage=24),
    ppl=PplTask(windows=2),
)
MODEL, TOKENIZER = tiny_model("llama"), tiny_tokenizer()


def run(policy: str, budget, **options):
    cell = Cell("tiny", "fp", policy, budget, 240, options)
    return evaluate_cell(MODEL, TOKENIZER, cell, TASKS, seed=0)


def test_every_metric_and_its_range() -> None:
    metrics = run("quest", 0.25, page=8)
    assert set(metrics) == set(TASKS.metrics())
    for name in ("passkey_exact", "needle_exact", "recall_exact"):
        assert metrics[name] in (0.0, 0.5, 1.0)
    assert metrics["ppl"] > 1.0 and metrics["recall_nll"] > 0.0
    assert metrics["kv_fraction_kept"] > 1.0  # the whole cache plus page bounds
    assert metrics["kv_fraction_read"] < 1.0


@pytest.mark.parametrize("policy", ["streaming", "snapkv", "quest", "moba"])
def test_budget_one_equals_dense(policy: str) -> None:
    assert run(policy, 1.0) == run("dense", 1.0)


def test_small_budget_moves_quality_and_bytes() -> None:
    dense, sparse = run("dense", 1.0), run("streaming", 16, sinks=4)
    assert sparse["kv_fraction_kept"] == pytest.approx(16 / 240, abs=1e-6)
    assert sparse["ppl"] != dense["ppl"] and sparse["recall_nll"] != dense["recall_nll"]
