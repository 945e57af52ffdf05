"""The model cards (docs/README.md) of trained bundles, denoisers and anatomy encoders, written from what the
run actually recorded."""

from __future__ import annotations

import platform
from pathlib import Path

from ..anatomy import ANATOMY_GROUPS
from .engine import describe

REPOSITORY = Path(__file__).resolve().parents[2]


def repository_relative(text: str) -> str:
    """Paths in ``text`` relative to the repository (and its parent as ``../``), as a model card's readers
    have it cloned."""
    return text.replace(f"{REPOSITORY}/", "").replace(f"{REPOSITORY.parent}/", "../")


INTENDED_USE = """\
## Intended use

Reducing the noise of low-dose CT (about 1/20 to 1/2 of a routine dose) reconstructed with filtered
back-projection and {kernels}, for reading and for downstream analysis, in research and
evaluation. Hounsfield units and geometry are kept; voxels outside the field of view and above
{hu_max:g} HU (metal) are returned unchanged. Check what denoising changed with `lowdose fidelity`.

## Not intended for

Primary diagnosis without the original images beside it; images that are not CT; iterative or deep-learning
reconstructions that are already denoised (the model expects FBP noise and would over-smooth); {not_in_training}

## Limits

{simulation_limits}
- Like every network trained with a pixel-wise loss, it smooths: fine low-contrast texture can be lost.
"""


FIXED_SIMULATOR = {
    "kernels": "a soft-tissue kernel",
    "not_in_training": "paediatric scans, very thick slabs (>5 mm) or sharp bone/lung kernels, none of which "
    "were in training.",
    "simulation_limits": """\
- Trained on **simulated** low-dose noise (`lowdose.simulate`: projection-domain Poisson + electronic
  noise, Siemens-Definition-like fan-beam geometry); real scanners differ in bowtie filtration, tube-current
  modulation and reconstruction kernel, and the simulated texture is slightly finer than a scanner's.
- Trained on CPU with a small budget on a handful of public series (listed below); figures are on one
  held-out series. Treat them as a lower bound of what the architecture can do, not as a clinical validation.""",
}
MATCHED_SIMULATOR = {
    "kernels": "a smooth to sharp kernel",
    "not_in_training": "paediatric scans and slabs thicker than 8 mm, which were not in training.",
    "simulation_limits": """\
- Trained on **simulated** low-dose noise matched to each training series' own scanner noise
  (`lowdose.simulate` with `match_source`: fan-beam geometry, bowtie, per-slice tube current from DICOM,
  electronic noise, and a filter with the source kernel's noise power spectrum), so smooth and sharp kernels
  of GE, Philips, Siemens and Toshiba scanners were seen. The simulator has no beam hardening, metal or
  photon-starvation streaks, and its detector limits the noise it can add above 0.71 cycles/mm: the
  sharpest kernels' finest noise is under-represented.
- The dose estimate reads the noise of each slice against what a routine scan of that kind held in
  training: a protocol far noisier or far cleaner than a routine one reads as a higher or lower dose.
- Trained on CPU with a small budget on public series (listed below); held-out figures are in
  `benchmarks/results/denoising.md`. Not a clinical validation.""",
}


def model_card(meta: dict, history: dict, parameters: int, gflops: float) -> str:
    """Markdown model card from the bundle metadata and the training history."""
    config = history.get("config", {})
    lines = [f"# {meta['name']}", ""]
    if config.get("description"):
        lines += [config["description"], ""]
    if config.get("init_bundle"):
        lines += [
            f"Fine-tuned from the bundle `{repository_relative(config['init_bundle'])}`; the figures below are of "
            "the fine-tuned model.",
            "",
        ]
    lines += _summary(meta, config, parameters, gflops)
    lines += _anatomy_section(meta, config)
    training = meta.get("training", {})
    simulator = MATCHED_SIMULATOR if config.get("data", {}).get("match_source") else FIXED_SIMULATOR
    lines += ["", INTENDED_USE.format(hu_max=meta["normalisation"]["hu_max"], **simulator), "## Training data", ""]
    lines += [f"- {series}" for series in training.get("train_series", [])]
    lines += ["", "Held out for validation:", ""]
    lines += [f"- {series}" for series in training.get("validation_series", [])]
    lines += _how_it_was_trained(history)
    return "\n".join(lines)


