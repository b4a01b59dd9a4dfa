"""Tokenization, calibration samples and evaluation windows."""

from __future__ import annotations

import logging

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from tersa.data.tokens import calibration_samples, eval_windows, tokenize_text
from tersa.errors import DataError

CORPUS = "Now, fair Hippolyta, our nuptial hour draws on apace; four happy days bring in another."


def _tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on one sentence, with a BOS post-processor."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CORPUS], trainer=trainer)
    # With special tokens the tokenizer would prepend <s>; tokenize_text must not.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>")


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return _tiny_tokenizer()


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


# --- tokenize_text ---


def test_tokenize_without_special_tokens(tokenizer: PreTrainedTokenizerFast) -> None:
    text = "Four days will quickly steep themselves in night."
    ids = tokenize_text(tokenizer, text)
    assert ids.dtype == torch.long and ids.dim() == 1
    assert tokenizer.bos_token_id not in ids.tolist()
    assert tokenizer(text)["input_ids"][0] == tokenizer.bos_token_id  # the template is live
    assert tokenizer.decode(ids.tolist()) == text


def test_long_text_does_not_warn(tokenizer: PreTrainedTokenizerFast) -> None:
    tok = _tiny_tokenizer()
    tok.model_max_length = 16
    text = CORPUS * 5
    records = _Records()
    logger = logging.getLogger("transformers")
    logger.addHandler(records)
    try:
        ids = tokenize_text(tok, text)
        assert ids.numel() > 16
        assert not [m for m in records.messages if "longer than the specified maximum" in m]
        tok(text)  # the plain call does warn, so the check above is meaningful
        assert [m for m in records.messages if "longer than the specified maximum" in m]
    finally:
        logger.removeHandler(records)


# --- calibration_samples ---

GOLDEN_STARTS = [452, 639, 509, 624]  # torch.randint(0, 984, (4,)) from a Generator seeded with 0


def test_samples_are_contiguous_slices() -> None:
    ids = torch.randint(0, 1000, (500,))
    out = calibration_samples(ids, samples=7, seq_len=33, seed=3)
    assert out.shape == (7, 33) and out.dtype == torch.long
    windows = ids.unfold(0, 33, 1)[: 500 - 33]  # every allowed start: [0, T - L - 1]
    for row in out:
        assert (windows == row).all(dim=1).any()


def test_sample_starts_are_fixed_per_seed() -> None:
    # Golden starts: a change here changes every calibration in the project.
    out = calibration_samples(torch.arange(1000), samples=4, seq_len=16, seed=0)
    assert out[:, 0].tolist() == GOLDEN_STARTS
    assert torch.equal(out - out[:, :1], torch.arange(16).expand(4, 16))


def test_same_seed_same_samples_other_seed_other_samples() -> None:
    ids = torch.randint(0, 1000, (2000,))
    a = calibration_samples(ids, samples=8, seq_len=64, seed=1)
    torch.manual_seed(123)  # the global RNG must not matter
    b = calibration_samples(ids, samples=8, seq_len=64, seed=1)
    c = calibration_samples(ids, samples=8, seq_len=64, seed=2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_samples_need_seq_len_plus_one_tokens() -> None:
    ids = torch.arange(65)
    assert torch.equal(calibration_samples(ids, 3, 64, 0), ids[:64].expand(3, 64))
    with pytest.raises(DataError) as e:
        calibration_samples(ids[:64], 3, 64, 0)
    assert str(e.value) == (
        "calibration text has 64 tokens; seq_len 64 needs at least 65 — "
        "lower seq_len or give more text"
    )


# --- eval_windows ---

IDS = torch.arange(1000) * 3 + 1  # T = 1000, L = 64 -> n = 15 windows, 40 tokens dropped
ALL = IDS[:960].view(15, 64)


def test_all_windows() -> None:
    assert torch.equal(eval_windows(IDS, 64, None, spread=False), ALL)
    assert torch.equal(eval_windows(IDS, 64, None, spread=True), ALL)
    assert torch.equal(eval_windows(IDS, 64, 100, spread=True), ALL)


def test_first_windows() -> None:
    assert torch.equal(eval_windows(IDS, 64, 4, spread=False), ALL[:4])


def test_spread_windows() -> None:
    assert torch.equal(eval_windows(IDS, 64, 4, spread=True), ALL[[0, 3, 7, 11]])
    assert torch.equal(eval_windows(IDS, 64, 1, spread=True), ALL[:1])
    assert torch.equal(eval_windows(IDS, 64, 14, spread=True)[-1], ALL[13])


def test_no_full_window() -> None:
    with pytest.raises(DataError) as e:
        eval_windows(IDS[:63], 64, None, spread=True)
    assert str(e.value) == (
        "evaluation text has 63 tokens, fewer than one window of 64; "
        "lower seq_len or give more text"
    )
