"""Recipes: the YAML a user writes, validated completely before any work starts.

A recipe names the model, the calibration and evaluation data, an ordered list of stages and the
export. Each stage item is a one-key mapping ``{stage_name: {field: value}}`` whose fields are exactly
those of the stage's registered config dataclass. Every problem is reported in one message that
names the key path (``stages[0].quantize.weights.bits``) and what is allowed.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, TypeAdapter, ValidationError
from pydantic.dataclasses import dataclass

from tersa.config import STRICT, Bool, Int, Str
from tersa.errors import RecipeError
from tersa.registry import stages

RECIPE_VERSION = 1


@dataclass(config=STRICT)
class CalibrationConfig:
    """Calibration text, cut into ``samples`` random windows of ``seq_len`` tokens."""

    data: Annotated[Str, Field(description="embedded:shakespeare, a local file, or a hub name")] = (
        "embedded:shakespeare"
    )
    split: Annotated[
        Str | None, Field(description="data split (embedded default: calibration)")
    ] = None
    text_field: Annotated[Str, Field(description="text field of json/jsonl/parquet records")] = (
        "text"
    )
    samples: Annotated[Int, Field(ge=1, description="number of calibration samples")] = 128
    seq_len: Annotated[Int, Field(ge=2, description="tokens per calibration sample")] = 512
    batch_size: Annotated[Int, Field(ge=1, description="samples per forward pass")] = 8
    seed: Annotated[Int, Field(description="seed for the sample offsets")] = 0


@dataclass(config=STRICT)
class EvaluationConfig:
    """Perplexity over non-overlapping windows of the evaluation text."""

    data: Annotated[Str, Field(description="embedded:shakespeare, a local file, or a hub name")] = (
        "embedded:shakespeare"
    )
    split: Annotated[Str | None, Field(description="data split (embedded default: evaluation)")] = (
        None
    )
    text_field: Annotated[Str, Field(description="text field of json/jsonl/parquet records")] = (
        "text"
    )
    seq_len: Annotated[Int, Field(ge=2, description="tokens per window")] = 512
    max_windows: Annotated[Int | None, Field(ge=1, description="windows scored (null: all)")] = 40
    spread: Annotated[
        Bool, Field(description="spread the windows evenly over the text (false: the first ones)")
    ] = True
    batch_size: Annotated[Int, Field(ge=1, description="windows per forward pass")] = 8
    baseline: Annotated[Bool, Field(description="also score the uncompressed model")] = True


@dataclass(config=STRICT)
class ExportConfig:
    """What is written to the output folder besides metrics.json and recipe.yaml."""

    model: Annotated[Bool, Field(description="write the compressed model (safetensors)")] = True
    tokenizer: Annotated[Bool, Field(description="write the tokenizer next to it")] = True
    lossless: Annotated[
        Bool,
        Field(description="entropy-code the tensors into model.tersa (tersa loads it, not HF)"),
    ] = False


@dataclass(config=STRICT)
class Recipe:
    """A complete, validated recipe. ``stages`` holds (name, config instance) pairs."""

    model: Annotated[Str, Field(description="embedded:smollm2-135m or a local HF folder")]
    stages: list[tuple[str, Any]]
    dtype: Annotated[
        Literal["float32", "bfloat16", "float16"], Field(description="compute dtype")
    ] = "float32"
    device: Annotated[
        Literal["auto", "cpu", "cuda"], Field(description="compute device (auto: cuda if present)")
    ] = "auto"
    offload: Annotated[
        Bool,
        Field(description="keep weights on the CPU; one block at a time moves to the device"),
    ] = False
    version: Annotated[Int, Field(ge=1, le=RECIPE_VERSION, description="recipe format version")] = (
        RECIPE_VERSION
    )
    calibration: CalibrationConfig | None = Field(default_factory=CalibrationConfig)
    evaluation: EvaluationConfig | None = Field(default_factory=EvaluationConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)

    def to_dict(self) -> dict[str, Any]:
        """The resolved recipe (every default filled in), as plain YAML-able data."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["stages"] = [{name: cfg} for name, cfg in self.stages]
        return _plain(out)


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


_TOP_KEYS = [f for f in Recipe.__dataclass_fields__ if f != "stages"] + ["stages"]


def load_recipe(path: str | Path) -> Recipe:
    """Read and validate a recipe file; :class:`RecipeError` on any problem."""
    return parse_recipe(read_yaml(path, "recipe"), source=str(path))


