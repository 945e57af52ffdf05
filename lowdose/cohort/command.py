"""`lowdose cohort`: argument parsing for a cohort run, then one call into ``run_cohort``.

Register it with ``add_parser(subparsers)``; errors derived from ``LowdoseError`` are left to the caller
(lowdose.cli prints them on one line and exits 1). Exit status 4 when some studies failed.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from ..bundle import DEFAULT_MODEL
from ..dicomweb import ENV_PACS_URL
from ..dose import parse_dose
from ..ensemble import ENSEMBLE_SIZES
from ..fidelity.command import load_thresholds
from ..limits import InputLimits
from ..strength import DEFAULT_STRENGTH, parse_strength
from .engine import run_cohort
from .results import OUTPUT_FORMATS, CohortSettings
from .schedulers import TRANSFERS, RayOptions, RayScheduler, SequentialScheduler
from .watchdog import watch_descendants

FAILED_EXIT_STATUS = 4

EPILOG = f"""\
INPUT is a folder of studies (NIfTI/NRRD/MHA files; every sub-folder holding DICOM files is one series), a CSV
with a 'path' column (relative to the CSV; optional 'study', 'series' and 'dose' columns) or a
'StudyInstanceUID' column, or a text file of StudyInstanceUIDs (one a line) read from the PACS (--pacs).

OUTPUT receives studies/<study>/ (the denoised volume, fidelity/ with the study's report and label maps,
thumbnail.png, study.json), cohort.parquet and cohort.csv (one row per study: status, error, paths, model,
dose, timings, and per structure Dice, surface Dice, HD95, HU shift and verdict), report.html and cohort.json.

Run it again to resume: studies finished with the same settings and input are skipped (failed ones too,
unless --retry-failed); Ctrl-C loses only the studies in flight.

Ray: by default a local Ray is started on this machine (loopback only) and shut down at the end;
--address (or $RAY_ADDRESS) runs on an existing cluster (see docs/cohort.md). Each study asks for
--cpus-per-study CPUs, --gpus-per-study GPUs (default 1 when the cluster has GPUs) and --memory-per-study GB.

exit status: 0 every study done; {FAILED_EXIT_STATUS} the cohort finished but some studies failed (see the
table's status and error columns); 1 an error stopped the cohort (bad INPUT, OUTPUT not writable, Ray
or TotalSegmentator weights missing); 130 interrupted (the table lists what finished).

TotalSegmentator weights are found as by `lowdose fidelity`: --weights, else $TOTALSEG_WEIGHTS_PATH, else
$TOTALSEG_HOME_DIR/nnunet/results, else ~/.totalsegmentator/nnunet/results; nothing is downloaded.

examples:
  lowdose cohort studies/ cohort_out/
  lowdose cohort studies.csv cohort_out/ --dose 1/4 --strength high --format dicom
  lowdose cohort uids.txt cohort_out/ --pacs http://pacs:8042/dicom-web --address ray://head:10001
"""


def _dose(text: str):
    try:
        return parse_dose(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _strength(text: str) -> float:
    try:
        return parse_strength(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register the ``cohort`` sub-command on an argparse ``subparsers`` object and return its parser."""
    p = subparsers.add_parser(
        "cohort",
        help="denoise and check the fidelity of every study of a list (resumable; on this machine or a Ray cluster)",
        description="Denoise every study of INPUT, check each one's anatomical fidelity with TotalSegmentator and\n"
        "write the denoised volumes, the per-study reports, a cohort table and report.html into OUTPUT.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", metavar="INPUT", help="folder of studies, CSV of paths or UIDs, or text file of UIDs")
    p.add_argument("output", metavar="OUTPUT", help="output folder (created if needed; reused to resume)")
    g = p.add_argument_group("denoising (as lowdose denoise)")
    g.add_argument("--model", default=DEFAULT_MODEL, help=f"model name or bundle folder (default {DEFAULT_MODEL})")
    g.add_argument("--dose", type=_dose, default="auto", help="dose fraction (0.25, 1/4, 25%%) or auto (default)")
    g.add_argument(
        "--strength",
        type=_strength,
        default=parse_strength(DEFAULT_STRENGTH),
        help="low, medium (default), high or 0..1",
    )
    g.add_argument(
        "--ensemble",
        type=int,
        choices=ENSEMBLE_SIZES,
        default=1,
        help="in-plane flips and transposes averaged per slice (default 1: the network alone; 8: +0.2 dB, 8x time)",
    )
    g.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: the GPU when there is one"
    )
    g.add_argument(
        "--format",
        dest="output_format",
        choices=OUTPUT_FORMATS,
        default="nii.gz",
        help="denoised volume format (default nii.gz; dicom: a derived series)",
    )
    g = p.add_argument_group("fidelity check (as lowdose fidelity)")
    mode = g.add_mutually_exclusive_group()
    mode.add_argument(
        "--fast", dest="fast", action="store_true", default=True, help="TotalSegmentator's 3 mm model (default)"
    )
    mode.add_argument("--full", dest="fast", action="store_false", help="TotalSegmentator's five 1.5 mm models")
    g.add_argument("--weights", metavar="DIR", help="TotalSegmentator weights folder (overrides the environment)")
    g.add_argument("--thresholds", metavar="JSON", help="JSON file overriding verdict thresholds")
    _add_running_arguments(p)
    p.set_defaults(func=run)
    return p


