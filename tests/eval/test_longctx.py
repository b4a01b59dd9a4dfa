"""Passkey and multi-key needle prompts: determinism, layout, answers, scoring and rejections."""

from __future__ import annotations

import re

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from tersa.data.sources import load_text
from tersa.data.tokens import tokenize_text
from tersa.errors import DataError
from tersa.eval.longctx import (
    _SNAP,
    PASSKEY_QUESTION,
    WORDS,
    LongContextExample,
    answer_scores,
    needle_examples,
    passkey_examples,
)
from tersa.models.tiny import tiny_model, tiny_tokenizer

TOK = tiny_tokenizer()  # byte-level: every digit is its own token
NEEDLE_RE = re.compile(r" The special magic number for (\w+) is (\d{7})\.")


@pytest.fixture(scope="module")
def hay() -> torch.Tensor:
    # A 20k-character head of the plays (~18k tokens) keeps tokenization well under a second.
    return tokenize_text(TOK, load_text("embedded:shakespeare", "evaluation", "text")[:20_000])


def _ids(text: str) -> torch.Tensor:
    return tokenize_text(TOK, text)


def _find(seq: torch.Tensor, sub: torch.Tensor) -> list[int]:
    """Every start of ``sub [k]`` in ``seq [n]``."""
    windows = seq.unfold(0, sub.numel(), 1)  # [n − k + 1, k]
    return (windows == sub).all(1).nonzero().flatten().tolist()


def _is_slice_of(part: torch.Tensor, stream: torch.Tensor) -> bool:
    return len(_find(stream, part)) > 0


def _same(a: list[LongContextExample], b: list[LongContextExample]) -> bool:
    return all(
        torch.equal(x.prompt, y.prompt) and torch.equal(x.answer, y.answer) and x.depth == y.depth
        for x, y in zip(a, b, strict=True)
    )


def test_examples_are_deterministic_per_seed(hay: torch.Tensor) -> None:
    for make in (passkey_examples, needle_examples):
        a, b = make(TOK, hay, 300, 4, seed=7), make(TOK, hay, 300, 4, seed=7)
        assert _same(a, b)
        other = make(TOK, hay, 300, 4, seed=8)
        answers = {TOK.decode(x.answer) for x in a}
        assert answers.isdisjoint(TOK.decode(x.answer) for x in other)
        assert len(answers) == 4  # and the keys differ between examples of one seed


def test_passkey_layout_and_answer(hay: torch.Tensor) -> None:
    context = 300
    q_ids = _ids(PASSKEY_QUESTION)
    examples = passkey_examples(TOK, hay, context, 5, seed=1)
    for ex, want in zip(examples, [0.1, 0.3, 0.5, 0.7, 0.9], strict=True):
        assert ex.task == "passkey" and ex.prompt.dtype == ex.answer.dtype == torch.long
        assert ex.prompt.numel() == context
        assert re.fullmatch(r" \d{5}", TOK.decode(ex.answer))
        key = TOK.decode(ex.answer).strip()
        needle = _ids(f" The pass key is {key}. Remember it. {key} is the pass key.")
        H = context - needle.numel() - q_ids.numel()
        p = round(ex.depth * H)
        assert torch.equal(ex.prompt[p : p + needle.numel()], needle)
        assert torch.equal(ex.prompt[-q_ids.numel() :], q_ids)
        # the rest is one contiguous slice of the haystack, split where the needle went in
        rest = torch.cat([ex.prompt[:p], ex.prompt[p + needle.numel() : -q_ids.numel()]])
        assert rest.numel() == H and _is_slice_of(rest, hay)
        assert want - 0.5 / H <= ex.depth <= want + _SNAP / H  # rounded, then moved on
        # the needle sits between words: the token after it starts with whitespace
        text = TOK.decode(ex.prompt)
        assert f" The pass key is {key}. Remember it. {key} is the pass key." in text
        assert TOK.decode(ex.prompt[p + needle.numel() :])[:1].isspace()


def test_passkey_answer_is_the_continuation_of_the_question(hay: torch.Tensor) -> None:
    (ex,) = passkey_examples(TOK, hay, 300, 1, seed=2)
    tail = TOK.decode(ex.prompt[-_ids(PASSKEY_QUESTION).numel() :])
    joint = _ids(tail + TOK.decode(ex.answer))
    assert torch.equal(joint, torch.cat([_ids(PASSKEY_QUESTION), ex.answer]))


def test_passkey_takes_given_depths(hay: torch.Tensor) -> None:
    examples = passkey_examples(TOK, hay, 300, 3, depths=[0.0, 1.0, 0.25])
    H = 300 - 54 - 33  # needle and question tokens under the tiny tokenizer
    assert examples[1].depth == 1.0  # the slice end is a word start by construction
    for ex, want in zip(examples, [0.0, 1.0, 0.25], strict=True):
        assert want - 0.5 / H <= ex.depth <= want + _SNAP / H  # rounded, then moved on


