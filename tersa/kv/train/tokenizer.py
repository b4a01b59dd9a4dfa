"""A small byte-level BPE tokenizer trained on the training text, saved with the model.

Byte-level (GPT-2 style): every byte has a token, so any text encodes without unknowns, and the
merges are learned from the text alone. The training is deterministic: the same text and settings
give the same ``tokenizer.json`` (a test checks it). The corpus is cut at blank lines, so merges do
not cross paragraphs. ``<|endoftext|>`` is token 0 and serves as BOS, EOS and padding.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

END_OF_TEXT = "<|endoftext|>"


def train_tokenizer(
    text: str, vocab_size: int = 4096, min_frequency: int = 2
) -> PreTrainedTokenizerFast:
    """A byte-level BPE with ``vocab_size`` tokens learned from ``text``.

    :param text: the training text; paragraphs (blank-line separated) are the BPE's documents.
    :param vocab_size: tokens in all: the 256 bytes, ``<|endoftext|>`` and the merges.
    :param min_frequency: a pair is merged only if it occurs at least this often.
    :returns: a fast tokenizer; ``save_pretrained(folder)`` writes what ``AutoTokenizer`` loads.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[END_OF_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(text.split("\n\n"), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=END_OF_TEXT,
        eos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        clean_up_tokenization_spaces=False,
    )
