"""Does the simulator's noise look like each scanner's own? NPS and noise level, source vs simulated, per series.

For every normal-dose series of ../shared/data/ct: a few slices are simulated at dose d; the added noise
(simulated minus source, known exactly) is measured in the same uniform soft-tissue patches as the source's
own noise (lowdose.noise). Physics says the added noise has sqrt(1/d - 1) times the source's standard
deviation and the same noise power spectrum shape (same kernel); the issue's targets are 15 % on both.

    .venv/bin/python benchmarks/simulator_realism.py [--dose 0.25] [--slices 6]

Writes benchmarks/results/simulator_realism.md, .json and .png (NPS curves, source vs simulated).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from normal_dose_noise import COVID_SLICES  # noqa: E402  (a sibling script)

from lowdose.io import load_ct  # noqa: E402
from lowdose.noise import patch_spectrum, uniform_patches  # noqa: E402
from lowdose.simulate import simulate_low_dose  # noqa: E402

SHARED = REPO.parent / "shared" / "data" / "ct"
RESULTS = REPO / "benchmarks" / "results"
SERIES = [
    ("Philips Brilliance 16, chest, kernel L (sharp)", "lungpetctdx_A0001_philips/kernel_L"),
    ("Philips Brilliance 16, chest, kernel B (standard)", "lungpetctdx_A0001_philips/kernel_B"),
    ("Siemens Sensation 10, chest, B70f (sharp)", "lungpetctdx_A0002_siemens/B70f"),
    ("Siemens Sensation 10, chest, B40f (medium)", "lungpetctdx_A0002_siemens/B40f"),
    ("GE LightSpeed Plus, chest, STANDARD", "lidc_idri_0001_ge"),
    ("Philips Brilliance 16P, chest, D", "lidc_idri_0314_philips"),
    ("GE LightSpeed16, abdomen, STANDARD", "crlm_1004_ge"),
    ("Philips Gemini GXL, head and neck, C", "hnpetct_HN-CHUS-052_philips"),
    ("Siemens, chest, B45f", "nsclc_radiogenomics_R01-001_siemens"),
    ("Philips Brilliance Big Bore, abdomen (iDose)", "tcia_pancreatic_ct_cbct_seg"),
    ("Siemens Biograph mCT, abdomen, Br38f (sample)", "totalsegmentator/example_ct_dicom"),
    ("GE, head, dcmqa", "dcmqa_ge_head"),
    ("GE, abdomen, STANDARD (crlm 1006)", "crlm_1006_ge"),
    ("lungmask chest (2 slices)", "lungmask_chest"),
    ("TotalSegmentator pulmonary report (NIfTI, no header)", "totalsegmentator/pulmonary_report_ct_cropped.nii.gz"),
    # The covid19_ny_sbu single slices: named by their DICOM header below.
    *((None, path) for path in COVID_SLICES),
]


def series_name(volume, relative: str) -> str:
    """A row's name from the DICOM header: scanner, kernel and the file (for the unnamed single slices)."""
    headers = volume.metadata.get("dicom_headers") or [None]
    scanner = " ".join(str(getattr(headers[0], tag, "")) for tag in ("Manufacturer", "ManufacturerModelName"))
    kernel = getattr(headers[0], "ConvolutionKernel", "?")
    scanner = scanner.replace("GE MEDICAL SYSTEMS", "GE").replace("TOSHIBA", "Toshiba").strip()
    return f"{scanner or '?'}, {kernel}, {relative.removeprefix('covid19_ny_sbu_slices/')}"


