"""Shared test helpers: tiny checkpoints and text files on disk."""

from __future__ import annotations

from pathlib import Path

import yaml

from tersa.models.tiny import save_tiny_checkpoint

TEXT = (
    "Now is the winter of our discontent made glorious summer by this sun of York; "
    "and all the clouds that lour'd upon our house in the deep bosom of the ocean buried. "
    "What light through yonder window breaks? It is the east, and Juliet is the sun. "
)


def write_text(path: Path, repeats: int = 40) -> Path:
    """A text file of ``repeats`` shuffled-ish paragraphs (a few thousand byte-level tokens)."""
    words = TEXT.split()
    lines = [" ".join(words[i % len(words) :] + words[: i % len(words)]) for i in range(repeats)]
    path.write_text("\n\n".join(lines), encoding="utf-8")
    return path


def tiny_setup(tmp_path: Path, family: str = "llama") -> tuple[Path, Path]:
    """(tiny checkpoint folder, text file) inside ``tmp_path``."""
    model = save_tiny_checkpoint(tmp_path / f"tiny-{family}", family=family)
    return model, write_text(tmp_path / "text.txt")


def tiny_recipe(model: Path, text: Path, stages: list, **extra: object) -> dict:
    """A small recipe dict over the tiny model and text (64-token windows)."""
    return {
        "model": str(model),
        "calibration": {"data": str(text), "samples": 8, "seq_len": 64, "batch_size": 4},
        "evaluation": {"data": str(text), "seq_len": 64, "max_windows": 6, "batch_size": 3},
        "stages": stages,
        **extra,
    }


def write_recipe(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path
