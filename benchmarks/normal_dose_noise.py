"""How much a routine (normal-dose) scan's own noise varies between scanners, kernels and protocols.

    .venv/bin/python benchmarks/normal_dose_noise.py     # writes benchmarks/results/normal_dose_noise.md

A dose estimate read from one image compares its noise with what a routine scan of that kind holds. This
measures, on every shared normal-dose series, the noise std and texture (NPS mean frequency) in uniform soft
tissue, with the slice thickness, pixel size and patient width, and asks how well those predict the routine
noise level of a series left out (leave-one-out least squares on log std). The spread left over bounds any
single-image dose estimate on scans whose protocol differs from the ones it learnt.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import yaml  # noqa: E402

from lowdose import dose  # noqa: E402
from lowdose.io import load_ct  # noqa: E402
from lowdose.noise import source_noise_spectrum  # noqa: E402
from lowdose.slabs import body_slices  # noqa: E402

CT = REPO.parent / "shared" / "data" / "ct"
RESULTS = REPO / "benchmarks" / "results"
# The covid19_ny_sbu single slices, paths under CT.
COVID_SLICES = [str(p.relative_to(CT)) for p in sorted((CT / "covid19_ny_sbu_slices").glob("*/*.dcm"))]
SERIES = [
    "tcia_pancreatic_ct_cbct_seg",
    "dcmqa_ge_head",
    "lungpetctdx_A0001_philips/kernel_L",
    "lungpetctdx_A0001_philips/kernel_B",
    "lungpetctdx_A0002_siemens/B70f",
    "lungpetctdx_A0002_siemens/B40f",
    "lidc_idri_0001_ge",
    "lidc_idri_0314_philips",
    "crlm_1004_ge",
    "crlm_1006_ge",
    "hnpetct_HN-CHUS-052_philips",
    "nsclc_radiogenomics_R01-001_siemens",
    "totalsegmentator/example_ct_dicom",
    *COVID_SLICES,
]
FEATURES = {
    "constant": lambda r: 1.0,
    "NPS mean frequency": lambda r: r["nps_mean_per_mm"],
    "log slice thickness": lambda r: np.log(r["slice_mm"]),
    "log pixel size": lambda r: np.log(r["pixel_mm"]),
    "patient width": lambda r: r["width_mm"] / 300,
}


def measure(path: str) -> dict | None:
    volume = load_ct(CT / path)
    try:
        spectrum = source_noise_spectrum(volume.hu, float(volume.spacing_mm[0]))
    except ValueError:
        return None
    area = (volume.hu > -300).sum(axis=(1, 2)).mean() * volume.spacing_mm[0] * volume.spacing_mm[1]
    return {
        "thickness_mm": volume.slice_thickness_mm,
        "series": path,
        "std_hu": spectrum.std_hu,
        "nps_mean_per_mm": spectrum.mean_per_mm,
        "slice_mm": float(volume.spacing_mm[2]),
        "pixel_mm": float(volume.spacing_mm[0]),
        "width_mm": float(2 * np.sqrt(area / np.pi)),
        "patches": spectrum.patches,
    }


def leave_one_out(rows: list[dict], features: list[str]) -> np.ndarray:
    """Residuals of log std for each series, predicted from the others with ``features``."""
    design = np.array([[FEATURES[f](r) for f in features] for r in rows])
    target = np.log([r["std_hu"] for r in rows])
    residuals = []
    for i in range(len(rows)):
        keep = np.arange(len(rows)) != i
        coefficients, *_ = np.linalg.lstsq(design[keep], target[keep], rcond=None)
        residuals.append(target[i] - design[i] @ coefficients)
    return np.array(residuals)


# The series lowdose.dose's routine level is fitted on: those the shipped dose_unet trained and validated on.
TRAINING_CONFIG = REPO / "models" / "dose_unet" / "configs" / "train_long.yaml"


def fitted_series() -> set[str]:
    """The shared series (paths under CT) of the shipped model's training and validation sets."""
    data = yaml.safe_load(TRAINING_CONFIG.read_text())["data"]
    out = set()
    for entry in data["train"] + data["validation"]:
        path = (TRAINING_CONFIG.parent / entry).resolve()
        if path.is_relative_to(CT.resolve()):
            out.add(str(path.relative_to(CT.resolve())))
    return out


def slice_levels(path: str) -> list[dict]:
    """lowdose.dose's noise level of up to 4 single body slices of a series, as the dose reader sees one slice."""
    volume = load_ct(CT / path)
    body = body_slices(volume, 0.2) or list(range(volume.shape[0]))
    picks = sorted({body[int(i)] for i in np.linspace(0, len(body) - 1, min(4, len(body))).round()})
    rows = []
    for k in picks:
        level = dose.noise_level(volume.hu[k : k + 1], float(volume.spacing_mm[0]), volume.slice_thickness_mm)
        if level is not None and level.patches >= dose.MIN_PATCHES:
            rows.append({"series": path, "slice": k, **dataclasses.asdict(level)})
    return rows


