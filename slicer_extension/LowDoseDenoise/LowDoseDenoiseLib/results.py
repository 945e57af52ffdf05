"""The server's answers made ready for display: the fidelity report as table rows and cells, the structures'
names and colours, and the record kept on each denoised volume (which model, dose, strength, sampling steps and
self-ensemble made it)."""

from __future__ import annotations

import json

from .ensemble import DEFAULT_ENSEMBLE, check_ensemble, ensemble_name
from .steps import steps_name
from .strength import strength_fraction, strength_name

FIDELITY_COLUMNS = (
    "structure",
    "verdict",
    "Dice",
    "HU mean before",
    "HU mean after",
    "HU SD before",
    "HU SD after",
    "flag",
)
FLAGGED_VERDICTS = ("changed", "check")  # the structures a reader should look at, worst first
VERDICT_COLOURS = {"changed": (255, 200, 200), "check": (255, 235, 190)}  # RGB of flagged rows: red, amber
_PAIR = "denoised_vs_original"


# ----------------------------------------------------------------------------------------- fidelity report


def fidelity_rows(report: dict, flagged_only: bool = False) -> list[dict]:
    """Table rows of a fidelity report: one per structure present in a scan, flagged ones first.

    Each row: label, name, verdict, dice, hu_mean_before/after, hu_sd_before/after (None when not
    measured), flagged (verdict "check" or "changed"), reasons (text).
    """
    rows = []
    for s in report.get("structures", []):
        if s.get("verdict") == "absent":
            continue
        images = s.get("images", {})
        before, after = images.get("original", {}), images.get("denoised", {})
        flagged = s.get("verdict") in FLAGGED_VERDICTS
        if flagged_only and not flagged:
            continue
        rows.append(
            {
                "label": s.get("label"),
                "name": s.get("name", "?"),
                "verdict": s.get("verdict", "?"),
                "dice": (s.get("pairs", {}).get(_PAIR) or {}).get("dice"),
                "hu_mean_before": before.get("hu_mean"),
                "hu_mean_after": after.get("hu_mean"),
                "hu_sd_before": before.get("hu_std"),
                "hu_sd_after": after.get("hu_std"),
                "flagged": flagged,
                "reasons": "; ".join(s.get("reasons") or []),
            }
        )
    order = {verdict: rank for rank, verdict in enumerate(FLAGGED_VERDICTS)}
    rows.sort(key=lambda r: (order.get(r["verdict"], len(order)), r["name"]))
    return rows


def _number(value: float | None, digits: int) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def fidelity_cells(row: dict) -> list[str]:
    """The texts of one table row, in the order of FIDELITY_COLUMNS (Dice to 3 decimals, HU to 1)."""
    return [
        row["name"],
        row["verdict"],
        _number(row["dice"], 3),
        _number(row["hu_mean_before"], 1),
        _number(row["hu_mean_after"], 1),
        _number(row["hu_sd_before"], 1),
        _number(row["hu_sd_after"], 1),
        "yes" if row["flagged"] else "",
    ]


def fidelity_verdict(report: dict) -> str:
    """The study's verdict line: "Verdict: KEPT - <the server's summary>"."""
    study = report.get("study", {})
    return f"Verdict: {str(study.get('verdict', '?')).upper()} - {study.get('summary', '')}"


def flagged_structures(report: dict) -> set[str]:
    """Names of the structures whose verdict is "check" or "changed"."""
    return {row["name"] for row in fidelity_rows(report, flagged_only=True)}


def fidelity_label_names(report: dict) -> dict[int, str]:
    """Label value -> structure name, for naming the segments of the returned label maps."""
    return {int(s["label"]): str(s["name"]) for s in report.get("structures", []) if "label" in s and "name" in s}


def colour_table_names(names: dict[int, str]) -> list[str]:
    """One name per label value from 0 to the largest, for a colour table: "background", the structure's name,
    or "label_<n>" for a value no structure has."""
    count = max(names) + 1 if names else 1
    return [names.get(value, f"label_{value}" if value else "background") for value in range(count)]


def structure_colour(value: int) -> tuple[float, float, float]:
    """A colour (RGB in [0, 1]) for a label value, when Slicer's anatomy colour table is missing: far apart for
    neighbouring values; black for the background (0)."""
    if not value:
        return (0.0, 0.0, 0.0)
    return (((value * 67) % 255) / 255.0, ((value * 151) % 255) / 255.0, ((value * 29) % 255) / 255.0)