def read_yaml(path: str | Path, what: str) -> Any:
    """The YAML data of the file at ``path`` (a ``what``, e.g. "training recipe", in messages).

    :raises RecipeError: the file is missing, not UTF-8 or not valid YAML (with the position).
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe '{path}' does not exist; give the path of a {what} YAML file")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"recipe '{path}' is not valid YAML{where}: {e}") from None
    except UnicodeDecodeError:
        raise RecipeError(f"recipe '{path}' is not UTF-8 text") from None


def parse_recipe(data: Any, source: str = "recipe") -> Recipe:
    """Validate recipe data (the YAML as Python objects)."""
    if not isinstance(data, dict):
        raise RecipeError(f"{source}: a recipe is a mapping with keys {', '.join(_TOP_KEYS)}")
    data = dict(data)
    if "training" in data and "stages" not in data:
        raise RecipeError(f"{source}: this is a training recipe; run it with `tersa train`")
    if "policies" in data and "stages" not in data:
        raise RecipeError(f"{source}: this is a study; run it with `tersa study`")
    if "model" not in data:
        raise RecipeError(f"{source}: missing key 'model' (embedded:smollm2-135m or a folder)")
    problems: list[str] = []
    stage_list = _parse_stages(data.pop("stages", []), problems)
    problems.extend(_check_order(stage_list))
    try:
        recipe = TypeAdapter(Recipe).validate_python({**data, "stages": []})
    except ValidationError as e:
        problems[:0] = _format_errors(e, Recipe, prefix="")
        recipe = None
    if problems:
        head = f"{source}: " + ("invalid recipe" if len(problems) > 1 else problems[0])
        raise RecipeError(head if len(problems) == 1 else head + "\n  " + "\n  ".join(problems))
    assert recipe is not None
    recipe.stages = stage_list
    return recipe


def _parse_stages(items: Any, problems: list[str]) -> list[tuple[str, Any]]:
    registry = stages()
    allowed = ", ".join(registry)
    if not isinstance(items, list):
        problems.append(f"stages: expected a list of stages (allowed stages: {allowed})")
        return []
    parsed: list[tuple[str, Any]] = []
    for i, item in enumerate(items):
        where = f"stages[{i}]"
        if isinstance(item, str):
            item = {item: {}}
        if not isinstance(item, dict) or len(item) != 1:
            problems.append(f"{where}: each stage is a one-key mapping {{name: {{...}}}}")
            continue
        ((name, fields),) = item.items()
        if name not in registry:
            problems.append(f"{where}: unknown stage '{name}'; allowed: {allowed}")
            continue
        config = registry[name].config
        try:
            parsed.append((name, TypeAdapter(config).validate_python(fields or {})))
        except ValidationError as e:
            problems.extend(_format_errors(e, config, prefix=f"{where}.{name}"))
    return parsed


def _check_order(stage_list: list[tuple[str, Any]]) -> list[str]:
    """Transforms of the float model must precede the quantization they prepare for, and a stage
    must follow the stages it names in ``follows``."""
    registry = stages()
    problems = []
    for i, (name, _) in enumerate(stage_list):
        problems.extend(
            f"stages[{j}]: '{later}' cannot handle what '{name}' (stages[{i}]) builds and must "
            f"come before it; move it up"
            for j, (later, _) in enumerate(stage_list)
            if j > i and later in registry[name].follows
        )
    first_quant = next(
        (i for i, (name, _) in enumerate(stage_list) if registry[name].kind == "quantize"), None
    )
    if first_quant is None:
        return problems
    quant = stage_list[first_quant][0]
    return [
        f"stages[{i}]: '{name}' transforms the float model and must come before "
        f"'{quant}' (stages[{first_quant}]); move it up"
        for i, (name, _) in enumerate(stage_list)
        if i > first_quant and registry[name].kind == "transform"
    ] + problems


def _format_errors(error: ValidationError, root: type, prefix: str) -> list[str]:
    """One line per pydantic error: key path, what is wrong, what is allowed."""
    lines = []
    for err in error.errors():
        loc = [str(p) for p in err["loc"] if p not in ("function-after",)]
        path = _join_path(prefix, loc)
        kind = err["type"]
        if kind in ("unexpected_keyword_argument", "extra_forbidden"):
            allowed = ", ".join(_fields_at(root, loc[:-1])) or "none"
            lines.append(f"{path}: unknown key '{loc[-1]}'; allowed: {allowed}")
        elif kind == "missing_argument" or kind == "missing":
            lines.append(f"{path}: missing required key")
        elif kind == "value_error":
            lines.append(f"{path or prefix}: {err['msg'].removeprefix('Value error, ')}")
        else:
            got = err.get("input")
            shown = "" if isinstance(got, dict) else f" (got {got!r})"
            lines.append(f"{path}: {err['msg'].lower()}{shown}")
    return lines


def _join_path(prefix: str, loc: list[str]) -> str:
    parts = [prefix] if prefix else []
    for p in loc:
        parts.append(f"[{p}]" if p.isdigit() else p)
    return ".".join(parts).replace(".[", "[")


def _fields_at(root: type, loc: list[str]) -> list[str]:
    """Field names of the (nested) config dataclass reached by following ``loc`` from ``root``."""
    cls: Any = root
    for key in loc:
        info = getattr(cls, "__pydantic_fields__", {}).get(key)
        if info is None:
            return []
        cls = next((t for t in _dataclass_types(info.annotation)), None)
    return list(getattr(cls, "__pydantic_fields__", {}))


def _dataclass_types(tp: Any) -> list[type]:
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return [tp]
    return [t for arg in typing.get_args(tp) for t in _dataclass_types(arg)]


def config_fields(config: type, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(name, type, default, description) of each field of a config dataclass, nested fields
    flattened as ``weights.bits``; for `tersa stages`."""
    rows = []
    for name, info in config.__pydantic_fields__.items():  # type: ignore[attr-defined]
        default = (
            "(required)" if info.is_required() else info.get_default(call_default_factory=True)
        )
        nested = _dataclass_types(info.annotation)
        shown = "{...}" if nested and default is not None else _plain(default)
        rows.append((prefix + name, _type_name(info.annotation), shown, info.description or ""))
        for sub in nested:
            rows.extend(config_fields(sub, prefix=f"{prefix}{name}."))
    return rows


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _type_name(typing.get_args(tp)[0])
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(tp))
        return f"{getattr(origin, '__name__', origin)}[{args}]"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))
