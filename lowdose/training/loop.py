"""The training loop: AdamW + cosine schedule, validation PSNR/SSIM each epoch, checkpoints, resume."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..atomic import write_text_atomically
from ..bundle import DEFAULT_NORMALISATION, _atomic_torch_save as _atomic_save, hu_to_input, load_checkpoint, output_to_hu, save_bundle
from ..errors import LowdoseError
from ..metrics import psnr, ssim
from .config import TrainConfig
from .data import PairSampler, find_ct_inputs, load_sources, validation_set

log = logging.getLogger("lowdose.train")


def pick_device(device: str = "auto") -> torch.device:
    """cuda when asked or available (auto), else cpu; a clear error if cuda is asked but absent."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LowdoseError("--device cuda: no CUDA GPU is available on this machine (use auto or cpu)")
    return torch.device(device)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _windowed_ssim_loss(prediction: torch.Tensor, target: torch.Tensor, normalisation: dict) -> torch.Tensor:
    """1 - SSIM on the abdomen window (C50/W400) scaled to [0, 1], as the field scores images."""
    from monai.losses import SSIMLoss

    scale = normalisation["scale_hu"]
    lo, width = (50.0 - 200.0) / scale, 400.0 / scale

    def window(t):
        return ((t - lo) / width).clamp(0, 1)

    return SSIMLoss(spatial_dims=2, data_range=1.0)(window(prediction), window(target))


