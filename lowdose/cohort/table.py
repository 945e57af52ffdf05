"""The cohort table, one row per study, as Parquet and CSV (``cohort.parquet``, ``cohort.csv``).

Columns: study, source, status (done, failed or pending), error, denoised / report / thumbnail (paths relative
to the output folder), model, dose_fraction, dose_source, strength, device, worker, verdict, summary, flagged
(names separated by ``;``), structures_present, kept / check / changed (structure counts), seconds_<step>
(fetch, load, model_load, denoise, save, fidelity, thumbnail, total), peak_rss_mb, model_loads, created,
lowdose_version;
then per structure found in any study ``<structure>.dice``, ``.nsd_<t>mm`` (surface Dice), ``.hd95_mm``,
``.hu_shift``, ``.verdict`` (denoised against original; empty where undefined).
"""

from __future__ import annotations

from pathlib import Path

from ..atomic import atomic_output
from .results import StudyResult

STEPS = ("fetch", "load", "model_load", "denoise", "save", "fidelity", "thumbnail", "total")


def _study_columns(r: StudyResult) -> dict:
    folder = f"studies/{r.study}"
    row = {
        "study": r.study,
        "source": r.source,
        "status": r.status,
        "error": r.error,
        "denoised": f"{folder}/{r.denoised}" if r.denoised else None,
        "report": f"{folder}/{r.report}" if r.report else None,
        "thumbnail": f"{folder}/{r.thumbnail}" if r.thumbnail else None,
        "model": r.model,
        "dose_fraction": r.dose_fraction,
        "dose_source": r.dose_source,
        "strength": r.strength,
        "device": r.device,
        "worker": r.worker,
        "verdict": r.verdict,
        "summary": r.summary,
        "flagged": ";".join(r.flagged),
        "structures_present": r.structures_present,
        **{v: r.counts.get(v) if r.counts else None for v in ("kept", "check", "changed")},
        **{f"seconds_{step}": r.timings_s.get(step) for step in STEPS},
        "peak_rss_mb": r.peak_rss_mb,
        "model_loads": r.model_loads,
        "created": r.created,
        "lowdose_version": r.lowdose_version,
    }
    return row


def _structure_columns(results: list[StudyResult]) -> list[tuple[str, str]]:
    """(structure, figure) pairs in label order, for every structure any done study reports."""
    labels: dict[str, int] = {}
    surface: set[str] = set()
    for r in results:
        for s in r.structures:
            labels.setdefault(s.name, s.label)
            surface.update(s.surface_dice)
    figures = ["dice", *sorted(surface), "hd95_mm", "hu_shift", "verdict"]
    return [(name, figure) for name in sorted(labels, key=labels.__getitem__) for figure in figures]


def table_columns(results: list[StudyResult]) -> dict[str, list]:
    """The table as columns (name -> one value per study, None where undefined)."""
    rows = [_study_columns(r) for r in results]
    columns: dict[str, list] = {
        name: [row[name] for row in rows] for name in (rows[0] if rows else _study_columns(StudyResult("", "", "")))
    }
    for name, figure in _structure_columns(results):
        values: list = []
        for r in results:
            s = next((s for s in r.structures if s.name == name), None)
            if s is None:
                values.append(None)
            elif figure.startswith("nsd_"):
                values.append(s.surface_dice.get(figure))
            else:
                values.append(getattr(s, figure))
        columns[f"{name}.{figure}"] = values
    return columns


def write_tables(results: list[StudyResult], parquet: Path, csv: Path) -> tuple[Path, Path]:
    """Write the table as Parquet and CSV, each atomically."""
    import pyarrow as pa  # 0.3 s to import: only when a cohort is written
    import pyarrow.csv as pa_csv
    import pyarrow.parquet as pq

    columns = table_columns(results)
    table = pa.table({name: pa.array(values, type=_arrow_type(pa, name)) for name, values in columns.items()})
    with atomic_output(parquet, suffix=".parquet") as tmp:
        pq.write_table(table, tmp)
    with atomic_output(csv, suffix=".csv") as tmp:
        pa_csv.write_csv(table, tmp)
    return parquet, csv


_TEXT = {"study", "source", "status", "error", "denoised", "report", "thumbnail", "model", "dose_source", "device"}
_TEXT |= {"worker", "verdict", "summary", "flagged", "created", "lowdose_version"}
_COUNTS = {"structures_present", "kept", "check", "changed", "model_loads"}


def _arrow_type(pa, column: str):
    """Text, whole numbers (structure counts) or floats; empty cells are nulls."""
    if column in _TEXT or column.endswith(".verdict"):
        return pa.string()
    return pa.int64() if column in _COUNTS else pa.float64()
