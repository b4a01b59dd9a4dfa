"""Study files: the YAML of a `tersa study` grid, validated completely before any model is loaded.

A study crosses models × quantization recipes × KV policies × budgets × context lengths and names
the tasks every cell is measured on. Problems are reported like recipe problems: one message that
names the key path (``policies[1]``, ``tasks.needle.keys``) and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

from tersa.config import STRICT, Int, Str
from tersa.errors import RecipeError
from tersa.kv.policies.config import POLICIES, make_policy
from tersa.recipe import _format_errors, load_recipe, read_yaml

STUDY_VERSION = 1

# What the evaluator reports: the KV metrics for every cell, the rest per configured task.
KV_METRICS = ("kv_bytes_kept", "kv_bytes_read", "kv_fraction_kept", "kv_fraction_read")
TASK_METRICS = {
    "passkey": ("passkey_exact",),
    "needle": ("needle_exact",),
    "recall": ("recall_nll", "recall_exact"),
    "ppl": ("ppl",),
}
# The Pareto front and the plot need each axis's direction; every other metric is "higher wins".
LOWER_IS_BETTER = frozenset({*KV_METRICS, "ppl", "recall_nll"})
# Default plot y: the first metric the study measures, retrieval before language modelling.
_DEFAULT_Y = ("needle_exact", "passkey_exact", "recall_exact", "ppl")

Positive = Annotated[Int, Field(ge=1)]


@dataclass(config=STRICT)
class QuantEntry:
    """A label and the recipe that builds it (None: the model as it is)."""

    name: Annotated[Str, Field(min_length=1, description="label in the results")]
    recipe: Annotated[
        Str | None, Field(description="recipe path (relative to the study file or the cwd)")
    ] = None


@dataclass(config=STRICT)
class PolicyEntry:
    """A KV policy name and its options, passed through to the evaluator untouched."""

    name: Str
    options: dict[str, Any] = Field(default_factory=dict)


@dataclass(config=STRICT)
class PasskeyTask:
    """Retrieve a number hidden in filler text."""

    n: Annotated[Int, Field(ge=1, description="prompts per cell")] = 8


@dataclass(config=STRICT)
class NeedleTask:
    """Retrieve the value of one of ``keys`` key-value needles spread over the context."""

    n: Annotated[Int, Field(ge=1, description="prompts per cell")] = 8
    keys: Annotated[Int, Field(ge=1, description="needles per prompt")] = 4


@dataclass(config=STRICT)
class RecallTask:
    """Repeat a passage of ``passage`` tokens seen ``gap`` tokens earlier; the repeat ends the
    context, so text fills the rest before the passage."""

    n: Annotated[Int, Field(ge=1, description="prompts per cell")] = 8
    passage: Annotated[Int, Field(ge=1, description="tokens to recall")] = 64
    gap: Annotated[
        Int | None,
        Field(
            ge=0,
            description="tokens between the passage and its recall (default: the rest "
            "of the context after a 64-token prefix)",
        ),
    ] = None


@dataclass(config=STRICT)
class PplTask:
    """Perplexity over windows of the context length."""

    windows: Annotated[Int, Field(ge=1, description="windows per cell")] = 4


@dataclass(config=STRICT)
class TasksConfig:
    """The evaluations each cell runs; a missing (or null) section is not run."""

    passkey: PasskeyTask | None = None
    needle: NeedleTask | None = None
    recall: RecallTask | None = None
    ppl: PplTask | None = None

    def names(self) -> list[str]:
        return [name for name in TASK_METRICS if getattr(self, name) is not None]

    def metrics(self) -> list[str]:
        """Every metric a cell of this study reports."""
        return [*KV_METRICS, *(m for name in self.names() for m in TASK_METRICS[name])]


@dataclass(config=STRICT)
class PlotConfig:
    """Axes of ``pareto.png``; y defaults to the first retrieval metric the study measures."""

    x: Str = "kv_fraction_read"
    y: Str | None = None


@dataclass(config=STRICT, kw_only=True)
class StudyConfig:
    """A complete, validated study. Quant recipe paths are resolved (absolute)."""

    version: Annotated[Int, Field(ge=1, le=STUDY_VERSION)] = STUDY_VERSION
    name: Annotated[Str | None, Field(description="default: the study file's stem")] = None
    models: Annotated[list[Str], Field(min_length=1, description="open_model specs")]
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    quant: Annotated[list[QuantEntry], Field(min_length=1)] = Field(
        default_factory=lambda: [QuantEntry(name="fp")]
    )
    policies: list[PolicyEntry]
    budgets: list[float | int] = Field(default_factory=list)
    contexts: Annotated[list[Positive], Field(min_length=1, description="context lengths")]
    tasks: TasksConfig
    seed: Int = 0
    plot: PlotConfig = Field(default_factory=PlotConfig)

    def to_dict(self) -> dict[str, Any]:
        """The normalized study as plain YAML-able data; it loads back as the same study."""
        out = TypeAdapter(StudyConfig).dump_python(self, mode="json")
        out["policies"] = [{"name": p.name, **p.options} for p in self.policies]
        out["budgets"] = list(self.budgets)  # keep 1 (a token) apart from 1.0 (everything)
        return out


@dataclasses.dataclass(frozen=True)
class Cell:
    """One evaluation: a (model, quant) build, a KV policy with its options, a budget (fraction
    of the context when a float, tokens when an int) and a context length in tokens."""

    model: str
    quant: str
    policy: str
    budget: float | int
    context: int
    options: dict[str, Any] = dataclasses.field(default_factory=dict)


_TOP_KEYS = list(StudyConfig.__pydantic_fields__)  # type: ignore[attr-defined]
_BUDGET_HELP = "a fraction of the context (0 < b <= 1) or a token count (an integer >= 1)"


def load_study(path: str | Path) -> StudyConfig:
    """Read and validate a study file; :class:`RecipeError` on any problem."""
    path = Path(path)
    return parse_study(read_yaml(path, "study"), source=str(path), folder=path.parent)


def parse_study(data: Any, source: str = "study", folder: Path | None = None) -> StudyConfig:
    """Validate study data; recipe paths resolve against ``folder`` first, then the cwd."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a study is a mapping with keys {', '.join(_TOP_KEYS)}")
    data = dict(data)
    problems: list[str] = []
    if "version" not in data:
        problems.append(f"version: missing required key; add 'version: {STUDY_VERSION}'")
    policies = _parse_policies(data.pop("policies", None), problems)
    budgets = _parse_budgets(data.pop("budgets", []), problems)
    study = None
    try:
        study = TypeAdapter(StudyConfig).validate_python({**data, "policies": [], "budgets": []})
    except ValidationError as e:
        problems[:0] = [p.removeprefix(": ") for p in _format_errors(e, StudyConfig, prefix="")]
    if study is not None:
        study.policies, study.budgets = policies, budgets
        problems.extend(_check(study, folder or Path.cwd()))
        if study.name is None:
            study.name = Path(source).stem
    if problems:
        head = f"{source}: " + ("invalid study" if len(problems) > 1 else problems[0])
        raise RecipeError(head if len(problems) == 1 else head + "\n  " + "\n  ".join(problems))
    assert study is not None
    return study


