"""``summary.csv``: one row per output folder of ``covfast infer``, the numbers a cohort study loads into a table.

The file lives in the output root beside the per-input folders. Every run updates the rows of the inputs it
finished, keyed by output folder name, and keeps the others, so two runs into the same root give one table. A row
is written only for an input whose outputs were written; a failed input keeps whatever row an earlier run left, as
it keeps its earlier folder. The file is replaced atomically, and a file that is not such a table is refused rather
than overwritten.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from covfast.errors import OutputError

FILENAME = "summary.csv"
# (column, how to read it from report.json); None where the report has no value.
COLUMNS = (
    "output",
    "input",
    "lung_ml",
    "infected_ml",
    "ggo_ml",
    "consolidation_ml",
    "percent_infected",
    "percent_infected_mean_of_slices",
    "ct_class",
    "zone_ct_score",
    "covid_positive_slices",
    "lesions",
    "peripheral_odds_ratio",
    "peripheral_odds_ratio_low",
    "peripheral_odds_ratio_high",
    "pattern",
    "bilateral",
    "diagnosis",
    "p_covid",
    "p_pneumonia",
    "p_normal",
    "seconds",
    "notes",
)


def _get(report: dict, *keys):
    value = report
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def row(name: str, report: dict) -> dict[str, str]:
    """The summary row of one report (``name``: its output folder's name)."""
    slices = report.get("slices") or []
    low, high = _get(report, "distribution", "peripheral_odds_ratio_interval") or (None, None)
    values = {
        "output": name,
        "input": _get(report, "input", "path"),
        "lung_ml": _get(report, "lung_volume_ml", "total"),
        "infected_ml": _get(report, "infected_volume_ml", "total"),
        "ggo_ml": _get(report, "infected_volume_ml", "ggo"),
        "consolidation_ml": _get(report, "infected_volume_ml", "consolidation"),
        "percent_infected": _get(report, "percent_infected", "volumetric"),
        "percent_infected_mean_of_slices": _get(report, "percent_infected", "mean_of_slices"),
        "ct_class": _get(report, "severity", "ct_class"),
        "zone_ct_score": report.get("zone_ct_score"),
        "covid_positive_slices": (
            sum(bool(s.get("covid_positive")) for s in slices)
            if any(s.get("covid_positive") is not None for s in slices) else None
        ),
        "lesions": _get(report, "lesions", "count"),
        "peripheral_odds_ratio": _get(report, "distribution", "peripheral_odds_ratio"),
        "peripheral_odds_ratio_low": low,
        "peripheral_odds_ratio_high": high,
        "pattern": _get(report, "distribution", "pattern"),
        "bilateral": _get(report, "distribution", "bilateral") if report.get("distribution") else None,
        "diagnosis": _get(report, "diagnosis", "label"),
        "p_covid": _get(report, "diagnosis", "probs", "covid"),
        "p_pneumonia": _get(report, "diagnosis", "probs", "pneumonia"),
        "p_normal": _get(report, "diagnosis", "probs", "normal"),
        "seconds": _get(report, "timings_s", "total"),
        "notes": " | ".join(report.get("notes") or []) or None,
    }
    return {column: _cell(values[column]) for column in COLUMNS}


def read(path: Path) -> list[dict[str, str]]:
    """Rows of an existing summary.csv (none when there is no file).

    Raises:
        OutputError: the file exists but is not a covfast summary table (its header differs).
    """
    if not path.exists():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise OutputError(path, f"cannot read the existing summary table ({exc})") from None
    reader = csv.DictReader(io.StringIO(text))
    if tuple(reader.fieldnames or ()) != COLUMNS:
        raise OutputError(path, "exists but is not a covfast summary table (other columns); move it away")
    return list(reader)


def update(out_root, rows: list[dict[str, str]]) -> Path:
    """Merge ``rows`` into ``out_root/summary.csv`` by output name (new rows replace old ones of the same name;
    rows sorted by name) and write it atomically. Returns its path."""
    from covfast.io.atomic import atomic_write

    path = Path(out_root) / FILENAME
    merged = {r["output"]: r for r in read(path)}
    merged.update((r["output"], r) for r in rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for name in sorted(merged):
        writer.writerow({column: merged[name].get(column, "") for column in COLUMNS})
    data = buffer.getvalue().encode("utf-8")
    atomic_write(path, lambda file: file.write(data))
    return path
