"""Anatomy-aware training: lowdose's anatomy encoder, ASCON's MAC loss, ALDEN's discriminator and semantic
contrastive loss, BioAtt attention, each switched on from a training config and run from the CLI.

The networks trained here are tiny and trained for seconds on real CT and real TotalSegmentator label
maps: the tests prove the machinery (losses, switches, bundles, inference with BioAtt), not what each
method buys, which benchmarks/anatomy.py measures.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from lowdose.anatomy import ANATOMY_GROUPS, group_of, load_anatomy_encoder, to_groups
from lowdose.bundle import available_models, load_bundle
from lowdose.denoise import Denoiser
from lowdose.errors import LowdoseError
from lowdose.fidelity.segmenter import total_class_names
from lowdose.labels import load_label_map
from lowdose.training import TrainConfig
from lowdose.training.anatomy_losses import AnatomyAwareAdversary, MACLoss, SemanticContrastiveLoss, discriminator_view

from .conftest import SAMPLE_DICOM, SAMPLE_SEG, shared
from .test_training import TINY


def _lowdose(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lowdose.cli", *args], capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def encoder_bundle(tmp_path_factory):
    """A tiny anatomy encoder trained from the CLI on TotalSegmentator's example CT and label map."""
    root = tmp_path_factory.mktemp("anatomy")
    config = {
        "task": "anatomy_encoder",
        "name": "tiny_anatomy",
        "output_dir": "run",
        "seed": 1,
        "device": "cpu",
        "images": [str(shared("totalsegmentator/example_ct_sm.nii.gz"))],
        "labels": [str(shared("totalsegmentator/example_seg.nii.gz"))],
        "validation_images": [str(SAMPLE_DICOM)],
        "validation_labels": [str(SAMPLE_SEG)],
        "in_plane_spacing_mm": 3.0,
        "doses": [1.0, 0.25],
        "epochs": 2,
        "batch_size": 8,
        "network_kwargs": {"features": [8, 16, 16, 16]},
    }
    (root / "anatomy.yaml").write_text(yaml.safe_dump(config))
    result = _lowdose("train", str(root / "anatomy.yaml"), "--bundle", str(root / "tiny_anatomy"), "--quiet")
    assert result.returncode == 0, result.stderr
    return root / "tiny_anatomy"


def test_every_totalsegmentator_structure_has_an_anatomy_group(sample_volume):
    names = total_class_names()
    assert len(names) == 117
    assert {group_of(n) for n in names.values()} == set(ANATOMY_GROUPS)
    with pytest.raises(KeyError):
        group_of("flux_capacitor")
    labels, _ = load_label_map(SAMPLE_SEG, sample_volume)
    groups = to_groups(labels, names)
    liver = [k for k, v in names.items() if v == "liver"][0]
    assert np.array_equal(groups == 1, labels == liver)  # liver is group 1, nothing else is
    assert set(np.unique(groups)) >= {0, 1, 2, 9, 10}  # background, liver, spleen, bone, muscle in the sample


def test_anatomy_encoder_trains_from_the_cli_into_a_bundle(encoder_bundle):
    meta = json.loads((encoder_bundle / "configs" / "metadata.json").read_text())
    assert meta["lowdose_kind"] == "anatomy_encoder" and meta["network"]["name"] == "anatomy_encoder"
    assert 0 <= meta["validation"]["val_mean_dice"] <= 1 and "liver" in meta["validation"]["val_dice"]
    card = (encoder_bundle / "docs" / "README.md").read_text()
    assert "| liver |" in card and "lowdose train" in card and "Limits" in card
    history = json.loads((encoder_bundle / "docs" / "history.json").read_text())
    assert [e["epoch"] for e in history["epochs"]] == [1, 2]
    assert history["epochs"][1]["loss"] < history["epochs"][0]["loss"] * 1.5  # finite, not diverging
    # Not a denoiser: never listed or served as one.
    with pytest.raises(LowdoseError, match="anatomy encoder bundle, not a denoising model"):
        load_bundle(encoder_bundle)
    assert "anatomy_encoder" not in available_models()


