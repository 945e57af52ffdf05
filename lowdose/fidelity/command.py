"""`lowdose fidelity`: argument parsing for the anatomical fidelity check, then one call into the library.

Register it with ``add_parser(subparsers)``; errors derived from ``LowdoseError`` are left to the caller
(lowdose.cli prints them on one line and exits 1). Exit status 3 when ``--fail-on`` is met.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from ..errors import LowdoseError
from ..io import check_output_folder
from .check import check_fidelity
from .compare import FidelityThresholds
from .segmenter import TotalSegmentatorSegmenter

FAIL_EXIT_STATUS = 3
_SEVERITY = {"kept": 0, "check": 1, "changed": 2}

EPILOG = """\
examples:
  lowdose fidelity --original low.nii.gz --denoised denoised.nii.gz --out fidelity/
  lowdose fidelity --original low/ --denoised den/ --reference normal/ --out fidelity/ --full --device cuda
  lowdose fidelity --original low.nii.gz --denoised den.nii.gz --out fidelity/ \\
      --original-labels low_seg.nii.gz --denoised-labels den_seg.nii.gz   (segmented elsewhere: no model needed)

TotalSegmentator weights are the user's and are never downloaded: lowdose looks in $TOTALSEG_WEIGHTS_PATH,
else $TOTALSEG_HOME_DIR/nnunet/results, else ~/.totalsegmentator/nnunet/results (or --weights).
Thresholds: --thresholds FILE.json with any of the fields of lowdose.fidelity.FidelityThresholds,
e.g. {"dice_kept": 0.9, "hu_shift_kept": 10}.
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``fidelity`` sub-command on an argparse ``subparsers`` object and return its parser."""
    p = subparsers.add_parser(
        "fidelity",
        help="check structure by structure that denoising kept the anatomy (TotalSegmentator)",
        description="Segment the low-dose, the denoised and (optionally) a normal-dose reference scan with\n"
        "TotalSegmentator (117 structures), compare them structure by structure and write\n"
        "fidelity.json, fidelity.html and the label maps into --out.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--original",
        required=True,
        metavar="CT",
        help="the low-dose scan that was denoised: NIfTI/NRRD/MHA file or DICOM series folder",
    )
    p.add_argument("--denoised", required=True, metavar="CT", help="the denoised scan (same voxel grid)")
    p.add_argument("--reference", metavar="CT", help="a normal-dose scan of the same grid, when there is one")
    p.add_argument("--out", required=True, metavar="DIR", help="report folder (created if needed)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--fast",
        dest="fast",
        action="store_true",
        default=True,
        help="TotalSegmentator's 3 mm model (default; minutes per scan on a CPU)",
    )
    mode.add_argument(
        "--full",
        dest="fast",
        action="store_false",
        help="TotalSegmentator's five 1.5 mm models (finer; a GPU is advisable)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (cuda:N) (default auto)")
    p.add_argument("--weights", metavar="DIR", help="TotalSegmentator weights folder (overrides the environment)")
    for role in ("original", "denoised", "reference"):
        p.add_argument(
            f"--{role}-labels",
            metavar="LABELS",
            help=f"label map of the {role} scan made elsewhere (TotalSegmentator 'total' values); "
            "used instead of segmenting it",
        )
    p.add_argument("--thresholds", metavar="JSON", help="JSON file overriding verdict thresholds")
    p.add_argument(
        "--fail-on",
        choices=("never", "check", "changed"),
        default="never",
        help=f"exit with status {FAIL_EXIT_STATUS} when the study verdict is this or worse " "(default never)",
    )
    p.add_argument("--json", action="store_true", help="print the study verdict as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run)
    return p


def load_thresholds(path: str | None):
    """``FidelityThresholds`` with the fields a JSON file sets (defaults for the rest)."""
    if path is None:
        return FidelityThresholds()
    try:
        values = json.loads(Path(path).read_text())
    except OSError as exc:
        raise LowdoseError(f"{path}: cannot read the thresholds file ({exc.strerror or exc})") from None
    except ValueError as exc:
        raise LowdoseError(f"{path}: the thresholds file is not valid JSON ({exc})") from None
    if not isinstance(values, dict):
        raise LowdoseError(f"{path}: the thresholds file must hold a JSON object")
    known = {f.name for f in dataclasses.fields(FidelityThresholds)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise LowdoseError(f"{path}: unknown threshold(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if "surface_tolerances_mm" in values:
        values["surface_tolerances_mm"] = tuple(values["surface_tolerances_mm"])
    try:
        return FidelityThresholds(**values)
    except (TypeError, ValueError) as exc:
        raise LowdoseError(f"{path}: {exc}") from None


def run(args) -> None:
    """The handler of ``lowdose fidelity``."""
    if args.reference_labels and not args.reference:
        raise LowdoseError("--reference-labels needs --reference (the scan gives the HU figures)")
    check_output_folder(args.out, inputs=(args.original, args.denoised, args.reference))
    thresholds = load_thresholds(args.thresholds)
    labels = {
        role: path
        for role, path in (
            ("original", args.original_labels),
            ("denoised", args.denoised_labels),
            ("reference", args.reference_labels),
        )
        if path
    }
    segmenter = TotalSegmentatorSegmenter(
        fast=args.fast, device=args.device, weights_dir=args.weights, progress=not args.quiet
    )
    roles = ["original", "denoised"] + (["reference"] if args.reference else [])
    if any(role not in labels for role in roles):
        segmenter.check_weights()  # fail before loading anything
    report = check_fidelity(
        args.original,
        args.denoised,
        args.reference,
        out_dir=args.out,
        segmenter=segmenter,
        thresholds=thresholds,
        labels=labels,
        progress=not args.quiet,
    )
    study = report.study
    if args.json:
        print(
            json.dumps(
                {
                    "verdict": study.verdict,
                    "summary": study.summary,
                    "flagged": study.flagged,
                    "reference": study.reference,
                    "files": {k: str(v) for k, v in report.files.items()},
                },
                indent=2,
            )
        )
    else:
        print(f"fidelity: {study.verdict} - {study.summary}")
        if study.flagged:
            print(f"  flagged: {', '.join(study.flagged)}")
        if study.reference is not None:
            print(f"  reference: {study.reference['summary']}")
        print(f"  report: {report.files['html']}")
    if args.fail_on != "never" and _SEVERITY[study.verdict] >= _SEVERITY[args.fail_on]:
        sys.exit(FAIL_EXIT_STATUS)
