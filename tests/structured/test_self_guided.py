"""Self-guided wrapper: exact ends of the mix, the dense path skipped at alpha 0, the cosine
schedule."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
from torch import nn

from tersa.structured.layers import BlockDense, LowRank
from tersa.structured.self_guided import SelfGuided, cosine_alpha


def pair() -> tuple[nn.Linear, LowRank, SelfGuided]:
    dense, structured = nn.Linear(12, 10), LowRank(12, 10, 3)
    return dense, structured, SelfGuided(dense, structured)


def test_alpha_one_is_the_dense_layer_exactly() -> None:
    dense, _, guided = pair()
    x = torch.randn(4, 12)
    assert torch.equal(guided(x), dense(x))


def test_alpha_zero_is_the_structured_layer_and_skips_dense() -> None:
    dense, structured, guided = pair()
    guided.alpha = 0.0
    calls = []
    dense.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randn(2, 3, 12)
    assert torch.equal(guided(x), structured(x))
    assert not calls


def test_mix_in_between() -> None:
    dense, structured, guided = pair()
    guided.alpha = 0.25
    x = torch.randn(4, 12)
    torch.testing.assert_close(guided(x), 0.25 * dense(x) + 0.75 * structured(x))


def test_from_structured_starts_at_the_factor_product() -> None:
    structured = BlockDense(12, 10, 6, 3, dtype=torch.float64)
    guided = SelfGuided.from_structured(structured, alpha=0.5)
    x = torch.randn(5, 12, dtype=torch.float64)
    torch.testing.assert_close(guided(x), structured(x))
    assert guided.dense.weight.dtype == torch.float64 and guided.finalize() is structured


def test_cosine_alpha() -> None:
    assert cosine_alpha(0, 100) == 1.0
    assert cosine_alpha(50, 100) == pytest.approx(0.5)
    assert cosine_alpha(25, 100) == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert cosine_alpha(100, 100) == 0.0 and cosine_alpha(150, 100) == 0.0
    values = [cosine_alpha(s, 10) for s in range(11)]
    assert all(a > b for a, b in pairwise(values))


def test_errors() -> None:
    _, _, guided = pair()
    with pytest.raises(ValueError) as err:
        guided.alpha = 1.5
    assert str(err.value) == "alpha must be in [0, 1], got 1.5"
    with pytest.raises(ValueError) as err:
        SelfGuided(nn.Linear(12, 11), LowRank(12, 10, 3))
    assert str(err.value) == "dense is 12 -> 11 but structured is 12 -> 10"
    with pytest.raises(ValueError) as err:
        cosine_alpha(1, 0)
    assert str(err.value) == "total_steps must be >= 1, got 0"
    with pytest.raises(ValueError) as err:
        cosine_alpha(-1, 10)
    assert str(err.value) == "step must be >= 0, got -1"