def train(config: TrainConfig, resume: bool = False, progress: bool = True,
          bundle_dir: str | Path | None = None, command: str | None = None, estimator_only: bool = False) -> dict:
    """Run the training described by ``config``; returns the history (per-epoch losses and figures).

    Stage 1 trains the denoiser (and the dose estimator on the same patches) for ``optim.epochs``;
    stage 2, when ``optim.estimator_epochs`` > 0, trains the dose estimator alone on whole slices and
    stores it in the best checkpoint. ``estimator_only`` runs stage 2 on a finished stage 1.
    ``command`` (the command line that started the run) is kept in the history for the model card.
    """
    from tqdm.auto import tqdm

    from ..networks import build_network, count_gflops, count_parameters

    _seed_everything(config.seed)
    device = pick_device(config.device)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    normalisation = dict(DEFAULT_NORMALISATION)
    net_kwargs = dict(config.network.kwargs)
    channels = int(net_kwargs.get("in_channels", 1))
    conditioned = bool(net_kwargs.get("dose_conditioning", False))

    # BioAtt's organ probabilities: slice_prior of one whole low-dose slice (training patches carry their
    # slice's), organ_prior of a batch of whole validation slabs.
    anatomy, organ_prior, slice_prior = None, None, None
    if config.anatomy.enabled:
        from .anatomy_losses import AnatomyTerms

        anatomy = AnatomyTerms(config.anatomy, normalisation, device)
        log.info("anatomy-aware training: %s (encoder: %s)", ", ".join(config.anatomy.enabled),
                 anatomy.encoder.name if anatomy.encoder is not None else "none")
        if config.anatomy.bioatt:
            organ_prior, slice_prior = anatomy.organ_probabilities, anatomy.slice_organ_probabilities
            net_kwargs["organ_attention"] = anatomy.num_organs
            config.network.kwargs = dict(net_kwargs)
    network = build_network(config.network.name, **net_kwargs).to(device)
    estimator = None
    if config.network.dose_estimator:
        estimator = build_network("dose_estimator", **config.network.dose_estimator_kwargs).to(device)
    if config.init_bundle:
        _load_initial_weights(config, network, estimator)
    parameters = list(network.parameters()) + (list(estimator.parameters()) if estimator else [])
    parameters += anatomy.generator_parameters() if anatomy is not None else []
    optimiser = torch.optim.AdamW(parameters, lr=config.optim.learning_rate, weight_decay=config.optim.weight_decay)

    source = load_sources(config.data.train, config.data.mode, config.data.paired_dose)
    sampler = PairSampler(source, config.data.doses, channels, normalisation, config.data.patch_size,
                          config.data.patches_per_slice, config.data.slices_per_epoch,
                          config.data.min_tissue_fraction, config.seed, config.data.simulation_cache,
                          config.data.simulation_pool)
    validation_volumes = load_sources(config.data.validation, "simulated").normal if config.data.validation else []
    validation = validation_set(validation_volumes, config.data.validation_doses, channels,
                                config.data.validation_slices) if validation_volumes else []

    steps_per_epoch = math.ceil(sampler.slices_per_epoch * sampler.patches_per_slice / config.optim.batch_size)
    total_steps = steps_per_epoch * config.optim.epochs
    warmup = min(100, total_steps // 20)

    def learning_rate_factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total_steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, learning_rate_factor)
    history: dict = {"epochs": [], "config": config.to_dict(), "commands": [], "threads": torch.get_num_threads()}
    start_epoch, best = 0, -float("inf")
    checkpoint_path = out / "checkpoint_last.pt"
    if estimator_only:
        resume = True
    if resume:
        if not checkpoint_path.is_file():
            raise LowdoseError(f"{checkpoint_path}: no checkpoint to resume from")
        state = load_checkpoint(checkpoint_path, map_location=device)
        network.load_state_dict(state["network"])
        if estimator is not None and state.get("dose_estimator") is not None:
            estimator.load_state_dict(state["dose_estimator"])
        if anatomy is not None and state.get("anatomy") is not None:
            anatomy.load_trainable_state(state["anatomy"])
        optimiser.load_state_dict(state["optimiser"])
        scheduler.load_state_dict(state["scheduler"])
        start_epoch, best, history = state["epoch"] + 1, state["best"], state["history"]
        torch.set_rng_state(state["torch_rng"])
        if estimator_only:
            if start_epoch < config.optim.epochs:
                raise LowdoseError(f"{checkpoint_path}: the denoiser has trained {start_epoch} of "
                                   f"{config.optim.epochs} epochs; finish it (--resume) before the estimator stage")
            if estimator is None or config.optim.estimator_epochs < 1:
                raise LowdoseError("the config has no dose estimator stage (network.dose_estimator and "
                                   "optim.estimator_epochs > 0)")
        else:
            log.info("resumed from %s at epoch %d", checkpoint_path, start_epoch + 1)
    history.setdefault("commands", [])
    if command:
        history["commands"].append(command)

    log.info("training %s (%d parameters, %.1f GFLOPs per 512x512 slice) on %s: %d epochs x %d steps",
             config.network.name, count_parameters(network), count_gflops(network, (1, channels, 512, 512),
             **forward_example(net_kwargs)), device,
             config.optim.epochs, steps_per_epoch)
    started = time.time()
    # CPU and wall time carried over a resume, for the model card's budget figures.
    done_cpu = history["epochs"][-1].get("cpu_minutes", 0.0) if history["epochs"] else 0.0
    done_wall = history["epochs"][-1].get("wall_minutes", 0.0) if history["epochs"] else 0.0
    cpu_started = time.process_time()
    for epoch in range(start_epoch, config.optim.epochs):
        network.train()
        if estimator is not None:
            estimator.train()
        t0 = time.time()
        items = sampler.epoch(epoch, slice_prior=slice_prior)
        simulate_seconds = time.time() - t0
        order = np.random.default_rng([config.seed, epoch, 1]).permutation(len(items))
        losses, dose_losses, anatomy_losses = [], [], {}
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{config.optim.epochs}", disable=not progress,
                   unit="step", leave=False)
        for step in bar:
            batch = [items[i] for i in order[step * config.optim.batch_size:(step + 1) * config.optim.batch_size]]
            if not batch:
                break
            low = torch.from_numpy(np.stack([b["low"] for b in batch])).to(device)
            normal = torch.from_numpy(np.stack([b["normal"] for b in batch])).to(device)
            dose = torch.from_numpy(np.stack([b["dose"] for b in batch])).to(device)
            prior = torch.from_numpy(np.stack([b["organ_probabilities"] for b in batch])).to(device) if slice_prior else None
            prediction = _forward(network, low, dose, conditioned, prior)
            loss = F.mse_loss(prediction, normal)
            if config.optim.ssim_weight > 0:
                loss = loss + config.optim.ssim_weight * _windowed_ssim_loss(prediction, normal, normalisation)
            total = loss
            if anatomy is not None:
                for name, term in anatomy.generator_losses(prediction, normal, low).items():
                    total = total + term
                    anatomy_losses.setdefault(name, []).append(float(term.detach()))
            if estimator is not None and torch.isfinite(dose).all():
                dose_loss = F.smooth_l1_loss(estimator(low), dose.log(), beta=0.1)
                total = total + config.optim.dose_loss_weight * dose_loss
                dose_losses.append(float(dose_loss.detach()))
            optimiser.zero_grad(set_to_none=True)
            total.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimiser.step()
            scheduler.step()
            if anatomy is not None:
                for name, value in anatomy.after_generator_step(prediction.detach(), normal).items():
                    anatomy_losses.setdefault(name, []).append(value)
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.5f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        figures = evaluate(network, estimator, validation, normalisation, channels, conditioned, device, organ_prior)
        record = {"epoch": epoch + 1, "loss": float(np.mean(losses)), "dose_loss": float(np.mean(dose_losses)) if dose_losses else None,
                  **{f"{name}_loss": float(np.mean(values)) for name, values in anatomy_losses.items()},
                  "simulate_seconds": round(simulate_seconds, 1), "epoch_seconds": round(time.time() - t0, 1), **figures,
                  "cpu_minutes": round(done_cpu + (time.process_time() - cpu_started) / 60, 2),
                  "wall_minutes": round(done_wall + (time.time() - started) / 60, 2)}
        history["epochs"].append(record)
        score = figures.get("val_psnr_abdomen", -float(np.mean(losses)))
        is_best = score > best or config.optim.selection == "last"
        best = max(best, score)
        state = {"network": network.state_dict(), "dose_estimator": estimator.state_dict() if estimator else None,
                 "optimiser": optimiser.state_dict(), "scheduler": scheduler.state_dict(), "epoch": epoch,
                 "best": best, "history": history, "torch_rng": torch.get_rng_state(), "config": config.to_dict(),
                 "anatomy": anatomy.trainable_state() if anatomy is not None else None}
        _atomic_save(state, checkpoint_path)
        if is_best:
            best_state = {k: state[k] for k in ("network", "dose_estimator", "epoch", "config")}
            if anatomy is not None and config.anatomy.bioatt:  # BioAtt reads the encoder at inference: shipped with it
                best_state["anatomy_encoder"] = anatomy.encoder_for_bundle()
            _atomic_save(best_state, out / "checkpoint_best.pt")
        message = " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in record.items() if v is not None)
        elapsed = time.time() - started
        remaining = elapsed / (epoch + 1 - start_epoch) * (config.optim.epochs - epoch - 1)
        log.info("%s (eta %.0f min)%s", message, remaining / 60, " *best*" if is_best else "")
        (out / "history.json").write_text(json.dumps(history, indent=2))
    if estimator is not None and config.optim.estimator_epochs > 0:
        history["estimator_stage"] = _train_estimator_stage(
            config, out, network, estimator, sampler, validation, normalisation, channels, conditioned, device, progress,
            organ_prior)
        (out / "history.json").write_text(json.dumps(history, indent=2))
    if bundle_dir is not None:
        export_bundle(out / "checkpoint_best.pt", bundle_dir, history=history)
    return history


