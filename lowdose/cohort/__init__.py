"""Cohorts: denoise and check the fidelity of every study of a list, resumably, on this machine or a Ray cluster.

``run_cohort(INPUT, OUTPUT)`` is the entry point and returns a ``CohortSummary``; ``find_studies`` reads a study
list (folder, CSV, StudyInstanceUIDs); ``RayScheduler`` / ``SequentialScheduler`` say where studies run.
"""

from __future__ import annotations

from .engine import run_cohort
from .results import CohortSettings, CohortSummary, StructureFigures, StudyResult
from .schedulers import RayOptions, RayScheduler, SequentialScheduler
from .studies import Study, find_studies

__all__ = [
    "CohortSettings",
    "CohortSummary",
    "RayOptions",
    "RayScheduler",
    "SequentialScheduler",
    "StructureFigures",
    "Study",
    "StudyResult",
    "find_studies",
    "run_cohort",
]
