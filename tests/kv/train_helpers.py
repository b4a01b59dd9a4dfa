"""A tiny training recipe over a small text file, for the training tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tests.helpers import write_text

SEQ, BATCH = 32, 4


def tiny_train_recipe(text: Path, batches: int = 3, **overrides: Any) -> dict[str, Any]:
    """2 layers of width 32, BPE of 300 tokens, ``batches`` batches of 4 × 32 tokens, joint D=8."""
    recipe: dict[str, Any] = {
        "model": {"layers": 2, "hidden": 32, "heads": 2, "intermediate": 48, "scan_chunk": 4},
        "tokenizer": {"vocab_size": 300},
        "data": {"source": str(text), "eval_windows": 1},
        "training": {
            "tokens": batches * SEQ * BATCH,
            "seq_len": SEQ,
            "batch_size": BATCH,
            "checkpoint_every": 2,
            "log_every": 1,
        },
        "joint": {"dilation": 8, "window": 0, "sinks": 0},
    }
    for key, value in overrides.items():
        old = recipe.get(key)
        recipe[key] = {**old, **value} if isinstance(old, dict) and value else value
    return recipe


def write_train_recipe(folder: Path, **overrides: Any) -> Path:
    """The tiny recipe and its text file inside ``folder``; returns the recipe path."""
    text = write_text(folder / "text.txt")
    path = folder / "train.yaml"
    path.write_text(yaml.safe_dump(tiny_train_recipe(text, **overrides)))
    return path


def tiny_init_recipe(checkpoint: Path, text: Path, batches: int = 3, **overrides: Any) -> dict:
    """The tiny recipe continuing ``checkpoint`` converted to RAT+ (``init``; no model, tokenizer)."""
    init = {"source": str(checkpoint), **overrides.pop("init", {})}
    recipe = tiny_train_recipe(text, batches=batches, **overrides)
    del recipe["model"], recipe["tokenizer"]
    return {"init": init, **recipe}
