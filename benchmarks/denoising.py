"""Denoising benchmark on held-out patients: every method, per scanner, kernel and region, one run.

    .venv/bin/python benchmarks/denoising.py                    # everything (about an hour on 2 cores)
    .venv/bin/python benchmarks/denoising.py --methods dose_unet  # recompute some methods, keep the rest

Writes benchmarks/results/denoising.md, .json (one row per slice, dose and method) and .png; each series'
rows are saved in benchmarks/results/denoising_parts/ as they come, so runs split by --series (in parallel
processes) or interrupted lose nothing, and --report-only assembles them.

Held-out data: series of patients that no shipped model was trained on (models/dose_unet/configs/train.yaml
lists the split), from four vendors, smooth and sharp kernels (one Siemens acquisition reconstructed with
both, B70f and B40f), chest and abdomen. Low-dose versions come from `lowdose.simulate` matched to each
series' own noise (`match_source`), at 1/2, 1/4, 1/10, 1/20 (doses the networks were trained on) and 1/3,
1/8 (never seen). Methods: the input; BM3D with the noise level estimated from the image and with the
oracle noise level (the true std of the added noise); RED-CNN and ESAU-Net (shipped peers); dose_unet
version 1 (before issue 18: `--before`, a bundle folder), version 2 (`--previous`) and the shipped dose_unet
(version 8 since 2026-12-04; the runs' list names its weights), each with its own dose
estimate (one slice per call, as a single image is sent, and the 2.5-D slab of a volume) and with the true
dose; the shipped dose_unet with its self-ensemble of 8 (`--ensemble 8`, "x8"). Figures: PSNR and SSIM in
the abdomen window C50/W400 (as the real-scan figures of issue 18), RMSE in HU over the field of view,
seconds per slice; the dose estimates; a 512x512x100 volume's time and peak memory. The kernel of each series is named by its DICOM tag and classed by its own noise power spectrum
(mean frequency under 0.30 cycles/mm smooth, 0.30-0.40 medium, above sharp).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from normal_dose_noise import SERIES as ROUTINE_SERIES  # noqa: E402  (a sibling script: benchmarks/ is on the path)

from lowdose import load_ct, sample_ct_path, simulate  # noqa: E402
from lowdose.atomic import write_text_atomically  # noqa: E402
from lowdose.bundle import DEFAULT_MODEL, Bundle  # noqa: E402
from lowdose.denoise import Denoiser  # noqa: E402
from lowdose.figures import body_zoom, side_by_side_png  # noqa: E402
from lowdose.metrics import psnr, rmse_hu, ssim  # noqa: E402
from lowdose.noise import source_noise_spectrum  # noqa: E402
from lowdose.slabs import body_slices  # noqa: E402
from lowdose.volume import CTVolume  # noqa: E402

CT = REPO.parent / "shared" / "data" / "ct"
RESULTS = REPO / "benchmarks" / "results"
DOSES = {"1/2": 0.5, "1/4": 0.25, "1/10": 0.1, "1/20": 0.05, "1/3 (unseen)": 1 / 3, "1/8 (unseen)": 0.125}
SEEN = ("1/2", "1/4", "1/10", "1/20")
SEED = 2024
BEFORE = "dose_unet v1"
PREVIOUS = "dose_unet v2"


@dataclasses.dataclass(frozen=True)
class TestSeries:
    """A held-out series: where it is, what it is, and how many of its slices are scored."""

    path: str  # under ../shared/data/ct, or "sample"
    patient: str
    scanner: str
    kernel: str
    region: str
    slices: int = 1
    role: str = "test"  # "test": never seen; "validation": picked the shipped epoch of dose_unet


TEST_SERIES = (
    TestSeries("lungpetctdx_A0002_siemens/B70f", "A0002", "Siemens Sensation 10", "B70f", "chest", 2),
    TestSeries("lungpetctdx_A0002_siemens/B40f", "A0002", "Siemens Sensation 10", "B40f", "chest", 2),
    TestSeries("lidc_idri_0314_philips", "LIDC-0314", "Philips Brilliance 16P", "D", "chest"),
    TestSeries("covid19_ny_sbu_slices/A046441/19001111-045.dcm", "A046441", "GE LightSpeed VCT", "STANDARD", "abdomen"),
    TestSeries("covid19_ny_sbu_slices/A046441/19010101-23.dcm", "A046441", "Toshiba Aquilion ONE", "FC17", "chest"),
    TestSeries("covid19_ny_sbu_slices/A098752/19001231-32.dcm", "A098752", "Toshiba Aquilion ONE", "FC17", "chest"),
    TestSeries("covid19_ny_sbu_slices/A098752/19010127-128.dcm", "A098752", "GE LightSpeed VCT", "STANDARD", "chest"),
    TestSeries("sample", "sample", "Siemens Biograph mCT", "Br38f", "abdomen", 1, "validation"),
)

# Every shared normal-dose series, for "a routine scan reads as about 1" (training series included): those
# whose routine noise benchmarks/normal_dose_noise.py measures, with the sample and lungmask's two slices.
NORMAL_DOSE_SERIES = ("sample", "lungmask_chest", *ROUTINE_SERIES)


def _load(path: str) -> CTVolume:
    return load_ct(sample_ct_path() if path == "sample" else CT / path)


def kernel_class(volume: CTVolume) -> tuple[str, float]:
    """smooth / medium / sharp from the series' own noise power spectrum, and its mean frequency."""
    try:
        mean_f = source_noise_spectrum(volume.hu, float(volume.spacing_mm[0])).mean_per_mm
    except ValueError:
        return "unknown", float("nan")
    return ("smooth" if mean_f < 0.30 else "medium" if mean_f < 0.40 else "sharp"), float(mean_f)