def measure(volume, dose: float, slices: int, seed: int, match_source: bool) -> dict | None:
    """Source and simulated-added noise of ``slices`` middle slices of one series (None: no uniform patch)."""
    start = max(0, volume.shape[0] // 2 - slices // 2)
    part = volume.slices(start, min(volume.shape[0], start + slices))
    pixel_mm = float(volume.spacing_mm[0])
    corners = uniform_patches(part.hu, pixel_mm)
    if not corners:
        return None
    started = time.perf_counter()
    low = simulate_low_dose(part, dose, seed=seed, match_source=match_source)
    seconds = time.perf_counter() - started
    match = low.metadata.get("lowdose_noise_match", {})
    source = patch_spectrum(part.hu, corners, pixel_mm)
    added = patch_spectrum(low.hu - part.hu, corners, pixel_mm)
    expected_ratio = math.sqrt(1.0 / dose - 1.0)
    return {
        "pixel_mm": pixel_mm,
        "slice_mm": float(volume.spacing_mm[2]),
        "patches": source.patches,
        "source_std_hu": source.std_hu,
        "added_std_hu": added.std_hu,
        "std_ratio_over_expected": added.std_hu / source.std_hu / expected_ratio,
        "source_mean_f": source.mean_per_mm,
        "added_mean_f": added.mean_per_mm,
        "mean_f_ratio": added.mean_per_mm / source.mean_per_mm,
        "source_peak_f": source.peak_per_mm,
        "added_peak_f": added.peak_per_mm,
        "frequency_per_mm": source.frequency_per_mm.tolist(),
        "source_nps": source.nps.tolist(),
        "added_nps": added.nps.tolist(),
        "simulation_seconds": seconds,
        "matched": bool(match.get("matched", False)),
        "not_matched_because": match.get("reason", ""),
    }


def _table(rows: dict) -> list[str]:
    """The Markdown table of one simulator model over every series, and how many meet both targets."""
    lines = [
        "| series | pixel / slice (mm) | patches | source std (HU) | added std (HU) | std / expected "
        "| source mean f (1/mm) | added mean f (1/mm) | mean f ratio |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows.items():
        lines.append(
            f"| {name} | {r['pixel_mm']:.2f} / {r['slice_mm']:.1f} | {r['patches']} | {r['source_std_hu']:.1f} | "
            f"{r['added_std_hu']:.1f} | {r['std_ratio_over_expected']:.2f} | {r['source_mean_f']:.2f} | "
            f"{r['added_mean_f']:.2f} | {r['mean_f_ratio']:.2f} |"
        )
    within = [
        n
        for n, r in rows.items()
        if abs(r["std_ratio_over_expected"] - 1) <= 0.15 and abs(r["mean_f_ratio"] - 1) <= 0.15
    ]
    return lines + ["", f"Within both targets: {len(within)} of {len(rows)} series.", ""]


def _matched_tables(rows: dict) -> list[str]:
    """The source-matched rows, and apart those the simulator could not calibrate (it then falls back to the
    default model, and says why in the simulated volume's metadata)."""
    matched = {n: r for n, r in rows.items() if r["matched"]}
    fallback = {n: r for n, r in rows.items() if not r["matched"]}
    lines = _table(matched)
    if fallback:
        reasons = sorted(
            {re.sub(r"\(\d+ patch(es)?", "(N patches", r["not_matched_because"]) for r in fallback.values()}
        )
        lines += [
            f"Not calibrated, default model used instead ({len(fallback)} series; {'; '.join(reasons)}; N is the "
            "table's patches column). Their own figures come from so few patches that a vessel or lung texture in "
            "one of them moves the source std: they say little either way.",
            "",
            *_table(fallback),
        ]
    return lines


def write_results(results: dict, args) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "simulator_realism.json").write_text(json.dumps(results, indent=2))
    lines = [
        "# Simulator realism: the added noise against each scanner's own noise",
        "",
        f"Command: `.venv/bin/python benchmarks/simulator_realism.py --dose {args.dose} --slices {args.slices}` "
        f"({time.strftime('%Y-%m-%d')}), the middle {args.slices} slices of each series. Added noise = simulated "
        f"minus source at dose {args.dose}; both measured in the same uniform soft-tissue patches (lowdose.noise, "
        "plane-detrended). Expected: std ratio "
        f"sqrt(1/d - 1) = {math.sqrt(1 / args.dose - 1):.2f} (column *std / expected* = 1) and the same NPS shape "
        "(column *mean f ratio* = 1). Targets: both within 15 %. The spectrum's mean frequency stands for its "
        "peak: in patient images the lowest bins keep some anatomy after detrending, which moves the peak, not "
        "the mean.",
        "",
        "## Source-matched simulation (`simulate_low_dose(..., match_source=True)`)",
        "",
        *_matched_tables(results["match_source"]),
        "## Default simulation (fixed photon level, Hann soft-tissue kernel, no bowtie)",
        "",
        *_table(results["default"]),
        "![NPS curves](simulator_realism.png)",
        "",
    ]
    (RESULTS / "simulator_realism.md").write_text("\n".join(lines) + "\n")
    _plot(results, RESULTS / "simulator_realism.png")
    print("\n".join(lines))


def _plot(results: dict, path: Path) -> None:
    import matplotlib  # matplotlib only for the figure

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 5
    rows, default = results["match_source"], results["default"]
    count = len(rows)
    figure, axes = plt.subplots(
        math.ceil(count / columns), columns, figsize=(4 * columns, 3 * math.ceil(count / columns))
    )
    for ax, (name, r) in zip(np.ravel(axes), rows.items()):
        f = np.asarray(r["frequency_per_mm"])
        source, added = np.asarray(r["source_nps"]), np.asarray(r["added_nps"])
        ax.plot(f, source / max(source.max(), 1e-12), label="source (normal dose)")
        ax.plot(f, added / max(added.max(), 1e-12), label="added, source-matched")
        plain = np.asarray(default[name]["added_nps"])
        ax.plot(f, plain / max(plain.max(), 1e-12), ":", label="added, default model")
        ax.set_title(name + ("" if r["matched"] else " (not matched)"), fontsize=6)
        ax.set_xlabel("cycles/mm", fontsize=7)
        ax.tick_params(labelsize=6)
    for ax in np.ravel(axes)[count:]:
        ax.axis("off")
    np.ravel(axes)[0].legend(fontsize=6)
    figure.suptitle("Noise power spectra, each normalised to its maximum", fontsize=9)
    figure.tight_layout(rect=(0, 0, 1, 0.98))
    figure.savefig(path, dpi=80)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dose", type=float, default=0.25)
    parser.add_argument("--slices", type=int, default=40, help="middle slices simulated (the noise is matched on them)")
    parser.add_argument("--seed", type=int, default=2024)
    args = parser.parse_args()
    results: dict = {"match_source": {}, "default": {}}
    for name, relative in SERIES:
        volume = load_ct(SHARED / relative)
        name = name or series_name(volume, relative)
        for model in results:
            r = measure(volume, args.dose, args.slices, args.seed, model != "default")
            if r is None:
                print(f"{name}: no uniform soft-tissue patch to measure the noise in; left out", flush=True)
                break
            results[model][name] = r
            print(
                f"{name} ({model}): std / expected {r['std_ratio_over_expected']:.2f}, "
                f"mean f ratio {r['mean_f_ratio']:.2f}",
                flush=True,
            )
    write_results(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
