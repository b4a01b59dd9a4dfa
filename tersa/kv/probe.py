"""A long-range recall probe, and per-token NLLs for paired comparisons of KV patterns.

Perplexity on plain text at short range rewards local context only (a window of 16 tokens is
nearly dense there), so it cannot show what dilated states are for. The probe asks for a copy
across a long gap, which a small model trained on plain text can do in context and a local window
cannot: each example is a stretch of held-out text ``[prefix | passage | gap]`` followed by the
passage again::

    | prefix (P0) | passage (P) | gap (G) | passage again (P) |
                  ^ first                 ^ repeat = P0 + P + G

A repeat token lies ``P + G`` positions after its first occurrence. Scored: the mean NLL of the
repeat (its tokens after the first, which nothing before the repeat cues) against the same
tokens' NLL at their first occurrence, and an exact match of the greedy continuation: after
``cue`` tokens of the repeat, do the next ``span`` tokens come out right? Greedy decoding
reproduces a span exactly iff every teacher-forced argmax in it is right (induction over the
span), so one forward pass gives it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tersa.errors import DataError


@dataclass(frozen=True)
class RecallProbe:
    """Probe sequences ``ids [N, L]`` with the passage at ``first`` and again at ``repeat``."""

    ids: torch.Tensor
    first: int
    repeat: int
    passage: int
    gap: int


def build_recall_probe(
    ids: torch.Tensor, n: int, passage: int = 64, gap: int = 768, prefix: int = 64, seed: int = 0
) -> RecallProbe:
    """``n`` probe sequences cut from the token stream ``ids [T]`` (deterministic for ``seed``).

    :param passage: tokens of the passage (``P``).
    :param gap: tokens of text between the passage and its repeat (``G``).
    :param prefix: tokens of text before the passage (``P0``), so it is not at the sequence start.
    :returns: ``RecallProbe`` with ``ids [n, prefix + 2·passage + gap]``.
    """
    if passage < 2 or gap < 0 or prefix < 0 or n < 1:
        raise DataError(
            f"probe needs passage >= 2, gap >= 0, prefix >= 0, n >= 1; got passage={passage}, "
            f"gap={gap}, prefix={prefix}, n={n}"
        )
    text_len = prefix + passage + gap
    if ids.numel() <= text_len:
        raise DataError(
            f"the probe text has {ids.numel()} tokens, fewer than one example needs "
            f"({text_len + 1}); lower gap or prefix"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - text_len, (n,), generator=gen)  # [n]
    text = ids[starts[:, None] + torch.arange(text_len)]  # [n, P0 + P + G]
    again = text[:, prefix : prefix + passage]  # [n, P]
    return RecallProbe(torch.cat([text, again], 1), prefix, prefix + passage + gap, passage, gap)


@torch.no_grad()
def token_nll(model: nn.Module, ids: torch.Tensor, batch_size: int = 1) -> torch.Tensor:
    """Next-token NLL of every position, so two patterns can be compared token by token.

    :param ids: windows ``[N, L]``.
    :returns: ``[N, L − 1]`` float64 (nats); entry ``i`` scores token ``i + 1``.
    """
    out = []
    for start in range(0, ids.shape[0], batch_size):
        batch = ids[start : start + batch_size]
        logits = model(input_ids=batch, use_cache=False).logits  # [B, L, V]
        nll = F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten(), reduction="none"
        )
        out.append(nll.view(batch.shape[0], -1).double())
    return torch.cat(out)


@torch.no_grad()
def recall_scores(
    model: nn.Module, probe: RecallProbe, cue: int = 8, span: int = 16, batch_size: int = 1
) -> dict[str, torch.Tensor]:
    """Per-example probe scores of ``model`` under its current KV pattern.

    :returns: ``nll_repeat [N]``: mean NLL of repeat tokens 1 .. P−1; ``nll_first [N]``: the same
        tokens at their first occurrence; ``exact [N]`` bool: the greedy continuation of ``span``
        tokens after ``cue`` repeat tokens matches the passage.
    """
    if cue < 1 or cue + span > probe.passage:
        raise DataError(
            f"need 1 <= cue and cue + span <= passage ({probe.passage}), got {cue}, {span}"
        )
    nlls, hits = [], []
    for start in range(0, probe.ids.shape[0], batch_size):
        batch = probe.ids[start : start + batch_size]
        logits = model(input_ids=batch, use_cache=False).logits  # [B, L, V]
        nll = F.cross_entropy(
            logits[:, :-1].transpose(1, 2).float(), batch[:, 1:], reduction="none"
        )
        nlls.append(nll.double())  # [B, L − 1]; entry i scores token i + 1
        lo = probe.repeat + cue  # first continuation token
        pred = logits[:, lo - 1 : lo - 1 + span].argmax(-1)  # [B, span]
        hits.append((pred == batch[:, lo : lo + span]).all(-1))
    nll = torch.cat(nlls)
    p = probe.passage
    return {
        "nll_repeat": nll[:, probe.repeat : probe.repeat + p - 1].mean(-1),
        "nll_first": nll[:, probe.first : probe.first + p - 1].mean(-1),
        "exact": torch.cat(hits),
    }
