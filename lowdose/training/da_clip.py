"""Training lowdose's DA-CLIP (``DoseAnatomyEncoder``) on the training engine: ``lowdose train CONFIG`` with
``network.name: da_clip``.

Normal-dose series are made into whole low-dose slices at random doses by the project's simulator (through
``PairSampler``; each run of slices at ``da_clip.doses_per_run`` doses, so a batch holds the same anatomy at
several doses and the dose embedding must read noise, not anatomy). Region labels come from TotalSegmentator
label maps where given, else from the table of known series (lowdose.anatomy.regions). The loss: an ordinal
dose contrast (Rank-N-Contrast) on the dose embedding, a supervised contrast (SupCon) on the region
embedding, log-dose regression and region classification on the two heads.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..anatomy.regions import REGIONS, known_series_regions, slice_regions
from ..atomic import write_text_atomically
from ..bundle import DEFAULT_NORMALISATION, hu_to_input, load_checkpoint, save_bundle
from ..bundle import atomic_torch_save as atomic_save
from ..device import pick_device
from ..errors import LowdoseError
from ..labels import load_label_map
from ..networks import build_network, count_gflops, count_parameters
from ..networks.da_clip import DoseAnatomyEmbedding, DoseAnatomyEncoder
from ..slabs import BODY_HU
from ..totalseg import total_class_names
from ..volume import CTVolume
from .checkpoints import write_history
from .config import TrainConfig
from .data import RUN_LENGTH, PairSampler, load_sources, validation_set
from .engine import LogEpochs, Objective, Progress, StepLoss, Trainer, seed_everything, warmup_cosine
from .model_card import repository_relative

log = logging.getLogger("lowdose.train")
UNKNOWN = -1  # a slice whose region no label map or table tells: it takes part in the dose terms only


def dose_rank_contrastive_loss(
    embeddings: torch.Tensor, log_dose: torch.Tensor, temperature: float = 0.1
) -> torch.Tensor:
    """Rank-N-Contrast (Zha et al., NeurIPS 2023) on log dose: embeddings of nearer doses are more similar.

    For an anchor i and each other sample j, j is the positive and every k whose dose is at least as far from
    i's as j's (|log d_i - log d_k| >= |log d_i - log d_j|) is a negative:
    ``-log exp(s_ij / t) / sum_k exp(s_ik / t)``, averaged over all pairs (i, j). The loss is at its minimum
    only when each anchor's similarities fall in the order of the dose distances, so the embedding is ordinal.

    Why this and not a soft-label contrast (target similarity exp(-|log d_i - log d_j| / sigma)): Rank-N-Contrast
    uses only the order of the dose distances, so it needs no width sigma, which would have to fit the uneven
    log-dose gaps between the training doses (ln 2 from 1/2 to 1/4, ln 1.5 from 1/4 to 1/6); and it is shown
    to give embeddings that are continuous in the label, which is what places the unseen doses (1/3, 1/8,
    1/16) between their neighbours. Samples of equal dose are each other's positives against all others.
    """
    n = embeddings.shape[0]
    if n < 2:
        return embeddings.sum() * 0
    similarity = embeddings @ embeddings.T / temperature
    distance = (log_dose[:, None] - log_dose[None, :]).abs()
    not_self = ~torch.eye(n, dtype=torch.bool, device=embeddings.device)
    # negatives[i, j, k]: k is at least as far in dose from i as j is (k == j included), k != i
    negatives = (distance[:, None, :] >= distance[:, :, None]) & not_self[:, None, :]
    logits = similarity[:, None, :].expand(n, n, n).masked_fill(~negatives, float("-inf"))
    log_probability = similarity - torch.logsumexp(logits, dim=2)
    return -log_probability[not_self].mean()


def supervised_contrastive_loss(
    embeddings: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1
) -> torch.Tensor:
    """SupCon (Khosla et al., NeurIPS 2020, L_out): each sample is pulled toward the others of its class and
    pushed from the rest. Samples labelled ``UNKNOWN`` (-1) take no part; anchors without a positive are skipped."""
    known = labels >= 0
    embeddings, labels = embeddings[known], labels[known]
    n = embeddings.shape[0]
    if n < 2:
        return embeddings.sum() * 0
    similarity = embeddings @ embeddings.T / temperature
    not_self = ~torch.eye(n, dtype=torch.bool, device=embeddings.device)
    positives = (labels[:, None] == labels[None, :]) & not_self
    log_probability = similarity - torch.logsumexp(
        similarity.masked_fill(~not_self, float("-inf")), dim=1, keepdim=True
    )
    counts = positives.sum(1)
    anchors = counts > 0
    if not anchors.any():
        return embeddings.sum() * 0
    per_anchor = (log_probability * positives).sum(1)[anchors] / counts[anchors]
    return -per_anchor.mean()


def source_regions(volume: CTVolume, label_map: str | None = None) -> list[str | None]:
    """The region of each slice of a series: from its TotalSegmentator label map when given, else from the
    table of known series, else unknown (None) for every slice."""
    if label_map is not None:
        labels, _ = load_label_map(label_map, volume)
        return slice_regions(labels, total_class_names(), volume.spacing_mm[0] * volume.spacing_mm[1])
    known = known_series_regions(str(volume.metadata.get("path", "")), volume.shape[0])
    return known if known is not None else [None] * volume.shape[0]


def region_indices(regions: Sequence[str | None]) -> np.ndarray:
    """Region names as indices into ``REGIONS`` (``UNKNOWN`` for None)."""
    return np.array([REGIONS.index(r) if r is not None else UNKNOWN for r in regions], dtype=np.int64)


@dataclasses.dataclass
class LabelledSlice:
    """One whole simulated low-dose slice (normalised, ``[1, H, W]``), its dose, region index and series."""

    low: np.ndarray
    dose: float
    region: int
    series: int


class RegionLabelledSampler(PairSampler):
    """``PairSampler`` whose whole slices carry their region; each run of slices is simulated at
    ``doses_per_run`` different doses (the pool holds those groups, regions in equal shares); slices of
    ``held_out`` regions never come."""

    def __init__(
        self,
        source,
        regions: list[np.ndarray],
        held_out: set[int],
        doses_per_run: int,
        groups: int,
        **pair_sampler: Any,
    ):
        super().__init__(source, pool_size=0, regions=regions, **pair_sampler)
        self.held_out = held_out
        self.candidates = [(v, k) for v, k in self.candidates if int(regions[v][k]) not in held_out]
        if not self.candidates:
            raise LowdoseError("every training slice is of a held-out region (da_clip.held_out_regions)")
        per_run = max(1, min(doses_per_run, len(self.doses)))
        rng = np.random.default_rng([self.seed, 7])
        # Regions in equal shares (then slices within a region at random): a long series of one region (or the
        # chest, most of the data) would otherwise fill the batches, and the region contrast needs them mixed.
        by_region: dict[int, list[int]] = {}
        for i, (v, k) in enumerate(self.candidates):
            by_region.setdefault(int(regions[v][k]), []).append(i)
        shares = sorted(by_region)
        self.run_groups: list[list[tuple[int, float, int]]] = []
        for _ in range(groups):
            within = by_region[shares[int(rng.integers(len(shares)))]]
            pick = within[int(rng.integers(len(within)))]
            doses = rng.choice(self.doses, size=per_run, replace=False)
            self.run_groups.append([(pick, float(d), int(rng.integers(2**31))) for d in doses])
        self.pool = [entry for group in self.run_groups for entry in group]

    def epoch_units(self, epoch: int, runs: int) -> list[list[LabelledSlice]]:
        """``runs`` run groups of the pool as units: one body slice at each of the group's doses, flipped alike."""
        rng = np.random.default_rng([self.seed, epoch, 3])
        chosen = rng.choice(len(self.run_groups), size=min(runs, len(self.run_groups)), replace=False)
        units = []
        for g in chosen:
            group = self.run_groups[int(g)]
            v, k = self.candidates[group[0][0]]
            volume = self.source.normal[v]
            first = max(0, min(k, volume.shape[0] - RUN_LENGTH))
            lo, hi = first, min(first + RUN_LENGTH, volume.shape[0])
            lows = [self._pooled(pick, volume, v, lo, hi, dose, seed) for pick, dose, seed in group]
            for c in range(lo, hi):
                assert self.regions is not None  # given to this sampler
                region = int(self.regions[v][c])
                if region in self.held_out or (volume.hu[c] > BODY_HU).mean() < 0.2:
                    continue
                flips = rng.random(2) < 0.5
                unit = []
                for (_, dose, _), low_run in zip(group, lows):
                    low = hu_to_input(low_run[c - lo], self.normalisation)
                    low = low[:, ::-1] if flips[0] else low
                    low = low[::-1] if flips[1] else low
                    unit.append(LabelledSlice(np.ascontiguousarray(low)[None], dose, region, v))
                units.append(unit)
        return units


