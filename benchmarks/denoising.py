"""Denoising benchmark: every method on the same held-out slices, simulated doses, one run.

    .venv/bin/python benchmarks/denoising.py            # writes benchmarks/results/denoising.md + .png

Methods: the low-dose input, Gaussian filter, non-local means (scikit-image), BM3D (the `bm3d`
package, noise sigma estimated from the image), and every trained model under models/ (RED-CNN,
ESAU-Net, our default dose-aware network, ...). Held out: the bundled sample series (never trained
on). Doses 1/2, 1/4, 1/10, 1/20 (seen in training) and 1/3, 1/8 (unseen). Figures: PSNR/SSIM on the
abdomen and chest windows, RMSE in HU, seconds per 512x512 slice, GFLOPs per slice, dose-estimator
error; then a separate timing of a 512x512x100 volume and the peak memory of a 512x512x300 volume.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lowdose import load_ct, sample_ct_path, simulate_low_dose  # noqa: E402
from lowdose.bundle import DEFAULT_MODEL, available_models  # noqa: E402
from lowdose.denoise import Denoiser  # noqa: E402
from lowdose.figures import body_zoom, side_by_side_png  # noqa: E402
from lowdose.metrics import psnr, rmse_hu, ssim  # noqa: E402
from lowdose.volume import CTVolume  # noqa: E402

DOSES = {"1/2": 0.5, "1/4": 0.25, "1/10": 0.1, "1/20": 0.05, "1/3 (unseen)": 1 / 3, "1/8 (unseen)": 0.125}
RESULTS = REPO / "benchmarks" / "results"
# The default network trained with no more CPU time than the baselines (benchmarks/configs/dose_unet_budget40.yaml).
EQUAL_BUDGET_MODEL = "dose_unet_budget40"


def gaussian(hu: np.ndarray) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(hu, sigma=(0, 1.0, 1.0))


def _sigma(hu2d: np.ndarray) -> float:
    from skimage.restoration import estimate_sigma

    return float(estimate_sigma(hu2d))


def nlm(hu: np.ndarray) -> np.ndarray:
    from skimage.restoration import denoise_nl_means

    out = np.empty_like(hu)
    for k, image in enumerate(hu):
        sigma = _sigma(image)
        out[k] = denoise_nl_means(image, h=0.8 * sigma, sigma=sigma, patch_size=5, patch_distance=6, fast_mode=True)
    return out


def bm3d_filter(hu: np.ndarray, sigmas=None) -> np.ndarray:
    """BM3D slice by slice; sigma estimated from each image unless given (one per slice)."""
    import bm3d

    out = np.empty_like(hu)
    for k, image in enumerate(hu):
        out[k] = bm3d.bm3d(image, sigma_psd=_sigma(image) if sigmas is None else sigmas[k])
    return out


def oracle_sigmas(low: CTVolume, normal: CTVolume, centre: list[int]) -> list[float]:
    """The true noise std of each scored slice inside the body (low - normal where normal > -500 HU).

    skimage's estimate_sigma reads the finest wavelet scale and sees only part of CT noise, which is
    spatially correlated by the reconstruction filter (12 HU estimated vs 29 HU true at 1/4 dose on the
    sample), so BM3D with it barely denoises; BM3D with this oracle sigma is its best case here.
    """
    return [float((low.hu[k] - normal.hu[k])[normal.hu[k] > -500].std()) for k in centre]


def evaluate(method, normal: CTVolume, low: CTVolume, centre: list[int]) -> tuple[dict, float, np.ndarray]:
    """Figures of ``method`` on the centre slices; ``method(low, centre)`` returns (slices, slices computed)."""
    started = time.perf_counter()
    out, computed = method(low, centre)
    seconds = (time.perf_counter() - started) / computed
    ref = normal.hu[centre]
    figures = {
        "psnr_abdomen": psnr(ref, out, "abdomen"),
        "ssim_abdomen": ssim(ref, out, "abdomen"),
        "psnr_chest": psnr(ref, out, "chest"),
        "ssim_chest": ssim(ref, out, "chest"),
        "rmse_hu": rmse_hu(ref, out),
    }
    return figures, seconds, out


def classic(filter_2d):
    """A slice-by-slice filter as a benchmark method: only the scored slices are filtered."""
    return lambda low, centre: (filter_2d(low.hu[centre]), len(centre))


def model_method(denoiser: Denoiser, dose=None, estimates: dict | None = None):
    """A model as a benchmark method: each scored slice denoised with just the neighbours it needs, so a
    2-D network computes one slice per scored slice and a 2.5-D one three (timing is per computed slice).
    ``dose=None`` uses the model's estimate for the whole low-dose stack (``estimates[model name]``, made
    beforehand and timed on its own), as users get by default."""
    half = denoiser.model.in_channels // 2

    def run(low: CTVolume, centre: list[int]):
        d = estimates[denoiser.name] if dose is None and denoiser.model.dose_conditioning else (dose or "auto")
        slices, computed = [], 0
        for k in centre:
            sub = low.slices(k - half, k + half + 1)
            slices.append(denoiser(sub, dose=d).volume.hu[half])
            computed += sub.shape[0]
        return np.stack(slices), computed

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=6, help="held-out slices to score (default 6)")
    parser.add_argument("--no-bm3d", action="store_true", help="skip BM3D (slow on a CPU)")
    parser.add_argument("--skip-volume", action="store_true", help="skip the 100/300-slice timing and memory runs")
    parser.add_argument(
        "--volume-models",
        nargs="*",
        default=[DEFAULT_MODEL],
        help=f"models timed on whole volumes (default {DEFAULT_MODEL}; RED-CNN needs ~15 min per 100 slices)",
    )
    parser.add_argument(
        "--extra-model",
        nargs="*",
        default=[],
        help="bundle folders scored besides the shipped models (e.g. an equal-budget run)",
    )
    parser.add_argument(
        "--only",
        nargs="*",
        default=None,
        help="score only these methods (e.g. a new model) and merge them into the existing results, "
        "whose other rows are kept; no volume runs, the PNG is kept",
    )
    args = parser.parse_args()
    if args.only is not None:
        args.skip_volume = True

    from lowdose.networks import count_gflops
    from lowdose.training.loop import forward_example

    normal = load_ct(sample_ct_path())
    centre = [int(k) for k in np.linspace(2, normal.shape[0] - 3, args.slices).round()]
    methods = {
        "low-dose input": (classic(lambda hu: hu), None),
        "Gaussian (sigma 1 px)": (classic(gaussian), None),
        "NLM (scikit-image)": (classic(nlm), None),
    }
    if not args.no_bm3d:
        methods["BM3D"] = (classic(bm3d_filter), None)
        methods["BM3D (oracle sigma)"] = ("oracle sigma", None)
    estimators, estimates = {}, {}
    for name in [*available_models(), *args.extra_model]:
        denoiser = Denoiser(name, device="cpu")
        model = denoiser.model
        gflops = count_gflops(
            model.network, (1, model.in_channels, 512, 512), **forward_example(model.metadata["network"]["kwargs"])
        )
        name = denoiser.name  # a bundle folder given by path is shown by its name
        methods[name] = (model_method(denoiser, estimates=estimates), gflops)
        if model.dose_conditioning:
            methods[f"{name} (true dose given)"] = ("true dose", gflops, denoiser)
        if model.dose_estimator is not None and (args.only is None or name in args.only):
            estimators[name] = denoiser
    if args.only is not None:
        methods = {k: v for k, v in methods.items() if k in args.only or k.split(" (true dose")[0] in args.only}

    rows, dose_rows, examples = [], [], {}
    for dose_name, dose in DOSES.items():
        low = simulate_low_dose(normal, dose, seed=2024)
        for name, denoiser in estimators.items():  # the dose of the whole stack, as users get it
            started = time.perf_counter()
            estimates[name] = denoiser.estimate_dose(low)
            dose_rows.append(
                {
                    "model": name,
                    "dose": dose_name,
                    "true": dose,
                    "estimated": estimates[name],
                    "relative_error": abs(estimates[name] - dose) / dose,
                    "seconds": time.perf_counter() - started,
                }
            )
        for method_name, (method, gflops, *extra) in methods.items():
            if method == "true dose":
                method = model_method(extra[0], dose)
            elif method == "oracle sigma":
                sigmas = oracle_sigmas(low, normal, centre)
                method = classic(lambda hu, s=sigmas: bm3d_filter(hu, s))
            figures, seconds, out = evaluate(method, normal, low, centre)
            rows.append(
                {
                    "dose": dose_name,
                    "method": method_name,
                    **figures,
                    "seconds_per_slice": seconds,
                    "gflops_per_slice": gflops,
                }
            )
            print(
                f"{dose_name:>13} {method_name:<32} PSNR abd {figures['psnr_abdomen']:6.2f} "
                f"SSIM abd {figures['ssim_abdomen']:.4f} RMSE {figures['rmse_hu']:6.1f} HU  {seconds:6.2f} s/slice",
                flush=True,
            )
            if dose_name == "1/4" and "true dose" not in method_name:
                examples[method_name] = out[len(centre) // 2]
    examples["normal dose"] = normal.hu[centre[len(centre) // 2]]

    if args.only is not None:  # merge into the results of the last full run
        previous = json.loads((RESULTS / "denoising.json").read_text())
        rows = [
            r for r in previous["rows"] if (r["dose"], r["method"]) not in {(n["dose"], n["method"]) for n in rows}
        ] + rows
        dose_rows = [
            r
            for r in previous["dose_estimation"]
            if (r["model"], r["dose"]) not in {(n["model"], n["dose"]) for n in dose_rows}
        ] + dose_rows
        order = list(DOSES)
        rows.sort(key=lambda r: order.index(r["dose"]))
        write_results(rows, dose_rows, previous["volumes"], None, args, normal.spacing_mm)
        return
    write_results(rows, dose_rows, [], examples, args, normal.spacing_mm)  # kept if the volume runs fail
    if not args.skip_volume:
        volume_rows = volume_runs([m for m in args.volume_models if m in available_models()])
        write_results(rows, dose_rows, volume_rows, examples, args, normal.spacing_mm)


def volume_runs(models: list[str]) -> list[dict]:
    """Whole-volume timing (512x512x100) and peak memory (512x512x300), each in a fresh process."""
    rows = []
    for name in models:
        for slices in (100, 300):
            code = (
                "import sys, time, resource, numpy as np; sys.path.insert(0, %r)\n"
                "from lowdose import CTVolume, load_ct, sample_ct_path\n"
                "from lowdose.denoise import Denoiser\n"
                "s = load_ct(sample_ct_path()); reps = -(-%d // s.shape[0])\n"
                "v = CTVolume(hu=np.tile(s.hu, (reps, 1, 1))[:%d], spacing_mm=s.spacing_mm, origin_mm=s.origin_mm)\n"
                "d = Denoiser(%r, device='cpu'); t = time.perf_counter(); d(v, dose='auto')\n"
                "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2)\n"
            ) % (str(REPO), slices, slices, name)
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            seconds, peak_gb = map(float, out.stdout.split()[-2:])
            rows.append({"model": name, "slices": slices, "seconds": seconds, "peak_memory_gb": peak_gb})
            print(f"{name}: 512x512x{slices} in {seconds:.1f} s, peak memory {peak_gb:.2f} GB", flush=True)
    return rows


def targets(rows, dose_rows, volume_rows) -> list[str]:
    """The issue's targets, each with the measured figure and whether it is met."""

    def psnr_of(dose, method):
        found = [r["psnr_abdomen"] for r in rows if r["dose"] == dose and r["method"] == method]
        return found[0] if found else None

    out = []
    for dose, margin in (("1/4", 1.0), ("1/10", 1.5)):
        ours = psnr_of(dose, DEFAULT_MODEL)
        for variant in ("BM3D", "BM3D (oracle sigma)"):
            bm3d = psnr_of(dose, variant)
            if ours is not None and bm3d is not None:
                gain = ours - bm3d
                out.append(
                    f"- {DEFAULT_MODEL} vs {variant} at {dose}: {gain:+.2f} dB PSNR abdomen "
                    f"(target >= +{margin:.1f}): {'met' if gain >= margin else 'NOT met'}"
                )
        budget = psnr_of(dose, EQUAL_BUDGET_MODEL)
        for other in ("redcnn", "esaunet"):
            theirs = psnr_of(dose, other)
            if ours is not None and theirs is not None:
                out.append(f"- {DEFAULT_MODEL} vs {other} at {dose}: {ours - theirs:+.2f} dB")
            if budget is not None and theirs is not None:
                out.append(
                    f"- same budget: {EQUAL_BUDGET_MODEL} (the default network trained with 28 CPU-minutes) vs "
                    f"{other} (40-46 CPU-minutes) at {dose}: {budget - theirs:+.2f} dB "
                    f"(target >= 0): {'met' if budget >= theirs else 'NOT met'}"
                )
    for r in volume_rows:
        if r["slices"] == 100:
            out.append(
                f"- {r['model']}, 512x512x100 in {r['seconds']:.1f} s (target <= 30 s): "
                f"{'met' if r['seconds'] <= 30 else 'NOT met'}"
            )
        if r["slices"] == 300:
            out.append(
                f"- {r['model']}, peak memory for 512x512x300 {r['peak_memory_gb']:.2f} GB (target <= 3 GB): "
                f"{'met' if r['peak_memory_gb'] <= 3 else 'NOT met'}"
            )
    errors = [r["relative_error"] for r in dose_rows if r["model"] == DEFAULT_MODEL]
    if errors:
        median = float(np.median(errors))
        out.append(
            f"- dose estimator median relative error {median:.1%} over seen and unseen doses (target <= 20 %): "
            f"{'met' if median <= 0.2 else 'NOT met'}"
        )
    return out


