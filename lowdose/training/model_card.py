"""The model card (docs/README.md) of a trained bundle, written from what the run actually recorded."""

from __future__ import annotations

import platform

INTENDED_USE = """\
## Intended use

Reducing the noise of low-dose CT (about 1/20 to 1/2 of a routine dose) reconstructed with filtered
back-projection and a soft-tissue kernel, for reading and for downstream analysis, in research and
evaluation. Hounsfield units and geometry are kept; voxels outside the field of view and above
{hu_max:g} HU (metal) are returned unchanged. Check what denoising changed with `lowdose fidelity`.

## Not intended for

Primary diagnosis without the original images beside it; images that are not CT; iterative or deep-learning
reconstructions that are already denoised (the model expects FBP noise and would over-smooth); paediatric
scans, very thick slabs (>5 mm) or sharp bone/lung kernels, none of which were in training.

## Limits

- Trained on **simulated** low-dose noise (`lowdose.simulate`: projection-domain Poisson + electronic
  noise, Siemens-Definition-like fan-beam geometry); real scanners differ in bowtie filtration, tube-current
  modulation and reconstruction kernel, and the simulated texture is slightly finer than a scanner's.
- Trained on CPU with a small budget on a handful of public series (listed below); figures are on one
  held-out series. Treat them as a lower bound of what the architecture can do, not as a clinical validation.
- Like every network trained with a pixel-wise loss, it smooths: fine low-contrast texture can be lost.
"""


def model_card(meta: dict, history: dict, parameters: int, gflops: float) -> str:
    """Markdown model card from the bundle metadata and the training history."""
    training, validation = meta.get("training", {}), meta.get("validation", {})
    config = history.get("config", {})
    epochs = history.get("epochs", [])
    name = meta["name"]
    network = meta["network"]
    lines = [f"# {name}", ""]
    if config.get("description"):
        lines += [config["description"], ""]
    if config.get("init_bundle"):
        lines += [f"Fine-tuned from the bundle `{config['init_bundle']}`; the figures below are of the fine-tuned model.", ""]
    lines += [
        "| | |", "|---|---|",
        f"| network | `{network['name']}` {network['kwargs']} |",
        f"| parameters | {parameters / 1e6:.3f} M |",
        f"| GFLOPs per 512x512 slice | {gflops:.1f} |",
        f"| dose estimator | {'yes (estimates the dose fraction from the image; `--dose auto`)' if meta.get('dose_estimator') else 'no'} |",
        f"| input | {meta['network_data_format']['inputs']['image']['channel_def']['0']}, HU clipped to "
        f"[{meta['normalisation']['hu_min']:g}, {meta['normalisation']['hu_max']:g}] / {meta['normalisation']['scale_hu']:g} |",
        f"| training doses | {', '.join(f'{d:.3g}' for d in training.get('doses', []))} (fractions of the normal dose) |",
        f"| epoch shipped | {training.get('best_epoch')} of {training.get('epochs')} ("
        + ("the last" if config.get("optim", {}).get("selection") == "last" else "best validation PSNR") + ") |",
        "",
        "Validation on the held-out series (abdomen window C50/W400, mean over the validation doses "
        f"{', '.join(f'{d:.3g}' for d in config.get('data', {}).get('validation_doses', []))}):",
        "",
        "| figure | value |", "|---|---|",
    ]
    lines += [f"| {key} | {value:.4f} |" for key, value in validation.items() if isinstance(value, float)]
    anatomy = meta.get("anatomy_aware_training") or {}
    lines += ["", "## Anatomy-aware training", ""]
    if anatomy.get("enabled"):
        lines += [f"On: {', '.join(anatomy['enabled'])}; anatomy encoder `{anatomy.get('encoder')}`. Weights: "
                  f"MAC {anatomy.get('mac_weight', 0):g}, adversarial {anatomy.get('adversarial_weight', 0):g}, "
                  f"semantic contrastive {anatomy.get('semantic_contrastive_weight', 0):g}, BioAtt "
                  f"{'on' if anatomy.get('bioatt') else 'off'}."]
        if meta.get("anatomy_encoder"):
            lines.append(f"The bundle ships the anatomy encoder `{meta['anatomy_encoder'].get('source')}` that gives "
                         "BioAtt its organ probabilities at inference.")
    else:
        lines.append("None: pixel losses only (MSE + SSIM). See `benchmarks/results/anatomy.md` for what the "
                     "anatomy-aware options change.")
    lines += ["", INTENDED_USE.format(hu_max=meta["normalisation"]["hu_max"]), "## Training data", ""]
    lines += [f"- {series}" for series in training.get("train_series", [])]
    lines += ["", "Held out for validation:", ""]
    lines += [f"- {series}" for series in training.get("validation_series", [])]
    lines += ["", "## How it was trained", ""]
    commands = history.get("commands") or ([history["command"]] if history.get("command") else [])
    if commands:
        lines += ["```", *commands, "```", ""]
    if epochs:
        last = epochs[-1]
        cpu = last.get("cpu_minutes")
        threads = history.get("threads", "?")
        lines += [f"On {platform.machine()} CPU ({threads} thread{'' if threads == 1 else 's'}), "
                  f"{last.get('wall_minutes', sum(e.get('epoch_seconds', 0) for e in epochs) / 60):.0f} min wall"
                  + (f", {cpu:.0f} CPU-minutes" if cpu else "") + f", {len(epochs)} epochs. "
                  "The full per-epoch history is `docs/history.json`.", ""]
        shown = epochs if len(epochs) <= 8 else epochs[:3] + epochs[-5:]
        lines += ["Log excerpt (first and last epochs):", "", "```"]
        for record in shown:
            lines.append(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                  for k, v in record.items() if v is not None))
        lines += ["```", ""]
    stage = history.get("estimator_stage")
    if stage:
        last = stage["epochs"][-1]
        lines += [f"Dose estimator, second stage on whole slices: {len(stage['epochs'])} epochs of "
                  f"{stage['slices_per_epoch']} slices, {stage['wall_minutes']:.0f} min wall; last epoch (the one "
                  "shipped, not picked on the held-out series):", "", "```",
                  " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in last.items()), "```", ""]
    return "\n".join(lines)