def test_needle_has_distinct_keys_and_asks_one(hay: torch.Tensor) -> None:
    context, keys = 400, 4
    for ex in needle_examples(TOK, hay, context, 6, keys=keys, seed=3):
        assert ex.task == "needle" and ex.prompt.numel() == context
        text = TOK.decode(ex.prompt)
        found = dict(NEEDLE_RE.findall(text))
        assert len(NEEDLE_RE.findall(text)) == keys and len(found) == keys  # distinct words
        assert set(found) <= set(WORDS) and len(set(found.values())) == keys
        asked = re.search(r" What is the special magic number for (\w+)\?", text)
        assert asked and text.endswith(f" The special magic number for {asked[1]} is")
        assert TOK.decode(ex.answer) == f" {found[asked[1]]}"
        # the asked needle is at the stated depth of the haystack (other needles not counted)
        needles = [_ids(f" The special magic number for {w} is {x}.") for w, x in found.items()]
        at = {w: _find(ex.prompt, n)[0] for (w, _), n in zip(found.items(), needles, strict=True)}
        before = sum(
            n.numel()
            for (w, _), n in zip(found.items(), needles, strict=True)
            if at[w] < at[asked[1]]
        )
        question = _ids(text[text.index(" What is the special") :])
        H = context - sum(n.numel() for n in needles) - question.numel()
        assert at[asked[1]] - before == round(ex.depth * H)


def test_answer_scores_read_the_answer_positions(hay: torch.Tensor) -> None:
    examples = passkey_examples(TOK, hay, 200, 3, seed=4)
    seen: list[int] = []

    def oracle(wrong: tuple[int, int] | None) -> object:
        def logits_fn(ids: torch.Tensor, prefill: int) -> torch.Tensor:
            row = next(
                i for i, ex in enumerate(examples) if torch.equal(ex.prompt, ids[0, :prefill])
            )
            seen.append(prefill)
            nxt = torch.cat([ids[0, 1:], ids[0, :1]])  # [L + A]: the right next token everywhere
            if wrong is not None and wrong[0] == row:
                nxt[wrong[1]] = (nxt[wrong[1]] + 1) % 320
            return torch.full((1, nxt.numel(), 320), -30.0).scatter(2, nxt.view(1, -1, 1), 30.0)

        return logits_fn

    right = answer_scores(oracle(None), examples)
    assert seen == [200] * 3
    assert right["exact"].tolist() == [True] * 3 and right["nll"].max() < 1e-6
    assert right["token_acc"].tolist() == [1.0] * 3 and right["nll"].dtype == torch.float64
    assert right["depth"].tolist() == [ex.depth for ex in examples]
    A = examples[1].answer.numel()
    # the logits at L − 1 predict the answer's first token; L − 2 predicts the prompt's last
    before = answer_scores(oracle((1, 200 - 2)), examples)
    first = answer_scores(oracle((1, 200 - 1)), examples)
    last = answer_scores(oracle((1, 200 + A - 2)), examples)
    assert before["exact"].all() and before["nll"].max() < 1e-6
    for bad in (first, last):
        assert bad["exact"].tolist() == [True, False, True]
        assert bad["token_acc"][1] == (A - 1) / A and bad["nll"][1] > 1.0


def test_answer_scores_run_a_tiny_model(hay: torch.Tensor) -> None:
    model = tiny_model("llama")
    examples = needle_examples(TOK, hay, 240, 2, keys=2)  # within 256 positions
    scores = answer_scores(lambda ids, prefill: model(input_ids=ids).logits, examples)
    assert scores["exact"].shape == (2,) and scores["exact"].dtype == torch.bool
    assert torch.isfinite(scores["nll"]).all() and (scores["nll"] > 0).all()
    assert ((scores["token_acc"] >= 0) & (scores["token_acc"] <= 1)).all()


def test_rejects_a_short_haystack(hay: torch.Tensor) -> None:
    with pytest.raises(DataError) as e:
        passkey_examples(TOK, hay[:50], 300, 1)
    assert str(e.value) == (
        "the haystack has 50 tokens, fewer than the 213 a 300-token passkey prompt needs; "
        "give a longer text or lower context"
    )


def test_rejects_a_context_too_small(hay: torch.Tensor) -> None:
    with pytest.raises(DataError) as e:
        passkey_examples(TOK, hay, 87, 1)
    assert str(e.value) == (
        "context 87 is too small for the passkey task: its needle(s) and question take 87 tokens; "
        "raise context above 87"
    )
    assert passkey_examples(TOK, hay, 88, 1)[0].prompt.numel() == 88


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n": 2, "depths": [0.5]}, "give n=2 depths, each in [0, 1]; got [0.5]"),
        ({"n": 1, "depths": [1.5]}, "give n=1 depths, each in [0, 1]; got [1.5]"),
        ({"n": 0}, "passkey needs n >= 1 examples, got 0"),
    ],
)
def test_passkey_rejects_bad_arguments(hay: torch.Tensor, kwargs: dict, message: str) -> None:
    with pytest.raises(DataError) as e:
        passkey_examples(TOK, hay, 300, **kwargs)
    assert str(e.value) == message


def test_needle_rejects_bad_keys(hay: torch.Tensor) -> None:
    for keys in (0, len(WORDS) + 1):
        with pytest.raises(DataError) as e:
            needle_examples(TOK, hay, 300, 1, keys=keys)
        assert str(e.value) == f"needle needs n >= 1 and 1 <= keys <= 40; got n=1, keys={keys}"


def test_rejects_a_tokenizer_that_merges_question_and_answer(hay: torch.Tensor) -> None:
    # Byte-level BPE without the word-splitting regex, with a merge of "s" and the space after it,
    # so "... key is" + " 12345" tokenizes differently from "... key is" alone.
    vocab = {c: i for i, c in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["sĠ"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[("s", "Ġ")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    merging = PreTrainedTokenizerFast(tokenizer_object=tok)
    with pytest.raises(DataError, match=r"merges the end of the question ' pass key is' with"):
        passkey_examples(merging, hay, 300, 1)
