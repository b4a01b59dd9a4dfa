"""Offline long-context retrieval tasks: passkey retrieval and multi-key needle-in-a-haystack.

Both tasks hide one or more short facts (needles) in a long stretch of ordinary text (the
haystack) and ask for one of them at the end, so that only a KV policy that keeps the needle's
keys and values reachable from the last position can answer::

    | haystack … | needle | … haystack … | question | answer |
    ^ 0          ^ depth · H             ^ L − Q    ^ L (= context)

* **passkey** (Landmark attention, LongLoRA): a 5-digit key in " The pass key is 71432. Remember
  it. 71432 is the pass key.", asked by " What is the pass key? The pass key is".
* **needle** (RULER's multi-key NIAH): ``keys`` needles " The special magic number for <word> is
  <7 digits>." with distinct words; the question asks for one word's number, the rest are
  distractors with different numbers.

Nothing is downloaded: the haystack is any token stream, usually the embedded plays::

    text = load_text("embedded:shakespeare", "evaluation", "text")
    haystack = tokenize_text(tokenizer, text)

The haystack is a contiguous slice of that stream from a seeded offset (moved to end before a word
start), ``H`` tokens long so that the prompt (haystack + needles + question) is exactly ``context``
tokens. Needles are tokenized on their own
and spliced in between haystack tokens, before a token that starts a word (one that decodes with
leading whitespace, looked for up to ``_SNAP`` tokens after the drawn depth), so the decoded
prompt reads as text with the needle sentence between two words. The answer is the tokenization
of the digits *as they follow the question*: question and answer are tokenized together and split
where the question alone ends, which must be a token boundary (else ``DataError``), so a
teacher-forced score sees exactly the tokens greedy decoding would have to produce.

Everything is drawn from one ``torch.Generator`` seeded with ``seed``: the same seed gives the same
tensors on every run and machine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerBase

from tersa.data.tokens import tokenize_text
from tersa.errors import DataError

PASSKEY_QUESTION = " What is the pass key? The pass key is"
# Common concrete nouns, one word each, for the multi-key needles; distinct per example.
WORDS = (
    "apple", "river", "candle", "garden", "window", "silver", "forest", "engine", "pencil",
    "marble", "harbor", "blanket", "ladder", "mirror", "rocket", "saddle", "tunnel", "violin",
    "walnut", "anchor", "basket", "copper", "dragon", "feather", "glacier", "hammer", "island",
    "jacket", "kettle", "lantern", "meadow", "orchid", "pepper", "ribbon", "shovel", "tiger",
    "umbrella", "wagon", "button", "cactus",
)  # fmt: skip
# How far past the drawn position to look for a word start: Shakespeare's words are a few tokens
# even for a byte-level tokenizer, so 16 nearly always finds one and moves the depth by < 16 / H.
_SNAP = 16


@dataclass(frozen=True)
class LongContextExample:
    """One prompt and the answer it asks for.

    :param prompt: ``[L]`` int64, the haystack with the needle(s) spliced in, then the question.
    :param answer: ``[A]`` int64, the expected continuation (the key's digits).
    :param depth: where the asked needle sits, as haystack tokens before it / haystack tokens
        (other needles not counted), in ``[0, 1]``.
    :param task: ``"passkey"`` or ``"needle"``.
    """

    prompt: torch.Tensor
    answer: torch.Tensor
    depth: float
    task: str


def passkey_examples(
    tokenizer: PreTrainedTokenizerBase,
    haystack_ids: torch.Tensor,
    context: int,
    n: int,
    seed: int = 0,
    depths: Sequence[float] | None = None,
) -> list[LongContextExample]:
    """``n`` passkey prompts of exactly ``context`` tokens, each with its own 5-digit key.

    :param haystack_ids: the haystack token stream ``[T]``.
    :param context: prompt length ``L`` (haystack + needle + question).
    :param depths: needle depth per example, each in ``[0, 1]``; default ``n`` evenly spaced in
        ``[0.1, 0.9]`` (0.5 when ``n`` is 1). The stored depth is where the needle landed after
        moving to a word start.
    :raises DataError: ``n < 1``, ``len(depths) != n``, a depth outside ``[0, 1]``, ``context`` too
        small for needle and question, or a haystack shorter than the prompt needs.
    """
    if n < 1:
        raise DataError(f"passkey needs n >= 1 examples, got {n}")
    if depths is None:
        depths = torch.linspace(0.1, 0.9, n).tolist() if n > 1 else [0.5]
    if len(depths) != n or not all(0.0 <= d <= 1.0 for d in depths):
        raise DataError(f"give n={n} depths, each in [0, 1]; got {list(depths)}")
    gen = torch.Generator().manual_seed(seed)
    out = []
    for depth in depths:
        key = int(torch.randint(10_000, 100_000, (1,), generator=gen))
        needle = f" The pass key is {key}. Remember it. {key} is the pass key."
        task = _Task("passkey", [needle], [float(depth)], 0, PASSKEY_QUESTION, f" {key}")
        out.append(_example(tokenizer, haystack_ids, context, task, gen))
    return out


def needle_examples(
    tokenizer: PreTrainedTokenizerBase,
    haystack_ids: torch.Tensor,
    context: int,
    n: int,
    keys: int = 4,
    seed: int = 0,
) -> list[LongContextExample]:
    """``n`` multi-key prompts of exactly ``context`` tokens: ``keys`` needles, one asked.

    Each example draws ``keys`` distinct words from ``WORDS``, distinct 7-digit numbers, a uniform
    random depth per needle and the asked needle.

    :param haystack_ids: the haystack token stream ``[T]``.
    :param context: prompt length ``L`` (haystack + needles + question).
    :raises DataError: ``n < 1``, ``keys`` outside ``[1, len(WORDS)]``, ``context`` too small for
        the needles and question, or a haystack shorter than the prompt needs.
    """
    if n < 1 or not 1 <= keys <= len(WORDS):
        raise DataError(
            f"needle needs n >= 1 and 1 <= keys <= {len(WORDS)}; got n={n}, keys={keys}"
        )
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        words = [WORDS[i] for i in torch.randperm(len(WORDS), generator=gen)[:keys].tolist()]
        numbers = torch.randint(1_000_000, 10_000_000, (keys,), generator=gen).tolist()
        while len(set(numbers)) < keys:  # distractors must differ from the answer
            numbers = torch.randint(1_000_000, 10_000_000, (keys,), generator=gen).tolist()
        depths = torch.rand(keys, generator=gen).tolist()
        asked = int(torch.randint(keys, (1,), generator=gen))
        needles = [
            f" The special magic number for {w} is {x}."
            for w, x in zip(words, numbers, strict=True)
        ]
        word = words[asked]
        question = (
            f" What is the special magic number for {word}? The special magic number for {word} is"
        )
        task = _Task("needle", needles, depths, asked, question, f" {numbers[asked]}")
        out.append(_example(tokenizer, haystack_ids, context, task, gen))
    return out


@torch.no_grad()
def answer_scores(
    logits_fn: Callable[[torch.Tensor, int], torch.Tensor], examples: list[LongContextExample]
) -> dict[str, torch.Tensor]:
    """Teacher-forced scores of the answers, one forward per example.

    ``logits_fn(ids, prefill)`` gets ``ids [1, L + A]`` (prompt then answer) and ``prefill = L``
    and returns logits ``[1, L + A, V]``; the caller runs positions ``< L`` as the prefill and the
    rest as decode steps under its KV policy. The answer's token ``j`` is scored by the logits at
    ``L − 1 + j``.

    Greedy decoding reproduces the answer exactly iff every teacher-forced argmax over it is
    right: if the first ``j`` argmaxes are right, greedy decoding has fed exactly the answer's
    first ``j`` tokens, so its next step sees the same input as the teacher-forced one (induction
    over the span). One forward thus gives the exact match without a decode loop.

    :returns: per example ``exact [n]`` bool, ``nll [n]`` float64 (mean answer-token NLL, nats),
        ``token_acc [n]`` float64 (fraction of answer tokens whose argmax is right) and
        ``depth [n]`` float64 (the example's depth, for grouping).
    """
    exact, nll, acc = [], [], []
    for ex in examples:
        L, A = ex.prompt.numel(), ex.answer.numel()
        ids = torch.cat([ex.prompt, ex.answer])[None]  # [1, L + A]
        logits = logits_fn(ids, L)
        assert logits.shape[:2] == (1, L + A), f"logits_fn gave {tuple(logits.shape)}"
        pred = logits[0, L - 1 : L + A - 1]  # [A, V]
        target = ex.answer.to(pred.device)
        hit = pred.argmax(-1) == target  # [A]
        exact.append(bool(hit.all()))
        acc.append(hit.double().mean().item())
        nll.append(F.cross_entropy(pred.float(), target).item())
    return {
        "exact": torch.tensor(exact, dtype=torch.bool),
        "nll": torch.tensor(nll, dtype=torch.float64),
        "token_acc": torch.tensor(acc, dtype=torch.float64),
        "depth": torch.tensor([ex.depth for ex in examples], dtype=torch.float64),
    }


@dataclass(frozen=True)
class _Task:
    """One example's texts: ``needles`` at ``depths`` (fractions of the haystack), the question
    about needle ``asked`` and its answer."""

    name: str
    needles: list[str]
    depths: list[float]
    asked: int
    question: str
    answer: str


def _example(
    tokenizer: PreTrainedTokenizerBase,
    haystack_ids: torch.Tensor,
    context: int,
    spec: _Task,
    gen: torch.Generator,
) -> LongContextExample:
    """Splice the needles into a haystack slice sized so that the prompt is ``context`` tokens."""
    assert haystack_ids.dim() == 1, f"haystack_ids must be 1-D, got {tuple(haystack_ids.shape)}"
    q_ids, a_ids = _question_answer(tokenizer, spec.question, spec.answer)
    n_ids = [tokenize_text(tokenizer, s) for s in spec.needles]
    used = q_ids.numel() + sum(x.numel() for x in n_ids)
    H = context - used  # haystack tokens
    if H < 1:
        raise DataError(
            f"context {context} is too small for the {spec.name} task: its needle(s) and question take "
            f"{used} tokens; raise context above {used}"
        )
    T = haystack_ids.numel()
    if T < H:
        raise DataError(
            f"the haystack has {T} tokens, fewer than the {H} a {context}-token {spec.name} prompt "
            f"needs; give a longer text or lower context"
        )
    hay = haystack_ids.cpu()
    start = int(torch.randint(0, T - H + 1, (1,), generator=gen))
    # End the slice before a word start, so the question follows whole words.
    start = _snap(tokenizer, hay, start + H, T) - H
    # Needle positions within the slice [0, H], each moved to a word start.
    pos = [_snap(tokenizer, hay, start + round(d * H), start + H) - start for d in spec.depths]
    parts, at = [], 0
    for i in sorted(range(len(spec.needles)), key=lambda i: pos[i]):
        parts += [hay[start + at : start + pos[i]], n_ids[i]]
        at = pos[i]
    parts += [hay[start + at : start + H], q_ids]
    prompt = torch.cat(parts)  # [context]
    assert prompt.numel() == context
    return LongContextExample(prompt, a_ids, pos[spec.asked] / H, spec.name)


def _question_answer(
    tokenizer: PreTrainedTokenizerBase, question: str, answer: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """(question ids ``[Q]``, answer ids ``[A]``), split from one tokenization of both."""
    q_ids = tokenize_text(tokenizer, question)
    qa_ids = tokenize_text(tokenizer, question + answer)
    Q = q_ids.numel()
    if qa_ids.numel() <= Q or not torch.equal(qa_ids[:Q], q_ids):
        raise DataError(
            f"the tokenizer merges the end of the question {question[-12:]!r} with the answer "
            f"{answer!r}, so the answer cannot be scored as the continuation of the prompt; use a "
            f"tokenizer that splits words and digits at spaces"
        )
    return q_ids, qa_ids[Q:]


def _snap(tokenizer: PreTrainedTokenizerBase, ids: torch.Tensor, pos: int, last: int) -> int:
    """The first word start in ``ids`` at ``pos .. min(pos + _SNAP, last)``; ``pos`` if none."""
    for i in range(pos, min(pos + _SNAP, last) + 1):
        if _starts_word(tokenizer, ids, i):
            return i
    return pos


def _starts_word(tokenizer: PreTrainedTokenizerBase, ids: torch.Tensor, i: int) -> bool:
    """Whether token ``i`` of ``ids [T]`` decodes with leading whitespace (the end counts)."""
    if i >= ids.numel():
        return True
    if i == 0:
        return tokenizer.decode(ids[:1])[:1].isspace()
    # Decoded after its predecessor: SentencePiece-style decoders drop a token's leading space
    # when it comes first, and a byte-level token may finish a character begun before it.
    head = tokenizer.decode(ids[i - 1 : i])
    both = tokenizer.decode(ids[i - 1 : i + 1])
    return both.startswith(head) and both[len(head) : len(head) + 1].isspace()