def bm3d_slice(image: np.ndarray, sigma: float | None) -> np.ndarray:
    """BM3D (the `bm3d` package); the noise std estimated by scikit-image when not given."""
    import bm3d
    from skimage.restoration import estimate_sigma

    return bm3d.bm3d(image, sigma_psd=float(estimate_sigma(image)) if sigma is None else sigma)


@dataclasses.dataclass
class Case:
    """One scored slice at one dose: its normal and low-dose slab and where the centre is."""

    series: TestSeries
    kernel_class: str
    slice_index: int
    dose_name: str
    dose: float
    normal: CTVolume  # the slab (1 or 3 slices)
    low: CTVolume
    centre: int
    noise_model: simulate.SourceNoiseModel | bool = False  # the series' own noise (simulate.source_noise_model)

    def key(self) -> dict:
        s = self.series
        return {
            "series": s.path,
            "patient": s.patient,
            "scanner": s.scanner,
            "kernel": s.kernel,
            "kernel_class": self.kernel_class,
            "region": s.region,
            "role": s.role,
            "slice": self.slice_index,
            "dose": self.dose_name,
            "dose_fraction": self.dose,
            # False: the simulator could not calibrate to the series (too few uniform patches) and used its
            # default noise model, whose level and texture are not the source's (simulator_realism.md).
            "noise_matched": bool(self.noise_model),
        }


def cases(series_list, max_slices: int = 0) -> list[Case]:
    """Every (series, slice, dose) of the benchmark, simulated once with the series' own noise model
    (``max_slices``: only the first of each series' scored slices)."""
    out = []
    for s in series_list:
        volume = _load(s.path)
        kind, _ = kernel_class(volume)
        model = simulate.source_noise_model(volume, seed=SEED) or False
        body = body_slices(volume, 0.2) or list(range(volume.shape[0]))
        inner = [k for k in body if 0 < k < volume.shape[0] - 1] or body
        picks = sorted({inner[int(i)] for i in np.linspace(0, len(inner) - 1, s.slices + 2)[1:-1].round()})
        picks = picks[:max_slices] if max_slices else picks
        for k in picks:
            normal = volume.slices(k - 1, k + 2) if volume.shape[0] >= 3 else volume
            centre = k - max(0, k - 1) if volume.shape[0] >= 3 else 0
            for d, (name, dose) in enumerate(DOSES.items()):
                low = simulate.simulate_low_dose(normal, dose, seed=SEED + 100 * k + d, match_source=model)
                out.append(Case(s, kind, k, name, dose, normal, low, centre, model))
        print(f"simulated {s.path}: {len(picks)} slices x {len(DOSES)} doses ({kind} kernel)", flush=True)
    return out