def _add_running_arguments(p: argparse.ArgumentParser) -> None:
    """Where and how the studies run: PACS, Ray, resources, resuming."""
    g = p.add_argument_group("running")
    g.add_argument(
        "--pacs",
        default=os.environ.get(ENV_PACS_URL),
        metavar="URL",
        help=f"DICOMweb URL of the PACS for StudyInstanceUIDs (default ${ENV_PACS_URL})",
    )
    g.add_argument(
        "--address",
        metavar="ADDR",
        help="an existing Ray cluster (ray://head:10001, auto; default $RAY_ADDRESS, else a local Ray)",
    )
    g.add_argument("--workers", type=int, metavar="N", help="studies at once (default: as many as the resources allow)")
    g.add_argument(
        "--cpus-per-study", type=float, default=1.0, metavar="C", help="CPUs a study asks Ray for (default 1)"
    )
    g.add_argument(
        "--gpus-per-study",
        type=float,
        metavar="G",
        help="GPUs a study asks for (default 1 when the cluster has GPUs, else 0)",
    )
    g.add_argument(
        "--memory-per-study", type=float, default=6.0, metavar="GB", help="memory a study reserves (default 6; 0: none)"
    )
    g.add_argument(
        "--transfer",
        choices=TRANSFERS,
        default="auto",
        help="path (shared filesystem), object-store, or auto (default: probed)",
    )
    g.add_argument(
        "--timeout",
        type=float,
        default=7200.0,
        metavar="S",
        help="seconds one study may take (default 7200; 0: no limit)",
    )
    g.add_argument("--sequential", action="store_true", help="no Ray: one study after another in this process")
    g.add_argument("--retry-failed", action="store_true", help="run again the studies that failed before")
    g.add_argument(
        "--verify-checksums", action="store_true", help="re-read every finished output's checksum before skipping it"
    )
    g.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args) -> None:
    """The handler of ``lowdose cohort``."""
    settings = CohortSettings(
        model=args.model,
        dose=args.dose,
        strength=args.strength,
        ensemble=args.ensemble,
        device=args.device,
        fast=args.fast,
        weights=args.weights,
        thresholds=load_thresholds(args.thresholds),
        output_format=args.output_format,
        timeout_s=args.timeout,
        pacs_url=args.pacs,
        limits=InputLimits.from_env(),
    )
    if args.sequential:
        scheduler: RayScheduler | SequentialScheduler = SequentialScheduler()
    else:
        scheduler = RayScheduler(
            RayOptions(
                address=args.address,
                workers=args.workers,
                cpus_per_study=args.cpus_per_study,
                gpus_per_study=args.gpus_per_study,
                memory_per_study_gb=args.memory_per_study or None,
                transfer=args.transfer,
            )
        )
    watch_descendants()  # the studies' processes (Ray's workers, nnU-Net's) go if this one is killed
    summary = run_cohort(
        args.input,
        args.output,
        settings,
        scheduler,
        retry_failed=args.retry_failed,
        verify_checksums=args.verify_checksums,
        progress=not args.quiet,
        command=shlex.join(["lowdose", *sys.argv[1:]]),
    )
    print(f"cohort: {summary.line()}")
    print(f"  table: {summary.table_parquet} (and {summary.table_csv.name}); report: {summary.report_html}")
    failed = [r for r in summary.results if r.status == "failed"]
    for record in failed[:10]:
        print(f"  failed: {record.study}: {record.error}")
    if len(failed) > 10:
        print(f"  ... and {len(failed) - 10} more (see the table)")
    if failed:
        sys.exit(FAILED_EXIT_STATUS)