def forward_example(network_kwargs: dict) -> dict:
    """Example conditioning inputs for one slice (for counting FLOPs): a dose, BioAtt's organ probabilities."""
    example = {}
    if network_kwargs.get("dose_conditioning"):
        example["dose_fraction"] = torch.tensor([0.25])
    if network_kwargs.get("organ_attention"):
        example["organ_probabilities"] = torch.full((1, int(network_kwargs["organ_attention"])), 0.5)
    return example


def _forward(network, low, dose, conditioned, organ_probabilities=None):
    """The generator's output; BioAtt networks also get the slices' organ probabilities."""
    extra = {} if organ_probabilities is None else {"organ_probabilities": organ_probabilities}
    return network(low, dose if conditioned else None, **extra) if conditioned or extra else network(low)


def _train_estimator_stage(config, out, network, estimator, sampler, validation, normalisation, channels,
                           conditioned, device, progress, organ_prior=None) -> dict:
    """Stage 2: the dose estimator alone on whole slices; stored in the best checkpoint (last epoch kept:
    the held-out series is not used to pick it). Returns its per-epoch record and final figures."""
    from tqdm.auto import tqdm

    best_path = out / "checkpoint_best.pt"
    best_state = load_checkpoint(best_path, map_location=device)
    network.load_state_dict(best_state["network"])  # the exported denoiser, for val_psnr_abdomen_auto
    if best_state.get("dose_estimator") is not None:
        estimator.load_state_dict(best_state["dose_estimator"])
    optimiser = torch.optim.AdamW(estimator.parameters(), lr=config.optim.estimator_learning_rate,
                                  weight_decay=config.optim.weight_decay)
    epochs = config.optim.estimator_epochs
    slices_per_epoch = sum(1 for _ in sampler.whole_slices(0))  # reads the pool once (cached afterwards)
    steps = epochs * math.ceil(slices_per_epoch / config.optim.estimator_batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    records, started, cpu_started = [], time.time(), time.process_time()
    for epoch in range(epochs):
        estimator.train()
        losses, batch = [], []
        bar = tqdm(total=slices_per_epoch, desc=f"dose estimator {epoch + 1}/{epochs}", unit="slice",
                   disable=not progress, leave=False)

        def step(batch):
            low = torch.from_numpy(np.stack([b[0] for b in batch])).to(device)
            dose = torch.tensor([b[1] for b in batch], dtype=torch.float32, device=device)
            loss = F.smooth_l1_loss(estimator(low), dose.log(), beta=0.1)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(estimator.parameters(), 1.0)
            optimiser.step()
            scheduler.step()
            losses.append(float(loss.detach()))
            bar.update(len(batch))

        for item in sampler.whole_slices(1000 + epoch):
            if batch and item[0].shape != batch[0][0].shape:  # series differ in size: batch alike slices
                step(batch)
                batch = []
            batch.append(item)
            if len(batch) == config.optim.estimator_batch_size:
                step(batch)
                batch = []
        if batch:
            step(batch)
        bar.close()
        figures = evaluate(network, estimator, validation, normalisation, channels, conditioned, device, organ_prior)
        record = {"epoch": epoch + 1, "dose_loss": float(np.mean(losses)),
                  **{k: v for k, v in figures.items() if "dose" in k or "auto" in k}}
        records.append(record)
        log.info("dose estimator %s", " ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}"
                                               for k, v in record.items()))
    best_state["dose_estimator"] = estimator.state_dict()
    _atomic_save(best_state, best_path)
    return {"epochs": records, "slices_per_epoch": slices_per_epoch,
            "cpu_minutes": round((time.process_time() - cpu_started) / 60, 2),
            "wall_minutes": round((time.time() - started) / 60, 2)}


