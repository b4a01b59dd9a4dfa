"""The long-range recall probe: deterministic construction and exact indexing of its scores."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tersa.errors import DataError
from tersa.kv.probe import build_recall_probe, recall_scores, token_nll
from tests.kv.helpers import random_ids, tiny_ratplus

STREAM = torch.arange(5000) % 97  # a token stream (ids < the tiny vocab)


def test_probe_is_deterministic_and_repeats_the_passage() -> None:
    a = build_recall_probe(STREAM, n=5, passage=16, gap=40, prefix=8, seed=3)
    b = build_recall_probe(STREAM, n=5, passage=16, gap=40, prefix=8, seed=3)
    assert torch.equal(a.ids, b.ids) and a.ids.shape == (5, 8 + 16 + 40 + 16)
    assert (a.first, a.repeat, a.passage, a.gap) == (8, 64, 16, 40)
    assert torch.equal(a.ids[:, 8:24], a.ids[:, 64:80])
    assert not torch.equal(a.ids, build_recall_probe(STREAM, 5, 16, 40, 8, seed=4).ids)


def test_probe_rejects_a_short_text() -> None:
    with pytest.raises(DataError, match="fewer than one example needs"):
        build_recall_probe(torch.arange(50), n=1, passage=16, gap=40, prefix=8)


class Oracle(nn.Module):
    """Predicts every next token of the probe sequences right, except where told to be wrong."""

    def __init__(self, ids: torch.Tensor, wrong_at: int | None = None) -> None:
        super().__init__()
        self.ids, self.wrong_at = ids, wrong_at

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False) -> object:
        row = next(i for i in range(self.ids.shape[0]) if torch.equal(self.ids[i], input_ids[0]))
        nxt = torch.cat([self.ids[row, 1:], self.ids[row, :1]])  # [L]
        if self.wrong_at is not None:
            nxt[self.wrong_at - 1] = (nxt[self.wrong_at - 1] + 1) % 97
        logits = torch.full((1, nxt.numel(), 97), -30.0).scatter(2, nxt.view(1, -1, 1), 30.0)
        return type("Out", (), {"logits": logits})()


def test_scores_read_the_right_positions() -> None:
    probe = build_recall_probe(STREAM, n=3, passage=32, gap=20, prefix=4, seed=0)
    right = recall_scores(Oracle(probe.ids), probe, cue=8, span=16)
    assert right["exact"].all() and right["nll_repeat"].max() < 1e-6
    # a wrong token right after the span leaves the match; one inside it breaks it
    after = recall_scores(Oracle(probe.ids, probe.repeat + 8 + 16), probe, cue=8, span=16)
    inside = recall_scores(Oracle(probe.ids, probe.repeat + 8 + 15), probe, cue=8, span=16)
    assert after["exact"].all() and not inside["exact"].any()
    assert inside["nll_repeat"].min() > 1.0 and inside["nll_first"].max() < 1e-6


def test_token_nll_pairs_with_the_model_loss() -> None:
    model = tiny_ratplus()
    ids = random_ids(3, 20)
    nll = token_nll(model, ids, batch_size=2)
    assert nll.shape == (3, 19) and nll.dtype == torch.float64
    with torch.no_grad():
        loss = model(ids, labels=ids, use_cache=False).loss
    assert nll.mean().item() == pytest.approx(loss.item(), rel=1e-5)
