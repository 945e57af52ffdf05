"""Training lowdose's anatomy encoder (``AnatomyUNet``) on TotalSegmentator label maps.

``lowdose train CONFIG`` runs this when the YAML says ``task: anatomy_encoder``. Each CT and its
TotalSegmentator ``total`` label map are resampled in-plane to ``in_plane_spacing_mm`` (the scale of the
slices the encoder will read), the 117 structures are gathered into the 11 anatomy groups, and the slices
are shown at every simulated dose in ``doses`` (1.0 = as acquired) and lightly smoothed, so the encoder
reads low-dose, denoised and normal-dose slices alike. Loss: Dice + cross-entropy on the groups, binary
cross-entropy on the per-slice group presence (BioAtt's prior).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import yaml

from ..errors import LowdoseError
from .groups import ANATOMY_GROUPS, to_groups

log = logging.getLogger("lowdose.train")
PRESENT_MM2 = 20.0  # a group is "in the slice" when it covers at least this area


@dataclasses.dataclass
class AnatomyEncoderConfig:
    """One YAML file: label maps in, an anatomy encoder bundle out."""

    task: str = "anatomy_encoder"
    name: str = "anatomy_encoder"
    description: str = ""
    output_dir: str = "runs/anatomy_encoder"
    seed: int = 0
    device: str = "auto"
    images: list[str] = dataclasses.field(default_factory=list)  # CT files/series, each with its label map
    labels: list[str] = dataclasses.field(default_factory=list)  # TotalSegmentator `total` label maps
    validation_images: list[str] = dataclasses.field(default_factory=list)
    validation_labels: list[str] = dataclasses.field(default_factory=list)
    in_plane_spacing_mm: float = 1.0
    doses: list[float] = dataclasses.field(default_factory=lambda: [1.0, 0.5, 0.25, 0.1, 0.05])
    network_kwargs: dict = dataclasses.field(default_factory=dict)
    epochs: int = 40
    batch_size: int = 4
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    presence_weight: float = 0.5

    @classmethod
    def from_yaml(cls, path: str | Path) -> "AnatomyEncoderConfig":
        path = Path(path)
        raw = yaml.safe_load(path.read_text()) or {}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - names
        if unknown:
            raise LowdoseError(f"{path}: unknown key(s) {', '.join(sorted(unknown))} (known: {', '.join(sorted(names))})")
        config = cls(**raw)
        base = path.resolve().parent
        for key in ("images", "labels", "validation_images", "validation_labels"):
            setattr(config, key, [str((base / p).resolve()) for p in getattr(config, key)])
        config.output_dir = str((base / config.output_dir).resolve())
        if not config.images or len(config.images) != len(config.labels):
            raise LowdoseError(f"{path}: give one label map per image (images: {len(config.images)}, "
                               f"labels: {len(config.labels)})")
        if len(config.validation_images) != len(config.validation_labels):
            raise LowdoseError(f"{path}: give one label map per validation image")
        return config


def _resampled(volume, labels: np.ndarray, spacing_mm: float):
    """CT (HU) and group labels in the usual axial layout (rows anterior to posterior, columns patient right
    to left, as a DICOM series with an identity direction), resampled in-plane to ``spacing_mm``."""
    from scipy.ndimage import zoom

    hu = volume.hu.astype(np.float32)
    direction = np.asarray(volume.direction).reshape(3, 3)
    for axis, array_axis in ((0, 2), (1, 1)):  # x (columns), y (rows); NIfTI files are often stored flipped
        if direction[axis, axis] < 0:
            hu, labels = np.flip(hu, array_axis), np.flip(labels, array_axis)
    factors = (1.0, volume.spacing_mm[1] / spacing_mm, volume.spacing_mm[0] / spacing_mm)  # spacing is x, y, z
    if np.allclose(factors, 1.0, atol=0.02):
        return np.ascontiguousarray(hu), np.ascontiguousarray(labels)
    return zoom(hu, factors, order=1).astype(np.float32), zoom(labels, factors, order=0)


def load_labelled(images: list[str], labels: list[str], spacing_mm: float) -> list[tuple]:
    """(HU [z, y, x], group labels, in-plane spacing, the CTVolume read) for each image and its label map."""
    from ..fidelity.labels import load_label_map
    from ..fidelity.segmenter import total_class_names
    from ..io import load_ct

    names = total_class_names()
    cases = []
    for image, label in zip(images, labels):
        volume = load_ct(image)
        label_map, _ = load_label_map(label, volume)
        try:
            groups = to_groups(label_map, names)
        except ValueError as exc:
            raise LowdoseError(f"{label}: not a TotalSegmentator 'total' label map ({exc})") from None
        hu, groups = _resampled(volume, groups, spacing_mm)
        cases.append((hu, groups.astype(np.int64), spacing_mm, volume))
    return cases


def _presence(groups: np.ndarray, spacing_mm: float) -> np.ndarray:
    """[z, 11] 0/1: which groups each slice holds."""
    minimum = PRESENT_MM2 / spacing_mm**2
    counts = np.stack([(groups == g).sum(axis=(1, 2)) for g in ANATOMY_GROUPS], axis=1)
    return (counts >= minimum).astype(np.float32)


def dice_per_group(prediction: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Dice of each anatomy group present in ``truth`` (or predicted)."""
    figures = {}
    for value, name in ANATOMY_GROUPS.items():
        p, t = prediction == value, truth == value
        if t.sum() or p.sum():
            figures[name] = float(2 * (p & t).sum() / (p.sum() + t.sum()))
    return figures