def _summary(meta: dict, config: dict, parameters: int, gflops: float) -> list[str]:
    """The card's table (network, size, input, doses, epoch shipped) and the shipped epoch's validation figures."""
    training, validation, network = meta.get("training", {}), meta.get("validation", {}), meta["network"]
    estimator = "no"
    if meta.get("dose_estimator"):
        estimator = "yes (estimates the dose fraction from the image; `--dose auto`)"
    scale = meta["normalisation"]
    doses = ", ".join(f"{d:.3g}" for d in training.get("doses", []))
    lines = [
        "| | |",
        "|---|---|",
        f"| network | `{network['name']}` {network['kwargs']} |",
        f"| parameters | {parameters / 1e6:.3f} M |",
        f"| GFLOPs per 512x512 slice | {gflops:.1f} |",
        f"| dose estimator | {estimator} |",
        f"| input | {meta['network_data_format']['inputs']['image']['channel_def']['0']}, HU clipped to "
        f"[{scale['hu_min']:g}, {scale['hu_max']:g}] / {scale['scale_hu']:g} |",
        f"| training doses | {doses} (fractions of the normal dose) |",
        f"| epoch shipped | {training.get('best_epoch')} of {training.get('epochs')} ("
        + ("the last" if config.get("optim", {}).get("selection") == "last" else "best validation PSNR")
        + ") |",
        "",
        "Validation on the held-out series (abdomen window C50/W400, mean over the validation doses "
        f"{', '.join(f'{d:.3g}' for d in config.get('data', {}).get('validation_doses', []))}):",
        "",
        "| figure | value |",
        "|---|---|",
    ]
    return lines + [f"| {key} | {value:.4f} |" for key, value in validation.items() if isinstance(value, float)]


def _anatomy_section(meta: dict, config: dict) -> list[str]:
    """Which anatomy-aware terms trained the model, with their weights (or that none did)."""
    anatomy = meta.get("anatomy_aware_training") or {}
    lines = ["", "## Anatomy-aware training", ""]
    diffusion = config.get("diffusion")
    pixel = (
        f"the residual diffusion loss ({diffusion.get('loss', 'l1').upper()} on the predicted residual) + SSIM"
        if diffusion
        else "MSE + SSIM"
    )
    if not anatomy.get("enabled"):
        return lines + [
            f"None: pixel losses only ({pixel}). See `benchmarks/results/anatomy.md` for what the "
            "anatomy-aware options change."
        ]
    lines += [
        f"On: {', '.join(anatomy['enabled'])}; anatomy encoder `{anatomy.get('encoder')}`. Weights: "
        f"MAC {anatomy.get('mac_weight', 0):g}, adversarial {anatomy.get('adversarial_weight', 0):g}, "
        f"semantic contrastive {anatomy.get('semantic_contrastive_weight', 0):g}, BioAtt "
        f"{'on' if anatomy.get('bioatt') else 'off'}."
    ]
    if meta.get("anatomy_encoder"):
        lines.append(
            f"The bundle ships the anatomy encoder `{meta['anatomy_encoder'].get('source')}` that gives "
            "BioAtt its organ probabilities at inference."
        )
    return lines


