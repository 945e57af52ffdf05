"""How far any denoiser could go on the denoising benchmark: the PSNR ceiling set by the full-dose reference's
own noise, beside what oracle BM3D and dose_unet reach.

    .venv/bin/python benchmarks/psnr_ceiling.py      # after benchmarks/denoising.py (it reads its rows)

The benchmark scores a denoised slice against the normal-dose scan, which carries the scanner's own noise n_s;
the low-dose input adds n_a, with the same texture and (1/d - 1) times its power at dose d. Even a denoiser that
knew the noiseless anatomy exactly could only guess n_s from n_s + n_a: for Gaussian noise of one texture the best
guess is d (n_s + n_a), leaving the error d n_a - (1 - d) n_s, of power (1 - d) times the source's (a ceiling of
10 log10(1/d) dB over the input, before the display window's clipping). This script measures that ceiling in the
benchmark's own metric (abdomen-window PSNR over the field of view) on its own cases (same series, slices, doses
and seeds), drawing n_s as a second simulated realisation of the source's noise (the simulator at dose 1/2 adds
noise of the source's own level and texture). Real denoisers do not know the anatomy, so they stay below it.
Writes benchmarks/results/psnr_ceiling.md and .json.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from denoising import DOSES, SEED, TEST_SERIES, cases  # noqa: E402

from lowdose import simulate  # noqa: E402
from lowdose.atomic import write_text_atomically  # noqa: E402
from lowdose.metrics import psnr  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
COMPARED = ("BM3D (oracle sigma)", "dose_unet (true dose given)", "dose_unet x8 (true dose given)")


def ceiling_rows() -> list[dict]:
    """Per benchmark case (one slice per series): the input's PSNR and the ceiling's."""
    rows = []
    for series in TEST_SERIES:
        for case in cases([series], max_slices=1):
            ref = case.normal.hu[case.centre]
            added = case.low.hu[case.centre] - ref
            # a second realisation of the source's own noise: dose 1/2 adds noise of the source's power
            twin = simulate.simulate_low_dose(
                case.normal, 0.5, seed=SEED + 7919 + case.slice_index, match_source=case.noise_model
            )
            source = twin.hu[case.centre] - ref
            ideal = ref + case.dose * added - (1 - case.dose) * source
            rows.append(
                {
                    "series": series.path,
                    "kernel": series.kernel,
                    "kernel_class": case.kernel_class,
                    "role": series.role,
                    "slice": case.slice_index,
                    "dose": case.dose_name,
                    "dose_fraction": case.dose,
                    "input": psnr(ref[None], (ref + added)[None], "abdomen"),
                    "ceiling": psnr(ref[None], ideal[None], "abdomen"),
                    "source_noise_std_hu": float(source[ref > -500].std()),
                }
            )
            print(
                f"{series.path[:40]:<40} {case.dose_name:>12} input {rows[-1]['input']:.2f} ceiling {rows[-1]['ceiling']:.2f}",
                flush=True,
            )
    return rows


def write(rows: list[dict], bench: list[dict]) -> None:
    """Add the denoising benchmark's PSNR of each compared method on the same case (nan when it has no such row)."""
    scored = {(b["series"], b["slice"], b["dose"], b["method"]): float(b["psnr_abdomen"]) for b in bench}
    for row in rows:
        row.update({m: scored.get((row["series"], row["slice"], row["dose"], m), float("nan")) for m in COMPARED})
    write_text_atomically(RESULTS / "psnr_ceiling.json", json.dumps(rows, indent=1))
    lines = [
        "# The PSNR ceiling of the denoising benchmark",
        "",
        f"Command: `.venv/bin/python benchmarks/psnr_ceiling.py` on {platform.machine()}, {time.strftime('%Y-%m-%d')};"
        " the methods' figures are benchmarks/results/denoising.json's for the same cases.",
        "",
        __doc__.split("\n\n", 2)[2].strip(),
        "",
        "## 1/4 dose, per series (PSNR, dB)",
        "",
        "| series | kernel | source noise (HU) | input | ceiling | BM3D (oracle sigma) | dose_unet (dose given) | dose_unet x8 "
        "| room over BM3D | dose_unet's share of it |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in (r for r in rows if r["dose"] == "1/4"):
        room = r["ceiling"] - r["BM3D (oracle sigma)"]
        share = (r["dose_unet (true dose given)"] - r["BM3D (oracle sigma)"]) / room if room > 0 else float("nan")
        lines.append(
            f"| {r['series']} | {r['kernel']} ({r['kernel_class']}) | {r['source_noise_std_hu']:.1f} | {r['input']:.2f} "
            f"| {r['ceiling']:.2f} | {r['BM3D (oracle sigma)']:.2f} | {r['dose_unet (true dose given)']:.2f} "
            f"| {r['dose_unet x8 (true dose given)']:.2f} | {room:+.2f} | {share:.0%} |"
        )
    lines += [
        "",
        "## Mean over the test series, every dose",
        "",
        "| dose | 10 log10(1/d) | input | ceiling | ceiling - input | BM3D (oracle sigma) | dose_unet (dose given) |",
        "|---|---|---|---|---|---|---|",
    ]
    test = [r for r in rows if r["role"] == "test"]
    for name, dose in DOSES.items():
        at = [r for r in test if r["dose"] == name]
        mean = {k: float(np.mean([r[k] for r in at])) for k in ("input", "ceiling", *COMPARED[:2])}
        lines.append(
            f"| {name} | {10 * np.log10(1 / dose):.2f} | {mean['input']:.2f} | {mean['ceiling']:.2f} "
            f"| {mean['ceiling'] - mean['input']:+.2f} | {mean['BM3D (oracle sigma)']:.2f} "
            f"| {mean['dose_unet (true dose given)']:.2f} |"
        )
    write_text_atomically(RESULTS / "psnr_ceiling.md", "\n".join(lines) + "\n")
    print(f"wrote {RESULTS / 'psnr_ceiling.md'}")


def main() -> None:
    bench_path = RESULTS / "denoising.json"
    bench = json.loads(bench_path.read_text())["rows"] if bench_path.is_file() else []
    write(ceiling_rows(), bench)


if __name__ == "__main__":
    main()
