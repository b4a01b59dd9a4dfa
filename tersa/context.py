"""What a stage gets besides the model and its config."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from tersa.calib import run_blockwise
from tersa.calib.blockwise import BlockFn
from tersa.errors import RecipeError
from tersa.models.adapters import Adapter, get_blocks
from tersa.offload import onloaded
from tersa.progress import Reporter

if TYPE_CHECKING:
    from tersa.recipe import Recipe


@dataclass
class StageContext:
    """Shared state for the stages of one run.

    ``calibration_ids`` is ``[N, T]`` token ids (None when the recipe has no calibration data);
    ``workdir`` is the run's work area (see :mod:`tersa.workarea`), None when nothing is written.
    """

    adapter: Adapter
    device: torch.device
    reporter: Reporter = field(default_factory=lambda: Reporter(quiet=True))
    calibration_ids: torch.Tensor | None = None
    batch_size: int = 8
    recipe: Recipe | None = None
    stage_name: str = ""
    stage_index: int = 0
    workdir: Path | None = None
    resume: bool = False  # reuse finished pieces found in ``workdir`` (``tersa run --resume``)
    info: dict[str, Any] = field(default_factory=dict)
    # What the running stage reports for metrics.json (its entry under "stages"); the pipeline
    # empties it before each stage. ``info`` is for later stages, this is for the user.
    metrics: dict[str, Any] = field(default_factory=dict)

    def next_config(self, stage: str) -> Any | None:
        """The config of the first ``stage`` stage after the current one in the recipe, if any."""
        if self.recipe is None:
            return None
        later = self.recipe.stages[self.stage_index + 1 :]
        return next((cfg for name, cfg in later if name == stage), None)

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return get_blocks(model, self.adapter)

    def blockwise(self, model: nn.Module, process: BlockFn) -> None:
        """Run ``process(i, block, cache)`` on each block with calibration inputs (see calib)."""
        if self.calibration_ids is None:
            raise RecipeError(
                f"stage '{self.stage_name}' needs calibration data; add a 'calibration' section"
            )
        blocks = self.blocks(model)
        with self.reporter.task(f"{self.stage_name}: blocks", len(blocks)) as update:
            run_blockwise(
                model,
                blocks,
                self.calibration_ids,
                process,
                batch_size=self.batch_size,
                device=self.device,
                on_block=update,
            )

    def each_block(self, model: nn.Module, process: BlockFn) -> None:
        """Data-free variant: ``process(i, block, None)`` on each block, with progress."""
        blocks = self.blocks(model)
        with self.reporter.task(f"{self.stage_name}: blocks", len(blocks)) as update:
            for i, block in enumerate(blocks):
                with onloaded(block, self.device):
                    process(i, block, None)  # type: ignore[arg-type]
                update(i + 1, len(blocks))
