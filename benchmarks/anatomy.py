"""Anatomy ablation: what ASCON's MAC loss, ALDEN's discriminator + semantic contrastive loss and BioAtt's
organ-prior attention change in the default denoiser, measured on held-out slices.

    .venv/bin/python benchmarks/anatomy.py --train   # fine-tune the five variants (one thread each), then score
    .venv/bin/python benchmarks/anatomy.py           # score variants already trained (runs/anatomy/)

Variants (configs in benchmarks/configs/anatomy_*.yaml): the shipped dose_unet fine-tuned with the same
data, doses, steps and schedule as plain MSE + SSIM (the control), + MAC, + ALDEN, + BioAtt, + all.
Held out: the bundled sample (abdomen, 20 slices), at 1/4 and 1/10 dose (simulated, seed 2024), denoised
with the true dose. Figures: PSNR/SSIM (abdomen window); over-smoothing: edge sharpness (gradient
magnitude on the reference's strongest edges, denoised / normal dose) and the NPS mean frequency in
liver and spleen relative to the normal dose; fidelity (``lowdose.fidelity.compare_structures``, the
fidelity check's own comparison): Dice of the anatomy groups segmented by lowdose's anatomy encoder
on the denoised vs the normal-dose scan, and the HU-mean error of the 31 TotalSegmentator structures
of the sample's reference label map.
"""

from __future__ import annotations

import argparse
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
sys.path.insert(0, str(REPO / "benchmarks"))

from denoising import compared_bundles  # noqa: E402  (LABEL=BUNDLE[:STEPS], as denoising.py reads them)

from lowdose import load_ct, sample_ct_path, simulate_low_dose  # noqa: E402
from lowdose.anatomy import ANATOMY_GROUPS  # noqa: E402
from lowdose.bundle import available_models  # noqa: E402
from lowdose.denoise import Denoiser  # noqa: E402
from lowdose.fidelity.compare import compare_structures, pair_name  # noqa: E402
from lowdose.fidelity.segmenter import AnatomyGroupSegmenter, total_class_names  # noqa: E402
from lowdose.figures import body_zoom, side_by_side_png  # noqa: E402
from lowdose.labels import load_label_map  # noqa: E402
from lowdose.metrics import edge_sharpness_ratio, nps_mean_frequency, psnr, ssim  # noqa: E402

VARIANTS = {
    "mse": "MSE + SSIM (control)",
    "mac": "+ MAC (ASCON)",
    "alden": "+ ALDEN (discr. + sem. contrastive)",
    "bioatt": "+ BioAtt",
    "all": "+ all",
}
DOSES = {"1/4": 0.25, "1/10": 0.1}
# The shipped bundles scored beside the variants: the plain default and the anatomy-aware model, if shipped.
PLAIN, AWARE = "dose_unet (shipped)", "dose_unet_anatomy (shipped)"
SHIPPED = {PLAIN: "dose_unet", AWARE: "dose_unet_anatomy"}
RUNS = REPO / "runs" / "anatomy"
RESULTS = REPO / "benchmarks" / "results"
SAMPLE_LABELS = REPO / "sample" / "abdomen_ct_totalseg.nii.gz"
MIN_VOXELS = 500  # structures smaller than this in the reference are left out of the HU figure


