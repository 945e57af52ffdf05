"""How much the dose a dose-conditioned model is told matters: PSNR of dose_unet told the true dose scaled by
0.5 to 2, the dose it reads itself, and the best scale per case (an oracle no user has).

    .venv/bin/python benchmarks/dose_conditioning.py [--model dose_unet]

The held-out test cases of benchmarks/denoising.py (same series, slices, doses and seeds), one slice per call,
so that only the dose the model is told differs. It answers two questions: what a perfect single-image dose
reading would be worth in PSNR (true dose against the dose read), and whether telling the model another dose than
the true one (the source's own noise level varies 5-fold between series) would pay. Writes
benchmarks/results/dose_conditioning.md and .json.
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
from lowdose.metrics import psnr  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
SCALES = (0.5, 0.7, 1.0, 1.4, 2.0)  # times the true dose (capped at 1)


def score(model: str) -> list[dict]:
    denoiser = Denoiser(model, device="cpu")
    rows = []
    for case in cases(TEST_SERIES):
        low = case.low.slices(case.centre, case.centre + 1)
        ref = case.normal.hu[case.centre][None]
        read, _ = denoiser.read_dose(low)
        row = {
            "series": case.series.path,
            "kernel": case.kernel_class,
            "dose": case.dose_name,
            "dose_fraction": case.dose,
            "source_std_hu": case.noise_model.source_std_hu if case.noise_model else None,
            "input": psnr(ref, low.hu, "abdomen"),
            "dose_read": read,
            "psnr_read": psnr(ref, denoiser(low, dose=read).volume.hu, "abdomen"),
        }
        for scale in SCALES:
            row[f"psnr_x{scale:g}"] = psnr(ref, denoiser(low, dose=min(case.dose * scale, 1.0)).volume.hu, "abdomen")
        rows.append(row)
        told = ", ".join(f"x{s:g} {row[f'psnr_x{s:g}']:.2f}" for s in SCALES)
        print(f"{case.series.path[:40]:<40} {case.dose_name:>12} read {read:.3f} {row['psnr_read']:.2f}; {told}")
    return rows


def _best(row: dict) -> float:
    return max(row[f"psnr_x{s:g}"] for s in SCALES)


def write(rows: list[dict], model: str) -> None:
    columns = ["input", *(f"psnr_x{s:g}" for s in SCALES)]
    lines = [
        "# What the dose a dose-conditioned model is told is worth",
        "",
        f"Command: `.venv/bin/python benchmarks/dose_conditioning.py --model {model}` on {platform.machine()}, CPU "
        f"only, {time.strftime('%Y-%m-%d')}. The held-out test cases of `benchmarks/denoising.py`, one slice per "
        "call; the model told the true dose times 0.5 to 2 (capped at 1), the dose it reads itself "
        "(`Denoiser.read_dose`), or for each case the best of the five scales (an oracle). PSNR in the abdomen "
        "window C50/W400.",
        "",
        "## Mean PSNR (dB)",
        "",
        "| dose | input | " + " | ".join(f"told {s:g} x true" for s in SCALES) + " | best scale per case (oracle) "
        "| told the dose it reads | median error of that reading |",
        "|---|---|" + "---|" * (len(SCALES) + 3),
    ]
    for dose in DOSES:
        part = [r for r in rows if r["dose"] == dose]
        if not part:
            continue
        figures = [np.mean([r[c] for r in part]) for c in columns]
        figures += [np.mean([_best(r) for r in part]), np.mean([r["psnr_read"] for r in part])]
        error = np.median([abs(r["dose_read"] / r["dose_fraction"] - 1) for r in part])
        lines.append(f"| {dose} | " + " | ".join(f"{v:.2f}" for v in figures) + f" | {error:.0%} |")
    truth = np.mean([r["psnr_x1"] for r in rows])
    lines += [
        "",
        f"Over all {len(rows)} cases: told the true dose {truth:.2f} dB; the best scale per case "
        f"{np.mean([_best(r) for r in rows]) - truth:+.2f} dB over it; the dose read "
        f"{np.mean([r['psnr_read'] for r in rows]) - truth:+.2f} dB.",
        "",
        "## Per series: which scale of the true dose the model does best with (mean over the doses)",
        "",
        "| series | kernel | source noise (HU) | " + " | ".join(f"{s:g} x" for s in SCALES) + " |",
        "|---|---|---|" + "---|" * len(SCALES),
    ]
    for series in dict.fromkeys(r["series"] for r in rows):
        part = [r for r in rows if r["series"] == series]
        noise = part[0]["source_std_hu"]
        means = [np.mean([r[f"psnr_x{s:g}"] for r in part]) for s in SCALES]
        top = int(np.argmax(means))
        cells = [f"**{m:.2f}**" if i == top else f"{m:.2f}" for i, m in enumerate(means)]
        lines.append(
            f"| {series} | {part[0]['kernel']} | {'-' if noise is None else f'{noise:.1f}'} | "
            + " | ".join(cells)
            + " |"
        )
    lines.append("")
    write_text_atomically(RESULTS / "dose_conditioning.md", "\n".join(lines))
    write_text_atomically(RESULTS / "dose_conditioning.json", json.dumps(rows, indent=1))
    print("\n".join(lines))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="dose_unet")
    args = parser.parse_args()
    write(score(args.model), args.model)


if __name__ == "__main__":
    main()
