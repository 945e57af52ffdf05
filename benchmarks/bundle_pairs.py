"""Two or more dose_unet bundles side by side on the held-out test cases, with the input and oracle BM3D.

    .venv/bin/python benchmarks/bundle_pairs.py shipped=models/dose_unet v4=runs/v4/dose_unet [--out NAME]

For a retrained model's ship-or-not decision: the cases of benchmarks/denoising.py (same series, slices, doses and
seeds, simulated with the current simulator), one slice per call, with the true dose and with the dose estimated;
per dose, per series at 1/4 against oracle BM3D (the issue 18 kernel-pair target), and each bundle's dose estimate
on every shared normal-dose series (a routine scan should read about 1). Writes benchmarks/results/NAME.md, .json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from denoising import DOSES, TEST_SERIES, bm3d_slice, cases, normal_dose_estimates, oracle_sigma  # noqa: E402

from lowdose.atomic import write_text_atomically  # noqa: E402
from lowdose.denoise import Denoiser  # noqa: E402
from lowdose.metrics import psnr  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


def score(bundles: dict[str, str]) -> list[dict]:
    denoisers = {label: Denoiser(folder, device="cpu") for label, folder in bundles.items()}
    rows = []
    for case in cases(TEST_SERIES):
        low = case.low.slices(case.centre, case.centre + 1)
        ref = case.normal.hu[case.centre][None]
        row = {"series": case.series.path, "kernel": case.series.kernel, "dose": case.dose_name}
        row["input"] = psnr(ref, low.hu, "abdomen")
        row["input, chest window"] = psnr(ref, low.hu, "chest")
        if case.dose_name == "1/4":
            row["bm3d_oracle"] = psnr(ref, bm3d_slice(low.hu[0], oracle_sigma(case))[None], "abdomen")
        for label, denoiser in denoisers.items():
            told = denoiser(low, dose=case.dose).volume.hu
            row[f"{label} true dose"] = psnr(ref, told, "abdomen")
            row[f"{label} true dose, chest window"] = psnr(ref, told, "chest")
            estimated = denoiser(low, dose="auto")
            row[f"{label} estimated"] = psnr(ref, estimated.volume.hu, "abdomen")
            row[f"{label} dose"] = estimated.dose_fraction
        rows.append(row)
        print(
            f"{case.series.path[:40]:<40} {case.dose_name:>12} "
            + " ".join(f"{k} {v:.2f}" for k, v in row.items() if isinstance(v, float)),
            flush=True,
        )
    return rows


def normal_dose(bundles: dict[str, str]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for label, folder in bundles.items():
        out[label] = {row["series"]: row["volume_estimate"] for row in normal_dose_estimates(folder)}
        print(f"{label}: routine scans read below 0.6: {sum(v < 0.6 for v in out[label].values())}", flush=True)
    return out


def write(rows: list[dict], normal: dict, bundles: dict[str, str], name: str, argv: list[str]) -> None:
    labels = list(bundles)
    lines = [
        f"# {', '.join(labels)}: held-out test cases",
        "",
        f"Command: `.venv/bin/python benchmarks/bundle_pairs.py {' '.join(argv)}` on {platform.machine()}, CPU only, "
        f"{time.strftime('%Y-%m-%d')}. Bundles: "
        + ", ".join(f"{k} = `{v}`" for k, v in bundles.items())
        + ". The cases of `benchmarks/denoising.py`, simulated with the current simulator; one slice per call; PSNR "
        "in the abdomen window C50/W400.",
        "",
        "## Mean PSNR (dB)",
        "",
        "| dose | input | " + " | ".join(f"{k} true dose | {k} estimated" for k in labels) + " |",
        "|---|---|" + "---|---|" * len(labels),
    ]
    for dose in DOSES:
        part = [r for r in rows if r["dose"] == dose]
        figures = [np.mean([r["input"] for r in part])]
        for k in labels:
            figures += [np.mean([r[f"{k} true dose"] for r in part]), np.mean([r[f"{k} estimated"] for r in part])]
        lines.append(f"| {dose} | " + " | ".join(f"{v:.2f}" for v in figures) + " |")
    lines += [
        "",
        "## Mean PSNR in the chest window C-600/W1500 (dB, true dose given)",
        "",
        "What the abdomen window clips: lung, fat and bone.",
        "",
        "| dose | input | " + " | ".join(labels) + " |",
        "|---|---|" + "---|" * len(labels),
    ]
    for dose in DOSES:
        part = [r for r in rows if r["dose"] == dose]
        figures = [np.mean([r["input, chest window"] for r in part])]
        figures += [np.mean([r[f"{k} true dose, chest window"] for r in part]) for k in labels]
        lines.append(f"| {dose} | " + " | ".join(f"{v:.2f}" for v in figures) + " |")
    lines += ["", "## 1/4 dose per series, against oracle BM3D (true dose given)", ""]
    lines += [
        "| series | input | BM3D (oracle sigma) | " + " | ".join(labels) + " |",
        "|---|---|---|" + "---|" * len(labels),
    ]
    for series in dict.fromkeys(r["series"] for r in rows):
        part = [r for r in rows if r["series"] == series and r["dose"] == "1/4"]
        bm3d = np.mean([r["bm3d_oracle"] for r in part])
        cells = [
            f"{np.mean([r[f'{k} true dose'] for r in part]):.2f} ({np.mean([r[f'{k} true dose'] for r in part]) - bm3d:+.2f})"
            for k in labels
        ]
        lines.append(
            f"| {series} | {np.mean([r['input'] for r in part]):.2f} | {bm3d:.2f} | " + " | ".join(cells) + " |"
        )
    lines += ["", "## Dose estimate, one slice: median relative error", "", "| dose | " + " | ".join(labels) + " |"]
    lines.append("|---|" + "---|" * len(labels))
    for dose, value in DOSES.items():
        part = [r for r in rows if r["dose"] == dose]
        errors = [np.median([abs(r[f"{k} dose"] / value - 1) for r in part]) for k in labels]
        lines.append(f"| {dose} | " + " | ".join(f"{100 * e:.0f} %" for e in errors) + " |")
    lines += ["", "## Routine (normal-dose) scans read below 0.6", ""]
    for k in labels:
        low = [p for p, v in normal[k].items() if v < 0.6]
        lines.append(f"- {k}: {len(low)} of {len(normal[k])} ({', '.join(low)})")
    lines.append("")
    write_text_atomically(RESULTS / f"{name}.md", "\n".join(lines))
    write_text_atomically(RESULTS / f"{name}.json", json.dumps({"rows": rows, "normal_dose": normal}, indent=1))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="+", metavar="LABEL=BUNDLE")
    parser.add_argument("--out", default="bundle_pairs", help="results file name under benchmarks/results/")
    args = parser.parse_args()
    bundles = dict(spec.split("=", 1) for spec in args.bundles)
    write(score(bundles), normal_dose(bundles), bundles, args.out, sys.argv[1:])


if __name__ == "__main__":
    main()