def train_anatomy_encoder(config: AnatomyEncoderConfig, bundle_dir: str | Path | None = None, progress: bool = True,
                          command: str | None = None) -> dict:
    """Train the anatomy encoder; write its bundle (with a model card) into ``bundle_dir``."""
    import torch
    import torch.nn.functional as F
    from monai.losses import DiceCELoss
    from scipy.ndimage import gaussian_filter
    from tqdm.auto import tqdm

    from ..bundle import DEFAULT_NORMALISATION, _atomic_torch_save, hu_to_input
    from ..networks import build_network
    from ..simulate import simulate_low_dose
    from ..training.loop import pick_device
    from ..volume import CTVolume

    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    device = pick_device(config.device)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    normalisation = dict(DEFAULT_NORMALISATION)
    cases = load_labelled(config.images, config.labels, config.in_plane_spacing_mm)
    # Every slice at every dose, simulated once (the simulator needs the whole stack's geometry).
    slices = []
    for hu, groups, spacing, volume in cases:
        presence = _presence(groups, spacing)
        stack = CTVolume(hu=hu, spacing_mm=(spacing, spacing, volume.spacing_mm[2]))
        for d, dose in enumerate(config.doses):
            noisy = hu if dose >= 1 else simulate_low_dose(stack, dose, seed=config.seed + d).hu
            for k in range(hu.shape[0]):
                if (groups[k] > 0).mean() > 0.01:
                    slices.append((hu_to_input(noisy[k], normalisation), groups[k], presence[k]))
    validation = []
    for hu, groups, spacing, volume in load_labelled(config.validation_images, config.validation_labels,
                                                     config.in_plane_spacing_mm):
        validation.append((hu_to_input(hu, normalisation), groups))
    log.info("anatomy encoder: %d training slices (%d doses), %d validation volumes", len(slices),
             len(config.doses), len(validation))

    network = build_network("anatomy_encoder", **config.network_kwargs).to(device)
    optimiser = torch.optim.AdamW(network.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(slices) / config.batch_size)
    total = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))
    segmentation_loss = DiceCELoss(to_onehot_y=True, softmax=True)
    history = {"epochs": [], "config": dataclasses.asdict(config), "commands": [command] if command else [],
               "threads": torch.get_num_threads(), "training_slices": len(slices)}
    started, cpu_started = time.time(), time.process_time()
    for epoch in range(config.epochs):
        network.train()
        losses = []
        order = rng.permutation(len(slices))
        for step in tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{config.epochs}", disable=not progress, leave=False):
            batch = [slices[i] for i in order[step * config.batch_size:(step + 1) * config.batch_size]]
            # Alike shapes per batch: slices of one case share a shape; mixed batches are cropped to the smallest.
            h = min(b[0].shape[0] for b in batch)
            w = min(b[0].shape[1] for b in batch)
            images, labels = [], []
            for image, label, _ in batch:
                image, label = image[:h, :w], label[:h, :w]
                # Flips of either axis: the groups are not sided, and slices read from files stored in
                # another orientation must not fool the organ presence.
                if rng.random() < 0.5:
                    image, label = image[:, ::-1], label[:, ::-1]
                if rng.random() < 0.25:
                    image, label = image[::-1], label[::-1]
                if rng.random() < 0.3:  # the smoothness of a denoised slice
                    image = gaussian_filter(image, rng.uniform(0.5, 1.5))
                images.append(np.ascontiguousarray(image))
                labels.append(np.ascontiguousarray(label))
            x = torch.from_numpy(np.stack(images))[:, None].to(device)
            y = torch.from_numpy(np.stack(labels))[:, None].to(device)
            presence = torch.from_numpy(np.stack([b[2] for b in batch])).to(device)
            logits, presence_logits = network(x)
            loss = segmentation_loss(logits, y) + config.presence_weight * F.binary_cross_entropy_with_logits(
                presence_logits, presence)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            scheduler.step()
            losses.append(float(loss.detach()))
        record = {"epoch": epoch + 1, "loss": float(np.mean(losses)),
                  **evaluate_anatomy_encoder(network, validation, device),
                  "cpu_minutes": round((time.process_time() - cpu_started) / 60, 2),
                  "wall_minutes": round((time.time() - started) / 60, 2)}
        history["epochs"].append(record)
        log.info(" ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items()
                          if not isinstance(v, dict)))
    state = {"network": network.state_dict()}
    _atomic_torch_save({**state, "history": history}, out / "checkpoint_last.pt")
    (out / "history.json").write_text(json.dumps(history, indent=2))
    if bundle_dir is not None:
        export_anatomy_bundle(bundle_dir, config, state["network"], history)
    return history