# ----------------------------------------------------------------------------------------- denoised volumes


def denoised_volume_name(
    original_name: str, model_name: str, strength=None, steps: int | None = None, ensemble: int | None = None
) -> str:
    """The name of a denoised volume: ``<input>_denoised_<model>_<strength>`` ("..._medium", "..._0.5"; without
    the strength when None), then a diffusion model's sampling steps ("..._medium_2steps"), then a self-ensemble
    larger than 1 ("..._medium_x8"; nothing for 1 or None). The scene makes it unique."""
    name = f"{original_name}_denoised_{model_name}"
    name = name if strength is None else f"{name}_{strength_name(strength)}"
    name = name if steps is None else f"{name}_{steps_name(steps)}"
    suffix = "" if ensemble is None else ensemble_name(ensemble)
    return f"{name}_{suffix}" if suffix else name


def denoised_record(
    model_name: str, task: str, summary: dict, strength=None, steps: int | None = None, ensemble: int | None = None
) -> str:
    """The JSON text kept on a denoised volume: the model, its task and the server's summary (dose used,
    strength, sampling steps, self-ensemble...). ``strength``, ``steps`` and ``ensemble``, those asked for, are
    recorded (the strength as a fraction) when the summary has none."""
    record = {"model": model_name, "task": task, **summary}
    if record.get("strength") is None and strength is not None:
        record["strength"] = strength_fraction(strength)
    if record.get("steps") is None and steps is not None:
        record["steps"] = steps
    if record.get("ensemble") is None and ensemble is not None:
        record["ensemble"] = check_ensemble(ensemble)
    return json.dumps(record)


def record_strength(record: str | None) -> float | None:
    """The strength (fraction of the noise removal applied) a denoised volume's record says; 1.0 (all) for a
    record without one, made before strengths existed; None for an unreadable record."""
    try:
        summary = json.loads(record or "")
        value = summary.get("strength", 1.0) if isinstance(summary, dict) else None
        return None if value is None else strength_fraction(value)
    except (ValueError, AttributeError):  # not JSON, or a strength that is not one
        return None


def record_steps(record: str | None) -> int | None:
    """The sampling steps a denoised volume's record says; None for a model that takes none, a record made
    before steps existed, or an unreadable record or value."""
    try:
        summary = json.loads(record or "")
    except ValueError:
        return None
    steps = summary.get("steps") if isinstance(summary, dict) else None
    return steps if isinstance(steps, int) and not isinstance(steps, bool) else None


def record_ensemble(record: str | None) -> int | None:
    """The self-ensemble (1, 2, 4 or 8) a denoised volume's record says; 1 (the network alone) for a record
    without one, made before the ensemble existed; None for an unreadable record or value."""
    try:
        summary = json.loads(record or "")
    except ValueError:
        return None
    if not isinstance(summary, dict):
        return None
    try:
        return check_ensemble(summary.get("ensemble", DEFAULT_ENSEMBLE))
    except ValueError:
        return None


def made_with(
    record: str | None,
    model_name: str,
    dose,
    strength="medium",
    steps: int | None = None,
    ensemble: int = DEFAULT_ENSEMBLE,
    version: str = "",
) -> bool:
    """Whether the denoised volume with this record was made by ``model_name`` at ``dose``: the same fraction,
    or for "auto" a dose the model estimated, at ``strength`` (the same fraction of the noise removal), in
    ``steps`` sampling steps (None: a model that takes none) and with the self-ensemble ``ensemble`` (a record
    without one: 1), by the model's ``version`` the server offers now (a record or a server that names no
    version matches any). An unreadable record matches nothing."""
    try:
        summary = json.loads(record or "{}")
    except ValueError:
        return False
    if not isinstance(summary, dict) or summary.get("model") != model_name:
        return False
    if version and summary.get("model_version") and summary.get("model_version") != version:
        return False  # made by another version of the model: an update on the server makes it anew
    found = record_strength(record)
    if found is None or abs(found - strength_fraction(strength)) > 1e-6:
        return False
    if record_steps(record) != steps or (steps is None and summary.get("steps") is not None):
        return False  # other steps, or steps that are not a number
    if record_ensemble(record) != check_ensemble(ensemble):
        return False  # another self-ensemble, or one that is not a size
    if dose == "auto":
        return summary.get("dose_source") == "estimated"
    try:
        return abs(float(summary.get("dose_fraction") or -1) - float(dose)) < 1e-6
    except (TypeError, ValueError):
        return False
