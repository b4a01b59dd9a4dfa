"""The work area of a run: finished pieces of a long stage, kept so a rerun can resume.

A run writing ``out/model`` keeps its work area in ``out/.model.work/`` (next to the output, on the
same disk); a stage that saves per-block results there (QDrop) finds them again when the run is
repeated with ``--resume``. The area records a fingerprint of the recipe: results made by another
recipe are never reused. A successful run deletes its work area; a run without ``--resume`` starts
from an empty one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from tersa.errors import RecipeError

MANIFEST = "manifest.json"


def work_area(output: Path) -> Path:
    """``out/.model.work`` for the output folder ``out/model``."""
    return output.parent / f".{output.name}.work"


def fingerprint(recipe_dict: dict) -> str:
    """A stable hash of a resolved recipe (its ``to_dict()``)."""
    text = json.dumps(recipe_dict, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def open_work_area(folder: Path, recipe_fingerprint: str, resume: bool) -> Path:
    """Create (or, with ``resume``, reopen) the work area ``folder`` for this recipe.

    Without ``resume`` an existing area is cleared. With ``resume``, an area made by a different
    recipe is refused: its blocks would not match.
    """
    manifest = folder / MANIFEST
    if folder.exists() and resume and manifest.exists():
        found = json.loads(manifest.read_text()).get("fingerprint")
        if found != recipe_fingerprint:
            raise RecipeError(
                f"--resume: the work area '{folder}' was made by a different recipe (or model); "
                "rerun without --resume to start over"
            )
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    manifest.write_text(json.dumps({"fingerprint": recipe_fingerprint}) + "\n")
    return folder


class BlockStore:
    """Per-block tensors of one stage under ``folder`` (``block-007.safetensors``), each written
    atomically, so a crash leaves only complete blocks."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def _path(self, index: int) -> Path:
        return self.folder / f"block-{index:03d}.safetensors"

    def has(self, index: int) -> bool:
        return self._path(index).exists()

    def save(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        tmp = self._path(index).with_suffix(".tmp")
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, self._path(index))

    def load(self, index: int) -> dict[str, torch.Tensor]:
        try:
            return load_file(str(self._path(index)))
        except (SafetensorError, OSError) as e:
            raise RecipeError(
                f"--resume: block file '{self._path(index)}' is unreadable ({e}); "
                "rerun without --resume to start over"
            ) from e
