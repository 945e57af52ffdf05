"""``check_fidelity``: segment the scans, compare them structure by structure, write the report.

``fidelity.json`` (schema_version 1.0): ``inputs`` (per scan: path, grid, where its labels came from),
``segmenter`` (name, version, mode, weights folder, device; null when all label maps were given),
``thresholds`` (``FidelityThresholds``), ``pairs`` (``denoised_vs_original`` and, with a reference,
``denoised_vs_reference``, ``original_vs_reference``), ``study`` (verdict, summary, counts, flagged names,
and with a reference whether the denoised scan is at least as close to it as the low-dose one),
``structures`` (one entry per structure, flagged first: label, name, verdict, reasons, small,
``images.<scan>`` = present/voxels/volume_ml/hu_mean/hu_std, ``pairs.<pair>`` = dice, nsd_1mm, nsd_2mm,
hd95_mm, volume_change_pct, common_voxels, hu_shift, hu_std_ratio, and ``reference`` = closer/as
close/further), ``timings_s`` and ``files``. Undefined numbers are null.
"""

from __future__ import annotations

import datetime
import os
import sys
import time
from pathlib import Path

import numpy as np

from .._version import __version__
from ..errors import CTInputError, CTOutputError, LowdoseError
from ..io import load_ct
from ..labels import load_label_map, save_label_map
from ..volume import CTVolume
from .compare import FidelityThresholds, compare_structures
from .report import make_figures, write_html, write_json
from .results import SCHEMA_VERSION, FidelityReport, StructureResult, StudyVerdict
from .segmenter import Segmenter, TotalSegmentatorSegmenter, timed_segment, total_class_names

__all__ = ["ROLES", "SCHEMA_VERSION", "FidelityReport", "check_fidelity"]

ROLES = ("original", "denoised", "reference")


