"""What the self-ensemble (lowdose.ensemble) buys: PSNR and time of dose_unet over 1, 2, 4 and 8 in-plane symmetries.

    .venv/bin/python benchmarks/self_ensemble.py [--model dose_unet]

The held-out test cases of benchmarks/denoising.py (same series, slices, doses and seeds), one slice per call,
the true dose given, so that only the ensemble differs. Writes benchmarks/results/self_ensemble.md and .json.
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

from denoising import DOSES, TEST_SERIES, cases  # noqa: E402

from lowdose.atomic import write_text_atomically  # noqa: E402
from lowdose.denoise import Denoiser  # noqa: E402
from lowdose.ensemble import ENSEMBLE_SIZES  # noqa: E402
from lowdose.metrics import psnr  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"


def score(model: str) -> list[dict]:
    denoiser = Denoiser(model, device="cpu")
    rows = []
    for case in cases(TEST_SERIES):
        low = case.low.slices(case.centre, case.centre + 1)
        ref = case.normal.hu[case.centre][None]
        row = {"series": case.series.path, "kernel": case.kernel_class, "dose": case.dose_name}
        row["input"] = psnr(ref, low.hu, "abdomen")
        for size in ENSEMBLE_SIZES:
            started = time.perf_counter()
            out = denoiser(low, dose=case.dose, ensemble=size).volume.hu
            row[f"seconds_{size}"] = time.perf_counter() - started
            row[f"psnr_{size}"] = psnr(ref, out, "abdomen")
        rows.append(row)
        gains = ", ".join(f"x{n} {row[f'psnr_{n}'] - row['psnr_1']:+.2f}" for n in ENSEMBLE_SIZES[1:])
        print(f"{case.series.path[:40]:<40} {case.dose_name:>12} alone {row['psnr_1']:.2f} dB; {gains}", flush=True)
    return rows


def write(rows: list[dict], model: str) -> None:
    sizes = ENSEMBLE_SIZES
    lines = [
        "# Self-ensemble: the network over in-plane flips and transposes",
        "",
        f"Command: `.venv/bin/python benchmarks/self_ensemble.py --model {model}` on {platform.machine()}, CPU only, "
        f"{time.strftime('%Y-%m-%d')}. The held-out test cases of `benchmarks/denoising.py` (simulated with the "
        "current simulator), one slice per call, true dose given; PSNR in the abdomen window C50/W400.",
        "",
        "## Mean PSNR (dB)",
        "",
        "| dose | input | " + " | ".join(f"x{n}" for n in sizes) + " |",
        "|---|---|" + "---|" * len(sizes),
    ]
    for dose in DOSES:
        part = [r for r in rows if r["dose"] == dose]
        if part:
            figures = [np.mean([r["input"] for r in part])] + [np.mean([r[f"psnr_{n}"] for r in part]) for n in sizes]
            lines.append(f"| {dose} | " + " | ".join(f"{v:.2f}" for v in figures) + " |")
    improved = {n: sum(r[f"psnr_{n}"] > r["psnr_1"] for r in rows) for n in sizes[1:]}
    lines += [
        "",
        "## Gain over the network alone, and time",
        "",
        "| symmetries | mean gain (dB) | cases improved | median seconds per slice |",
        "|---|---|---|---|",
    ]
    for n in sizes:
        gain = np.mean([r[f"psnr_{n}"] - r["psnr_1"] for r in rows])
        seconds = np.median([r[f"seconds_{n}"] for r in rows])
        lines.append(f"| {n} | {gain:+.2f} | {improved.get(n, '-')} of {len(rows)} | {seconds:.2f} |")
    lines += [
        "",
        "Per kernel class at 1/4 (mean gain of x8, dB): "
        + ", ".join(
            f"{k} {np.mean([r['psnr_8'] - r['psnr_1'] for r in rows if r['kernel'] == k and r['dose'] == '1/4']):+.2f}"
            for k in sorted({r["kernel"] for r in rows})
        ),
        "",
    ]
    write_text_atomically(RESULTS / "self_ensemble.md", "\n".join(lines))
    write_text_atomically(RESULTS / "self_ensemble.json", json.dumps(rows, indent=1))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dose_unet")
    args = parser.parse_args()
    write(score(args.model), args.model)


if __name__ == "__main__":
    main()