def methods(
    before: str | None, only: set[str] | None, previous: str | None = None, compare: dict | None = None
) -> dict:
    """name -> function(case) -> (centre slice in HU, computed slices, dose used or None). ``compare``: more
    bundles by label, each ``(folder, sampling steps or None)``, scored one slice per call and with the dose given."""
    table: dict = {
        "low-dose input": lambda c: (c.low.hu[c.centre], 0, None),
        "BM3D (sigma estimated)": lambda c: (bm3d_slice(c.low.hu[c.centre], None), 1, None),
        "BM3D (oracle sigma)": lambda c: (bm3d_slice(c.low.hu[c.centre], oracle_sigma(c)), 1, None),
    }
    for name in ("redcnn", "esaunet"):
        table[name] = _model(name, "slab")
    models = [(BEFORE, before)] if before else []
    models += [(PREVIOUS, previous)] if previous else []
    models.append((DEFAULT_MODEL, DEFAULT_MODEL))
    for label, bundle in models:
        table[f"{label} (one slice, dose estimated)"] = _model(bundle, "one slice")
        table[f"{label} (dose estimated)"] = _model(bundle, "slab")
        table[f"{label} (true dose given)"] = _model(bundle, "true dose")
    # The shipped model with its self-ensemble of 8 (lowdose.ensemble), as --ensemble 8 runs it.
    table[f"{DEFAULT_MODEL} x8 (one slice, dose estimated)"] = _model(DEFAULT_MODEL, "one slice", ensemble=8)
    table[f"{DEFAULT_MODEL} x8 (true dose given)"] = _model(DEFAULT_MODEL, "true dose", ensemble=8)
    for label, (bundle, steps) in (compare or {}).items():
        table[f"{label} (one slice, dose estimated)"] = _model(bundle, "one slice", steps)
        table[f"{label} (true dose given)"] = _model(bundle, "true dose", steps)
    if only:
        table = {k: v for k, v in table.items() if any(k == o or k.startswith(o + " (") for o in only)}
    return table


def oracle_sigma(case: Case) -> float:
    """The true std of the added noise in the body of the scored slice (BM3D's best case)."""
    normal, low = case.normal.hu[case.centre], case.low.hu[case.centre]
    return float((low - normal)[normal > -500].std())


_DENOISERS: dict[tuple[str, int | None], Denoiser] = {}


def _model(bundle: str, mode: str, steps: int | None = None, ensemble: int = 1):
    def run(case: Case):
        key = (bundle, steps)
        denoiser = _DENOISERS.get(key) or _DENOISERS.setdefault(key, Denoiser(bundle, device="cpu", steps=steps))
        if mode == "one slice":
            low, centre = case.low.slices(case.centre, case.centre + 1), 0
        else:
            low, centre = case.low, case.centre
        dose = case.dose if mode == "true dose" else "auto"
        result = denoiser(low, dose=dose, ensemble=ensemble)
        return result.volume.hu[centre], low.shape[0], result.dose_fraction

    return run


def score(case: Case, name: str, method) -> tuple[dict, np.ndarray]:
    started = time.perf_counter()
    out, computed, dose_used = method(case)
    seconds = (time.perf_counter() - started) / max(computed, 1)
    ref = case.normal.hu[case.centre]
    row = {
        **case.key(),
        "method": name,
        "psnr_abdomen": psnr(ref[None], out[None], "abdomen"),
        "ssim_abdomen": ssim(ref[None], out[None], "abdomen"),
        "rmse_hu": rmse_hu(ref[None], out[None]),
        "seconds_per_slice": seconds if computed else 0.0,
        "dose_used": dose_used,
    }
    return row, out


