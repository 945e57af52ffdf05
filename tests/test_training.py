"""Training on simulated pairs, checkpoints/resume, bundle export, and the inference engine on real CT.

The models trained here are tiny and trained for seconds: these tests prove the machinery (data,
loop, resume, bundle, HU and geometry through inference), not denoising quality, which the shipped
model's benchmark measures.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from lowdose import load_ct, save_ct, simulate_low_dose
from lowdose.denoise import Denoiser
from lowdose.errors import LowdoseError
from lowdose.training import TrainConfig, export_bundle, train

from .checkpoint_fixtures import unsafe_load_runs_the_payload, write_crafted_checkpoint
from .conftest import shared

TINY = {
    "name": "tiny",
    "seed": 3,
    "device": "cpu",
    "data": {
        "mode": "simulated",
        "doses": [0.5, 0.1],
        "validation_doses": [0.25],
        "patch_size": 48,
        "patches_per_slice": 4,
        "slices_per_epoch": 8,
        "validation_slices": 1,
    },
    "network": {
        "name": "dose_unet",
        "kwargs": {"in_channels": 3, "dose_conditioning": True, "features": [8, 16], "blocks_per_level": [1, 1]},
        "dose_estimator": True,
        "dose_estimator_kwargs": {"in_channels": 3, "features": [8, 16]},
    },
    "optim": {"epochs": 2, "batch_size": 8, "learning_rate": 1e-3, "estimator_epochs": 1, "estimator_batch_size": 4},
}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    raw = json.loads(json.dumps(TINY))
    raw["output_dir"] = "run"
    # two series of different slice sizes (122 x 102 and 512 x 512): whole-slice batches must not mix them
    raw["data"]["train"] = [
        str(shared("totalsegmentator/pulmonary_report_ct_cropped.nii.gz")),
        str(shared("lungmask_chest")),
    ]
    raw["data"]["validation"] = [str(shared("totalsegmentator/example_ct_sm.nii.gz"))]
    raw["data"]["simulation_pool"] = 4
    raw["version"] = 2.5  # YAML's number: the bundle's version is its text
    (root / "train.yaml").write_text(yaml.safe_dump(raw))
    config = TrainConfig.from_yaml(root / "train.yaml")
    history = train(config, progress=False, bundle_dir=root / "bundle")
    return root, config, history


def test_training_runs_validates_and_checkpoints(tiny_run):
    root, config, history = tiny_run
    assert config.output_dir == str(root / "run")  # relative to the config file
    assert [e["epoch"] for e in history["epochs"]] == [1, 2]
    for record in history["epochs"]:
        assert np.isfinite(record["loss"]) and np.isfinite(record["dose_loss"])
        assert 10 < record["val_psnr_abdomen"] < 60 and 0 < record["val_ssim_abdomen"] <= 1
        assert record["val_input_psnr_abdomen"] > 0
    assert (root / "run" / "checkpoint_last.pt").is_file() and (root / "run" / "checkpoint_best.pt").is_file()
    saved = json.loads((root / "run" / "history.json").read_text())
    assert len(saved["epochs"]) == 2


def test_history_records_keep_their_keys_in_order(tiny_run):
    """history.json is read by model cards, the benchmarks and the fine-tune task: its records keep their keys
    and their order (the engine's EpochRecord writes them)."""
    root, _, history = tiny_run
    assert list(history["epochs"][0]) == [
        "epoch",
        "loss",
        "dose_loss",
        "simulate_seconds",
        "epoch_seconds",
        "val_psnr_abdomen",
        "val_ssim_abdomen",
        "val_input_psnr_abdomen",
        "val_psnr_abdomen_auto",
        "val_dose_median_rel_error",
        "cpu_minutes",
        "wall_minutes",
    ]
    assert list(history["estimator_stage"]["epochs"][0]) == [
        "epoch",
        "dose_loss",
        "val_psnr_abdomen_auto",
        "val_dose_median_rel_error",
    ]
    assert list(history["estimator_stage"]) == ["epochs", "slices_per_epoch", "cpu_minutes", "wall_minutes"]
    assert list(history)[:4] == ["epochs", "config", "commands", "threads"]


def test_training_engine_runs_any_objective_with_its_hooks():
    """The engine knows nothing of CT: a least-squares objective with a hook shows the contract every
    objective (denoising, dose estimator, anatomy encoder, later diffusion) and hook relies on."""
    import logging
    import math

    import torch

    from lowdose.training.engine import EpochRecord, Hook, LogEpochs, Objective, StepLoss, Trainer, warmup_cosine

    torch.manual_seed(0)
    x = torch.randn(32, 3)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]])

    class LeastSquares(Objective):
        def __init__(self):
            self.weights = torch.nn.Linear(3, 1)
            self.steps_per_epoch = 4

        def train_mode(self):
            self.weights.train()

        def batches(self, epoch):
            return ((x[i::4], y[i::4]) for i in range(4))

        def loss(self, batch):
            error = torch.nn.functional.mse_loss(self.weights(batch[0]), batch[1])
            return StepLoss(error, {"loss": error}, {"prediction": self.weights(batch[0])})

        def validate(self):
            with torch.no_grad():
                return {"val_mse": float(torch.nn.functional.mse_loss(self.weights(x), y))}

    class Counter(Hook):
        steps, epochs = 0, []

        def after_step(self, step):
            assert "prediction" in step.outputs  # what the step computed, for hooks such as a discriminator
            Counter.steps += 1
            return {"steps_loss": float(Counter.steps)}

        def after_epoch(self, record):
            Counter.epochs.append(record)

    objective = LeastSquares()
    optimiser = torch.optim.SGD(objective.weights.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimiser, warmup_cosine(12, 2))
    assert [scheduler.get_last_lr()[0], warmup_cosine(12, 2)(1), warmup_cosine(12)(12)] == [0.05, 1.0, 0.0]
    records: list = []
    trainer = Trainer(
        objective,
        optimiser,
        scheduler,
        parameters=list(objective.weights.parameters()),
        clip_grad_norm=1.0,
        hooks=[Counter(), LogEpochs(records, logging.getLogger("lowdose.train"))],
        progress=False,
    )
    result = trainer.fit(0, 3)
    assert Counter.steps == 12 and [r.epoch for r in Counter.epochs] == [1, 2, 3]
    assert all(isinstance(r, EpochRecord) for r in result) and records == [r.as_dict() for r in result]
    assert list(records[0]) == ["epoch", "loss", "steps_loss", "val_mse", "cpu_minutes", "wall_minutes"]
    assert records[0]["steps_loss"] == 2.5  # the mean of the epoch's per-step figures (1, 2, 3, 4)
    assert records[-1]["val_mse"] < records[0]["val_mse"] and math.isfinite(records[-1]["loss"])