def _parse_policies(items: Any, problems: list[str]) -> list[PolicyEntry]:
    allowed = ", ".join(POLICIES)
    if items is None:
        problems.append(f"policies: missing required key; list one or more of {allowed}")
        return []
    if not isinstance(items, list) or not items:
        problems.append(f"policies: expected a non-empty list of policies ({allowed})")
        return []
    entries = []
    for i, item in enumerate(items):
        where = f"policies[{i}]"
        if isinstance(item, str):
            name, options = item, {}
        elif isinstance(item, dict) and isinstance(item.get("name"), str):
            options = {k: v for k, v in item.items() if k != "name"}
            name = item["name"]
        else:
            problems.append(
                f"{where}: a policy is a name ({allowed}) or {{name: ..., option: ...}}"
            )
            continue
        if name not in POLICIES:
            problems.append(f"{where}: unknown policy '{name}'; allowed: {allowed}")
        elif not all(isinstance(k, str) for k in options) or not _is_json(options):
            problems.append(f"{where}: options must be plain YAML values under string keys")
        elif "budget" in options:
            problems.append(f"{where}: budget comes from the study's budgets list; remove it here")
        else:
            try:  # an option the policy does not take or a bad value: fail before any model loads
                make_policy({"name": name, **options})
            except RecipeError as e:
                problems.append(f"{where}: {e}")
                continue
            entries.append(PolicyEntry(name=name, options=options))
    return entries