def evaluate_anatomy_encoder(network, validation, device) -> dict:
    """Group Dice of the encoder's segmentation on the validation volumes (normal dose)."""
    import torch

    if not validation:
        return {}
    network.eval()
    dices = {}
    with torch.inference_mode():
        for image, truth in validation:
            prediction = np.concatenate([network(torch.from_numpy(image[k:k + 4])[:, None].to(device))[0]
                                         .argmax(1).cpu().numpy() for k in range(0, image.shape[0], 4)])
            for name, value in dice_per_group(prediction, truth).items():
                dices.setdefault(name, []).append(value)
    per_group = {name: float(np.mean(v)) for name, v in dices.items()}
    return {"val_mean_dice": float(np.mean(list(per_group.values()))), "val_dice": per_group}


def export_anatomy_bundle(folder: str | Path, config: AnatomyEncoderConfig, network_state: dict, history: dict) -> Path:
    """The anatomy encoder as a MONAI bundle (``lowdose_kind: anatomy_encoder``) with its model card."""
    from ..atomic import write_text_atomically
    from ..bundle import DEFAULT_NORMALISATION, save_bundle
    from ..networks import build_network, count_gflops, count_parameters

    last = history["epochs"][-1] if history["epochs"] else {}
    root = Path(__file__).resolve().parents[2]

    def shown(path: str) -> str:
        return path.replace(f"{root}/", "").replace(f"{root.parent}/", "../")

    metadata = {
        "task": "CT anatomy encoder: 11 anatomy groups (segmentation and per-slice presence) from TotalSegmentator labels",
        "lowdose_kind": "anatomy_encoder",
        "groups": {str(k): v for k, v in ANATOMY_GROUPS.items()},
        "training": {"images": [shown(p) for p in config.images], "labels": [shown(p) for p in config.labels],
                     "in_plane_spacing_mm": config.in_plane_spacing_mm, "doses": config.doses,
                     "epochs": config.epochs, "seed": config.seed},
        "validation": {k: v for k, v in last.items() if k.startswith("val_")},
    }
    kwargs = {"in_channels": 1, **config.network_kwargs}
    bundle = save_bundle(folder, name=Path(folder).name, network_name="anatomy_encoder", network_kwargs=kwargs,
                         network_state=network_state, normalisation=DEFAULT_NORMALISATION, metadata=metadata)
    network = build_network("anatomy_encoder", **kwargs)
    text = json.dumps(history, indent=2)
    write_text_atomically(bundle / "docs" / "history.json", shown(text))
    dice = last.get("val_dice", {})
    lines = [f"# {Path(folder).name}", "", config.description or metadata["task"], "",
             "| | |", "|---|---|",
             f"| network | `anatomy_encoder` {kwargs} |",
             f"| parameters | {count_parameters(network) / 1e6:.3f} M |",
             f"| GFLOPs per 512x512 slice | {count_gflops(network, (1, 1, 512, 512)):.1f} |",
             f"| groups | {', '.join(ANATOMY_GROUPS.values())} |",
             f"| training slices | {history.get('training_slices')} (every slice at doses {', '.join(f'{d:g}' for d in config.doses)}) |",
             "", "## What it is for", "",
             "The anatomy prior of lowdose's anatomy-aware training: its encoder features feed ALDEN's "
             "discriminator and semantic contrastive loss, its organ-presence head gives BioAtt's per-slice organ "
             "probabilities, and in the ablation benchmark it segments denoised and normal-dose slices to "
             "measure what denoising changed. It is not a clinical segmentation model: use TotalSegmentator "
             "(`lowdose fidelity`) for that.", "",
             "## Training data", "", *[f"- {shown(i)} with {shown(l)}" for i, l in zip(config.images, config.labels)],
             "", "Validation (group Dice at normal dose):", "",
             *[f"- {shown(i)} with {shown(l)}" for i, l in zip(config.validation_images, config.validation_labels)], "",
             "| group | Dice |", "|---|---|", *[f"| {k} | {v:.3f} |" for k, v in dice.items()],
             f"| **mean** | {last.get('val_mean_dice', float('nan')):.3f} |", "",
             "## Limits", "",
             "Learnt from very few label maps (listed above): it knows the coarse groups of an adult abdomen and "
             "lower chest, not head, neck or pelvis. "
             + ("The validation series is also a training series: its Dice is in-sample, an upper bound."
                if set(config.validation_images) & set(config.images) else
                "Where the validation series is the same patient as a training series, its Dice is optimistic."), "",
             "## How it was trained", "", "```", *history.get("commands", []), "```", "",
             f"{len(history['epochs'])} epochs, {last.get('wall_minutes', 0):.0f} min wall, "
             f"{last.get('cpu_minutes', 0):.0f} CPU-minutes ({history.get('threads')} threads)."]
    write_text_atomically(bundle / "docs" / "README.md", "\n".join(lines) + "\n")
    return bundle