def test_dose_estimator_stage_trains_on_whole_slices_and_is_what_ships(tiny_run):
    import torch

    root, config, history = tiny_run
    stage = history["estimator_stage"]
    assert len(stage["epochs"]) == 1 and stage["slices_per_epoch"] >= 2
    assert np.isfinite(stage["epochs"][0]["dose_loss"])
    best = torch.load(root / "run" / "checkpoint_best.pt", map_location="cpu", weights_only=True)
    shipped = torch.load(root / "bundle" / "models" / "model.pt", map_location="cpu", weights_only=True)
    for key, value in best["dose_estimator"].items():
        assert torch.equal(shipped["dose_estimator"][key], value), key
    meta = json.loads((root / "bundle" / "configs" / "metadata.json").read_text())
    assert meta["validation"]["val_dose_median_rel_error"] == stage["epochs"][-1]["val_dose_median_rel_error"]
    # whole slices, as at inference: full 2.5-D slabs of the training series
    from lowdose.bundle import DEFAULT_NORMALISATION
    from lowdose.training.data import PairSampler, load_sources

    source = load_sources(config.data.train, "simulated")
    sampler = PairSampler(source, [0.5], 3, DEFAULT_NORMALISATION, 48, 2, 8, 0.2, seed=1)
    low, dose = next(sampler.whole_slices(0))
    assert low.shape == (3, *source.normal[0].shape[1:]) and dose == 0.5


