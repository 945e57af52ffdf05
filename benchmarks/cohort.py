"""Cohort throughput on this machine: studies per hour for the shell loop a user would write today, for
`lowdose cohort --sequential`, and for `lowdose cohort` on a local Ray; memory per worker; a finished rerun.

    .venv/bin/python benchmarks/cohort.py [--studies 4] [--slices 16] [--weights DIR]

Studies are --slices slices of --studies different shared series (../shared/data/ct), saved as NIfTI. Without
--weights, TotalSegmentator runs with the tiny random stand-in weights of the test suite (the real weights cannot
be downloaded here): its network is then almost free, so the figures measure lowdose's and nnU-Net's overheads,
not TotalSegmentator's segmentation time (see docs/cohort.md for the estimate with real weights).
Writes benchmarks/results/cohort.md and cohort.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lowdose.io import load_ct, save_ct  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
SHARED = Path(os.environ.get("LOWDOSE_SHARED_CT", REPO.parent / "shared" / "data" / "ct"))
SERIES = [
    "totalsegmentator/example_ct_dicom",
    "lidc_idri_0001_ge",
    "crlm_1004_ge",
    "hnpetct_HN-CHUS-052_philips",
    "nsclc_radiogenomics_R01-001_siemens",
    "lidc_idri_0314_philips",
]
LOWDOSE = str(Path(sys.executable).parent / "lowdose")


def make_studies(folder: Path, count: int, slices: int) -> list[Path]:
    folder.mkdir(parents=True)
    paths = []
    for name in SERIES[:count]:
        volume = load_ct(SHARED / name)
        start = max(0, volume.shape[0] // 2 - slices // 2)
        path = folder / f"{name.split('/')[0]}.nii.gz"
        save_ct(volume.slices(start, start + slices), path)
        paths.append(path)
    return paths


def timed(command: list[str], env: dict) -> float:
    started = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode not in (0, 4):
        raise SystemExit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return time.perf_counter() - started


def shell_loop(studies: list[Path], work: Path, env: dict) -> float:
    """What a user writes today: `lowdose denoise` then `lowdose fidelity`, one study at a time."""
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    for study in studies:
        denoised = work / f"{study.name[:-7]}_denoised.nii.gz"
        timed([LOWDOSE, "denoise", str(study), str(denoised), "--device", "cpu", "--quiet"], env)
        report = work / f"{study.name[:-7]}_fidelity"
        timed(
            [LOWDOSE, "fidelity", "--original", str(study), "--denoised", str(denoised), "--out", str(report)]
            + ["--device", "cpu", "--quiet"],
            env,
        )
    return time.perf_counter() - started


def cohort_figures(out: Path) -> dict:
    """Per-study figures from the cohort table: seconds, peak memory per worker, models loaded per worker."""
    import pyarrow.parquet as pq

    rows = [r for r in pq.read_table(out / "cohort.parquet").to_pylist() if r["status"] == "done"]
    workers: dict[str, dict] = {}
    for r in rows:
        w = workers.setdefault(r["worker"], {"studies": 0, "peak_rss_mb": 0.0, "model_loads": 0})
        w["studies"] += 1
        w["peak_rss_mb"] = max(w["peak_rss_mb"], r["peak_rss_mb"] or 0)
        w["model_loads"] = max(w["model_loads"], r["model_loads"] or 0)
    steps = ("load", "denoise", "fidelity", "total")
    return {
        "done": len(rows),
        "mean_seconds": {s: round(sum(r[f"seconds_{s}"] or 0 for r in rows) / max(len(rows), 1), 2) for s in steps},
        "workers": workers,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=4)
    parser.add_argument("--slices", type=int, default=16)
    parser.add_argument("--weights", help="real TotalSegmentator weights (default: the tests' tiny stand-in)")
    parser.add_argument("--modes", default="shell,sequential,ray2,ray1")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="lowdose-cohort-bench-"))
    env = dict(os.environ)
    if args.weights:
        env["TOTALSEG_WEIGHTS_PATH"] = args.weights
        weights = args.weights
    else:
        from tests.fidelity_fixtures import write_tiny_totalsegmentator_weights

        write_tiny_totalsegmentator_weights(work / "totalseg" / "weights", fast=True)
        env["TOTALSEG_HOME_DIR"] = str(work / "totalseg")
        env["TOTALSEG_WEIGHTS_PATH"] = str(work / "totalseg" / "weights")
        weights = "tiny random stand-in (tests/fidelity_fixtures.py)"
    studies = make_studies(work / "studies", args.studies, args.slices)
    base = [LOWDOSE, "cohort", str(work / "studies")]
    modes = {
        "shell": ("shell loop: lowdose denoise + lowdose fidelity per study", None),
        "sequential": ("lowdose cohort --sequential", ["--sequential"]),
        "ray2": ("lowdose cohort, local Ray, 2 workers x 1 CPU", ["--workers", "2", "--cpus-per-study", "1"]),
        "ray1": ("lowdose cohort, local Ray, 1 worker x 2 CPUs", ["--workers", "1", "--cpus-per-study", "2"]),
    }
    results = {}
    for key in args.modes.split(","):
        label, options = modes[key]
        load_before = os.getloadavg()[0]
        if options is None:
            seconds = shell_loop(studies, work / "shell", env)
            figures: dict = {}
        else:
            out = work / f"out_{key}"
            seconds = timed([*base, str(out), "--device", "cpu", "--quiet", "--memory-per-study", "1", *options], env)
            figures = cohort_figures(out)
            figures["rerun_seconds"] = round(timed([*base, str(out), "--device", "cpu", "--quiet", *options], env), 2)
        results[key] = {
            "label": label,
            "seconds": round(seconds, 1),
            "studies_per_hour": round(len(studies) * 3600 / seconds, 1),
            "load_average_before": round(load_before, 2),
            **figures,
        }
        print(f"{label}: {seconds:.1f} s, {results[key]['studies_per_hour']} studies/hour", flush=True)
    write_results(results, args, weights, len(studies))
    shutil.rmtree(work, ignore_errors=True)
    return 0


def write_results(results: dict, args, weights: str, count: int) -> None:
    meta = {
        "studies": count,
        "slices_per_study": args.slices,
        "voxels": f"512x512x{args.slices}",
        "weights": weights,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "cohort.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    lines = [
        "# Cohort throughput on this machine",
        "",
        f"`.venv/bin/python benchmarks/cohort.py --studies {count} --slices {args.slices}` on {meta['date']}: "
        f"{count} studies of {meta['voxels']} voxels (one per shared series), {meta['cpus']} CPUs, no GPU. "
        f"TotalSegmentator weights: {weights}. The machine was shared with other jobs (load average before each "
        "run in the table), so the figures are rough.",
        "",
        "| how | wall time (s) | studies per hour | load before | mean s per study (denoise / fidelity / total) "
        "| peak memory per worker (MB) | models loaded per worker | rerun of the finished cohort (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results.values():
        mean = r.get("mean_seconds")
        per_study = f"{mean['denoise']} / {mean['fidelity']} / {mean['total']}" if mean else "-"
        workers = r.get("workers", {})
        memory = ", ".join(f"{w['peak_rss_mb']:.0f}" for w in workers.values()) or "-"
        loads = ", ".join(str(w["model_loads"]) for w in workers.values()) or "-"
        lines.append(
            f"| {r['label']} | {r['seconds']} | {r['studies_per_hour']} | {r['load_average_before']} | {per_study} "
            f"| {memory} | {loads} | {r.get('rerun_seconds', '-')} |"
        )
    lines += [
        "",
        "Peak memory per worker is the worker process plus its largest child (nnU-Net's), from the cohort table's "
        "`peak_rss_mb`. A rerun of a finished cohort checks each study's record and outputs and runs nothing (Ray "
        "is not even started). See docs/cohort.md for what these figures mean for 10,000 studies on a cluster.",
    ]
    (RESULTS / "cohort.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
