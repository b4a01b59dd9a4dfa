"""The cells of a study, in the order they run, and the key that identifies each in results.csv."""

from __future__ import annotations

import json

from tersa.study.schema import Cell, StudyConfig

# results.csv columns that describe a cell, in this order; the key joins them differently (below).
CELL_COLUMNS = ("model", "quant", "policy", "budget", "context", "options")
_KEY_COLUMNS = ("model", "quant", "policy", "options", "budget", "context")


def cells(study: StudyConfig) -> list[Cell]:
    """Every cell, ordered model → quant → context → policy → budget, so the cells of one
    (model, quant) build are adjacent and each build happens once. ``dense`` keeps the whole
    cache whatever the budget: it gets one cell per context, with budget 1.0."""
    out = []
    for model in study.models:
        for quant in study.quant:
            for context in study.contexts:
                for policy in study.policies:
                    budgets = [1.0] if policy.name == "dense" else study.budgets
                    out.extend(
                        Cell(model, quant.name, policy.name, b, context, dict(policy.options))
                        for b in budgets
                    )
    return out


def cell_row(cell: Cell) -> dict[str, str]:
    """The cell's results.csv columns, as text."""
    return {
        "model": cell.model,
        "quant": cell.quant,
        "policy": cell.policy,
        "budget": budget_text(cell.budget),
        "context": str(cell.context),
        "options": json.dumps(cell.options, sort_keys=True, separators=(",", ":")),
    }


def budget_text(budget: float | int) -> str:
    """``0.25`` or ``256``: a float always shows a point, so a fraction of 1.0 stays apart from
    a budget of 1 token."""
    return repr(float(budget)) if isinstance(budget, float) else str(int(budget))


def cell_key(cell: Cell) -> str:
    """``model|quant|policy|options-json|budget|context``: stable across runs."""
    return row_key(cell_row(cell))


def row_key(row: dict[str, str]) -> str:
    """The key of a results.csv row; equals :func:`cell_key` of the cell it was written for."""
    return "|".join(row[c] for c in _KEY_COLUMNS)