def normal_dose_estimates(model: str = DEFAULT_MODEL) -> list[dict]:
    """A model's dose estimate on every shared normal-dose series: the volume, and its slices one by one."""
    denoiser = Denoiser(model, device="cpu")
    rows = []
    for path in NORMAL_DOSE_SERIES:
        volume = _load(path)
        body = body_slices(volume, 0.2) or list(range(volume.shape[0]))
        picks = sorted({body[int(i)] for i in np.linspace(0, len(body) - 1, min(4, len(body))).round()})
        singles = [denoiser.estimate_dose(volume.slices(k, k + 1)) for k in picks]
        rows.append(
            {
                "series": path,
                "slice_mm": float(volume.spacing_mm[2]),
                "pixel_mm": float(volume.spacing_mm[0]),
                "volume_estimate": denoiser.estimate_dose(volume),
                "single_slice_estimates": singles,
            }
        )
        print(
            f"normal dose {path}: volume {rows[-1]['volume_estimate']:.2f}, slices {np.round(singles, 2)}", flush=True
        )
    return rows


def volume_run(model: str) -> dict:
    """A 512x512x100 volume (the sample's slices tiled) with the dose estimated, in a fresh process."""
    code = (
        "import sys, time, resource, numpy as np; sys.path.insert(0, %r)\n"
        "from lowdose import CTVolume, load_ct, sample_ct_path\n"
        "from lowdose.denoise import Denoiser\n"
        "s = load_ct(sample_ct_path()); reps = -(-100 // s.shape[0])\n"
        "v = CTVolume(hu=np.tile(s.hu, (reps, 1, 1))[:100], spacing_mm=s.spacing_mm, origin_mm=s.origin_mm)\n"
        "d = Denoiser(%r, device='cpu'); t = time.perf_counter(); d(v, dose='auto')\n"
        "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2)\n"
    ) % (str(REPO), model)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    seconds, peak_gb = map(float, out.stdout.split()[-2:])
    print(f"{model}: 512x512x100 in {seconds:.1f} s, peak memory {peak_gb:.2f} GB", flush=True)
    return {"model": model, "slices": 100, "seconds": seconds, "peak_memory_gb": peak_gb}


PARTS = RESULTS / "denoising_parts"  # one file per series (and the normal-dose and volume runs), merged as they come


def _part(name: str) -> Path:
    return PARTS / (name.replace("/", "__") + ".json")


def _read_part(name: str) -> list:
    """A part file's contents ([] before it exists)."""
    return json.loads(_part(name).read_text()) if _part(name).is_file() else []


def _merge_rows(path: Path, rows: list[dict]) -> None:
    """Add ``rows`` to a part file, replacing rows of the same slice, dose and method (atomic write)."""
    old = json.loads(path.read_text()) if path.is_file() else []
    fresh = {(r["slice"], r["dose"], r["method"]) for r in rows}
    merged = [r for r in old if (r["slice"], r["dose"], r["method"]) not in fresh] + rows
    _write_json(path, merged)


def _write_json(path: Path, value) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomically(path, json.dumps(value, indent=1))


def run_series(series: TestSeries, chosen: dict, max_slices: int = 0, again: bool = False) -> None:
    """Score every method on one series' cases; each case's rows are saved as soon as they exist, and rows
    already saved are not computed again unless ``again``."""
    examples: dict[str, np.ndarray] = {}
    saved = [] if again else _read_part(series.path)
    done = {(r["slice"], r["dose"], r["method"]) for r in saved}
    for case in cases([series], max_slices):
        rows = []
        for name, method in chosen.items():
            if (case.slice_index, case.dose_name, name) in done:
                continue
            row, out = score(case, name, method)
            rows.append(row)
            print(
                f"{series.path[:40]:<40} {case.dose_name:>12} {name:<40} PSNR {row['psnr_abdomen']:6.2f} "
                f"RMSE {row['rmse_hu']:6.1f}  {row['seconds_per_slice']:5.2f} s"
                + (f"  dose {row['dose_used']:.3f}" if row["dose_used"] is not None else ""),
                flush=True,
            )
            if series.path.endswith("B70f") and case.dose_name == "1/4" and "given" not in name:
                examples.setdefault(name, out)
                examples.setdefault("normal dose", case.normal.hu[case.centre])
        _merge_rows(_part(series.path), rows)
    if examples:  # the figure's panels: the sharp-kernel slice at 1/4
        panels = PARTS / "figure_panels.npz"
        kept = dict(np.load(panels)) if panels.is_file() else {}
        np.savez_compressed(panels, **{**kept, **examples})


