"""Block-by-block propagation reproduces the full forward pass."""

from __future__ import annotations

import pytest
import torch

from tersa.calib import capture_block_inputs, run_blockwise
from tersa.models.adapters import get_adapter, get_blocks, resolve
from tersa.models.tiny import tiny_model


@pytest.mark.parametrize("family", ["llama", "qwen2", "opt", "gpt2"])
def test_propagated_hidden_states_match_full_forward(family: str) -> None:
    model = tiny_model(family)
    adapter = get_adapter(model)
    blocks = get_blocks(model, adapter)
    ids = torch.randint(0, 300, (5, 19))
    cache = capture_block_inputs(model, blocks, ids, batch_size=2, device=torch.device("cpu"))
    assert [h.shape[0] for h in cache.hidden] == [2, 2, 1]
    for block in blocks:
        cache.advance(block)
    with torch.no_grad():
        out = model(input_ids=ids, use_cache=False, output_hidden_states=True)
    norm = model.get_submodule(resolve(model, adapter, adapter.final_norm))
    got = norm(torch.cat(cache.hidden))
    torch.testing.assert_close(got, out.hidden_states[-1], rtol=1e-5, atol=1e-5)


def test_run_blockwise_visits_blocks_in_order_with_their_inputs() -> None:
    model = tiny_model("llama")
    blocks = get_blocks(model)
    ids = torch.randint(0, 300, (3, 11))
    seen: list[tuple[int, torch.Tensor]] = []
    progress: list[tuple[int, int]] = []

    def process(i, block, cache):
        assert block is blocks[i]
        seen.append((i, torch.cat(cache.hidden).clone()))

    run_blockwise(
        model, blocks, ids, process, batch_size=2, on_block=lambda d, t: progress.append((d, t))
    )
    assert [i for i, _ in seen] == [0, 1] and progress == [(1, 2), (2, 2)]
    with torch.no_grad():
        states = model(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states
    torch.testing.assert_close(seen[0][1], states[0])
    torch.testing.assert_close(seen[1][1], states[1], rtol=1e-5, atol=1e-5)


def test_a_block_changed_by_the_stage_feeds_its_new_outputs_forward() -> None:
    model = tiny_model("llama")
    blocks = get_blocks(model)
    ids = torch.randint(0, 300, (2, 7))
    inputs: list[torch.Tensor] = []

    def process(i, block, cache):
        inputs.append(torch.cat(cache.hidden).clone())
        if i == 0:
            with torch.no_grad():
                block.mlp.down_proj.weight.mul_(3.0)

    run_blockwise(model, blocks, ids, process)
    with torch.no_grad():
        states = model(input_ids=ids, use_cache=False, output_hidden_states=True).hidden_states
    torch.testing.assert_close(inputs[1], states[1], rtol=1e-5, atol=1e-5)