def test_estimator_stage_shows_normal_dose_slices_as_dose_one():
    """``normal_fraction`` runs are the source itself, labelled 1, so a routine scan learns to read as ~1."""
    from lowdose.bundle import DEFAULT_NORMALISATION, hu_to_input
    from lowdose.training.data import PairSampler, load_sources

    source = load_sources([str(shared("lungmask_chest"))], "simulated")
    sampler = PairSampler(source, [0.25], 1, DEFAULT_NORMALISATION, 48, 2, 8, 0.2, seed=1)
    slices = list(sampler.whole_slices(0, normal_fraction=0.999))
    assert slices and all(dose == 1.0 for _, dose in slices)
    normal = hu_to_input(source.normal[0].hu, DEFAULT_NORMALISATION)
    values = {np.sort(image.ravel()).tobytes() for image in normal}  # flip-invariant: the slice's sorted pixels
    assert all(np.sort(low[0].ravel()).tobytes() in values for low, _ in slices)  # no noise added
    assert all(dose == 0.25 for _, dose in sampler.whole_slices(0))  # off by default: simulated doses only


def test_single_slice_fraction_gives_slabs_of_one_slice_repeated():
    """``data.single_slice_fraction``: training slabs whose neighbours are the centre repeated, as a lone slice
    reaches the 2.5-D network at inference; none of them without it."""
    from lowdose.bundle import DEFAULT_NORMALISATION
    from lowdose.training.data import PairSampler, load_sources

    source = load_sources([str(shared("totalsegmentator/pulmonary_report_ct_cropped.nii.gz"))], "simulated")

    def repeated_share(fraction: float) -> float:
        sampler = PairSampler(
            source, [0.25], 3, DEFAULT_NORMALISATION, 48, 2, 8, 0.2, seed=1, single_slice_fraction=fraction
        )
        items = sampler.epoch(0)
        return np.mean(
            [np.array_equal(i["low"][0], i["low"][1]) and np.array_equal(i["low"][1], i["low"][2]) for i in items]
        )

    assert repeated_share(0.0) == 0.0
    assert repeated_share(1.0) == 1.0