def _how_it_was_trained(history: dict) -> list[str]:
    """The commands, the budget (CPU, threads, minutes), a log excerpt and the dose estimator's second stage."""
    epochs = history.get("epochs", [])
    lines = ["", "## How it was trained", ""]
    commands = history.get("commands") or ([history["command"]] if history.get("command") else [])
    if commands:
        lines += ["```", *commands, "```", ""]
    if epochs:
        last = epochs[-1]
        cpu = last.get("cpu_minutes")
        threads = history.get("threads", "?")
        lines += [
            f"On {platform.machine()} CPU ({threads} thread{'' if threads == 1 else 's'}), "
            f"{last.get('wall_minutes', sum(e.get('epoch_seconds', 0) for e in epochs) / 60):.0f} min wall"
            + (f", {cpu:.0f} CPU-minutes" if cpu else "")
            + f", {len(epochs)} epochs. "
            "The full per-epoch history is `docs/history.json`.",
            "",
        ]
        shown = epochs if len(epochs) <= 8 else epochs[:3] + epochs[-5:]
        lines += ["Log excerpt (first and last epochs):", "", "```", *[describe(record) for record in shown], "```", ""]
    stage = history.get("estimator_stage")
    if stage:
        lines += [
            f"Dose estimator, second stage on whole slices: {len(stage['epochs'])} epochs of "
            f"{stage['slices_per_epoch']} slices, {stage['wall_minutes']:.0f} min wall; last epoch (the one "
            "shipped, not picked on the held-out series):",
            "",
            "```",
            describe(stage["epochs"][-1]),
            "```",
            "",
        ]
    return lines


ANATOMY_ENCODER_PURPOSE = (
    "The anatomy prior of lowdose's anatomy-aware training: its encoder features feed ALDEN's "
    "discriminator and semantic contrastive loss, its organ-presence head gives BioAtt's per-slice organ "
    "probabilities, and in the ablation benchmark it segments denoised and normal-dose slices to "
    "measure what denoising changed. It is not a clinical segmentation model: use TotalSegmentator "
    "(`lowdose fidelity`) for that."
)


def anatomy_encoder_card(
    name: str, config, task: str, kwargs: dict, parameters: int, gflops: float, history: dict
) -> str:
    """Markdown model card of an anatomy encoder bundle from its config (``AnatomyEncoderConfig``) and history."""
    shown = repository_relative
    last = history["epochs"][-1] if history["epochs"] else {}
    dice = last.get("val_dice", {})
    groups = ", ".join(ANATOMY_GROUPS.values())
    doses = ", ".join(f"{d:g}" for d in config.doses)
    lines = [
        f"# {name}",
        "",
        config.description or task,
        "",
        "| | |",
        "|---|---|",
        f"| network | `anatomy_encoder` {kwargs} |",
        f"| parameters | {parameters / 1e6:.3f} M |",
        f"| GFLOPs per 512x512 slice | {gflops:.1f} |",
        f"| groups | {groups} |",
        f"| training slices | {history.get('training_slices')} (every slice at doses {doses}) |",
        "",
        "## What it is for",
        "",
        ANATOMY_ENCODER_PURPOSE,
        "",
        "## Training data",
        "",
        *[f"- {shown(i)} with {shown(m)}" for i, m in zip(config.images, config.labels)],
        "",
        "Validation (group Dice at normal dose):",
        "",
        *[f"- {shown(i)} with {shown(m)}" for i, m in zip(config.validation_images, config.validation_labels)],
        "",
        "| group | Dice |",
        "|---|---|",
        *[f"| {k} | {v:.3f} |" for k, v in dice.items()],
        f"| **mean** | {last.get('val_mean_dice', float('nan')):.3f} |",
        "",
        "## Limits",
        "",
        "Learnt from very few label maps (listed above): it knows the coarse groups of an adult abdomen and "
        "lower chest, not head, neck or pelvis. "
        + (
            "The validation series is also a training series: its Dice is in-sample, an upper bound."
            if set(config.validation_images) & set(config.images)
            else "Where the validation series is the same patient as a training series, its Dice is optimistic."
        ),
        "",
        "## How it was trained",
        "",
        "```",
        *history.get("commands", []),
        "```",
        "",
        f"{len(history['epochs'])} epochs, {last.get('wall_minutes', 0):.0f} min wall, "
        f"{last.get('cpu_minutes', 0):.0f} CPU-minutes ({history.get('threads')} threads).",
    ]
    return "\n".join(lines) + "\n"