def _is_json(value: Any) -> bool:
    # Options become part of each cell's key (JSON), so they must serialize as they are.
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _parse_budgets(items: Any, problems: list[str]) -> list[float | int]:
    if not isinstance(items, list):
        problems.append(f"budgets: expected a list; each budget is {_BUDGET_HELP}")
        return []
    for i, b in enumerate(items):
        fraction = isinstance(b, float) and 0 < b <= 1
        tokens = isinstance(b, int) and not isinstance(b, bool) and b >= 1
        if not (fraction or tokens):
            problems.append(f"budgets[{i}]: a budget is {_BUDGET_HELP}; got {b!r}")
    return list(items)


def _check(study: StudyConfig, folder: Path) -> list[str]:
    """Cross-field checks: duplicates, budgets for sparse policies, tasks, plot axes, recipes."""
    problems = _duplicates(study)
    sparse = sorted({p.name for p in study.policies if p.name != "dense"})
    if sparse and not study.budgets:
        problems.append(f"budgets: missing; {', '.join(sparse)} need budgets, each {_BUDGET_HELP}")
    if study.name is not None and (
        study.name in ("", ".", "..") or re.search(r"[/\\]", study.name)
    ):
        problems.append(
            f"name: '{study.name}' names the output folder out/<name>; use one folder name "
            "(no / or \\, not . or ..)"
        )
    if not study.tasks.names():
        problems.append(f"tasks: configure at least one of {', '.join(TASK_METRICS)}")
    else:
        problems.extend(_check_plot(study))
    for i, entry in enumerate(study.quant):
        if entry.recipe is not None:
            problems.extend(_resolve_recipe(entry, f"quant[{i}].recipe", folder))
    return problems


def _duplicates(study: StudyConfig) -> list[str]:
    # Labels key the results; a repeated one would make two cells indistinguishable.
    lists = {
        "models": study.models,
        "quant": [q.name for q in study.quant],
        "policies": [json.dumps([p.name, p.options], sort_keys=True) for p in study.policies],
        "budgets": [(type(b), b) for b in study.budgets],
        "contexts": study.contexts,
    }
    problems = []
    for key, values in lists.items():
        for i, value in enumerate(values):
            if value in values[:i]:
                problems.append(f"{key}[{i}]: repeats {key}[{values.index(value)}]; remove it")
    return problems


def _check_plot(study: StudyConfig) -> list[str]:
    metrics = study.tasks.metrics()
    if study.plot.y is None:
        study.plot.y = next(m for m in _DEFAULT_Y if m in metrics)
    return [
        f"plot.{axis}: '{value}' is not a metric of this study; allowed: {', '.join(metrics)}"
        for axis, value in (("x", study.plot.x), ("y", study.plot.y))
        if value not in metrics
    ]


def _resolve_recipe(entry: QuantEntry, where: str, folder: Path) -> list[str]:
    """Point ``entry.recipe`` at the absolute recipe path and validate the recipe."""
    assert entry.recipe is not None
    given = Path(entry.recipe).expanduser()
    candidates = [given] if given.is_absolute() else [folder / given, Path.cwd() / given]
    found = next((c for c in candidates if c.is_file()), None)
    if found is None:
        looked = ", ".join(str(c) for c in dict.fromkeys(candidates))
        return [f"{where}: no recipe file '{entry.recipe}' (looked for {looked})"]
    entry.recipe = str(found.resolve())
    try:
        load_recipe(found)
    except RecipeError as e:
        return [f"{where}: {e}"]
    return []
