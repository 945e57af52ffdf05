"""Anatomical fidelity check: did denoising keep every structure? Segment, compare structure by structure, report.

``check_fidelity(original, denoised, reference=None, out_dir=...)`` is the entry point and returns a
``FidelityReport``; ``Segmenter`` is the interface a segmentation backend implements
(``TotalSegmentatorSegmenter`` is the one provided).
"""

from __future__ import annotations

from ..labels import load_label_map, save_label_map
from .check import check_fidelity
from .compare import FidelityThresholds, compare_structures, overlap_metrics, surface_distances
from .results import SCHEMA_VERSION, FidelityReport, StructureResult, StudyVerdict
from .segmenter import (
    Segmenter,
    SegmenterError,
    TotalSegmentatorSegmenter,
    TotalSegmentatorWeightsError,
    ensure_usage_statistics_off,
    total_class_names,
)

__all__ = [
    "SCHEMA_VERSION",
    "FidelityReport",
    "FidelityThresholds",
    "Segmenter",
    "SegmenterError",
    "StructureResult",
    "StudyVerdict",
    "TotalSegmentatorSegmenter",
    "TotalSegmentatorWeightsError",
    "check_fidelity",
    "compare_structures",
    "ensure_usage_statistics_off",
    "load_label_map",
    "overlap_metrics",
    "save_label_map",
    "surface_distances",
    "total_class_names",
]