def test_lowdose_encoder_gives_differentiable_features_and_organ_presence(encoder_bundle, sample_volume):
    encoder = load_anatomy_encoder(str(encoder_bundle))
    assert not any(p.requires_grad for p in encoder.parameters())
    hu = torch.from_numpy(sample_volume.hu[8:10, None, 100:228, 100:228].copy()).requires_grad_()
    features = encoder.features(hu)
    assert [f.shape[-1] for f in features] == [64, 32, 16, 8]
    sum(f.sum() for f in features).backward()
    assert hu.grad is not None and hu.grad.abs().sum() > 0
    presence = encoder.organ_presence(hu.detach())
    assert presence.shape == (2, len(ANATOMY_GROUPS)) and ((presence >= 0) & (presence <= 1)).all()
    assert encoder.segment(hu.detach()).shape == (2, 128, 128)
    with pytest.raises(LowdoseError, match="timm:<model name>:<checkpoint file>"):
        load_anatomy_encoder("timm:resnet18")


def test_mac_loss_prefers_the_normal_dose_and_updates_its_ema_target(sample_volume):
    torch.manual_seed(0)
    mac = MACLoss(pixel_points=256)
    normal = torch.from_numpy(sample_volume.hu[10:12, None, 150:246, 150:246].copy()) / 1000
    noisy = normal + 0.05 * torch.randn_like(normal)
    torch.manual_seed(1)
    loss_same = mac(normal, normal)
    torch.manual_seed(1)
    loss_noisy = mac(noisy.requires_grad_(), normal)
    assert torch.isfinite(loss_noisy) and loss_same < loss_noisy
    loss_noisy.backward()
    assert noisy.grad.abs().sum() > 0 and mac.online.stem[0].weight.grad is not None
    assert all(not p.requires_grad for p in mac.target.parameters())
    with torch.no_grad():
        for p in mac.online.parameters():
            p.add_(1.0)
    before = mac.target.stem[0].weight.clone()
    mac.update_target()
    moved = mac.target.stem[0].weight - before
    assert torch.allclose(moved, 0.01 * (mac.online.stem[0].weight - before), atol=1e-5)  # EMA 0.99


def test_semantic_contrastive_loss_pulls_to_normal_and_pushes_from_low(encoder_bundle, sample_volume):
    from lowdose import simulate_low_dose

    encoder = load_anatomy_encoder(str(encoder_bundle))
    loss = SemanticContrastiveLoss(encoder)
    normal = torch.from_numpy(sample_volume.hu[9:10, None].copy())
    low = torch.from_numpy(simulate_low_dose(sample_volume.slices(8, 11), 0.1, seed=0).hu[1:2, None].copy())
    assert float(loss(normal, normal, low)) == pytest.approx(0.0, abs=1e-6)
    halfway = 0.5 * (normal + low)
    assert 0 < float(loss(halfway, normal, low)) < float(loss(low, normal, low))


ALL_ON = {"mac_weight": 0.1, "adversarial_weight": 0.01, "semantic_contrastive_weight": 0.1, "bioatt": True}


@pytest.fixture(scope="module")
def anatomy_run(encoder_bundle, tmp_path_factory):
    """A tiny dose_unet trained from the CLI with all four anatomy-aware terms on."""
    root = tmp_path_factory.mktemp("anatomy_run")
    raw = json.loads(json.dumps(TINY))
    raw.update(output_dir="run", anatomy={"encoder": str(encoder_bundle), **ALL_ON})
    raw["optim"].update(epochs=1, estimator_epochs=0)
    raw["data"]["train"] = [str(shared("totalsegmentator/pulmonary_report_ct_cropped.nii.gz"))]
    raw["data"]["validation"] = [str(shared("totalsegmentator/example_ct_sm.nii.gz"))]
    (root / "train.yaml").write_text(yaml.safe_dump(raw))
    result = _lowdose("train", str(root / "train.yaml"), "--bundle", str(root / "bundle"), "--quiet")
    assert result.returncode == 0, result.stderr
    return root