@torch.inference_mode()
def evaluate(network, estimator, validation, normalisation, channels, conditioned, device, organ_prior=None) -> dict:
    """PSNR/SSIM (abdomen window) of the network on the fixed validation slices.

    A dose-conditioned network is scored with the true dose (``val_psnr_abdomen``, what selects the best
    epoch) and with the dose its estimator predicts (``val_psnr_abdomen_auto``, what users get by default).
    """
    if not validation:
        return {}
    network.eval()
    if estimator is not None:
        estimator.eval()

    def denoise(low, dose, centre_hu):
        prediction = _forward(network, low, dose, conditioned, organ_prior(low) if organ_prior else None)
        hu = output_to_hu(prediction[0, 0].float().cpu().numpy(), normalisation)
        return np.where(centre_hu > normalisation["hu_max"], centre_hu, hu)  # metal kept as it was

    psnrs, ssims, auto_psnrs, input_psnrs, dose_errors = [], [], [], [], []
    for item in validation:
        low = torch.from_numpy(hu_to_input(item["low_hu"], normalisation))[None].to(device)
        estimated = estimator.predict_dose_fraction(low) if estimator is not None else None
        if estimated is not None:
            dose_errors.append(abs(float(estimated) - item["dose"]) / item["dose"])
        centre_hu = item["low_hu"][channels // 2]
        hu = denoise(low, torch.tensor([item["dose"]], device=device), centre_hu)
        psnrs.append(psnr(item["normal_hu"], hu))
        ssims.append(ssim(item["normal_hu"], hu))
        if conditioned and estimated is not None:
            auto_psnrs.append(psnr(item["normal_hu"], denoise(low, estimated, centre_hu)))
        input_psnrs.append(psnr(item["normal_hu"], centre_hu))
    figures = {"val_psnr_abdomen": float(np.mean(psnrs)), "val_ssim_abdomen": float(np.mean(ssims)),
               "val_input_psnr_abdomen": float(np.mean(input_psnrs))}
    if auto_psnrs:
        figures["val_psnr_abdomen_auto"] = float(np.mean(auto_psnrs))
    if dose_errors:
        figures["val_dose_median_rel_error"] = float(np.median(dose_errors))
    return figures


def export_bundle(checkpoint: str | Path, bundle_dir: str | Path, history: dict | None = None) -> Path:
    """Write the MONAI bundle of a training checkpoint (see lowdose.bundle) with its model card."""
    from ..networks import build_network, count_gflops, count_parameters
    from .model_card import model_card

    state = load_checkpoint(checkpoint)
    config = TrainConfig.from_dict(state["config"])
    history = history or state.get("history") or {}
    epochs = history.get("epochs", [])
    exported = state.get("epoch", 0) + 1
    shipped = next((r for r in epochs if r.get("epoch") == exported), {})  # the figures of the epoch shipped
    metadata = {
        "training": {
            "data_mode": config.data.mode,
            "train_series": [str(p) for entry in config.data.train for p in _relative_inputs(entry)],
            "validation_series": [str(p) for entry in config.data.validation for p in _relative_inputs(entry)],
            "doses": config.data.doses,
            "epochs": config.optim.epochs,
            "best_epoch": state.get("epoch", 0) + 1,
            "seed": config.seed,
        },
        "validation": {k: v for k, v in shipped.items() if k.startswith("val_")},
        "anatomy_aware_training": {"enabled": config.anatomy.enabled, **dataclasses.asdict(config.anatomy)},
    }
    stage = (history.get("estimator_stage") or {}).get("epochs")
    if stage:  # the shipped estimator is stage 2's: its figures replace stage 1's
        metadata["validation"].update({k: v for k, v in stage[-1].items() if k.startswith("val_")})
        metadata["training"]["dose_estimator_stage_epochs"] = len(stage)
    folder = save_bundle(bundle_dir, name=Path(bundle_dir).name, network_name=config.network.name,
                         network_kwargs=config.network.kwargs, network_state=state["network"],
                         estimator_kwargs=config.network.dose_estimator_kwargs if state.get("dose_estimator") else None,
                         estimator_state=state.get("dose_estimator"), metadata=metadata,
                         anatomy_encoder=state.get("anatomy_encoder"))
    network = build_network(config.network.name, **config.network.kwargs)
    gflops = count_gflops(network, **forward_example(config.network.kwargs))
    meta = json.loads((folder / "configs" / "metadata.json").read_text())
    # Paths in the history relative to the repository, as the model card's readers have it cloned.
    root = Path(__file__).resolve().parents[2]
    text = json.dumps(history, indent=2).replace(f"{root}/", "").replace(f"{root.parent}/", "../")
    write_text_atomically(folder / "docs" / "history.json", text)
    write_text_atomically(folder / "docs" / "README.md", model_card(meta, history, count_parameters(network), gflops))
    return folder


def _relative_inputs(entry: str) -> list[str]:
    """Series names for the model card, relative to the shared data folder when under it."""
    try:
        inputs = find_ct_inputs(entry)
    except LowdoseError:
        return [entry]
    root = Path(__file__).resolve().parents[2]
    names = []
    for p in inputs:
        p = Path(p).resolve()
        parts = p.parts
        if p.is_relative_to(root):  # e.g. the bundled sample
            names.append(str(p.relative_to(root)))
        else:
            names.append("/".join(parts[parts.index("data"):]) if "data" in parts else p.name)
    return names


def _load_initial_weights(config: TrainConfig, network, estimator) -> None:
    """Fine-tuning: start from a trained bundle's weights (it must have the same network and arguments)."""
    from ..bundle import find_bundle

    folder = find_bundle(config.init_bundle)
    meta = json.loads((folder / "configs" / "metadata.json").read_text())
    # BioAtt's attention may be added to a network trained without it (it starts as the identity).
    def comparable(kwargs):
        return {k: v for k, v in dict(kwargs).items() if k != "organ_attention"}

    if meta["network"]["name"] != config.network.name or comparable(meta["network"]["kwargs"]) != comparable(config.network.kwargs):
        raise LowdoseError(f"{folder}: its network ({meta['network']['name']} {meta['network']['kwargs']}) is not the "
                           f"config's ({config.network.name} {config.network.kwargs}); fine-tuning needs the same")
    state = load_checkpoint(folder / "models" / "model.pt")
    missing, unexpected = network.load_state_dict(state["network"], strict=False)
    if unexpected or any(not key.startswith("attention.") for key in missing):
        raise LowdoseError(f"{folder}: its weights do not fit the config's network (missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]})")
    if estimator is not None and state.get("dose_estimator") is not None:
        estimator.load_state_dict(state["dose_estimator"])
    log.info("fine-tuning from %s", folder)