def test_training_config_checks_the_normal_fraction_and_resolves_init_bundle_folders(tmp_path):
    raw = json.loads(json.dumps(TINY))
    raw["data"]["train"] = [str(shared("lungmask_chest"))]
    raw["init_bundle"] = "../bundles/v1"
    raw["optim"]["estimator_normal_fraction"] = 0.15
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "train.yaml").write_text(yaml.safe_dump(raw))
    config = TrainConfig.from_yaml(tmp_path / "configs" / "train.yaml")
    assert config.init_bundle == str((tmp_path / "bundles" / "v1").resolve())
    raw["init_bundle"] = "dose_unet"  # a model name stays a name
    raw["optim"]["estimator_normal_fraction"] = 1.0
    (tmp_path / "configs" / "train.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(LowdoseError, match="estimator_normal_fraction"):
        TrainConfig.from_yaml(tmp_path / "configs" / "train.yaml")
    raw["optim"]["estimator_normal_fraction"] = 0.0
    raw["data"]["single_slice_fraction"] = 1.5
    (tmp_path / "configs" / "train.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(LowdoseError, match="single_slice_fraction"):
        TrainConfig.from_yaml(tmp_path / "configs" / "train.yaml")


def test_estimator_stage_needs_a_finished_first_stage(tmp_path):
    raw = json.loads(json.dumps(TINY))
    raw["output_dir"] = "run"
    raw["data"]["train"] = [str(shared("totalsegmentator/pulmonary_report_ct_cropped.nii.gz"))]
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(raw))
    config = TrainConfig.from_yaml(tmp_path / "train.yaml")
    with pytest.raises(LowdoseError, match="no checkpoint"):
        train(config, progress=False, estimator_only=True)
    config.optim.epochs, config.optim.estimator_epochs = 1, 0
    train(config, progress=False)
    config.optim.epochs, config.optim.estimator_epochs = 2, 1
    with pytest.raises(LowdoseError, match="trained 1 of 2 epochs"):
        train(config, progress=False, estimator_only=True)


def test_resume_continues_where_it_stopped(tiny_run):
    root, config, _ = tiny_run
    config.optim.epochs = 3
    history = train(config, resume=True, progress=False)
    assert [e["epoch"] for e in history["epochs"]] == [1, 2, 3]


def test_bundle_has_monai_layout_and_metadata(tiny_run):
    root, _, _ = tiny_run
    bundle = root / "bundle"
    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["network"]["name"] == "dose_unet" and meta["dose_estimator"]["name"] == "dose_estimator"
    assert meta["normalisation"] == {"hu_min": -1024.0, "hu_max": 3071.0, "scale_hu": 1000.0}
    assert meta["training"]["doses"] == [0.5, 0.1]
    assert meta["version"] == "2.5" and "2.5" in meta["changelog"]  # the config's version, named in its outputs
    shipped_epoch = meta["training"]["best_epoch"]  # the figures are those of the epoch shipped
    history = json.loads((bundle / "docs" / "history.json").read_text())
    assert meta["validation"]["val_psnr_abdomen"] == history["epochs"][shipped_epoch - 1]["val_psnr_abdomen"]
    assert (bundle / "models" / "model.pt").stat().st_size < 20e6
    assert json.loads((bundle / "configs" / "inference.json").read_text())["network_def"]["name"] == "dose_unet"


def test_inference_keeps_hu_geometry_and_padding_and_is_deterministic(tiny_run, tmp_path):
    root, _, _ = tiny_run
    normal = load_ct(shared("totalsegmentator/example_ct_sm.nii.gz"))
    low = simulate_low_dose(normal, 0.25, seed=1)
    low.hu[:, :5, :5] = -3024.0  # padding outside the field of view
    denoiser = Denoiser(root / "bundle", device="cpu", batch_size=3)
    result = denoiser(low, dose="auto")
    first, second = result.volume, denoiser(low, dose="auto").volume
    np.testing.assert_array_equal(first.hu, second.hu)
    assert first.hu.dtype == np.float32 and first.shape == low.shape
    assert first.spacing_mm == low.spacing_mm and first.origin_mm == low.origin_mm
    np.testing.assert_array_equal(first.direction, low.direction)
    assert np.all(first.hu[:, :5, :5] == -3024.0)
    assert 0 < result.dose_fraction <= 1 and result.dose_source == "estimated"
    given = denoiser(low, dose=0.1)
    assert given.dose_fraction == 0.1 and given.dose_source == "given"
    # HU stay HU: the mean in soft tissue stays within a few HU of the input's
    tissue = (normal.hu > 0) & (normal.hu < 100)
    assert abs(float(first.hu[tissue].mean() - low.hu[tissue].mean())) < 60
    save_ct(first, tmp_path / "denoised.nii.gz")
    back = load_ct(tmp_path / "denoised.nii.gz")
    np.testing.assert_allclose(back.origin_mm, low.origin_mm, atol=1e-4)
    with pytest.raises(LowdoseError, match="must be in"):
        denoiser(low, dose=1.5)


def test_soft_tissue_weight_counts_errors_where_the_target_is_soft_tissue_more():
    """``optim.soft_tissue_weight``: an error on a pixel whose normal-dose value lies in C50/W400 counts
    1 + weight times one on lung or bone; weight 0 is plain MSE."""
    import torch.nn.functional as F

    from lowdose.bundle import DEFAULT_NORMALISATION, hu_to_input
    from lowdose.training.denoising import soft_tissue_weighted_mse

    hu = np.zeros((1, 1, 8, 8), np.float32)
    hu[..., :4] = 40.0  # liver
    hu[..., 4:] = -800.0  # lung
    target = torch.from_numpy(hu_to_input(hu, DEFAULT_NORMALISATION))
    error = torch.zeros_like(target)
    on_tissue, on_lung = error.clone(), error.clone()
    on_tissue[..., :4], on_lung[..., 4:] = 0.02, 0.02  # 20 HU either side
    everywhere = on_tissue + on_lung

    def loss(e, weight):
        return float(soft_tissue_weighted_mse(target + e, target, weight, DEFAULT_NORMALISATION))

    assert loss(on_tissue, 0.0) == pytest.approx(float(F.mse_loss(target + on_tissue, target)))
    assert loss(everywhere, 3.0) == pytest.approx(0.02**2)  # same error everywhere: the weights cancel
    assert loss(on_tissue, 3.0) == pytest.approx(4 * loss(on_lung, 3.0), rel=1e-4)
    assert loss(on_tissue, 3.0) > loss(on_tissue, 0.0) > loss(on_lung, 3.0)


def test_bad_configs_and_models_give_clear_errors(tmp_path):
    (tmp_path / "bad.yaml").write_text("data: {mode: simulated, train: [x], colour: red}\n")
    with pytest.raises(LowdoseError, match="unknown key.*colour"):
        TrainConfig.from_yaml(tmp_path / "bad.yaml")
    (tmp_path / "dose.yaml").write_text("data: {train: [x], doses: [0.5, 2]}\n")
    with pytest.raises(LowdoseError, match="dose fraction 2"):
        TrainConfig.from_yaml(tmp_path / "dose.yaml")
    with pytest.raises(LowdoseError, match="no such model"):
        Denoiser("no_such_model", device="cpu")
    with pytest.raises(LowdoseError, match="no such training config"):
        TrainConfig.from_yaml(tmp_path / "missing.yaml")
    (tmp_path / "weight.yaml").write_text("data: {train: [x]}\noptim: {soft_tissue_weight: -1}\n")
    with pytest.raises(LowdoseError, match="soft_tissue_weight must be 0 or more"):
        TrainConfig.from_yaml(tmp_path / "weight.yaml")
    (tmp_path / "select.yaml").write_text("data: {train: [x]}\noptim: {selection: best}\n")
    with pytest.raises(LowdoseError, match="optim.selection must be 'val_psnr' or 'last', not 'best'"):
        TrainConfig.from_yaml(tmp_path / "select.yaml")


def test_selection_last_ships_the_last_epoch_with_its_own_figures(tmp_path):
    raw = json.loads(json.dumps(TINY))
    raw["output_dir"] = str(tmp_path / "run")
    raw["data"]["train"] = [str(shared("totalsegmentator/pulmonary_report_ct_cropped.nii.gz"))]
    raw["data"]["validation"] = [str(shared("totalsegmentator/example_ct_sm.nii.gz"))]
    raw["optim"].update(epochs=2, estimator_epochs=0, selection="last")
    history = train(TrainConfig.from_dict(raw), progress=False, bundle_dir=tmp_path / "bundle")
    meta = json.loads((tmp_path / "bundle" / "configs" / "metadata.json").read_text())
    assert meta["training"]["best_epoch"] == 2
    assert meta["validation"]["val_psnr_abdomen"] == history["epochs"][1]["val_psnr_abdomen"]
    assert "| epoch shipped | 2 of 2 (the last) |" in (tmp_path / "bundle" / "docs" / "README.md").read_text()


def test_a_zero_dose_loss_weight_holds_the_dose_estimator_of_the_bundle_fine_tuned(tiny_run, tmp_path):
    """``optim.dose_loss_weight: 0`` fine-tunes the denoiser of ``init_bundle`` and ships its dose estimator exactly
    as it came (not even weight decay moves it); with the default weight both change."""
    from lowdose.bundle import load_checkpoint

    root, _, _ = tiny_run
    states = {}
    for weight in (0.0, 1.0):
        raw = json.loads(json.dumps(TINY))
        raw["output_dir"] = str(tmp_path / f"run_{weight:g}")
        raw["init_bundle"] = str(root / "bundle")
        raw["data"]["train"] = [str(shared("totalsegmentator/pulmonary_report_ct_cropped.nii.gz"))]
        raw["optim"].update(epochs=1, estimator_epochs=0, dose_loss_weight=weight)
        train(TrainConfig.from_dict(raw), progress=False, bundle_dir=tmp_path / f"bundle_{weight:g}")
        states[weight] = load_checkpoint(tmp_path / f"bundle_{weight:g}" / "models" / "model.pt")
    before = load_checkpoint(root / "bundle" / "models" / "model.pt")
    for name, tensor in before["dose_estimator"].items():
        assert torch.equal(states[0.0]["dose_estimator"][name], tensor), name
    assert any(not torch.equal(states[1.0]["dose_estimator"][k], v) for k, v in before["dose_estimator"].items())
    assert any(not torch.equal(states[0.0]["network"][k], v) for k, v in before["network"].items())


def test_a_bundle_fine_tuned_with_noise_conditioning_ships_it_and_denoises_with_it(tiny_run, tmp_path):
    """Adding ``noise_conditioning`` to a trained dose-conditioned bundle's network is a fine-tune (the new
    embedding starts at zero, everything else loads); the exported bundle keeps the argument, its noise embedding
    has learnt something, and lowdose denoises with it, HU and geometry kept."""
    import dataclasses

    from lowdose import sample_ct_path
    from lowdose.bundle import load_checkpoint

    root, _, _ = tiny_run
    raw = json.loads(json.dumps(TINY))
    raw["output_dir"] = str(tmp_path / "run")
    raw["init_bundle"] = str(root / "bundle")
    raw["network"]["kwargs"]["noise_conditioning"] = True
    raw["data"]["train"] = [str(shared("totalsegmentator/pulmonary_report_ct_cropped.nii.gz"))]
    raw["optim"].update(epochs=1, estimator_epochs=0, dose_loss_weight=0.0)
    train(TrainConfig.from_dict(raw), progress=False, bundle_dir=tmp_path / "bundle")
    state = load_checkpoint(tmp_path / "bundle" / "models" / "model.pt")["network"]
    assert state["noise_embedding.mlp.2.weight"].abs().sum() > 0  # trained away from its zero start
    denoiser = Denoiser(tmp_path / "bundle", device="cpu")
    assert denoiser.model.network.noise_embedding is not None
    whole = load_ct(sample_ct_path())
    volume = dataclasses.replace(whole, hu=whole.hu[8:11])
    result = denoiser(volume, dose=0.25)
    assert result.volume.hu.shape == volume.hu.shape and np.isfinite(result.volume.hu).all()
    assert np.array_equal(result.volume.spacing_mm, volume.spacing_mm)
    assert np.array_equal(result.volume.origin_mm, volume.origin_mm)
    assert not np.array_equal(result.volume.hu, volume.hu)


def test_export_bundle_writes_a_model_card_from_the_run(tiny_run, tmp_path):
    from lowdose.networks import count_parameters

    root, _, history = tiny_run
    export_bundle(root / "run" / "checkpoint_best.pt", tmp_path / "exported", history=history)
    denoiser = Denoiser(tmp_path / "exported", device="cpu")
    assert denoiser.model.dose_estimator is not None
    card = (tmp_path / "exported" / "docs" / "README.md").read_text()
    assert card.startswith("# exported")
    assert f"| parameters | {count_parameters(denoiser.model.network) / 1e6:.3f} M |" in card
    assert "## Intended use" in card and "## Limits" in card and "pulmonary_report_ct_cropped" in card
    # the log excerpt is the run's own per-epoch record
    assert f"val_psnr_abdomen={history['epochs'][0]['val_psnr_abdomen']:.4f}" in card
    assert history["epochs"][-1]["cpu_minutes"] > 0 and history["epochs"][-1]["wall_minutes"] > 0
    assert json.loads((tmp_path / "exported" / "docs" / "history.json").read_text())["epochs"] == history["epochs"]


def test_simulation_pool_shares_doses_and_is_simulated_once(tmp_path):
    """A pool of N runs holds the doses in equal shares; later epochs reuse the cached simulations."""
    from lowdose.bundle import DEFAULT_NORMALISATION
    from lowdose.training.data import PairSampler, load_sources

    source = load_sources([str(shared("totalsegmentator/pulmonary_report_ct_cropped.nii.gz"))], "simulated")
    sampler = PairSampler(
        source,
        [0.5, 0.25, 0.1],
        3,
        DEFAULT_NORMALISATION,
        48,
        2,
        16,
        0.2,
        seed=1,
        cache_dir=str(tmp_path / "cache"),
        pool_size=3,
    )
    assert sorted(dose for _, dose, _ in sampler.pool) == [0.1, 0.25, 0.5]
    first = sampler.epoch(0)
    cached = sorted((tmp_path / "cache").iterdir())
    assert 1 <= len(cached) <= 3
    second = sampler.epoch(1)
    for _ in range(4):
        sampler.epoch(2)
    assert len(list((tmp_path / "cache").iterdir())) <= 3  # never more simulations than pool entries
    assert {round(float(item["dose"]), 6) for item in first + second} <= {0.5, 0.25, 0.1}
    assert first[0]["low"].shape == (3, 48, 48) and first[0]["normal"].shape == (1, 48, 48)


def test_lowdose_checkpoints_hold_only_what_weights_only_loading_reads(tiny_run, tmp_path):
    """Every file lowdose saves loads with torch's weights_only loader and nothing allowed besides; numpy
    scalars, paths and dataclasses are turned into plain types when saving."""
    import dataclasses
    from pathlib import Path

    import torch

    from lowdose.bundle import atomic_torch_save, load_checkpoint

    root, config, history = tiny_run
    for path in (
        root / "run" / "checkpoint_last.pt",
        root / "run" / "checkpoint_best.pt",
        root / "bundle" / "models" / "model.pt",
    ):
        state = torch.load(path, map_location="cpu", weights_only=True)
        assert "network" in state and all(isinstance(v, torch.Tensor) for v in state["network"].values()), path
    last = load_checkpoint(root / "run" / "checkpoint_last.pt")
    assert last["history"]["epochs"][0]["val_psnr_abdomen"] == history["epochs"][0]["val_psnr_abdomen"]

    @dataclasses.dataclass
    class Record:
        psnr: float

    atomic_torch_save(
        {
            "psnr": np.float64(31.5),
            "epoch": np.int64(3),
            "folder": Path("/data/ct"),
            "figures": np.array([1.0, 2.0]),
            "record": Record(np.float32(2.5)),
            "doses": {0.25},
        },
        tmp_path / "c.pt",
    )
    state = torch.load(tmp_path / "c.pt", weights_only=True)
    assert state["psnr"] == 31.5 and type(state["psnr"]) is float and type(state["epoch"]) is int
    assert state["folder"] == "/data/ct" and state["record"] == {"psnr": 2.5} and state["doses"] == [0.25]
    assert torch.equal(state["figures"], torch.tensor([1.0, 2.0], dtype=torch.float64))


def test_a_checkpoint_that_runs_code_is_refused_by_resume_export_and_load(tiny_run, tmp_path):
    """A crafted checkpoint (its pickle creates a marker file) handed to `lowdose train --resume`, to
    export_bundle and as a bundle's weights is refused, naming the file; the marker never appears."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import torch

    from lowdose.bundle import load_bundle

    root, _, _ = tiny_run
    marker = tmp_path / "the_pickle_ran"
    real = torch.load(root / "run" / "checkpoint_last.pt", map_location="cpu", weights_only=True)
    raw = json.loads(json.dumps(TINY))
    raw["output_dir"] = str(tmp_path / "run")
    raw["data"]["train"] = [str(shared("totalsegmentator/pulmonary_report_ct_cropped.nii.gz"))]
    (tmp_path / "run").mkdir()
    (tmp_path / "train.yaml").write_text(yaml.safe_dump(raw))
    crafted = write_crafted_checkpoint(tmp_path / "run" / "checkpoint_last.pt", marker, real)
    assert unsafe_load_runs_the_payload(crafted, marker)  # the control: the old loader would have run it

    lowdose = Path(sys.executable).parent / "lowdose"
    result = subprocess.run(
        [str(lowdose), "train", str(tmp_path / "train.yaml"), "--resume", "--quiet"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1, result.stderr
    [line] = [line for line in result.stderr.splitlines() if "error" in line]
    assert line.startswith(f"lowdose train: error: {crafted}: refused: the checkpoint holds ")
    assert "Traceback" not in result.stderr
    assert not marker.exists()

    with pytest.raises(LowdoseError, match=f"{crafted}: refused"):
        export_bundle(crafted, tmp_path / "bundle")
    assert not marker.exists() and not (tmp_path / "bundle" / "models" / "model.pt").exists()

    shutil.copytree(root / "bundle", tmp_path / "evil_bundle")
    weights = tmp_path / "evil_bundle" / "models" / "model.pt"
    write_crafted_checkpoint(weights, marker, torch.load(weights, weights_only=True), key="note")
    with pytest.raises(LowdoseError, match=f"{weights}: refused"):
        load_bundle(tmp_path / "evil_bundle")
    assert not marker.exists()


def test_training_pairs_can_carry_each_series_own_noise(tmp_path):
    """data.match_source: the sampler calibrates the simulator once per series (kernel, noise level) and its
    patches carry that noise; the config switch parses and an unknown key is still refused."""
    from lowdose.bundle import DEFAULT_NORMALISATION
    from lowdose.errors import LowdoseError
    from lowdose.training import TrainConfig
    from lowdose.training.data import PairSampler, load_sources

    series = str(shared("lungpetctdx_A0001_philips/kernel_L"))
    config = TrainConfig.from_dict({"data": {"train": [series], "match_source": True}})
    assert config.data.match_source is True
    with pytest.raises(LowdoseError, match="unknown key"):
        TrainConfig.from_dict({"data": {"train": [series], "match_sources": True}})
    source = load_sources([series], "simulated")
    sampler = PairSampler(source, [0.25], 3, DEFAULT_NORMALISATION, 64, 2, 2, 0.2, seed=1, match_source=True)
    [model] = sampler.noise_models
    assert model and model.source_std_hu > 20  # a sharp lung kernel: ~39 HU in soft tissue
    items = sampler.epoch(0)
    assert items and items[0]["low"].shape == (3, 64, 64)