def variance_section(levels: list[dict]) -> tuple[list[str], dict]:
    """The fit of lowdose.dose's routine level on the training series' slices, and how it reads the others."""
    fit_set = fitted_series()
    design = np.array([[1.0, r["texture_per_mm"]] for r in levels])
    target = np.log([r["variance_hu2"] * r["slice_mm"] for r in levels])
    fitted = np.array([r["series"] in fit_set for r in levels])
    coefficients, *_ = np.linalg.lstsq(design[fitted], target[fitted], rcond=None)
    residuals = target - design @ coefficients
    spread = float(np.exp(residuals[fitted].std()))
    # A routine slice whose variance is exp(r) times the fitted level reads as dose exp(-r).
    read = np.exp(-residuals)
    fit = {
        "ROUTINE_LOG_VARIANCE": round(float(coefficients[0]), 3),
        "ROUTINE_TEXTURE_SLOPE": round(float(coefficients[1]), 3),
        "ROUTINE_SPREAD": round(spread, 2),
        "fitted_slices": int(fitted.sum()),
        "fitted_series": len({r["series"] for r in levels if r["series"] in fit_set}),
    }
    lib = (dose.ROUTINE_LOG_VARIANCE, dose.ROUTINE_TEXTURE_SLOPE, dose.ROUTINE_SPREAD)
    lines = [
        "## The routine noise level lowdose.dose reads a dose against",
        "",
        f"Noise variance of single body slices (median over their uniform patches) x slice thickness, against the "
        f"patches' NPS mean frequency f, fitted on {fit['fitted_slices']} slices of the {fit['fitted_series']} "
        f"series dose_unet trains and validates on ({TRAINING_CONFIG.relative_to(REPO)}): log(variance x "
        f"thickness) = {coefficients[0]:.3f} + {coefficients[1]:.3f} f, residual spread a factor {spread:.2f} "
        f"(lowdose.dose: {lib[0]:.3f} + {lib[1]:.3f} f, spread {lib[2]:.2f}).",
        "",
        "| slices | routine slices read as (median) | read below 0.6 | read below 0.3 | median error of a reading |",
        "|---|---|---|---|---|",
    ]
    for name, mask in (("fitted (training series)", fitted), ("held out", ~fitted)):
        r = read[mask]
        lines.append(
            f"| {name}: {mask.sum()} | {np.median(r):.2f} | {(r < 0.6).sum()} | {(r < 0.3).sum()} | "
            f"{np.median(np.abs(r - 1)):.0%} |"
        )
    pair = {k: [float(x) for x, lv in zip(read, levels) if lv["series"].endswith(k)] for k in ("B70f", "B40f")}
    lines += [
        "",
        "The same acquisition reconstructed with two kernels reads (before the cap at 1): B70f "
        f"{', '.join(f'{x:.2f}' for x in pair['B70f'])}; B40f {', '.join(f'{x:.2f}' for x in pair['B40f'])} "
        "(their noise std differs 4-fold, their variance 13-fold).",
    ]
    return lines, fit


def main() -> None:
    rows = [r for r in (measure(p) for p in SERIES) if r is not None]
    lines = [
        "# Routine noise across the shared normal-dose series",
        "",
        f"Command: `.venv/bin/python benchmarks/normal_dose_noise.py`, {time.strftime('%Y-%m-%d')}.",
        "",
        __doc__.split("\n\n", 2)[2].strip(),
        "",
        "| series | noise std (HU) | NPS mean (cycles/mm) | slice (mm) | pixel (mm) | width (mm) | patches |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['series']} | {r['std_hu']:.1f} | {r['nps_mean_per_mm']:.3f} | {r['slice_mm']:g} | "
        f"{r['pixel_mm']:.3f} | {r['width_mm']:.0f} | {r['patches']} |"
        for r in rows
    ]
    lines += ["", "| predictors | left-out log-std residual (std) | dose error it implies (median) |", "|---|---|---|"]
    names = list(FEATURES)
    fits = {}
    for k in range(1, len(names) + 1):
        residuals = leave_one_out(rows, names[:k])
        # A routine scan whose noise is exp(r) times the predicted level reads as dose exp(-2 r).
        error = float(np.median(np.abs(np.exp(-2 * residuals) - 1)))
        fits[" + ".join(names[:k])] = {"residual_std": float(residuals.std()), "median_dose_error": error}
        lines.append(f"| {' + '.join(names[:k])} | {residuals.std():.3f} | {error:.0%} |")
    levels = [level for path in SERIES for level in slice_levels(path)]
    section, fit = variance_section(levels)
    lines += ["", *section]
    stds = [r["std_hu"] for r in rows]
    lines += [
        "",
        f"Routine noise spans {min(stds):.1f} to {max(stds):.1f} HU over {len(rows)} series. What the image shows "
        "explains part of it (sharp kernels and thin slices are noisier); the rest is the protocol (mAs chosen by "
        "the site), which one image cannot tell apart from the dose.",
    ]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "normal_dose_noise.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "normal_dose_noise.json").write_text(
        json.dumps({"series": rows, "leave_one_out": fits, "slices": levels, "routine_level": fit}, indent=1)
    )
    print("\n".join(lines))


if __name__ == "__main__":
    main()