def embed_batch(network: DoseAnatomyEncoder, images: Sequence[np.ndarray], device) -> DoseAnatomyEmbedding:
    """The encoder's result for slices of mixed sizes ``[1, H, W]``: alike shapes go through together."""
    by_shape: dict[tuple, list[int]] = {}
    for i, image in enumerate(images):
        by_shape.setdefault(image.shape, []).append(i)
    dose_parts, region_parts, order = [], [], []
    for indices in by_shape.values():
        dose, region = network.pooled(torch.from_numpy(np.stack([images[i] for i in indices])).to(device))
        dose_parts.append(dose)
        region_parts.append(region)
        order += indices
    inverse = torch.argsort(torch.tensor(order, device=device))
    return network.heads(torch.cat(dose_parts)[inverse], torch.cat(region_parts)[inverse])


class DaClipObjective(Objective):
    """Rank-N-Contrast on log dose + SupCon on regions + log-dose regression + region classification, on batches
    of whole slices (each anatomy at several doses); validation: dose error and region accuracy."""

    def __init__(
        self,
        network: DoseAnatomyEncoder,
        sampler: RegionLabelledSampler,
        validation: list[dict],
        validation_regions: list[np.ndarray],
        config: TrainConfig,
        device,
    ):
        self.network, self.sampler, self.device = network, sampler, device
        self.validation, self.validation_regions = validation, validation_regions
        self.weights, self.batch_size = config.da_clip, config.optim.batch_size
        self.runs = max(1, config.data.slices_per_epoch // RUN_LENGTH)
        per_run = min(config.da_clip.doses_per_run, len(sampler.doses))
        # an estimate for the progress bar (body slices of held-out regions are skipped)
        self.slices_per_epoch = self.runs * RUN_LENGTH * per_run
        self.steps_per_epoch = math.ceil(self.slices_per_epoch / self.batch_size)
        self.trained_by_region = dict.fromkeys([*REGIONS, "unknown"], 0)  # what the run showed the network

    def train_mode(self) -> None:
        self.network.train()

    def batches(self, epoch: int) -> Iterator[list[LabelledSlice]]:
        units = self.sampler.epoch_units(epoch, self.runs)
        order = np.random.default_rng([self.sampler.seed, epoch, 4]).permutation(len(units))
        batch: list[LabelledSlice] = []
        for u in order:
            batch += units[int(u)]
            if len(batch) >= self.batch_size:
                yield batch
                batch = []
        if len(batch) > 1:
            yield batch

    def loss(self, batch: list[LabelledSlice]) -> StepLoss:
        out = embed_batch(self.network, [b.low for b in batch], self.device)
        for b in batch:
            self.trained_by_region[REGIONS[b.region] if b.region >= 0 else "unknown"] += 1
        log_dose = torch.tensor([math.log(b.dose) for b in batch], dtype=torch.float32, device=self.device)
        regions = torch.tensor([b.region for b in batch], dtype=torch.int64, device=self.device)
        w = self.weights
        dose_contrast = dose_rank_contrastive_loss(out.dose_embedding, log_dose, w.temperature)
        region_contrast = supervised_contrastive_loss(out.region_embedding, regions, w.temperature)
        dose_regression = F.smooth_l1_loss(out.log_dose, log_dose, beta=0.1)
        known = regions >= 0
        region_ce = F.cross_entropy(out.region_logits[known], regions[known]) if known.any() else out.log_dose.sum() * 0
        total = (
            w.dose_contrastive_weight * dose_contrast
            + w.region_contrastive_weight * region_contrast
            + w.dose_regression_weight * dose_regression
            + w.region_classification_weight * region_ce
        )
        figures = {
            "loss": total,
            "dose_contrast": dose_contrast,
            "region_contrast": region_contrast,
            "dose_loss": dose_regression,
            "region_loss": region_ce,
        }
        return StepLoss(total, figures)

    def validate(self) -> dict:
        if not self.validation:
            return {}
        figures = evaluate_da_clip(
            self.network,
            self.validation,
            self.validation_regions,
            self.sampler.normalisation,
            self.device,
            sorted(self.sampler.held_out),
        )
        return {f"val_{k}": v for k, v in figures.items()}

    def progress(self, epoch: int, epochs: int) -> Progress:
        return Progress(f"da_clip {epoch + 1}/{epochs}", self.slices_per_epoch, "slice")

    def progress_units(self, batch: list[LabelledSlice]) -> int:
        return len(batch)


def evaluate_da_clip(
    network: DoseAnatomyEncoder,
    items: list[dict],
    regions: list[np.ndarray],
    normalisation: dict,
    device,
    held_out: Sequence[int] = (),
) -> dict:
    """Dose and region figures on simulated whole slices (``validation_set`` items, ``regions`` per volume).

    ``dose_median_rel_error`` (all items) and ``dose_rel_error`` per dose (median |d_est / d - 1|), ``region_accuracy``
    over items of a known region and ``region_accuracy_by_region``, ``region_predicted`` (how often each region is
    predicted, by true region: what a held-out region is taken for). The classifier chooses among the trained
    regions only: the logits of ``held_out`` regions were never trained and are left out."""
    network.eval()
    errors: dict[float, list[float]] = {}
    hits: dict[str, list[bool]] = {}
    predicted: dict[str, dict[str, int]] = {}
    with torch.inference_mode():
        for first in range(0, len(items), 4):
            chunk = items[first : first + 4]
            images = [hu_to_input(item["low_hu"][item["low_hu"].shape[0] // 2][None], normalisation) for item in chunk]
            out = embed_batch(network, images, device)
            for item, dose, logits in zip(chunk, out.dose_fraction().tolist(), out.region_logits):
                errors.setdefault(round(item["dose"], 4), []).append(abs(dose / item["dose"] - 1))
                truth = int(regions[item["volume"]][item["slice"]])
                if truth == UNKNOWN:
                    continue
                logits = logits.clone()
                logits[list(held_out)] = float("-inf")
                guess = REGIONS[int(logits.argmax())]
                hits.setdefault(REGIONS[truth], []).append(guess == REGIONS[truth])
                counts = predicted.setdefault(REGIONS[truth], {})
                counts[guess] = counts.get(guess, 0) + 1
    figures: dict[str, Any] = {
        "dose_median_rel_error": float(np.median([e for v in errors.values() for e in v])),
        "dose_rel_error": {f"{d:g}": float(np.median(v)) for d, v in sorted(errors.items())},
    }
    if hits:
        figures["region_accuracy"] = float(np.mean([h for v in hits.values() for h in v]))
        figures["region_accuracy_by_region"] = {r: float(np.mean(v)) for r, v in hits.items()}
        figures["region_predicted"] = predicted
    return figures


def labelled_regions(volumes: list[CTVolume], label_maps: dict[str, str]) -> list[np.ndarray]:
    """Region indices per slice of each volume (``UNKNOWN`` where nothing tells; label maps keyed by the series
    path as the config gives it)."""
    resolved = {str(Path(k).resolve()): v for k, v in label_maps.items()}
    out = []
    for volume in volumes:
        path = str(Path(str(volume.metadata.get("path", ""))).resolve())
        out.append(region_indices(source_regions(volume, resolved.get(path))))
    return out


def _held_out(config: TrainConfig) -> set[int]:
    unknown = [r for r in config.da_clip.held_out_regions if r not in REGIONS]
    if unknown:
        raise LowdoseError(f"da_clip.held_out_regions: unknown region(s) {unknown} (regions: {', '.join(REGIONS)})")
    return {REGIONS.index(r) for r in config.da_clip.held_out_regions}


def _da_clip_data(config: TrainConfig, held_out: set[int]):
    """The training series with their slices' regions, the region-balanced sampler over them, and the validation
    slices with theirs."""
    normalisation = dict(DEFAULT_NORMALISATION)
    data = config.data
    source = load_sources(data.train, "simulated")
    regions = labelled_regions(source.normal, config.da_clip.label_maps)
    runs = max(1, data.slices_per_epoch // RUN_LENGTH)
    sampler = RegionLabelledSampler(
        source,
        regions,
        held_out,
        config.da_clip.doses_per_run,
        groups=max(runs, data.simulation_pool // max(1, config.da_clip.doses_per_run)),
        doses=data.doses,
        channels=1,
        normalisation=normalisation,
        patch_size=data.patch_size,
        patches_per_slice=1,
        slices_per_epoch=data.slices_per_epoch,
        min_tissue_fraction=data.min_tissue_fraction,
        seed=config.seed,
        cache_dir=data.simulation_cache,
        match_source=data.match_source,
    )
    validation_volumes = load_sources(data.validation, "simulated").normal if data.validation else []
    validation = (
        validation_set(
            validation_volumes, data.validation_doses, 1, data.validation_slices, match_source=data.match_source
        )
        if validation_volumes
        else []
    )
    validation_regions = labelled_regions(validation_volumes, config.da_clip.label_maps)
    return source, regions, sampler, validation, validation_regions


def train_da_clip(
    config: TrainConfig,
    resume: bool = False,
    progress: bool = True,
    bundle_dir: str | Path | None = None,
    command: str | None = None,
) -> dict:
    """Train the DA-CLIP encoder of ``config`` (``network.name: da_clip``); write its bundle into ``bundle_dir``.
    Returns the history. Runs are short (no resume)."""
    if resume:
        raise LowdoseError("a da_clip run cannot be resumed: start it again")
    if config.data.mode != "simulated":
        raise LowdoseError("da_clip trains on simulated doses (data.mode: simulated)")
    held_out = _held_out(config)
    seed_everything(config.seed)
    device = pick_device(config.device)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    source, regions, sampler, validation, validation_regions = _da_clip_data(config, held_out)
    network = cast(DoseAnatomyEncoder, build_network("da_clip", **config.network.kwargs).to(device))
    optimiser = torch.optim.AdamW(
        network.parameters(), lr=config.optim.learning_rate, weight_decay=config.optim.weight_decay
    )
    objective = DaClipObjective(network, sampler, validation, validation_regions, config, device)
    total = objective.steps_per_epoch * config.optim.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, warmup_cosine(total, min(50, total // 10)))
    counts = {REGIONS[r]: int(sum((v == r).sum() for v in regions)) for r in range(len(REGIONS)) if r not in held_out}
    log.info(
        "da_clip: %d parameters, %d training series (labelled slices by region %s; held out: %s), %d validation slices",
        count_parameters(network),
        len(source.normal),
        counts,
        ", ".join(config.da_clip.held_out_regions) or "none",
        len(validation),
    )
    history: dict[str, Any] = {
        "epochs": [],
        "config": config.to_dict(),
        "commands": [command] if command else [],
        "threads": torch.get_num_threads(),
        "training_slices_by_region": counts,
    }
    trainer = Trainer(
        objective,
        optimiser,
        scheduler,
        parameters=network.parameters(),
        clip_grad_norm=1.0,
        hooks=[LogEpochs(history["epochs"], log, "da_clip ")],
        progress=progress,
        show_loss=True,
    )
    trainer.fit(0, config.optim.epochs)
    history["trained_slices_by_region"] = objective.trained_by_region
    calibrate_batch_norm(network, objective)
    history["after_batch_norm_calibration"] = objective.validate()
    log.info("da_clip after batch-norm calibration: %s", history["after_batch_norm_calibration"])
    state = {"network": network.state_dict()}
    atomic_save({**state, "config": config.to_dict(), "history": history}, out / "checkpoint_last.pt")
    write_history(history, out)
    if bundle_dir is not None:
        export_da_clip_bundle(bundle_dir, config, state["network"], history)
    return history


CALIBRATION_EPOCHS = 4  # epochs of training batches whose average makes the batch norms' statistics


def calibrate_batch_norm(network: DoseAnatomyEncoder, objective: DaClipObjective, epochs: int = CALIBRATION_EPOCHS):
    """Set the batch norms' running statistics to their average over ``epochs`` epochs of training batches
    (precise batch norm; no weight changes). The running averages of training (momentum 0.1 over 8 batches an
    epoch, each batch a few anatomies at two doses) moved so much that the validation region accuracy jumped
    between 0.3 and 1.0 from one epoch to the next (measured)."""
    norms = [m for m in network.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average
    network.train()
    with torch.no_grad():
        for epoch in range(epochs):
            for batch in objective.batches(1_000_000 + epoch):  # fresh draws of the training pool
                embed_batch(network, [b.low for b in batch], objective.device)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    network.eval()


def calibrate_da_clip_run(config: TrainConfig, bundle_dir: str | Path) -> dict:
    """``calibrate_batch_norm`` on a finished run's last checkpoint (runs trained before it existed), then its
    bundle written again; returns the validation figures after calibration."""
    out = Path(config.output_dir)
    state = load_checkpoint(out / "checkpoint_last.pt")
    held_out = _held_out(config)
    _, _, sampler, validation, validation_regions = _da_clip_data(config, held_out)
    network = cast(DoseAnatomyEncoder, build_network("da_clip", **config.network.kwargs))
    network.load_state_dict(state["network"])
    objective = DaClipObjective(network, sampler, validation, validation_regions, config, torch.device("cpu"))
    calibrate_batch_norm(network, objective)
    history = state["history"]
    history["after_batch_norm_calibration"] = objective.validate()
    atomic_save({**state, "network": network.state_dict(), "history": history}, out / "checkpoint_last.pt")
    write_history(history, out)
    export_da_clip_bundle(bundle_dir, config, network.state_dict(), history)
    return history["after_batch_norm_calibration"]


def export_da_clip_bundle(folder: str | Path, config: TrainConfig, network_state: dict, history: dict) -> Path:
    """The DA-CLIP encoder as a MONAI bundle (``lowdose_kind: da_clip``) with its model card."""
    last = history["epochs"][-1] if history["epochs"] else {}
    kwargs = dict(config.network.kwargs)
    metadata: dict[str, Any] = {
        "task": "CT dose and body-region encoder (DA-CLIP): unit-norm dose and region embeddings, log dose fraction "
        "and region of a slice",
        "lowdose_kind": "da_clip",
        "regions": list(REGIONS),
        "training": {
            "data_mode": "simulated",
            "train_series": [repository_relative(p) for p in config.data.train],
            "validation_series": [repository_relative(p) for p in config.data.validation],
            "doses": config.data.doses,
            "held_out_regions": config.da_clip.held_out_regions,
            "epochs": config.optim.epochs,
            "seed": config.seed,
            "slices_by_region": history.get("training_slices_by_region", {}),
        },
        "validation": {k: v for k, v in last.items() if k.startswith("val_")},
    }
    calibrated = history.get("after_batch_norm_calibration")
    if calibrated:  # the shipped weights' figures: after the batch norms' calibration
        metadata["validation"] = dict(calibrated)
    bundle = save_bundle(
        folder,
        name=Path(folder).name,
        network_name="da_clip",
        network_kwargs=kwargs,
        network_state=network_state,
        normalisation=DEFAULT_NORMALISATION,
        metadata=metadata,
    )
    network = build_network("da_clip", **kwargs).eval()  # eval: its batch normalisation takes one slice
    write_text_atomically(bundle / "docs" / "history.json", repository_relative(json.dumps(history, indent=2)))
    write_text_atomically(
        bundle / "docs" / "README.md",
        _card(Path(folder).name, config, metadata, count_parameters(network), count_gflops(network, (1, 1, 512, 512))),
    )
    return bundle


def _card(name: str, config: TrainConfig, metadata: dict, parameters: int, gflops: float) -> str:
    """A short model card: what it is, what it was trained on, its validation figures, its limits."""
    training, validation = metadata["training"], metadata["validation"]
    lines = [
        f"# {name}: lowdose's DA-CLIP (dose and body-region encoder)",
        "",
        config.description.strip() or metadata["task"] + ".",
        "",
        f"- Network: `da_clip` (DoseAnatomyEncoder), {parameters / 1e6:.2f} M parameters, {gflops:.2f} GFLOPs per "
        "512x512 slice; reads one slice (the centre of a 2.5-D slab), HU normalised as the denoisers' input.",
        f"- Outputs: dose and region embeddings ([B, {config.network.kwargs.get('embedding_dim', 64)}], unit norm), "
        f"log dose fraction, logits of the regions {', '.join(REGIONS)}.",
        f"- Trained on simulated doses {', '.join(f'{d:.3g}' for d in training['doses'])} of: "
        f"{', '.join(training['train_series'])}.",
        f"- Held-out regions (never in training): {', '.join(training['held_out_regions']) or 'none'}.",
        f"- Training slices by region: {training['slices_by_region']}.",
        f"- Validation (last epoch): {json.dumps(validation)}.",
        "",
        "Held-out patients, unseen doses and the held-out region: benchmarks/da_clip.py "
        "(benchmarks/results/da_clip.md).",
        "",
        "Limits: research use only, not a medical device. Doses are simulated (lowdose.simulate), relative to the "
        "source scan's own noise; a region never seen in training cannot be named by the classifier.",
        "",
    ]
    return "\n".join(lines)