def _only_note(only) -> str:
    """What the command line's --only means for the table (Python 3.11 f-strings cannot nest this)."""
    if not only:
        return ""
    return (
        f" (rows of {', '.join(only)} added by this command to the last full run; timings of rows added while "
        "other jobs ran are not comparable)"
    )


def write_results(rows, dose_rows, volume_rows, examples, args, spacing_mm) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "denoising.json").write_text(
        json.dumps({"rows": rows, "dose_estimation": dose_rows, "volumes": volume_rows}, indent=2)
    )
    lines = [
        "# Denoising benchmark",
        "",
        f"Command: `.venv/bin/python benchmarks/denoising.py --slices {args.slices}{' --no-bm3d' if args.no_bm3d else ''}"
        f"{' --extra-model ' + ' '.join(args.extra_model) if args.extra_model else ''}"
        f"{' --only ' + ' '.join(args.only) if args.only else ''}`"
        f"{_only_note(args.only)} "
        f"on {platform.machine()} with {__import__('os').cpu_count()} cores, CPU only, "
        f"{time.strftime('%Y-%m-%d')}.",
        "",
        f"Held-out data: the bundled sample (abdomen, 512x512, never trained on), {args.slices} slices; "
        "low-dose versions made by `lowdose.simulate` with seed 2024. PSNR/SSIM on windowed images in "
        "[0, 1] (abdomen C50/W400, chest C-600/W1500); RMSE in HU over the field of view.",
        "",
    ]
    header = "| dose | method | PSNR abd (dB) | SSIM abd | PSNR chest (dB) | SSIM chest | RMSE (HU) | s/slice | GFLOPs/slice |"
    lines += [header, "|" + "---|" * 9]
    for r in rows:
        gflops = "" if r["gflops_per_slice"] is None else f"{r['gflops_per_slice']:.1f}"
        lines.append(
            f"| {r['dose']} | {r['method']} | {r['psnr_abdomen']:.2f} | {r['ssim_abdomen']:.4f} | "
            f"{r['psnr_chest']:.2f} | {r['ssim_chest']:.4f} | {r['rmse_hu']:.1f} | "
            f"{r['seconds_per_slice']:.2f} | {gflops} |"
        )
    if dose_rows:
        lines += [
            "",
            "## Dose estimator (whole low-dose stack, median of 8 slices)",
            "",
            "| model | dose | estimated | relative error | seconds |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| {r['model']} | {r['dose']} | {r['estimated']:.3f} | {r['relative_error']:.1%} | {r['seconds']:.2f} |"
            for r in dose_rows
        ]
        for model in sorted({r["model"] for r in dose_rows}):
            errors = [r["relative_error"] for r in dose_rows if r["model"] == model]
            lines.append(f"\n{model}: median relative error {np.median(errors):.1%} over the {len(errors)} doses.")
    if volume_rows:
        lines += [
            "",
            "## Whole volumes (sample slices tiled; fresh process each)",
            "",
            "| model | slices | seconds | peak memory (GB) |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {r['model']} | {r['slices']} | {r['seconds']:.1f} | {r['peak_memory_gb']:.2f} |" for r in volume_rows
        ]
    lines += ["", "## Against the targets", ""] + targets(rows, dose_rows, volume_rows)
    (RESULTS / "denoising.md").write_text("\n".join(lines) + "\n")

    if examples is None:
        print(f"wrote {RESULTS / 'denoising.md'} (merged; {RESULTS / 'denoising.png'} kept)")
        return
    shown = {name: image for name, image in examples.items() if name not in ("Gaussian (sigma 1 px)",)}
    side_by_side_png(
        RESULTS / "denoising.png",
        shown,
        window="abdomen",
        title="1/4 dose (simulated), held-out slice of the bundled sample",
        spacing_mm=(spacing_mm[1], spacing_mm[0]),
        zoom=body_zoom(examples["normal dose"]),
    )
    print(f"wrote {RESULTS / 'denoising.md'} and {RESULTS / 'denoising.png'}")


if __name__ == "__main__":
    main()
