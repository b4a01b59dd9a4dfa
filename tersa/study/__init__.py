"""`tersa study`: a resumable grid of (model × quant recipe × KV policy × budget × context)
evaluations, written to results.csv / results.md / pareto.png."""

from tersa.study.grid import cell_key, cells
from tersa.study.run import StudyResult, default_build_model, run_study
from tersa.study.schema import (
    Cell,
    NeedleTask,
    PasskeyTask,
    PlotConfig,
    PolicyEntry,
    PplTask,
    QuantEntry,
    RecallTask,
    StudyConfig,
    TasksConfig,
    load_study,
    parse_study,
)

__all__ = [
    "Cell",
    "NeedleTask",
    "PasskeyTask",
    "PlotConfig",
    "PolicyEntry",
    "PplTask",
    "QuantEntry",
    "RecallTask",
    "StudyConfig",
    "StudyResult",
    "TasksConfig",
    "cell_key",
    "cells",
    "default_build_model",
    "load_study",
    "parse_study",
    "run_study",
]
