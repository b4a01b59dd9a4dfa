"""StructuredLinear pre-merge: the dense-vs-factored choice per call, equal outputs both ways,
and a merged-weight cache that follows parameter updates and dtype changes."""

from __future__ import annotations

import pytest
import torch

from tersa.structured.base import StructuredLinear
from tersa.structured.layers import BlockDense, BlockShuffle, LowRank

F64 = torch.float64


def layers(merge_below: int | None) -> list[StructuredLinear]:
    """One layer of each kind, 12 -> 18, with the same seed for every ``merge_below``."""
    torch.manual_seed(1)
    return [
        LowRank(12, 18, 4, merge_below=merge_below, dtype=F64),
        BlockDense(12, 18, 6, 3, merge_below=merge_below, dtype=F64),
        BlockShuffle(12, 18, 3, merge_below=merge_below, dtype=F64),
    ]


def count_factored(layer: StructuredLinear, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Patch ``layer.factored`` to count its calls; returns the one-element counter."""
    calls = [0]
    original = layer.factored

    def counted(x: torch.Tensor) -> torch.Tensor:
        calls[0] += 1
        return original(x)

    monkeypatch.setattr(layer, "factored", counted)
    return calls


@pytest.mark.parametrize("tokens", [1, 3, 7, 40])
def test_merged_and_factored_outputs_agree(tokens: int) -> None:
    x = torch.randn(tokens, 12, dtype=F64)
    with torch.no_grad():
        for factored, merged in zip(layers(None), layers(10**6), strict=True):
            torch.testing.assert_close(merged(x), factored(x), rtol=1e-12, atol=1e-12)


def test_choice_by_token_count(monkeypatch: pytest.MonkeyPatch) -> None:
    for layer in layers(merge_below=4):
        calls = count_factored(layer, monkeypatch)
        layer(torch.randn(3, 12, dtype=F64))  # 3 tokens < 4: merged
        layer(torch.randn(1, 3, 12, dtype=F64))
        assert calls[0] == 0
        layer(torch.randn(2, 2, 12, dtype=F64))  # 4 tokens: factored
        assert calls[0] == 1


def test_never_merges_without_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = layers(None)[0]
    calls = count_factored(layer, monkeypatch)
    layer(torch.randn(1, 12, dtype=F64))
    assert calls[0] == 1


def test_cache_follows_in_place_updates_and_dtype() -> None:
    for layer in layers(merge_below=8):
        x = torch.randn(2, 12, dtype=F64)
        with torch.no_grad():
            layer(x)
            cached = layer.merged_weight()
            assert layer.merged_weight() is cached  # unchanged factors: no rebuild
            for p in layer.factors():
                p.mul_(2.0)  # what an optimizer step or load_state_dict does
            torch.testing.assert_close(layer(x), x @ layer.dense_weight().t() + layer.bias)
            layer.float()
            assert layer(x.float()).dtype == torch.float32


def test_gradients_flow_through_the_merged_path() -> None:
    merged, factored = layers(10**6)[2], layers(None)[2]
    x = torch.randn(3, 12, dtype=F64)
    merged(x).square().sum().backward()
    factored(x).square().sum().backward()
    for a, b in zip(merged.parameters(), factored.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad)


def test_rejects_negative_threshold() -> None:
    with pytest.raises(ValueError) as err:
        LowRank(12, 18, 4, merge_below=-1)
    assert str(err.value) == "merge_below must be None or >= 0, got -1"
