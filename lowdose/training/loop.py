"""``train(config)``: a denoising run described by its YAML config, on the training engine.

Stage 1 trains the denoiser (and its dose estimator, on the same patches) with the denoising objective, plus
the anatomy-aware terms when the config's ``anatomy`` section switches something on; checkpoints each
epoch, resumable. Stage 2 trains the dose estimator alone on whole slices. The selected epoch is exported
as a MONAI bundle with its model card.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import cast

import torch

from ..bundle import DEFAULT_NORMALISATION, Bundle, load_checkpoint
from ..device import pick_device
from ..errors import LowdoseError
from ..networks import build_network, count_gflops, count_parameters
from ..networks.dose_estimator import DoseEstimator
from .anatomy_terms import AnatomyTerms
from .checkpoints import RunCheckpoints, new_history, write_history
from .config import TrainConfig
from .da_clip import labelled_regions, train_da_clip
from .data import PairSampler, load_sources, validation_set, with_sharper_kernels
from .denoising import DenoisingNetworks, DenoisingObjective, forward_example
from .diffusion import DiffusionObjective, is_diffusion
from .engine import Budget, Trainer, seed_everything, warmup_cosine
from .estimator_stage import train_estimator_stage
from .export import export_bundle

__all__ = ["export_bundle", "forward_example", "train"]

log = logging.getLogger("lowdose.train")


def train(
    config: TrainConfig,
    resume: bool = False,
    progress: bool = True,
    bundle_dir: str | Path | None = None,
    command: str | None = None,
    estimator_only: bool = False,
) -> dict:
    """Run the training described by ``config``; returns the history (per-epoch losses and figures).

    Stage 1 trains the denoiser (and the dose estimator on the same patches) for ``optim.epochs``;
    stage 2, when ``optim.estimator_epochs`` > 0, trains the dose estimator alone on whole slices and
    stores it in the best checkpoint. ``estimator_only`` runs stage 2 on a finished stage 1.
    ``command`` (the command line that started the run) is kept in the history for the model card.
    ``network.name: da_clip`` trains lowdose's DA-CLIP encoder instead (lowdose.training.da_clip).
    """
    if config.network.name == "da_clip":
        return train_da_clip(config, resume, progress, bundle_dir, command)
    seed_everything(config.seed)
    device = pick_device(config.device)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    normalisation = dict(DEFAULT_NORMALISATION)
    anatomy = _anatomy_terms(config, normalisation, device)
    model = _build_model(config, anatomy, device)
    # dose_loss_weight 0 holds the dose estimator as it came (from init_bundle): not even weight decay moves it.
    parameters = model.parameters(train_estimator=config.optim.dose_loss_weight > 0)
    parameters += anatomy.generator_parameters() if anatomy is not None else []
    optimiser = torch.optim.AdamW(parameters, lr=config.optim.learning_rate, weight_decay=config.optim.weight_decay)
    objective = _denoising_objective(config, model, anatomy, normalisation, device)
    total_steps = objective.steps_per_epoch * config.optim.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, warmup_cosine(total_steps, min(100, total_steps // 20)))
    checkpoints = RunCheckpoints(out, config, model, optimiser, scheduler, new_history(config), anatomy)
    first_epoch = _resume(checkpoints, config, device, estimator_only) if resume or estimator_only else 0
    history = checkpoints.history
    history.setdefault("commands", [])
    if command:
        history["commands"].append(command)
    _log_start(config, model, device, objective.steps_per_epoch)
    trainer = Trainer(
        objective,
        optimiser,
        scheduler,
        parameters=parameters,
        clip_grad_norm=1.0,
        hooks=[*([anatomy] if anatomy is not None else []), checkpoints],
        progress=progress,
        show_loss=True,
    )
    trainer.fit(first_epoch, config.optim.epochs, _carried_budget(history))
    if model.estimator is not None and config.optim.estimator_epochs > 0:
        history["estimator_stage"] = train_estimator_stage(
            config, out, model, objective.sampler, objective.validation, normalisation, device, progress
        )
        write_history(history, out)
    if bundle_dir is not None:
        export_bundle(out / "checkpoint_best.pt", bundle_dir, history=history)
    return history


def _anatomy_terms(config: TrainConfig, normalisation: dict, device) -> AnatomyTerms | None:
    """The anatomy-aware terms the config switches on (None when it switches none on)."""
    if not config.anatomy.enabled:
        return None
    anatomy = AnatomyTerms(config.anatomy, normalisation, device)
    log.info(
        "anatomy-aware training: %s (encoder: %s)",
        ", ".join(config.anatomy.enabled),
        anatomy.encoder.name if anatomy.encoder is not None else "none",
    )
    return anatomy


def _build_model(config: TrainConfig, anatomy: AnatomyTerms | None, device) -> DenoisingNetworks:
    """The network (with BioAtt's attention when on; the config then records it), the dose estimator, and
    a bundle's weights when fine-tuning."""
    bioatt = anatomy if anatomy is not None and config.anatomy.bioatt else None  # the terms, when BioAtt is on
    if bioatt is not None:
        config.network.kwargs = bioatt.network_kwargs(config.network.kwargs)
    kwargs = dict(config.network.kwargs)
    network = build_network(config.network.name, **kwargs).to(device)
    estimator = None
    if config.network.dose_estimator:
        estimator = cast(
            DoseEstimator, build_network("dose_estimator", **config.network.dose_estimator_kwargs).to(device)
        )
    if config.init_bundle:
        _load_initial_weights(config, network, estimator)
    return DenoisingNetworks(
        network,
        estimator,
        bool(kwargs.get("dose_conditioning", False)),
        bioatt.organ_probabilities if bioatt is not None else None,
    )


def _denoising_objective(
    config: TrainConfig, model: DenoisingNetworks, anatomy: AnatomyTerms | None, normalisation: dict, device
) -> DenoisingObjective:
    """The denoising objective on the config's data: the training pair sampler and the validation slices."""
    channels = int(config.network.kwargs.get("in_channels", 1))
    data = config.data
    source = load_sources(data.train, data.mode, data.paired_dose)
    if data.sharper_kernels:
        source.normal = with_sharper_kernels(source.normal, data.sharper_kernels)
    # DA-Diff's region conditioning: every slice's region, for the patches and the validation slices to carry.
    by_region = bool(config.network.kwargs.get("region_classes"))
    sampler = PairSampler(
        source,
        data.doses,
        channels,
        normalisation,
        data.patch_size,
        data.patches_per_slice,
        data.slices_per_epoch,
        data.min_tissue_fraction,
        config.seed,
        data.simulation_cache,
        data.simulation_pool,
        data.match_source,
        data.single_slice_fraction,
        labelled_regions(source.normal, config.diffusion.label_maps) if by_region else None,
    )
    validation_volumes = load_sources(data.validation, "simulated").normal if data.validation else []
    validation_volumes = with_sharper_kernels(validation_volumes, data.sharper_kernels)
    validation = (
        validation_set(
            validation_volumes,
            data.validation_doses,
            channels,
            data.validation_slices,
            match_source=data.match_source,
            regions=labelled_regions(validation_volumes, config.diffusion.label_maps) if by_region else None,
        )
        if validation_volumes
        else []
    )
    slice_prior = None
    if model.organ_prior is not None:
        assert anatomy is not None  # the organ prior is BioAtt's, given by the anatomy terms
        slice_prior = anatomy.slice_organ_probabilities
    # A residual diffusion network (dose_diffusion) learns one diffusion step; every other network its output.
    objective, extra = DenoisingObjective, {}
    if is_diffusion(model.network):
        objective, extra = DiffusionObjective, {"loss": config.diffusion.loss}
    return objective(
        model,
        sampler,
        validation,
        config.optim,
        normalisation,
        device,
        config.seed,
        terms=[anatomy] if anatomy is not None else [],
        slice_prior=slice_prior,
        **extra,
    )


def _resume(checkpoints: RunCheckpoints, config: TrainConfig, device, estimator_only: bool) -> int:
    """The epoch to go on from, after loading the last checkpoint; checks that stage 2 alone can run."""
    first_epoch = checkpoints.resume(device)
    if not estimator_only:
        log.info("resumed from %s at epoch %d", checkpoints.last_path, first_epoch + 1)
        return first_epoch
    if first_epoch < config.optim.epochs:
        raise LowdoseError(
            f"{checkpoints.last_path}: the denoiser has trained {first_epoch} of "
            f"{config.optim.epochs} epochs; finish it (--resume) before the estimator stage"
        )
    if checkpoints.model.estimator is None or config.optim.estimator_epochs < 1:
        raise LowdoseError(
            "the config has no dose estimator stage (network.dose_estimator and " "optim.estimator_epochs > 0)"
        )
    return first_epoch


def _log_start(config: TrainConfig, model: DenoisingNetworks, device, steps_per_epoch: int) -> None:
    kwargs = config.network.kwargs
    channels = int(kwargs.get("in_channels", 1))
    gflops = count_gflops(model.network, (1, channels, 512, 512), **forward_example(kwargs))
    log.info(
        "training %s (%d parameters, %.1f GFLOPs per 512x512 slice) on %s: %d epochs x %d steps",
        config.network.name,
        count_parameters(model.network),
        gflops,
        device,
        config.optim.epochs,
        steps_per_epoch,
    )


def _carried_budget(history: dict) -> Budget:
    """The run's budget clock, counting the CPU and wall minutes of the sessions before a resume."""
    last = history["epochs"][-1] if history["epochs"] else {}
    return Budget(last.get("cpu_minutes", 0.0), last.get("wall_minutes", 0.0))


def _load_initial_weights(config: TrainConfig, network, estimator) -> None:
    """Fine-tuning: start from a trained bundle's weights (it must have the same network and arguments)."""
    assert config.init_bundle is not None  # called only when the config fine-tunes a bundle
    bundle = Bundle.find(config.init_bundle)

    # BioAtt's attention and the noise embedding may be added to a network trained without them (they start as
    # the identity and as zero)
    added = {"organ_attention": "attention.", "noise_conditioning": "noise_embedding."}

    def comparable(kwargs):
        return {k: v for k, v in dict(kwargs).items() if k not in added}

    same_kwargs = comparable(bundle.network_kwargs) == comparable(config.network.kwargs)
    if bundle.network_name != config.network.name or not same_kwargs:
        raise LowdoseError(
            f"{bundle.folder}: its network ({bundle.network_name} {bundle.network_kwargs}) is not the "
            f"config's ({config.network.name} {config.network.kwargs}); fine-tuning needs the same"
        )
    state = load_checkpoint(bundle.weights)
    missing, unexpected = network.load_state_dict(state["network"], strict=False)
    if unexpected or any(not key.startswith(tuple(added.values())) for key in missing):
        raise LowdoseError(
            f"{bundle.folder}: its weights do not fit the config's network (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]})"
        )
    if estimator is not None and state.get("dose_estimator") is not None:
        if bundle.dose_estimator_kwargs == dict(config.network.dose_estimator_kwargs):
            estimator.load_state_dict(state["dose_estimator"])
        else:  # e.g. an in-plane estimator replacing a 2.5-D one: it learns from scratch
            log.info(
                "dose estimator %s starts untrained (the bundle's is %s)",
                config.network.dose_estimator_kwargs,
                bundle.dose_estimator_kwargs,
            )
    log.info("fine-tuning from %s", bundle.folder)