def test_alden_discriminator_learns_to_tell_smoothed_from_normal_dose_texture():
    """The discriminator must be able to see texture: normal-dose-like patches (soft tissue with 10 HU white
    noise) against the same kind of patches smoothed as a denoiser would (the noise blurred to ~3 HU), same
    mean HU. Anatomy features are fixed random maps: this checks the discriminator's view, not the encoder."""
    from scipy import ndimage

    rng = np.random.default_rng(0)
    torch.manual_seed(0)

    def patches(smooth: bool) -> torch.Tensor:
        noise = rng.normal(0, 10, (8, 1, 32, 32))
        if smooth:
            noise = ndimage.gaussian_filter(noise, (0, 0, 1.0, 1.0)) * 3.5
        return torch.tensor(40 + noise, dtype=torch.float32)

    normal = patches(False)
    view = discriminator_view(normal)
    assert view.shape == (8, 2, 32, 32) and float(view[:, 0].mean()) == pytest.approx(-0.05, abs=0.01)
    assert float(view[:, 1].std()) > 0.5  # 10 HU of noise is ~1 unit of the high-pass channel
    features = [torch.randn(8, c, 32 // 2**i, 32 // 2**i) for i, c in enumerate((8, 8, 8))]
    adversary = AnatomyAwareAdversary(None, [8, 8, 8])
    optimiser = torch.optim.AdamW(adversary.discriminator.parameters(), lr=5e-4, betas=(0.5, 0.999))
    losses = []
    for _ in range(60):
        loss = adversary.discriminator_loss(patches(True), patches(False), features)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    assert np.mean(losses[:5]) > 0.2 and np.mean(losses[-10:]) < 0.1, (losses[:5], losses[-10:])
    fooled = adversary.generator_loss(patches(True), features)
    assert float(fooled) > 0.5  # the generator is told its smoothed output does not pass as normal dose


def test_all_anatomy_terms_train_from_the_cli_and_are_recorded(anatomy_run):
    history = json.loads((anatomy_run / "run" / "history.json").read_text())
    record = history["epochs"][0]
    terms = ["mac_loss", "semantic_contrastive_loss", "adversarial_loss", "discriminator_loss"]
    for key in terms:
        assert np.isfinite(record[key]) and record[key] > 0, key
    assert list(record)[:7] == ["epoch", "loss", "dose_loss", *terms]  # history.json's order, as before the engine
    meta = json.loads((anatomy_run / "bundle" / "configs" / "metadata.json").read_text())
    assert len(meta["anatomy_aware_training"]["enabled"]) == 4
    assert meta["network"]["kwargs"]["organ_attention"] == len(ANATOMY_GROUPS)
    assert meta["anatomy_encoder"]["source"] == "tiny_anatomy"
    card = (anatomy_run / "bundle" / "docs" / "README.md").read_text()
    assert "ASCON MAC loss, ALDEN anatomy-aware discriminator, ALDEN semantic contrastive loss, BioAtt" in card
    state = torch.load(anatomy_run / "run" / "checkpoint_last.pt", weights_only=True)
    assert {"mac", "discriminator", "discriminator_optimiser"} <= set(state["anatomy"])  # resumable


def test_bioatt_bundle_denoises_with_its_shipped_encoder(anatomy_run, sample_volume):
    model = load_bundle(anatomy_run / "bundle")
    assert model.anatomy_encoder is not None
    hu = torch.from_numpy(sample_volume.hu[5:7, None].copy())
    probabilities = model.organ_probabilities(hu)
    assert probabilities.shape == (2, len(ANATOMY_GROUPS))
    # The attention was trained (it starts as the identity): other organ probabilities, another output.
    x = torch.from_numpy(np.stack([sample_volume.hu[4:7], sample_volume.hu[5:8]]) / 1000).float()
    with torch.no_grad():
        a = model.network(x, 0.25, organ_probabilities=probabilities)
        b = model.network(x, 0.25, organ_probabilities=1 - probabilities)
        with pytest.raises(ValueError, match="organ_probabilities"):
            model.network(x, 0.25)
    assert (a - b).abs().max() > 0
    volume = sample_volume.slices(0, 6)
    out = Denoiser(str(anatomy_run / "bundle"), device="cpu")(volume, dose=0.25).volume
    assert out.shape == volume.shape and out.spacing_mm == volume.spacing_mm
    assert np.array_equal(out.direction, volume.direction) and np.isfinite(out.hu).all()
    assert 20 < np.abs(out.hu).mean() < 2000  # HU out, not normalised values


def test_bioatt_training_patches_carry_the_organ_prior_of_their_whole_slice():
    """At inference BioAtt reads organ presence from whole slices; training patches must carry the same."""
    from lowdose.bundle import DEFAULT_NORMALISATION
    from lowdose.training.data import PairSampler, load_sources

    source = load_sources([str(shared("totalsegmentator/pulmonary_report_ct_cropped.nii.gz"))], "simulated")
    sampler = PairSampler(source, [0.25], 3, DEFAULT_NORMALISATION, 48, 2, 4, 0.2, seed=1)
    seen = []

    def prior(hu):
        seen.append(hu.shape)
        return np.array([float(hu.mean()), len(seen)], np.float32)

    items = sampler.epoch(0, slice_prior=prior)
    assert seen and all(shape == source.normal[0].shape[1:] for shape in seen)  # whole slices, not patches
    assert all(item["low"].shape == (3, 48, 48) for item in items)
    assert len({tuple(item["organ_probabilities"]) for item in items}) == len(seen)  # one prior per slice
    assert "organ_probabilities" not in sampler.epoch(0)[0]


def test_bioatt_fine_tunes_from_a_bundle_without_attention(encoder_bundle, tmp_path):
    from lowdose.training import train

    base = dict(json.loads(json.dumps(TINY)), output_dir=str(tmp_path / "base"))
    base["data"]["train"] = [str(shared("totalsegmentator/pulmonary_report_ct_cropped.nii.gz"))]
    base["optim"].update(epochs=1, estimator_epochs=0)
    train(TrainConfig.from_dict(base), progress=False, bundle_dir=tmp_path / "plain")
    tuned = dict(
        json.loads(json.dumps(base)),
        output_dir=str(tmp_path / "tuned"),
        init_bundle=str(tmp_path / "plain"),
        anatomy={"encoder": str(encoder_bundle), "bioatt": True},
    )
    history = train(TrainConfig.from_dict(tuned), progress=False, bundle_dir=tmp_path / "tuned_bundle")
    assert np.isfinite(history["epochs"][0]["loss"])
    card = (tmp_path / "tuned_bundle" / "docs" / "README.md").read_text()
    from lowdose.training.model_card import repository_relative  # paths as a reader of the repository has them

    assert f"Fine-tuned from the bundle `{repository_relative(str(tmp_path / 'plain'))}`" in card
    assert "BioAtt organ-prior attention" in card
    other = dict(json.loads(json.dumps(tuned)), output_dir=str(tmp_path / "other"))
    other["network"]["kwargs"]["features"] = [8, 32]
    with pytest.raises(LowdoseError, match="fine-tuning needs the same"):
        train(TrainConfig.from_dict(other), progress=False)


def test_anatomy_config_errors_are_clear():
    good = json.loads(json.dumps(TINY))
    good["data"]["train"] = ["x"]
    with pytest.raises(LowdoseError, match="unknown key.*anatomy"):
        TrainConfig.from_dict({**good, "anatomy": {"mac": 0.1}})
    with pytest.raises(LowdoseError, match="0 \\(off\\) or positive"):
        TrainConfig.from_dict({**good, "anatomy": {"mac_weight": -1}})
    redcnn = dict(good, network={"name": "redcnn", "kwargs": {}, "dose_estimator": False})
    with pytest.raises(LowdoseError, match="bioatt needs the dose_unet"):
        TrainConfig.from_dict({**redcnn, "anatomy": {"bioatt": True}})
    assert TrainConfig.from_dict(good).anatomy.enabled == []


def test_train_command_rejects_an_unknown_task(tmp_path):
    (tmp_path / "c.yaml").write_text("task: segmentation\n")
    result = _lowdose("train", str(tmp_path / "c.yaml"))
    assert result.returncode != 0 and "task must be denoising or anatomy_encoder" in result.stderr