def train_variants(variants: list[str]) -> None:
    for name in variants:
        command = [
            str(REPO / ".venv" / "bin" / "lowdose"),
            "train",
            f"benchmarks/configs/anatomy_{name}.yaml",
            "--bundle",
            f"runs/anatomy/anatomy_{name}",
            "--quiet",
        ]
        print("$ OMP_NUM_THREADS=1", " ".join(command[1:]), flush=True)
        # One thread each: CPU-minutes then compare across variants (two threads count their waiting too).
        subprocess.run(command, cwd=REPO, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def texture_mask(labels: np.ndarray, names: dict[int, str]) -> np.ndarray:
    """Liver and spleen, eroded 3 voxels in-plane: uniform tissue for the noise power spectrum."""
    from scipy import ndimage

    organs = [k for k, v in names.items() if v in ("liver", "spleen")]
    return ndimage.binary_erosion(np.isin(labels, organs), structure=np.ones((1, 7, 7), bool))


def soft_tissue_edges_mask(normal) -> np.ndarray:
    """Inside the body (eroded 10 voxels, so the skin edge does not dominate) where the normal dose is soft
    tissue or fat (-150..250 HU after a 3x3 mean): organ boundaries, vessels, bowel walls; no bone or lung."""
    from scipy import ndimage

    body = ndimage.binary_erosion(normal.hu > -500, structure=np.ones((1, 21, 21), bool))
    smooth = ndimage.uniform_filter(normal.hu, size=(1, 3, 3))
    return body & (smooth > -150) & (smooth < 250)


def score(
    denoised: np.ndarray,
    normal,
    low: np.ndarray,
    labels_ts,
    names,
    segmenter,
    seg_reference,
    seg_low,
    texture,
    f_reference,
    edges_mask,
) -> dict:
    from lowdose.volume import CTVolume

    figures = {
        "psnr_abdomen": psnr(normal.hu, denoised),
        "ssim_abdomen": ssim(normal.hu, denoised),
        "edge_sharpness": edge_sharpness_ratio(normal.hu, denoised, mask=edges_mask),
        "nps_mean_frequency_ratio": nps_mean_frequency(denoised, texture, normal.spacing_mm[1]) / f_reference,
    }
    seg = segmenter.segment(
        CTVolume(hu=denoised, spacing_mm=normal.spacing_mm, origin_mm=normal.origin_mm, direction=normal.direction)
    )
    pair = pair_name("denoised", "reference")
    groups = compare_structures(
        {"original": seg_low, "denoised": seg, "reference": seg_reference},
        {"original": low, "denoised": denoised, "reference": normal.hu},
        normal.spacing_mm,
        ANATOMY_GROUPS,
    )["structures"]
    dice = {
        s["name"]: s["pairs"][pair]["dice"]
        for s in groups
        if s["images"]["reference"]["voxels"] >= 1000 and s["pairs"][pair]["dice"] is not None
    }
    figures["group_dice"] = dice
    figures["mean_group_dice"] = float(np.mean(list(dice.values())))
    structures = compare_structures(
        {"original": labels_ts, "denoised": labels_ts, "reference": labels_ts},
        {"original": low, "denoised": denoised, "reference": normal.hu},
        normal.spacing_mm,
        names,
    )["structures"]
    shifts = {
        s["name"]: s["pairs"][pair]["hu_shift"]
        for s in structures
        if s["images"]["reference"]["voxels"] >= MIN_VOXELS and s["pairs"][pair]["hu_shift"] is not None
    }
    figures["hu_shift"] = shifts
    figures["mean_abs_hu_error"] = float(np.mean(np.abs(list(shifts.values()))))
    figures["max_abs_hu_error"] = float(np.max(np.abs(list(shifts.values()))))
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", action="store_true", help="fine-tune the variants first (about an hour on 2 cores)")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument(
        "--compare",
        nargs="*",
        default=[],
        metavar="LABEL=BUNDLE[:STEPS]",
        help="score these bundles beside the shipped dose_unet instead of the variants (e.g. a diffusion model)",
    )
    parser.add_argument("--name", default="anatomy", help="results file name under benchmarks/results/")
    args = parser.parse_args()
    if args.train:
        train_variants(args.variants)

    normal = load_ct(sample_ct_path())
    names = total_class_names()
    labels_ts, _ = load_label_map(SAMPLE_LABELS, normal)
    labels_ts = labels_ts.astype(np.int64)
    texture = texture_mask(labels_ts, names)
    edges_mask = soft_tissue_edges_mask(normal)
    f_reference = nps_mean_frequency(normal.hu, texture, normal.spacing_mm[1])
    segmenter = AnatomyGroupSegmenter("anatomy_encoder")
    seg_reference = segmenter.segment(normal)
    # The instrument itself: the encoder's groups on the normal dose against TotalSegmentator's, grouped.
    from lowdose.anatomy import to_groups
    from lowdose.training.anatomy_encoder import dice_per_group

    instrument = dice_per_group(seg_reference, to_groups(labels_ts, names))

    methods: dict[str, tuple[str, int | None]] = {
        label: (name, None) for label, name in SHIPPED.items() if name in available_models()
    }
    if args.compare:  # the compared bundles beside the shipped default, no variants
        methods = {PLAIN: ("dose_unet", None), **compared_bundles(args.compare)}
    else:
        methods.update(
            {label: (str(RUNS / f"anatomy_{v}"), None) for v, label in VARIANTS.items() if v in args.variants}
        )
    rows, examples, budgets = [], {}, {}
    for dose_name, dose in DOSES.items():
        low = simulate_low_dose(normal, dose, seed=2024)
        seg_low = segmenter.segment(low)
        entries = {"low-dose input": low.hu}
        for label, (model, steps) in methods.items():
            denoiser = Denoiser(model, device="cpu", steps=steps)
            entries[label] = denoiser(low, dose=dose).volume.hu
            history = Path(model) / "docs" / "history.json"
            if history.is_file():
                epochs = json.loads(history.read_text())["epochs"]
                budgets[label] = {
                    "epochs": len(epochs),
                    "cpu_minutes": epochs[-1].get("cpu_minutes"),
                    "wall_minutes": epochs[-1].get("wall_minutes"),
                }
        for label, denoised in entries.items():
            figures = score(
                denoised,
                normal,
                low.hu,
                labels_ts,
                names,
                segmenter,
                seg_reference,
                seg_low,
                texture,
                f_reference,
                edges_mask,
            )
            rows.append({"dose": dose_name, "method": label, **figures})
            print(
                f"{dose_name:>5} {label:<38} PSNR {figures['psnr_abdomen']:6.2f} SSIM {figures['ssim_abdomen']:.4f} "
                f"edges {figures['edge_sharpness']:.3f} NPS f {figures['nps_mean_frequency_ratio']:.3f} "
                f"Dice {figures['mean_group_dice']:.4f} |dHU| {figures['mean_abs_hu_error']:.2f}",
                flush=True,
            )
            if dose_name == "1/10":
                examples[label] = denoised[normal.shape[0] // 2]
    examples["normal dose"] = normal.hu[normal.shape[0] // 2]
    if args.compare:
        write_comparison(rows, budgets, args)
    else:
        write_results(rows, budgets, instrument, args, normal, examples)


def figures_table(rows) -> list[str]:
    """One line per dose and method: PSNR, SSIM, edges, NPS f, group Dice, HU errors."""
    header = "| dose | method | PSNR abd (dB) | SSIM abd | edges | NPS f | group Dice | mean / max abs HU error |"
    lines = [header, "|" + "---|" * 8]
    for r in rows:
        lines.append(
            f"| {r['dose']} | {r['method']} | {r['psnr_abdomen']:.2f} | {r['ssim_abdomen']:.4f} | "
            f"{r['edge_sharpness']:.3f} | {r['nps_mean_frequency_ratio']:.3f} | {r['mean_group_dice']:.4f} | "
            f"{r['mean_abs_hu_error']:.2f} / {r['max_abs_hu_error']:.2f} |"
        )
    return lines


def write_comparison(rows, budgets, args) -> None:
    """``--compare``'s report: the fidelity figures of the compared bundles beside the shipped dose_unet."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps({"rows": rows, "budgets": budgets}, indent=2))
    lines = [
        f"# Fidelity figures: {', '.join(label for label, _ in compared_bundles(args.compare).items())}",
        "",
        f"Command: `.venv/bin/python benchmarks/anatomy.py --compare {' '.join(args.compare)} --name {args.name}` "
        f"on {platform.machine()} with {os.cpu_count()} cores, CPU only, {time.strftime('%Y-%m-%d')}.",
        "",
        "The bundled sample (abdomen, all 20 slices; a validation series of the shipped models, never trained on), "
        "simulated at 1/4 and 1/10 dose (seed 2024), denoised with the true dose. Figures as in `anatomy.md`: "
        "edges (sharpness of soft-tissue edges, denoised / normal dose), NPS f (noise texture in liver and spleen, "
        "denoised / normal dose), group Dice (lowdose's anatomy encoder on the denoised vs the normal-dose scan: the "
        "fidelity check's comparison) and the HU error of the sample's TotalSegmentator structures "
        f"(>= {MIN_VOXELS} voxels).",
        "",
        *figures_table(rows),
        "",
    ]
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines))
    print("\n".join(lines))


# (figure, label, higher is better, smallest change that counts)
FIGURES = (
    ("psnr_abdomen", "PSNR", True, 0.05),
    ("edge_sharpness", "edges", True, 0.005),
    ("nps_mean_frequency_ratio", "NPS f", True, 0.005),
    ("mean_group_dice", "group Dice", True, 0.002),
    ("mean_abs_hu_error", "|HU error|", False, 0.1),
)


def changes(rows) -> list[str]:
    """One line per variant and dose: each figure's change from the control, and whether it helped."""
    control = VARIANTS["mse"]
    lines = []
    for dose in DOSES:
        base = next((r for r in rows if r["dose"] == dose and r["method"] == control), None)
        if base is None:
            continue
        for r in rows:
            if r["dose"] != dose or r["method"] in (control, "low-dose input", *SHIPPED):
                continue
            parts = []
            for key, label, higher, least in FIGURES:
                delta = r[key] - base[key]
                better = delta > least if higher else delta < -least
                worse = delta < -least if higher else delta > least
                parts.append(f"{label} {delta:+.3f} ({'better' if better else 'worse' if worse else 'same'})")
            lines.append(f"- {dose}, {r['method']}: " + "; ".join(parts))
    return lines


def ship_decision(rows, baseline: str) -> list[str]:
    """The issue's rule, checked against one baseline: the anatomy-aware model ships if it beats the plain
    model on fidelity (lower HU error and group Dice not lower, at both doses) without losing more than
    0.3 dB PSNR."""
    lines = []
    for dose in DOSES:
        a = next((r for r in rows if r["dose"] == dose and r["method"] == AWARE), None)
        b = next((r for r in rows if r["dose"] == dose and r["method"] == baseline), None)
        if a is None or b is None:
            return []
        fidelity = a["mean_abs_hu_error"] < b["mean_abs_hu_error"] and a["mean_group_dice"] >= b["mean_group_dice"]
        psnr_kept = a["psnr_abdomen"] - b["psnr_abdomen"] >= -0.3
        lines.append(
            f"- {dose}: PSNR {a['psnr_abdomen'] - b['psnr_abdomen']:+.2f} dB, "
            f"|HU error| {a['mean_abs_hu_error'] - b['mean_abs_hu_error']:+.2f} HU, "
            f"group Dice {a['mean_group_dice'] - b['mean_group_dice']:+.4f}, "
            f"edges {a['edge_sharpness'] - b['edge_sharpness']:+.3f}, "
            f"NPS f {a['nps_mean_frequency_ratio'] - b['nps_mean_frequency_ratio']:+.3f}: "
            f"fidelity {'better' if fidelity else 'not better'}, "
            f"PSNR {'within' if psnr_kept else 'NOT within'} 0.3 dB"
        )
    return [f"## {AWARE} against {baseline}", ""] + lines + [""]


def write_results(rows, budgets, instrument, args, normal, examples) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "anatomy.json").write_text(
        json.dumps({"rows": rows, "budgets": budgets, "encoder_dice_vs_totalsegmentator": instrument}, indent=2)
    )
    lines = [
        "# Anatomy ablation",
        "",
        f"Command: `.venv/bin/python benchmarks/anatomy.py{' --train' if args.train else ''}` on "
        f"{platform.machine()} with {os.cpu_count()} cores, CPU only, {time.strftime('%Y-%m-%d')}.",
        "",
        "Every variant is the shipped `dose_unet` fine-tuned with the same data, doses, steps (5 epochs x 64 "
        "steps of 16 patches) and schedule; only the `anatomy` section of its config differs "
        "(`benchmarks/configs/anatomy_*.yaml`). Held out: the bundled sample, all 20 slices, simulated 1/4 and "
        "1/10 dose (seed 2024), denoised with the true dose. Scored beside them: the shipped default `dose_unet` "
        "(78 CPU-minutes from scratch, not fine-tuned) and the shipped `dose_unet_anatomy` (the + ALDEN recipe "
        "with validation figures, its last epoch; `models/dose_unet_anatomy/configs/train.yaml`).",
        "",
        "- **edges**: mean gradient magnitude of the denoised scan / the normal dose's on the 10 % strongest "
        "soft-tissue edges inside the body (organ boundaries, vessels; skin, bone and lung left out) (1 = as sharp; below 1 = blurred).",
        "- **NPS f**: noise power spectrum mean frequency in liver and spleen, denoised / normal dose (1 = the "
        "same texture; below 1 = blotchy, over-smoothed).",
        "- **group Dice**: lowdose's anatomy encoder segments the denoised and the normal-dose scan into the 11 "
        "anatomy groups; mean Dice of the groups with >= 1000 voxels (the fidelity check's comparison).",
        f"- **|HU error|**: mean and max over the TotalSegmentator structures of the sample's reference label map "
        f"(>= {MIN_VOXELS} voxels) of |mean HU denoised - mean HU normal dose|.",
        "",
    ]
    lines += figures_table(rows)
    groups = [g for g in ANATOMY_GROUPS.values() if any(g in r["group_dice"] for r in rows)]
    lines += [
        "",
        "## Group Dice at 1/10 dose (denoised vs normal dose, lowdose's anatomy encoder)",
        "",
        "| method | " + " | ".join(groups) + " |",
        "|---|" + "---|" * len(groups),
    ]
    for r in rows:
        if r["dose"] == "1/10":
            lines.append(
                f"| {r['method']} | " + " | ".join(f"{r['group_dice'].get(g, float('nan')):.3f}" for g in groups) + " |"
            )
    lines += ["", "## What each method changed (against the control, same budget)", ""] + changes(rows)
    lines += [""] + ship_decision(rows, VARIANTS["mse"]) + ship_decision(rows, PLAIN)
    lines += [
        "## Training budgets (one thread each)",
        "",
        "| variant | epochs | CPU-minutes | wall minutes |",
        "|---|---|---|---|",
    ]
    lines += [f"| {k} | {v['epochs']} | {v['cpu_minutes']} | {v['wall_minutes']} |" for k, v in budgets.items()]
    lines += [
        "",
        "## The instrument",
        "",
        "Dice of lowdose's anatomy encoder on the normal-dose sample against TotalSegmentator's label map "
        "(grouped): " + ", ".join(f"{k} {v:.2f}" for k, v in instrument.items()) + ". The encoder was trained "
        "on this very series (and TotalSegmentator's 3 mm example CT): the figures are in-sample, its best case; "
        "its small groups are not learnt, so the group Dice is carried by liver, spleen, bowel and bone. ALDEN and BioAtt variants were trained with this same encoder's features: a better group Dice "
        "for them can partly be the denoiser learning what this encoder likes; the HU errors, measured in "
        "TotalSegmentator's own structures, do not share that bias.",
        "",
    ]
    (RESULTS / "anatomy.md").write_text("\n".join(lines) + "\n")
    side_by_side_png(
        RESULTS / "anatomy.png",
        examples,
        window="abdomen",
        title="1/10 dose (simulated), held-out slice, anatomy ablation",
        spacing_mm=(normal.spacing_mm[1], normal.spacing_mm[0]),
        zoom=body_zoom(examples["normal dose"]),
    )
    print(f"wrote {RESULTS / 'anatomy.md'} and {RESULTS / 'anatomy.png'}")


if __name__ == "__main__":
    main()
