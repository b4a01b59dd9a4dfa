"""Reports: the Pareto front on hand-made points, markdown formatting, the plot, the CSV."""

from __future__ import annotations

from pathlib import Path

import pytest

from tersa.study.report import (
    columns,
    front_indices,
    pareto_front,
    plot_pareto,
    plotted_points,
    read_csv,
    shown,
    write_csv,
    write_markdown,
)


def row(policy: str, budget: str, status: str = "ok", quant: str = "fp", **metrics: str) -> dict:
    return {
        "model": "m",
        "quant": quant,
        "policy": policy,
        "budget": budget,
        "context": "1024",
        "options": "{}",
        "status": status,
        "error": "" if status == "ok" else "ValueError: boom",
        "wall_s": "1.23456",
        **metrics,
    }


def test_pareto_front_minimises_x_and_maximises_y() -> None:
    points = [
        (0.5, 0.9),  # 0 front
        (0.25, 0.7),  # 1 front
        (0.25, 0.6),  # 2 same x as 1, lower y: beaten
        (1.0, 0.9),  # 3 same y as 0, larger x: beaten
        (1.0, 1.0),  # 4 front (best y)
        (0.125, 0.1),  # 5 front (least x)
        (0.5, 0.5),  # 6 beaten by 1
        (0.25, 0.7),  # 7 duplicate of 1: neither beats the other
    ]
    assert pareto_front(points) == [5, 1, 7, 0, 4]


def test_pareto_front_small_cases() -> None:
    assert pareto_front([]) == []
    assert pareto_front([(3.0, 1.0)]) == [0]
    assert pareto_front([(1.0, 1.0), (2.0, 0.0)]) == [0]  # one point beats the other outright


def test_front_follows_each_metrics_sense() -> None:
    rows = [
        row("a", "0.25", kv_fraction_read="0.25", ppl="20.0", needle_exact="0.5"),
        row("b", "0.5", kv_fraction_read="0.5", ppl="12.0", needle_exact="0.25"),
        row("c", "1.0", kv_fraction_read="1.0", ppl="15.0", needle_exact="1.0"),
    ]
    points = plotted_points(rows, "kv_fraction_read", "ppl")
    # lower perplexity is better: c (more KV, worse ppl than b) is off the front
    assert [points[i][0]["policy"] for i in front_indices(points, "kv_fraction_read", "ppl")] == [
        "a",
        "b",
    ]
    points = plotted_points(rows, "kv_fraction_read", "needle_exact")
    front = front_indices(points, "kv_fraction_read", "needle_exact")
    assert [points[i][0]["policy"] for i in front] == ["a", "c"]


def test_plotted_points_skip_errors_and_missing_values() -> None:
    rows = [
        row("a", "0.25", kv_fraction_read="0.25", needle_exact="0.5"),
        row("b", "0.5", status="error"),
        row("c", "0.5", kv_fraction_read="0.5", needle_exact="nan"),
        row("d", "0.5", kv_fraction_read="0.5"),
    ]
    assert [
        r["policy"] for r, _, _ in plotted_points(rows, "kv_fraction_read", "needle_exact")
    ] == ["a"]


def test_plot_writes_a_png(tmp_path) -> None:
    rows = [
        row("dense", "1.0", kv_fraction_read="1.0", needle_exact="1.0"),
        row("quest", "0.25", kv_fraction_read="0.3", needle_exact="0.75"),
        row("quest", "0.25", quant="w8", kv_fraction_read="0.3", needle_exact="0.5"),
        row("snapkv", "0.25", status="error"),
    ]
    path = tmp_path / "p.png"
    assert plot_pareto(rows, "kv_fraction_read", "needle_exact", path, title="t")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["p.png"]  # no temp file left


def test_plot_without_points_writes_nothing(tmp_path) -> None:
    rows = [row("quest", "0.25", status="error")]
    assert not plot_pareto(rows, "kv_fraction_read", "needle_exact", tmp_path / "p.png")
    assert not (tmp_path / "p.png").exists()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0.123456", "0.1235"),
        ("12345.678", "1.235e+04"),
        ("4096", "4096"),
        ("nan", "nan"),
        ("", ""),
    ],
)
def test_numbers_show_four_significant_digits(text, expected) -> None:
    assert shown(text) == expected


def test_markdown_has_one_table_per_build(tmp_path) -> None:
    rows = [
        row("dense", "1.0", needle_exact="0.987654"),
        row("quest", "0.25", status="error"),
        row("dense", "1.0", quant="w8", needle_exact="0.5"),
    ]
    path = tmp_path / "r.md"
    write_markdown(rows, path, title="tersa study: s")
    text = path.read_text()
    assert text.splitlines()[0] == "# tersa study: s"
    assert "## m · fp" in text and "## m · w8" in text
    assert (
        "| policy | budget | context | status | needle_exact | wall_s | error |\n"
        "| --- | --- | --- | --- | --- | --- | --- |\n"
        "| dense | 1.0 | 1024 | ok | 0.9877 | 1.235 |  |\n"
        "| quest | 0.25 | 1024 | error |  | 1.235 | ValueError: boom |\n"
    ) in text
    # no errors in the w8 table: no error column
    assert "| dense | 1.0 | 1024 | ok | 0.5 | 1.235 |\n" in text


def test_csv_round_trip_and_column_order(tmp_path) -> None:
    rows = [row("dense", "1.0", zeta="1.5", alpha="2"), row("quest", "0.25", status="error")]
    path = tmp_path / "r.csv"
    write_csv(rows, path)
    header = path.read_text().splitlines()[0]
    assert header == "model,quant,policy,budget,context,options,status,error,wall_s,alpha,zeta"
    back = read_csv(path)
    assert back[0] == rows[0]
    assert back[1]["alpha"] == "" and back[1]["status"] == "error"
    assert columns(back) == header.split(",")
    assert [p.name for p in tmp_path.iterdir()] == ["r.csv"]


def test_read_csv_rejects_a_foreign_file(tmp_path) -> None:
    path = tmp_path / "r.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="no column model, quant"):
        read_csv(path)


def test_failed_write_keeps_the_old_file(tmp_path, monkeypatch) -> None:
    path = tmp_path / "r.csv"
    write_csv([row("dense", "1.0")], path)
    before = path.read_text()

    def crash(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("csv.DictWriter.writerows", crash)
    with pytest.raises(KeyboardInterrupt):
        write_csv([row("quest", "0.5")], Path(path))
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["r.csv"]