def check_fidelity(
    original: CTVolume | str | os.PathLike,
    denoised: CTVolume | str | os.PathLike,
    reference: CTVolume | str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    segmenter: Segmenter | None = None,
    thresholds: FidelityThresholds | None = None,
    labels: dict | None = None,
    class_names: dict[int, str] | None = None,
    progress: bool = True,
) -> FidelityReport:
    """Did denoising keep the anatomy? Segment the low-dose ``original``, the ``denoised`` scan and, when
    given, a normal-dose ``reference`` (all on one voxel grid), compare them structure by structure, and
    write ``fidelity.json``, ``fidelity.html`` and ``labels_<scan>.nii.gz`` into ``out_dir`` (when given).

    Scans are ``CTVolume``s or paths ``load_ct`` reads. ``labels`` maps a scan ("original", "denoised",
    "reference") to a precomputed label map (path or ``[z, y, x]`` array) that is used instead of
    segmenting that scan (the scan is still needed for the HU figures). ``segmenter`` defaults to
    TotalSegmentator (task ``total``, fast 3 mm mode, device auto) and is only built when some scan needs
    segmenting. ``class_names`` defaults to the segmenter's (TotalSegmentator's 117 structures).

    TotalSegmentator runs nnU-Net worker processes: a script calling this needs an
    ``if __name__ == "__main__":`` guard.

    Example: ``check_fidelity("low.nii.gz", "denoised.nii.gz", out_dir="fidelity").verdict``
    """
    started = time.perf_counter()
    thresholds = thresholds or FidelityThresholds()
    labels = _checked_labels(labels, reference)
    out = None if out_dir is None else _prepare_out_dir(Path(out_dir))
    timings: dict = {}
    t = time.perf_counter()
    volumes = _load_scans(original, denoised, reference)
    timings["loading"] = time.perf_counter() - t

    label_maps, label_sources = _given_label_maps(labels, volumes)
    to_segment = [r for r in volumes if r not in label_maps]
    timings["segmentation"] = {}
    if to_segment:
        if segmenter is None:
            segmenter = TotalSegmentatorSegmenter(progress=progress)
        timings["segmentation"] = _segment(
            segmenter, {r: volumes[r] for r in to_segment}, label_maps, label_sources, progress
        )
    if class_names is None:
        class_names = segmenter.class_names if segmenter is not None else total_class_names()

    if progress:
        print("[fidelity] comparing structures ...", file=sys.stderr, flush=True)
    t = time.perf_counter()
    comparison = compare_structures(
        label_maps, {r: v.hu for r, v in volumes.items()}, volumes["original"].spacing_mm, class_names, thresholds
    )
    timings["comparison"] = time.perf_counter() - t

    report = FidelityReport(
        study=StudyVerdict.from_json(comparison["study"]),
        structures=[StructureResult.from_json(s) for s in comparison["structures"]],
        inputs={role: _describe_input(v, label_sources[role]) for role, v in volumes.items()},
        segmenter=segmenter.describe() if segmenter is not None and to_segment else None,
        thresholds=thresholds,
        pairs=list(next(iter(comparison["structures"]))["pairs"]) if comparison["structures"] else [],
        timings_s=timings,
        label_maps=label_maps,
        lowdose_version=__version__,
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    if out is not None:
        _write_files(report, volumes, out, started)
    else:
        timings["total"] = time.perf_counter() - started
    if progress:
        print(
            f"[fidelity] verdict: {report.verdict} ({report.study.summary}) in {timings['total']:.1f} s",
            file=sys.stderr,
            flush=True,
        )
    return report


def _checked_labels(labels: dict | None, reference) -> dict:
    labels = dict(labels or {})
    unknown = set(labels) - set(ROLES)
    if unknown:
        raise ValueError(f"labels for unknown scans {sorted(unknown)}; use {ROLES}")
    if reference is None and "reference" in labels:
        raise LowdoseError("reference labels were given without the reference scan")
    return labels


def _load_scans(original, denoised, reference) -> dict[str, CTVolume]:
    """The scans as volumes by role, after checking that they share the original's grid."""
    volumes = {"original": _as_volume(original), "denoised": _as_volume(denoised)}
    if reference is not None:
        volumes["reference"] = _as_volume(reference)
    for role in ("denoised", "reference"):
        if role in volumes:
            _check_same_grid(volumes["original"], volumes[role], role)
    return volumes


def _segment(
    segmenter: Segmenter, volumes: dict[str, CTVolume], label_maps: dict, label_sources: dict, progress: bool
) -> dict[str, float]:
    """Segment each of ``volumes`` into ``label_maps`` (saying so in ``label_sources``); seconds per scan."""
    seconds = {}
    for k, (role, volume) in enumerate(volumes.items()):
        label_maps[role], seconds[role] = timed_segment(
            segmenter, volume, role, progress, step=f"{k + 1}/{len(volumes)}: "
        )
        label_sources[role] = f"segmented by {segmenter.name}"
    return seconds


def _write_files(report: FidelityReport, volumes: dict[str, CTVolume], out: Path, started: float) -> None:
    """The label maps, fidelity.html and fidelity.json into ``out``; their paths into ``report.files``."""
    t = time.perf_counter()
    for role, labels in report.label_maps.items():
        report.files[f"labels_{role}"] = save_label_map(labels, volumes[role], out / f"labels_{role}.nii.gz")
    original = volumes["original"]
    figures = make_figures(
        report.to_json(),
        {r: v.hu for r, v in volumes.items()},
        report.label_maps,
        original.spacing_mm,
        original.direction,
    )
    report.timings_s["report"] = time.perf_counter() - t
    report.timings_s["total"] = time.perf_counter() - started
    report.files["json"], report.files["html"] = out / "fidelity.json", out / "fidelity.html"
    content = report.to_json()
    write_html(content, figures, report.files["html"])
    write_json(content, report.files["json"])


def _as_volume(scan) -> CTVolume:
    return scan if isinstance(scan, CTVolume) else load_ct(scan)


def _prepare_out_dir(out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise CTOutputError(out, "exists and is not a folder; the fidelity report is written into a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CTOutputError(out, f"cannot create the report folder ({exc.strerror or exc})") from None
    if not os.access(out, os.W_OK):
        raise CTOutputError(out, "the report folder is not writable")
    return out


def _name(volume: CTVolume, role: str) -> str:
    return volume.metadata.get("path") or f"the {role} scan"


def _check_same_grid(original: CTVolume, other: CTVolume, role: str) -> None:
    """The check compares voxel by voxel: every scan must be on the original's grid."""
    problem = None
    if other.shape != original.shape:
        problem = f"has {other.shape[::-1]} voxels (x, y, z), the original {original.shape[::-1]}"
    elif not np.allclose(other.spacing_mm, original.spacing_mm, rtol=1e-4, atol=1e-4):
        problem = f"has spacing {other.spacing_mm} mm, the original {original.spacing_mm}"
    elif not np.allclose(other.origin_mm, original.origin_mm, atol=0.01 * min(original.spacing_mm)):
        problem = f"has origin {other.origin_mm} mm, the original {original.origin_mm}"
    elif not np.allclose(other.direction, original.direction, atol=1e-4):
        problem = "has another orientation (direction cosines) than the original"
    if problem:
        raise CTInputError(
            _name(other, role),
            f"{problem}: the {role} scan must be on the original's voxel grid "
            "(the check compares voxel by voxel; resample it first)",
        )


def _given_label_maps(labels: dict, volumes: dict[str, CTVolume]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The precomputed label maps by role, and where each came from."""
    label_maps: dict[str, np.ndarray] = {}
    label_sources: dict[str, str] = {}
    for role, given in labels.items():
        label_maps[role], label_sources[role] = _given_labels(given, volumes[role], role)
    return label_maps, label_sources


def _given_labels(given, volume: CTVolume, role: str) -> tuple[np.ndarray, str]:
    if isinstance(given, (str, os.PathLike)):
        labels, how = load_label_map(given, volume)
        return labels, f"{os.fspath(given)} ({how})"
    labels = np.asarray(given)
    if labels.shape != volume.shape:
        raise LowdoseError(f"the {role} label map has shape {labels.shape}, its scan {volume.shape}")
    if labels.dtype.kind not in "iu":
        raise LowdoseError(f"the {role} label map is {labels.dtype}, not an integer label map")
    return labels, "given as an array"


def _describe_input(volume: CTVolume, labels: str) -> dict:
    x, y, z = volume.shape[::-1]
    sx, sy, sz = volume.spacing_mm
    return {
        "path": volume.metadata.get("path"),
        "shape_zyx": list(volume.shape),
        "spacing_mm": list(volume.spacing_mm),
        "origin_mm": list(volume.origin_mm),
        "grid": f"{x}x{y}x{z} voxels, {sx:.3g}x{sy:.3g}x{sz:.3g} mm"
        + ("" if volume.is_regular_grid else " (irregular slices: distances use the nominal spacing)"),
        "labels": labels,
    }
