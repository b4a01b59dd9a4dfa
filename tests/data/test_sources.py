"""load_text: every spec kind, and one test per rejection with its exact message."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from tersa.data import sources
from tersa.data.embedded import load_embedded
from tersa.data.sources import load_text
from tersa.errors import DataError

RECORDS = [{"text": "first record", "id": 1}, {"text": "second\nrecord", "id": 2}]
JOINED = "first record\n\nsecond\nrecord"
OFFLINE = "local files (.txt, .json, .jsonl, .parquet) and embedded:shakespeare work offline"


def _message(spec: str, **kwargs: object) -> str:
    with pytest.raises(DataError) as e:
        load_text(spec, **kwargs)
    return str(e.value)


# --- kinds that load ---


def test_embedded_split() -> None:
    assert load_text("embedded:shakespeare", "evaluation") == load_embedded(
        "shakespeare", "evaluation"
    )


def test_embedded_without_split_is_all() -> None:
    assert load_text("embedded:shakespeare") == load_embedded("shakespeare", "all")


def test_txt_is_the_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    content = "line one\nline two\n\nafter a blank line\n"
    path.write_text(content, encoding="utf-8")
    assert load_text(str(path)) == content


def test_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in RECORDS) + "\n", encoding="utf-8")
    assert load_text(str(path)) == JOINED


def test_json_list(tmp_path: Path) -> None:
    path = tmp_path / "a.json"
    path.write_text(json.dumps(RECORDS), encoding="utf-8")
    assert load_text(str(path)) == JOINED


def test_parquet(tmp_path: Path) -> None:
    path = tmp_path / "a.parquet"
    datasets.Dataset.from_list(RECORDS).to_parquet(str(path))
    assert load_text(str(path)) == JOINED


def test_other_text_field(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text('{"body": "x"}\n{"body": "y"}\n', encoding="utf-8")
    assert load_text(str(path), text_field="body") == "x\n\ny"


def test_local_file_ignores_split(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    path.write_text("some text", encoding="utf-8")
    assert load_text(str(path), "calibration") == "some text"


def test_hub_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[object, ...]] = []

    def split_names(name: str, config: str | None) -> list[str]:
        calls.append(("splits", name, config))
        return ["train", "validation"]

    def load_dataset(name: str, config: str | None, split: str) -> datasets.Dataset:
        calls.append(("load", name, config, split))
        return datasets.Dataset.from_list(RECORDS)

    monkeypatch.setattr(datasets, "get_dataset_split_names", split_names)
    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    assert load_text("allenai/c4:en.noblocklist", "validation") == JOINED
    assert load_text("wikitext") == JOINED
    assert calls == [
        ("splits", "allenai/c4", "en.noblocklist"),
        ("load", "allenai/c4", "en.noblocklist", "validation"),
        ("splits", "wikitext", None),
        ("load", "wikitext", None, "train"),
    ]


# --- rejections ---


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.jsonl"
    assert _message(str(path)) == f"data file {path} does not exist; check the path"


def test_unknown_extension(tmp_path: Path) -> None:
    path = tmp_path / "a.csv"
    path.write_text("text\nhello\n", encoding="utf-8")
    assert _message(str(path)) == (
        f"unknown file type '.csv' for {path}; use one of: .txt, .json, .jsonl, .parquet"
    )


def test_unknown_extension_of_missing_file() -> None:
    assert _message("data.csv") == (
        "unknown file type '.csv' for data.csv; use one of: .txt, .json, .jsonl, .parquet"
    )


def test_no_extension(tmp_path: Path) -> None:
    path = tmp_path / "corpus"
    path.write_text("hello", encoding="utf-8")
    assert _message(str(path)) == (
        f"unknown file type '(no extension)' for {path}; use one of: .txt, .json, .jsonl, .parquet"
    )


def test_missing_text_field(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text('{"body": "x", "id": 1}\n', encoding="utf-8")
    assert _message(str(path)) == (
        f"{path} has no field 'text'; fields found: body, id; set the text field to one of them"
    )


def test_field_that_is_not_text(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "x", "id": 1}\n', encoding="utf-8")
    assert _message(str(path), text_field="id") == (
        f"field 'id' of {path} holds Value('int64'), not text; choose a text field"
    )


def test_malformed_file(tmp_path: Path) -> None:
    path = tmp_path / "a.jsonl"
    path.write_text('{"text": "x"\n{oops', encoding="utf-8")
    message = _message(str(path))
    assert message.startswith(f"could not read {path}: ")
    assert message.endswith("; check that it is a valid json file")


def test_unknown_embedded_name() -> None:
    assert _message("embedded:wikitext") == (
        "unknown embedded dataset 'embedded:wikitext'; the embedded ones are: embedded:shakespeare"
    )


def test_unknown_embedded_split() -> None:
    assert _message("embedded:shakespeare", split="test") == (
        "unknown split 'test' for embedded:shakespeare; choose one of: calibration, evaluation, all"
    )


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("empty.txt", ""),
        ("blank.txt", " \n\n\t\n"),
        ("empty.jsonl", ""),
        ("blank.jsonl", '{"text": ""}\n'),
    ],
)
def test_empty_text(tmp_path: Path, name: str, content: str) -> None:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    assert _message(str(path)) == f"{path} holds no text; give a source with some text in it"


def test_hub_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    def offline(name: str, config: str | None) -> list[str]:
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "get_dataset_split_names", offline)
    assert _message("owner/name") == (
        "dataset 'owner/name' could not be loaded (ConnectionError: Couldn't reach 'owner/name' on "
        f"the Hub (OfflineModeIsEnabled)); check the name and the network, or use a local file: "
        f"{OFFLINE}"
    )


def test_hub_offline_for_real() -> None:
    # conftest sets HF_DATASETS_OFFLINE=1: the real datasets call fails fast, without the network.
    message = _message("tersa-tests/no-such-dataset")
    assert message.startswith("dataset 'tersa-tests/no-such-dataset' could not be loaded (")
    assert message.endswith(OFFLINE)


def test_hub_unknown_split(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(datasets, "get_dataset_split_names", lambda name, config: ["train", "test"])
    assert _message("owner/name", split="calibration") == (
        "unknown split 'calibration' for owner/name; choose one of: train, test"
    )


def test_local_files_leave_no_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: list[str] = []
    real = datasets.load_dataset

    def load_dataset(*args: object, cache_dir: str, **kwargs: object) -> datasets.Dataset:
        seen.append(cache_dir)
        return real(*args, cache_dir=cache_dir, **kwargs)

    monkeypatch.setattr(sources.datasets, "load_dataset", load_dataset)
    path = tmp_path / "a.txt"
    path.write_text("some text", encoding="utf-8")
    assert load_text(str(path)) == "some text"
    assert len(seen) == 1 and not Path(seen[0]).exists()
