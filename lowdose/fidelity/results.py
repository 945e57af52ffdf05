"""What the fidelity check found, typed: ``FidelityReport`` (the study), ``StructureResult`` (one structure each),
``StudyVerdict``. ``FidelityReport.to_json()`` is ``fidelity.json`` (schema in ``lowdose.fidelity.check``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import numpy as np

from .compare import FidelityThresholds

SCHEMA_VERSION = "1.0"


@dataclasses.dataclass(frozen=True)
class StudyVerdict:
    """The study's verdict: the worst structure verdict, with counts and the structures flagged."""

    verdict: str  # kept, check or changed
    summary: str
    counts: dict[str, int]
    structures_present: int
    flagged: list[str]
    reference: dict | None = None  # with a reference scan: counts, at_least_as_close, summary, further

    @classmethod
    def from_json(cls, study: dict) -> StudyVerdict:
        return cls(
            verdict=study["verdict"],
            summary=study["summary"],
            counts=dict(study["counts"]),
            structures_present=int(study["structures_present"]),
            flagged=list(study["flagged"]),
            reference=study.get("reference"),
        )

    def to_json(self) -> dict:
        study = {
            "verdict": self.verdict,
            "summary": self.summary,
            "counts": self.counts,
            "structures_present": self.structures_present,
            "flagged": self.flagged,
        }
        if self.reference is not None:
            study["reference"] = self.reference
        return study


@dataclasses.dataclass(frozen=True)
class StructureResult:
    """One structure compared across the scans.

    ``images`` per scan: present, voxels, volume_ml, hu_mean, hu_std. ``pairs`` per compared pair
    (``denoised_vs_original``, ...): dice, nsd_<t>mm, hd95_mm, volume_change_pct, common_voxels, hu_shift,
    hu_std_ratio. ``reference`` (with a reference scan): verdict (closer, as close, further) and reasons.
    """

    label: int
    name: str
    verdict: str  # kept, check, changed or absent
    reasons: list[str]
    small: bool
    images: dict[str, dict]
    pairs: dict[str, dict]
    reference: dict | None = None

    @classmethod
    def from_json(cls, entry: dict) -> StructureResult:
        return cls(
            label=int(entry["label"]),
            name=entry["name"],
            verdict=entry["verdict"],
            reasons=list(entry["reasons"]),
            small=bool(entry["small"]),
            images=entry["images"],
            pairs=entry["pairs"],
            reference=entry.get("reference"),
        )

    def to_json(self) -> dict:
        entry = {
            "label": self.label,
            "name": self.name,
            "images": self.images,
            "pairs": self.pairs,
            "verdict": self.verdict,
            "reasons": self.reasons,
            "small": self.small,
        }
        if self.reference is not None:
            entry["reference"] = self.reference
        return entry


@dataclasses.dataclass
class FidelityReport:
    """What ``check_fidelity`` found: the study verdict, each structure, how the label maps were made, and the
    files written (``labels_<scan>``, ``json``, ``html``; empty without an output folder)."""

    study: StudyVerdict
    structures: list[StructureResult]
    inputs: dict[str, dict]  # per scan: path, shape_zyx, spacing_mm, origin_mm, grid, labels
    segmenter: dict | None  # the segmenter's description; None when every label map was given
    thresholds: FidelityThresholds
    pairs: list[str]
    timings_s: dict[str, Any]
    label_maps: dict[str, np.ndarray]
    created: str
    lowdose_version: str
    files: dict[str, Path] = dataclasses.field(default_factory=dict)
    schema_version: str = SCHEMA_VERSION

    @property
    def verdict(self) -> str:
        """The study verdict: "kept", "check" or "changed"."""
        return self.study.verdict

    def structure(self, name: str) -> StructureResult:
        """The result of the structure called ``name`` (e.g. ``liver``)."""
        for result in self.structures:
            if result.name == name:
                return result
        raise KeyError(f"no structure {name!r} in the report")

    def to_json(self) -> dict:
        """``fidelity.json``: schema_version 1.0, as documented in ``lowdose.fidelity.check``."""
        report = {
            "schema_version": self.schema_version,
            "lowdose_version": self.lowdose_version,
            "created": self.created,
            "inputs": self.inputs,
            "segmenter": self.segmenter,
            "thresholds": self.thresholds.as_dict(),
            "pairs": self.pairs,
            "study": self.study.to_json(),
            "structures": [s.to_json() for s in self.structures],
            "timings_s": self.timings_s,
        }
        if self.files:
            report["files"] = {k: p.name for k, p in self.files.items()}
        return report
