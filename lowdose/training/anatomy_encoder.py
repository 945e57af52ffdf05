"""Training lowdose's anatomy encoder (``AnatomyUNet``) on TotalSegmentator label maps, on the training engine.

``lowdose train CONFIG`` runs this when the YAML says ``task: anatomy_encoder``. Each CT and its
TotalSegmentator ``total`` label map are resampled in-plane to ``in_plane_spacing_mm`` (the scale of the
slices the encoder will read), the 117 structures are gathered into the 11 anatomy groups, and the slices
are shown at every simulated dose in ``doses`` (1.0 = as acquired) and lightly smoothed, so the encoder
reads low-dose, denoised and normal-dose slices alike. Objective: Dice + cross-entropy on the groups,
binary cross-entropy on the per-slice group presence (BioAtt's prior).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter, zoom

from ..anatomy import ANATOMY_GROUPS, to_groups
from ..atomic import write_text_atomically
from ..bundle import DEFAULT_NORMALISATION, hu_to_input, save_bundle
from ..bundle import atomic_torch_save as atomic_save
from ..device import pick_device
from ..errors import LowdoseError
from ..io import load_ct
from ..labels import load_label_map
from ..networks import build_network, count_gflops, count_parameters
from ..simulate import simulate_low_dose
from ..totalseg import total_class_names
from ..volume import CTVolume
from .checkpoints import write_history
from .config import AnatomyEncoderConfig
from .engine import LogEpochs, Objective, StepLoss, Trainer, warmup_cosine
from .model_card import anatomy_encoder_card, repository_relative

__all__ = [
    "AnatomyEncoderConfig",
    "dice_per_group",
    "evaluate_anatomy_encoder",
    "export_anatomy_bundle",
    "load_labelled",
    "train_anatomy_encoder",
]

log = logging.getLogger("lowdose.train")
PRESENT_MM2 = 20.0  # a group is "in the slice" when it covers at least this area


def _resampled(volume, labels: np.ndarray, spacing_mm: float):
    """CT (HU) and group labels in the usual axial layout (rows anterior to posterior, columns patient right
    to left, as a DICOM series with an identity direction), resampled in-plane to ``spacing_mm``."""
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


def training_slices(cases: list[tuple], doses: list[float], seed: int, normalisation: dict) -> list[tuple]:
    """(normalised slice, group labels, group presence) of every labelled slice at every dose, simulated once
    per case and dose (the simulator needs the whole stack's geometry)."""
    slices = []
    for hu, groups, spacing, volume in cases:
        presence = _presence(groups, spacing)
        stack = CTVolume(hu=hu, spacing_mm=(spacing, spacing, volume.spacing_mm[2]))
        for d, dose in enumerate(doses):
            noisy = hu if dose >= 1 else simulate_low_dose(stack, dose, seed=seed + d).hu
            for k in range(hu.shape[0]):
                if (groups[k] > 0).mean() > 0.01:
                    slices.append((hu_to_input(noisy[k], normalisation), groups[k], presence[k]))
    return slices


def dice_per_group(prediction: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Dice of each anatomy group present in ``truth`` (or predicted)."""
    figures = {}
    for value, name in ANATOMY_GROUPS.items():
        p, t = prediction == value, truth == value
        if t.sum() or p.sum():
            figures[name] = float(2 * (p & t).sum() / (p.sum() + t.sum()))
    return figures


class AnatomyEncoderObjective(Objective):
    """Group segmentation (Dice + cross-entropy) and per-slice group presence (BCE) of shuffled, flipped and
    sometimes smoothed slices; validation: group Dice on whole normal-dose volumes."""

    def __init__(
        self,
        network: torch.nn.Module,
        slices: list[tuple],
        validation: list[tuple],
        config: AnatomyEncoderConfig,
        rng: np.random.Generator,
        device,
    ):
        from monai.losses import DiceCELoss  # monai.losses takes seconds to import: only when a run needs it

        self.network, self.slices, self.validation, self.rng, self.device = network, slices, validation, rng, device
        self.batch_size, self.presence_weight = config.batch_size, config.presence_weight
        self.steps_per_epoch = math.ceil(len(slices) / config.batch_size)
        self.segmentation_loss = DiceCELoss(to_onehot_y=True, softmax=True)

    def train_mode(self) -> None:
        self.network.train()

    def batches(self, epoch: int) -> Iterator[tuple]:
        order = self.rng.permutation(len(self.slices))
        size = self.batch_size
        return (
            self._augmented([self.slices[i] for i in order[step * size : (step + 1) * size]])
            for step in range(self.steps_per_epoch)
        )

    def _augmented(self, batch: list[tuple]) -> tuple:
        """(images, labels, presence) on the device; mixed shapes cropped to the smallest (slices of one case
        share a shape)."""
        h = min(b[0].shape[0] for b in batch)
        w = min(b[0].shape[1] for b in batch)
        images, labels = [], []
        for image, label, _ in batch:
            image, label = image[:h, :w], label[:h, :w]
            # Flips of either axis: the groups are not sided, and slices read from files stored in
            # another orientation must not fool the organ presence.
            if self.rng.random() < 0.5:
                image, label = image[:, ::-1], label[:, ::-1]
            if self.rng.random() < 0.25:
                image, label = image[::-1], label[::-1]
            if self.rng.random() < 0.3:  # the smoothness of a denoised slice
                image = gaussian_filter(image, self.rng.uniform(0.5, 1.5))
            images.append(np.ascontiguousarray(image))
            labels.append(np.ascontiguousarray(label))
        x = torch.from_numpy(np.stack(images))[:, None].to(self.device)
        y = torch.from_numpy(np.stack(labels))[:, None].to(self.device)
        presence = torch.from_numpy(np.stack([b[2] for b in batch])).to(self.device)
        return x, y, presence

    def loss(self, batch: tuple) -> StepLoss:
        x, y, presence = batch
        logits, presence_logits = self.network(x)
        loss = self.segmentation_loss(logits, y) + self.presence_weight * F.binary_cross_entropy_with_logits(
            presence_logits, presence
        )
        return StepLoss(loss, {"loss": loss})

    def validate(self) -> dict:
        return evaluate_anatomy_encoder(self.network, self.validation, self.device)


def train_anatomy_encoder(
    config: AnatomyEncoderConfig,
    bundle_dir: str | Path | None = None,
    progress: bool = True,
    command: str | None = None,
) -> dict:
    """Train the anatomy encoder; write its bundle (with a model card) into ``bundle_dir``."""
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    device = pick_device(config.device)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    normalisation = dict(DEFAULT_NORMALISATION)
    cases = load_labelled(config.images, config.labels, config.in_plane_spacing_mm)
    slices = training_slices(cases, config.doses, config.seed, normalisation)
    validation = [
        (hu_to_input(hu, normalisation), groups)
        for hu, groups, _, _ in load_labelled(
            config.validation_images, config.validation_labels, config.in_plane_spacing_mm
        )
    ]
    log.info(
        "anatomy encoder: %d training slices (%d doses), %d validation volumes",
        len(slices),
        len(config.doses),
        len(validation),
    )

    network = build_network("anatomy_encoder", **config.network_kwargs).to(device)
    optimiser = torch.optim.AdamW(network.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    objective = AnatomyEncoderObjective(network, slices, validation, config, rng, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, warmup_cosine(objective.steps_per_epoch * config.epochs))
    history: dict[str, Any] = {
        "epochs": [],
        "config": config.to_dict(),
        "commands": [command] if command else [],
        "threads": torch.get_num_threads(),
        "training_slices": len(slices),
    }
    Trainer(objective, optimiser, scheduler, hooks=[LogEpochs(history["epochs"], log)], progress=progress).fit(
        0, config.epochs
    )
    state = {"network": network.state_dict()}
    atomic_save({**state, "history": history}, out / "checkpoint_last.pt")
    write_history(history, out)
    if bundle_dir is not None:
        export_anatomy_bundle(bundle_dir, config, state["network"], history)
    return history


def evaluate_anatomy_encoder(network, validation, device) -> dict:
    """Group Dice of the encoder's segmentation on the validation volumes (normal dose)."""
    if not validation:
        return {}
    network.eval()
    dices: dict[str, list[float]] = {}
    with torch.inference_mode():
        for image, truth in validation:
            prediction = np.concatenate(
                [
                    network(torch.from_numpy(image[k : k + 4])[:, None].to(device))[0].argmax(1).cpu().numpy()
                    for k in range(0, image.shape[0], 4)
                ]
            )
            for name, value in dice_per_group(prediction, truth).items():
                dices.setdefault(name, []).append(value)
    per_group = {name: float(np.mean(v)) for name, v in dices.items()}
    return {"val_mean_dice": float(np.mean(list(per_group.values()))), "val_dice": per_group}


def export_anatomy_bundle(folder: str | Path, config: AnatomyEncoderConfig, network_state: dict, history: dict) -> Path:
    """The anatomy encoder as a MONAI bundle (``lowdose_kind: anatomy_encoder``) with its model card."""
    last = history["epochs"][-1] if history["epochs"] else {}
    metadata: dict[str, Any] = {
        "task": "CT anatomy encoder: 11 anatomy groups (segmentation and per-slice presence) from TotalSegmentator "
        "labels",
        "lowdose_kind": "anatomy_encoder",
        "groups": {str(k): v for k, v in ANATOMY_GROUPS.items()},
        "training": {
            "images": [repository_relative(p) for p in config.images],
            "labels": [repository_relative(p) for p in config.labels],
            "in_plane_spacing_mm": config.in_plane_spacing_mm,
            "doses": config.doses,
            "epochs": config.epochs,
            "seed": config.seed,
        },
        "validation": {k: v for k, v in last.items() if k.startswith("val_")},
    }
    kwargs = {"in_channels": 1, **config.network_kwargs}
    bundle = save_bundle(
        folder,
        name=Path(folder).name,
        network_name="anatomy_encoder",
        network_kwargs=kwargs,
        network_state=network_state,
        normalisation=DEFAULT_NORMALISATION,
        metadata=metadata,
    )
    network = build_network("anatomy_encoder", **kwargs)
    write_text_atomically(bundle / "docs" / "history.json", repository_relative(json.dumps(history, indent=2)))
    card = anatomy_encoder_card(
        Path(folder).name,
        config,
        metadata["task"],
        kwargs,
        count_parameters(network),
        count_gflops(network, (1, 1, 512, 512)),
        history,
    )
    write_text_atomically(bundle / "docs" / "README.md", card)
    return bundle