def record_run(argv: list[str]) -> None:
    """Note in the parts which command computed rows, when, and with which shipped weights (their digest), so a
    report assembled from runs split by --series, or resumed, still says how each part was made."""
    runs = _read_part("runs")
    runs.append(
        {
            "command": " ".join(["benchmarks/denoising.py", *argv]),
            "date": time.strftime("%Y-%m-%d %H:%M"),
            "dose_unet_sha256": Bundle.find(DEFAULT_MODEL).weights_sha256()[:16],
        }
    )
    _write_json(_part("runs"), runs)


def report(argv) -> None:
    """Assemble the parts into denoising.md, .json and .png."""
    rows = [r for s in TEST_SERIES for r in _read_part(s.path)]
    normal, volumes = _read_part("normal_dose"), _read_part("volumes")
    panels = PARTS / "figure_panels.npz"
    examples = dict(np.load(panels)) if panels.is_file() else {}
    write(rows, normal, volumes, examples, argv, _read_part("runs"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default=str(REPO / "runs" / "dose_unet_v1"), help="dose_unet version 1 bundle")
    parser.add_argument("--previous", default=str(REPO / "runs" / "v2r3" / "dose_unet"), help="version 2 bundle")
    parser.add_argument(
        "--compare",
        nargs="*",
        default=[],
        metavar="LABEL=BUNDLE[:STEPS]",
        help="more bundles to score (e.g. a diffusion model at 1, 2 and 4 sampling steps); rows keep their label",
    )
    parser.add_argument("--methods", nargs="*", default=None, help="compute only these (others' rows are kept)")
    parser.add_argument("--series", nargs="*", default=None, help="only these test series (paths as listed)")
    parser.add_argument("--skip-volume", action="store_true", help="skip the 512x512x100 timing")
    parser.add_argument("--skip-normal", action="store_true", help="skip the normal-dose estimates")
    parser.add_argument("--report-only", action="store_true", help="only assemble the saved parts into the report")
    parser.add_argument("--max-slices", type=int, default=0, help="score only the first N slices of each series")
    parser.add_argument("--again", action="store_true", help="recompute rows already saved (e.g. a retrained model)")
    args = parser.parse_args()
    if not args.report_only:
        record_run(sys.argv[1:])
        before = args.before if Path(args.before, "configs", "metadata.json").is_file() else None
        if before is None:
            print(f"no dose_unet v1 bundle at {args.before}: its rows are skipped (see the model card to get it)")
        previous = args.previous if Path(args.previous, "configs", "metadata.json").is_file() else None
        if previous is None:
            print(f"no dose_unet v2 bundle at {args.previous}: its rows are skipped (see the model card to get it)")
        chosen = methods(before, set(args.methods) if args.methods else None, previous, compared_bundles(args.compare))
        for series in [s for s in TEST_SERIES if not args.series or s.path in args.series]:
            run_series(series, chosen, args.max_slices, args.again)
        if not args.skip_normal:
            _write_json(_part("normal_dose"), normal_dose_estimates())
        if not args.skip_volume:
            _write_json(_part("volumes"), [volume_run(DEFAULT_MODEL)])
    report(sys.argv[1:])


def compared_bundles(specs: list[str]) -> dict:
    """``LABEL=BUNDLE[:STEPS]`` -> {label: (bundle folder, steps or None)}."""
    out = {}
    for spec in specs:
        label, _, target = spec.partition("=")
        bundle, _, steps = target.partition(":")
        if not label or not Path(bundle, "configs", "metadata.json").is_file():
            raise SystemExit(f"--compare {spec!r}: expected LABEL=BUNDLE[:STEPS] with a bundle folder")
        out[label] = (bundle, int(steps) if steps else None)
    return out


def _mean(rows, **match) -> float:
    values = [r["psnr_abdomen"] for r in rows if all(r[k] == v for k, v in match.items())]
    return float(np.mean(values)) if values else float("nan")


def _method_order(rows) -> list[str]:
    order = list(methods(BEFORE, None, PREVIOUS))
    order += [m for m in dict.fromkeys(r["method"] for r in rows) if m not in order]  # --compare rows
    return [m for m in order if any(r["method"] == m for r in rows)]


def summary_table(rows) -> list[str]:
    """Mean PSNR per dose and method over the test series (the validation series apart)."""
    test = [r for r in rows if r["role"] == "test"]
    lines = ["| method | " + " | ".join(DOSES) + " |", "|---|" + "---|" * len(DOSES)]
    for m in _method_order(test):
        lines.append(f"| {m} | " + " | ".join(f"{_mean(test, method=m, dose=d):.2f}" for d in DOSES) + " |")
    return lines


def time_table(rows) -> list[str]:
    """Median seconds per slice of each method (one slice per call, or the slab's slices)."""
    lines = ["| method | median seconds per slice |", "|---|---|"]
    for m in _method_order(rows):
        seconds = [r["seconds_per_slice"] for r in rows if r["method"] == m and r["seconds_per_slice"] > 0]
        if seconds:
            lines.append(f"| {m} | {np.median(seconds):.2f} |")
    return lines


def per_series_table(rows, dose: str = "1/4") -> list[str]:
    """PSNR per series at one dose: scanner, kernel, region."""
    series = list(dict.fromkeys(r["series"] for r in rows))
    shown = [
        m
        for m in _method_order(rows)
        if "one slice" in m
        or m in ("low-dose input", "BM3D (oracle sigma)", "redcnn", "esaunet")
        or m.endswith("(true dose given)")
    ]
    lines = [
        "| series | scanner | kernel | region | " + " | ".join(shown) + " |",
        "|---|---|---|---|" + "---|" * len(shown),
    ]
    default_noise = {r["series"] for r in rows if not r.get("noise_matched", True)}
    for s in series:
        first = next(r for r in rows if r["series"] == s)
        role = " (validation)" if first["role"] == "validation" else ""
        role += " (default noise)" if s in default_noise else ""
        lines.append(
            f"| {Path(s).parent.name if s.endswith('.dcm') else s}{role} | {first['scanner']} | {first['kernel']} "
            f"({first['kernel_class']}) | {first['region']} | "
            + " | ".join(f"{_mean(rows, series=s, method=m, dose=dose):.2f}" for m in shown)
            + " |"
        )
    if default_noise:
        lines += [
            "",
            "(default noise): the simulator could not calibrate to the series' own noise (fewer than 8 uniform "
            "soft-tissue patches in the slice) and added its default noise, whose level and texture are not the "
            "source's (`benchmarks/results/simulator_realism.md`).",
        ]
    return lines


def dose_table(rows, model: str = DEFAULT_MODEL) -> tuple[list[str], dict]:
    """A model's dose estimates on the test series: one slice per call and the 2.5-D slab."""
    lines = [
        "| dose | one slice: median estimate | median relative error | slab: median estimate | median relative error |"
    ]
    lines.append("|---|---|---|---|---|")
    errors: dict = {}
    for d, true in DOSES.items():
        cells = []
        for mode in ("one slice, dose estimated", "dose estimated"):
            est = [
                r["dose_used"]
                for r in rows
                if r["method"] == f"{model} ({mode})" and r["dose"] == d and r["role"] == "test"
            ]
            if not est:
                cells += ["", ""]
                continue
            error = float(np.median(np.abs(np.array(est) - true) / true))
            errors[(d, mode)] = error
            cells += [f"{np.median(est):.3f}", f"{error:.1%}"]
        lines.append(f"| {d} ({true:.3g}) | " + " | ".join(cells) + " |")
    return lines, errors


def targets(rows, normal, volumes, errors) -> list[str]:
    out = []
    for kernel in ("B70f", "B40f"):
        series = f"lungpetctdx_A0002_siemens/{kernel}"
        modes = ("(one slice, dose estimated)", "(dose estimated)", "(true dose given)", "x8 (true dose given)")
        for method in (f"{DEFAULT_MODEL} {mode}" for mode in modes):
            if not any(r["method"] == method for r in rows):
                continue  # a report of rows from before that method existed
            ours = _mean(rows, series=series, method=method, dose="1/4")
            bm3d = _mean(rows, series=series, method="BM3D (oracle sigma)", dose="1/4")
            gain = ours - bm3d
            out.append(
                f"- same acquisition, {kernel}, 1/4 dose: {method} vs BM3D (oracle sigma): "
                f"{gain:+.2f} dB (target >= +1.5): {'met' if gain >= 1.5 else 'NOT met'}"
            )
    for cls in ("smooth", "medium", "sharp"):
        test = [r for r in rows if r["role"] == "test" and r["kernel_class"] == cls]
        if test:
            gain = _mean(test, method=f"{DEFAULT_MODEL} (one slice, dose estimated)", dose="1/4") - _mean(
                test, method="low-dose input", dose="1/4"
            )
            out.append(f"- {cls} kernels, 1/4 dose, one slice per call, dose estimated: {gain:+.2f} dB over the input")
    for (d, mode), error in errors.items():
        if d in SEEN:
            out.append(
                f"- dose estimate ({mode}) at {d}: median relative error {error:.1%} (target <= 20 %): "
                f"{'met' if error <= 0.2 else 'NOT met'}"
            )
    if normal:
        low = [n["series"] for n in normal if n["volume_estimate"] < 0.6]
        out.append(
            f"- normal-dose series read as low dose (volume estimate < 0.6): {len(low)} of {len(normal)}"
            + (f" ({', '.join(low)})" if low else "")
        )
    for v in volumes:
        out.append(
            f"- {v['model']}: 512x512x100 in {v['seconds']:.1f} s (target <= 30 s): {'met' if v['seconds'] <= 30 else 'NOT met'}"
        )
    return out


def write(rows, normal, volumes, examples, argv, runs=()) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    _write_json(RESULTS / "denoising.json", {"rows": rows, "normal_dose": normal, "volumes": volumes})
    dose_lines, errors = dose_table(rows)
    previous_lines, _ = dose_table(rows, PREVIOUS)
    lines = [
        "# Denoising benchmark: held-out patients, four vendors, smooth and sharp kernels",
        "",
        f"Command: `.venv/bin/python benchmarks/denoising.py {' '.join(argv)}` on {platform.machine()} with "
        f"{os.cpu_count()} cores, CPU only, {time.strftime('%Y-%m-%d')}. Other jobs may have shared the cores: "
        "compare seconds within one run only.",
        "",
        *(["Runs that computed the rows (the shipped dose_unet's weights by their SHA-256):", ""] if runs else []),
        *[f"- {r['date']}: `.venv/bin/python {r['command']}` (dose_unet {r['dose_unet_sha256']})" for r in runs],
        *([""] if runs else []),
        __doc__.split("\n\n", 2)[2].strip(),
        "",
        "## Mean PSNR (dB, abdomen window) over the test series",
        "",
        *summary_table(rows),
        "",
        "## Time per slice (shared cores: compare within one run only)",
        "",
        *time_table(rows),
        "",
        "## Per series at 1/4 dose (PSNR, dB)",
        "",
        *per_series_table(rows),
        "",
        "## Dose estimate of the shipped model on the test series",
        "",
        *dose_lines,
        "",
        f"The same, {PREVIOUS} (its network's estimate alone, before the noise-power range of lowdose.dose):",
        "",
        *previous_lines,
        "",
    ]
    if normal:
        lines += ["## Dose estimate on every shared normal-dose series (should be about 1)", ""]
        lines += ["| series | slice (mm) | pixel (mm) | volume | single slices |", "|---|---|---|---|---|"]
        lines += [
            f"| {n['series']} | {n['slice_mm']:g} | {n['pixel_mm']:.3f} | {n['volume_estimate']:.2f} | "
            f"{', '.join(f'{x:.2f}' for x in n['single_slice_estimates'])} |"
            for n in normal
        ]
        lines.append("")
    lines += ["## Against the targets", "", *targets(rows, normal, volumes, errors)]
    write_text_atomically(RESULTS / "denoising.md", "\n".join(lines) + "\n")
    if examples:
        normal_image = examples["normal dose"]
        side_by_side_png(
            RESULTS / "denoising.png",
            {
                k: examples[k]
                for k in ("low-dose input", "BM3D (oracle sigma)", f"{DEFAULT_MODEL} (one slice, dose estimated)")
                + ("normal dose",)
                if k in examples
            },
            window="abdomen",
            title="1/4 dose (simulated), held-out Siemens B70f (sharp) slice",
            zoom=body_zoom(normal_image),
        )
    print(f"wrote {RESULTS / 'denoising.md'}")


if __name__ == "__main__":
    main()
