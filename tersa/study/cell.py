"""One study cell: a model under one KV policy and budget, at one context length, on every task.

Every task follows the decode protocol of :mod:`tersa.kv.policies.attention` in one teacher-forced
pass per example: the prompt runs dense and what is scored runs under the policy.

- ``passkey`` / ``needle`` (:mod:`tersa.eval.longctx`): a ``context``-token prompt; its last token
  and the answer decode under the policy. ``*_exact``: the share of answers greedy decoding gets
  exactly right.
- ``recall`` (:mod:`tersa.kv.probe`): ``[prefix | passage | gap | passage]`` of ``context`` tokens
  (64-token prefix unless ``gap`` is set); the repeat decodes under the policy. ``recall_nll``: the
  mean NLL of the repeat; ``recall_exact``: the share of 16-token greedy continuations after 8 cue
  tokens that are exact.
- ``ppl``: windows of ``context`` tokens spread over the evaluation text; the first half is the
  prompt, the perplexity is over the second half (decoded under the policy).

Text: the embedded Shakespeare evaluation split (plays no calibration saw). KV metrics
(:mod:`tersa.kv.policies.memory`) are at the context length.
"""

from __future__ import annotations

import dataclasses
import math
from functools import lru_cache
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedTokenizerBase

from tersa.data.sources import load_text
from tersa.data.tokens import eval_windows, tokenize_text
from tersa.errors import DataError
from tersa.eval.longctx import answer_scores, needle_examples, passkey_examples
from tersa.kv.policies import kv_policy, make_policy
from tersa.kv.policies.memory import KVLayout, kv_traffic
from tersa.kv.probe import build_recall_probe, recall_scores
from tersa.study.schema import Cell, TasksConfig

RECALL_PREFIX = 64
RECALL_CUE, RECALL_SPAN = 8, 16


@lru_cache(maxsize=4)
def _text_ids(tokenizer: PreTrainedTokenizerBase) -> torch.Tensor:
    return tokenize_text(tokenizer, load_text("embedded:shakespeare", "evaluation", "text"))


def evaluate_cell(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    cell: Cell,
    tasks: TasksConfig,
    seed: int,
) -> dict[str, float]:
    """Flat metrics of ``model`` under the cell's policy (see the module doc)."""
    policy = make_policy({"name": cell.policy, "budget": cell.budget, **cell.options})
    traffic = kv_traffic(policy, KVLayout.of(model), cell.context)
    metrics: dict[str, float] = {
        "kv_bytes_kept": traffic.kept_bytes,
        "kv_bytes_read": traffic.read_bytes,
        "kv_fraction_kept": round(traffic.kept_fraction, 6),
        "kv_fraction_read": round(traffic.read_fraction, 6),
    }
    device = next(model.parameters()).device
    ids = _text_ids(tokenizer)

    def logits_fn(seq: torch.Tensor, prefill: int) -> torch.Tensor:
        # the prompt's last token is the first decode step (it predicts the answer's first token)
        with torch.no_grad(), kv_policy(model, policy, prefill=prefill - 1):
            return model(input_ids=seq.to(device), use_cache=False).logits.float().cpu()

    if tasks.passkey is not None:
        examples = passkey_examples(tokenizer, ids, cell.context, tasks.passkey.n, seed=seed)
        metrics["passkey_exact"] = _share(answer_scores(logits_fn, examples)["exact"])
    if tasks.needle is not None:
        examples = needle_examples(
            tokenizer, ids, cell.context, tasks.needle.n, keys=tasks.needle.keys, seed=seed
        )
        metrics["needle_exact"] = _share(answer_scores(logits_fn, examples)["exact"])
    if tasks.recall is not None:
        metrics.update(_recall(model, policy, ids, cell.context, tasks, seed, device))
    if tasks.ppl is not None:
        metrics["ppl"] = _ppl(logits_fn, ids, cell.context, tasks.ppl.windows)
    return metrics


def _share(flags: torch.Tensor) -> float:
    return round(float(flags.float().mean()), 6)


def _recall(
    model: nn.Module,
    policy: Any,
    ids: torch.Tensor,
    context: int,
    tasks: TasksConfig,
    seed: int,
    device: torch.device,
) -> dict[str, float]:
    task = tasks.recall
    assert task is not None
    gap = task.gap if task.gap is not None else context - 2 * task.passage - RECALL_PREFIX
    prefix = context - 2 * task.passage - gap
    if gap < 0 or prefix < 0:
        raise DataError(
            f"recall: a passage of {task.passage} tokens repeated after a gap of {gap} does not "
            f"fit in a context of {context}; lower passage or gap"
        )
    probe = build_recall_probe(ids, task.n, task.passage, gap, prefix, seed=seed)
    probe = dataclasses.replace(probe, ids=probe.ids.to(device))
    with kv_policy(model, policy, prefill=probe.repeat):
        scores = recall_scores(model, probe, cue=RECALL_CUE, span=RECALL_SPAN)
    return {
        "recall_nll": round(float(scores["nll_repeat"].mean()), 6),
        "recall_exact": _share(scores["exact"]),
    }


def _ppl(logits_fn: Any, ids: torch.Tensor, context: int, windows: int) -> float:
    """Perplexity of the second half of each window, the first half its prompt."""
    prompt = context // 2
    total, count = 0.0, 0
    for window in eval_windows(ids, context, windows, spread=True):
        # logits_fn takes the prompt length and decodes from its last token on
        logits = logits_fn(window[None], prompt + 1)[0]  # [L, V]
        targets = window[prompt + 1 :]
        nll = F.cross_entropy(logits[prompt:-1], targets, reduction="sum")
        total, count = total + float(nll), count + targets.numel()
    if count == 0:
        raise DataError(f"ppl: the evaluation text holds no window of {context} tokens")
    return round(math.exp(total / count), 6)
