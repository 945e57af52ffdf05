"""What a cohort run is given and what it finds, typed: the settings every study shares, one ``StudyResult`` per
study (written as ``studies/<id>/study.json``) and the ``CohortSummary`` of a run."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from ..ensemble import parse_ensemble
from ..fidelity.compare import FidelityThresholds
from ..limits import InputLimits

RECORD_VERSION = "1.0"
DONE, FAILED, PENDING = "done", "failed", "pending"
# The formats a denoised volume can be written in: a file suffix, or a folder holding a derived DICOM series.
OUTPUT_FORMATS = ("nii.gz", "nii", "nrrd", "mha", "dicom")


@dataclasses.dataclass(frozen=True)
class CohortSettings:
    """What every study of a cohort is run with (as ``lowdose denoise`` and ``lowdose fidelity`` take it).

    ``dose`` is a fraction or ``auto``; ``strength`` a fraction in [0, 1]; ``ensemble`` the self-ensemble (1, 2, 4
    or 8 in-plane symmetries averaged, lowdose.ensemble); ``fast`` picks TotalSegmentator's
    3 mm model (else the five 1.5 mm ones); ``weights`` overrides $TOTALSEG_WEIGHTS_PATH / $TOTALSEG_HOME_DIR;
    ``output_format`` is one of ``OUTPUT_FORMATS``; ``timeout_s`` bounds one study (0: no bound).
    """

    model: str = "dose_unet"
    dose: float | str = "auto"
    strength: float = 0.7
    ensemble: int = 1
    device: str = "auto"
    fast: bool = True
    weights: str | None = None
    thresholds: FidelityThresholds = dataclasses.field(default_factory=FidelityThresholds)
    output_format: str = "nii.gz"
    timeout_s: float = 7200.0
    pacs_url: str | None = None
    limits: InputLimits = dataclasses.field(default_factory=InputLimits.from_env)

    def __post_init__(self):
        parse_ensemble(self.ensemble)  # ValueError naming the allowed sizes
        if self.output_format not in OUTPUT_FORMATS:
            raise ValueError(f"output format must be one of {', '.join(OUTPUT_FORMATS)}; got {self.output_format!r}")

    @property
    def denoised_name(self) -> str:
        """The denoised volume's name inside a study folder: ``denoised.nii.gz`` or the folder ``denoised``."""
        return "denoised" if self.output_format == "dicom" else f"denoised.{self.output_format}"

    def key(self) -> dict:
        """What a finished study's outputs depend on: a study done with another key is done again."""
        return {
            "model": self.model,
            "dose": self.dose,
            "strength": round(float(self.strength), 6),
            # Only when on: a cohort finished before the self-ensemble existed keeps its results.
            **({"ensemble": self.ensemble} if self.ensemble != 1 else {}),
            "fast": self.fast,
            "thresholds": _plain(self.thresholds.as_dict()),
            "output_format": self.output_format,
        }


@dataclasses.dataclass(frozen=True)
class StructureFigures:
    """One structure of one study, denoised against original: the figures that go into the cohort table."""

    name: str
    label: int
    verdict: str  # kept, check, changed or absent
    dice: float | None
    surface_dice: dict[str, float | None]  # nsd_<t>mm -> normalised surface Dice at t mm
    hd95_mm: float | None
    hu_shift: float | None
    volume_change_pct: float | None

    @classmethod
    def from_fidelity(cls, structure) -> StructureFigures:
        """From a ``lowdose.fidelity.StructureResult``."""
        pair = structure.pairs.get("denoised_vs_original", {})
        return cls(
            name=structure.name,
            label=int(structure.label),
            verdict=structure.verdict,
            dice=_number(pair.get("dice")),
            surface_dice={k: _number(v) for k, v in sorted(pair.items()) if k.startswith("nsd_")},
            hd95_mm=_number(pair.get("hd95_mm")),
            hu_shift=_number(pair.get("hu_shift")),
            volume_change_pct=_number(pair.get("volume_change_pct")),
        )


@dataclasses.dataclass(frozen=True)
class FileStamp:
    """A written output's checksum, with the size and modification time it had when it was written (a rerun
    re-reads a file only when these changed, or with ``verify_checksums``)."""

    sha256: str
    size: int
    mtime_ns: int


@dataclasses.dataclass
class StudyResult:
    """One study of the cohort: done (denoised, checked) or failed (with its one-line error).

    ``files`` maps each output (relative to the study folder) to its ``FileStamp``. ``timings_s`` has
    fetch, load, model_load, denoise, save, fidelity, thumbnail and total (seconds; model_load is 0 when the
    worker had the model already). ``worker`` is ``host:pid``; ``model_loads`` the models that process had
    loaded by then; ``peak_rss_mb`` the worker's peak memory
    (itself plus its largest child process, i.e. nnU-Net's).
    """

    study: str
    source: str
    status: str
    error: str = ""
    settings_key: dict = dataclasses.field(default_factory=dict)
    fingerprint: str = ""
    series_uid: str | None = None
    denoised: str | None = None
    report: str | None = None
    thumbnail: str | None = None
    model: str | None = None
    dose_fraction: float | None = None
    dose_source: str | None = None
    strength: float | None = None
    device: str | None = None
    worker: str | None = None
    verdict: str | None = None
    summary: str | None = None
    flagged: list[str] = dataclasses.field(default_factory=list)
    structures_present: int | None = None
    counts: dict[str, int] = dataclasses.field(default_factory=dict)
    structures: list[StructureFigures] = dataclasses.field(default_factory=list)
    timings_s: dict[str, float] = dataclasses.field(default_factory=dict)
    peak_rss_mb: float | None = None
    model_loads: int | None = None  # models the worker process had loaded by then (1: loaded once, kept)
    transfer: str = "path"
    files: dict[str, FileStamp] = dataclasses.field(default_factory=dict)
    created: str = ""
    lowdose_version: str = ""
    record_version: str = RECORD_VERSION

    def to_json(self) -> dict:
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, data: dict) -> StudyResult:
        fields = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in data.items() if k in fields}
        values["structures"] = [StructureFigures(**s) for s in values.get("structures", [])]
        values["files"] = {k: FileStamp(**v) for k, v in values.get("files", {}).items()}
        return cls(**values)


@dataclasses.dataclass
class CohortSummary:
    """What a cohort run did: counts, where the table and report are, and how it ran."""

    output: Path
    total: int
    done: int  # done in this run
    failed: int  # failed in this run
    skipped: int  # finished (done or failed) in an earlier run and still valid
    pending: int  # not finished: the run was interrupted
    seconds: float
    table_parquet: Path
    table_csv: Path
    report_html: Path
    scheduler: dict[str, Any]
    results: list[StudyResult]

    @property
    def failed_total(self) -> int:
        """Studies whose record says failed, in this run or an earlier one."""
        return sum(r.status == FAILED for r in self.results)

    @property
    def done_total(self) -> int:
        return sum(r.status == DONE for r in self.results)

    def line(self) -> str:
        """One line for people: counts and time."""
        return (
            f"{self.total} studies: {self.done_total} done, {self.failed_total} failed"
            + (f", {self.pending} not run (interrupted)" if self.pending else "")
            + f" ({self.done + self.failed} run now, {self.skipped} finished before) in {self.seconds:.1f} s"
        )


def _number(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _plain(value):
    """JSON-ready: tuples as lists, non-finite floats as None, numpy scalars as Python numbers."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, (str, bytes)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value
