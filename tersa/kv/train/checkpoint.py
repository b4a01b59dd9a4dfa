"""Training checkpoints without pickle: safetensors for every tensor, JSON for the rest.

A checkpoint is a folder ``checkpoint-000050/`` in the run's work area:

- ``model.safetensors``: the model's state dict;
- ``optimizer.safetensors``: the optimizer's per-parameter state as ``state.<index>.<name>``
  (AdamW: ``step``, ``exp_avg``, ``exp_avg_sq``) and the torch RNG state as ``rng.torch``;
- ``trainer.json``, written last: the step, the optimizer's param groups, anything else the loop
  keeps (its loss log), and the recipe fingerprint.

The folder is written under a temporary name and renamed into place, then older checkpoints are
deleted, so a crash at any moment leaves at least one complete checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from tersa.errors import RecipeError

CHECKPOINT_FORMAT = 1
PREFIX = "checkpoint-"
TRAINER_FILE = "trainer.json"


def save_checkpoint(
    work: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> Path:
    """Write the checkpoint after ``step`` steps into ``work``; returns its folder."""
    tmp = Path(tempfile.mkdtemp(prefix=".checkpoint.tmp-", dir=work))
    # clone: tied weights share memory, which safetensors refuses
    weights = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    save_file(weights, str(tmp / "model.safetensors"))
    opt = optimizer.state_dict()
    tensors = {"rng.torch": torch.get_rng_state()}
    for index, entry in opt["state"].items():
        for name, value in entry.items():
            if not torch.is_tensor(value):
                raise TypeError(f"optimizer state {index}.{name} is not a tensor: {value!r}")
            tensors[f"state.{index}.{name}"] = value.detach().clone().contiguous()
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    meta = {"format": CHECKPOINT_FORMAT, "step": step, "param_groups": opt["param_groups"], **state}
    (tmp / TRAINER_FILE).write_text(json.dumps(meta, indent=1) + "\n")
    folder = work / f"{PREFIX}{step:06d}"
    os.replace(tmp, folder)
    for old in work.glob(f"{PREFIX}*"):
        if old != folder:
            shutil.rmtree(old, ignore_errors=True)
    return folder


def latest_checkpoint(work: Path) -> Path | None:
    """The complete checkpoint with the highest step in ``work``, or None."""
    done = [p for p in work.glob(f"{PREFIX}*") if (p / TRAINER_FILE).is_file()]
    return max(done, key=lambda p: p.name, default=None)


def load_checkpoint(
    folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer
) -> dict[str, Any]:
    """Restore ``model``, ``optimizer`` and the torch RNG from ``folder``; returns trainer.json."""
    try:
        meta = json.loads((folder / TRAINER_FILE).read_text())
        weights = load_file(str(folder / "model.safetensors"))
        tensors = load_file(str(folder / "optimizer.safetensors"))
    except (OSError, json.JSONDecodeError, SafetensorError) as e:
        raise RecipeError(
            f"--resume: checkpoint '{folder}' is unreadable ({e}); rerun without --resume"
        ) from e
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise RecipeError(
            f"--resume: checkpoint '{folder}' has format {meta.get('format')!r}, this tersa "
            f"reads {CHECKPOINT_FORMAT}; rerun without --resume"
        )
    model.load_state_dict(weights, strict=True)
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    return meta
