"""External anatomy encoders (lowdose/anatomy/external.py): TotalSegmentator's nnU-Net encoder and timm backbones.

TotalSegmentator's downloadable weights cannot exist here (no internet; they are the user's). The tiny
randomly initialised nnU-Net v2 model of tests/fidelity_fixtures.py stands in for them, written in
TotalSegmentator's folder layout in a temporary weights folder named by TOTALSEG_WEIGHTS_PATH, so the real
code path runs: plans.json / dataset.json -> nnU-Net's PlansManager and get_network_from_plans ->
checkpoint_final.pth -> encoder. Its features are meaningless; loading, shapes, normalisation, gradients
and errors are what is tested. timm backbones are made here with random weights and saved as the user's
checkpoint files would be.
"""

from __future__ import annotations

import argparse
import shutil

import numpy as np
import pytest
import torch

import lowdose
from lowdose import LowdoseError
from lowdose.anatomy.encoders import load_anatomy_encoder
from lowdose.anatomy.external import TimmEncoder, TotalSegmentatorEncoder
from lowdose.fidelity.segmenter import TotalSegmentatorWeightsError

from .checkpoint_fixtures import unsafe_load_runs_the_payload, write_crafted_checkpoint
from .fidelity_fixtures import write_tiny_totalsegmentator_weights


@pytest.fixture(scope="module")
def slices():
    """Slices 10 and 0 of the bundled sample CT, central 128x128 crops, as [2, 1, 128, 128] HU."""
    hu = lowdose.load_ct(lowdose.sample_ct_path()).hu
    return torch.from_numpy(np.ascontiguousarray(hu[[10, 0], 192:320, 192:320])).unsqueeze(1).float()


@pytest.fixture(scope="module")
def small_slices(slices):
    """The central 64x64 of ``slices``: enough for a timm backbone's five stages, and quick."""
    return slices[:, :, 32:96, 32:96].contiguous()


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """A weights folder holding the tiny stand-ins for TotalSegmentator's fast and full ``total`` models."""
    weights = tmp_path_factory.mktemp("totalseg") / "weights"
    write_tiny_totalsegmentator_weights(weights, fast=True)
    write_tiny_totalsegmentator_weights(weights, fast=False)
    return weights


@pytest.fixture
def totalseg_env(tiny_weights, tmp_path, monkeypatch):
    monkeypatch.setenv("TOTALSEG_WEIGHTS_PATH", str(tiny_weights))
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path / "home"))
    return tiny_weights


# ------------------------------------------------------------------------------------------ TotalSegmentator


def test_totalsegmentator_encoder_is_the_checkpoints_encoder(totalseg_env, slices, tmp_path):
    encoder = load_anatomy_encoder("totalsegmentator")
    assert isinstance(encoder, TotalSegmentatorEncoder)
    info = encoder.describe()
    assert "Dataset297" in info["model_folder"] and info["weights_dir_from"] == "TOTALSEG_WEIGHTS_PATH"
    assert info["mode"] == "fast" and info["network"] == "PlainConvUNet"
    # The encoder holds exactly the checkpoint's encoder weights (built by nnU-Net, then loaded).
    checkpoint = torch.load(encoder.model_folder / "fold_0" / "checkpoint_final.pth", weights_only=True)
    expected = {k[len("encoder.") :]: v for k, v in checkpoint["network_weights"].items() if k.startswith("encoder.")}
    state = encoder.encoder.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in state)
    assert not any(p.requires_grad for p in encoder.parameters())
    assert not encoder.training
    # Nothing was written into TotalSegmentator's home (no config.json, no download folder).
    assert not (tmp_path / "home").exists()

    hu = slices.clone().requires_grad_()
    maps = encoder.features(hu)
    assert [m.shape for m in maps] == [(2, 4, 128, 128), (2, 8, 64, 64)]
    assert all(torch.isfinite(m).all() for m in maps)
    sum(m.sum() for m in maps).backward()
    assert hu.grad is not None and hu.grad.abs().sum() > 0
    # Same weights, different slices -> different features.
    assert not torch.allclose(maps[0][0], maps[0][1]) and not torch.allclose(maps[1][0], maps[1][1])


def test_totalsegmentator_normalisation_and_sizes(totalseg_env, slices):
    encoder = TotalSegmentatorEncoder(fast=True)
    # CTNormalization from plans.json: clip to the 0.5 / 99.5 percentiles (-1000 / 1500 HU in the stand-in).
    assert encoder.normalisation == {"lower_hu": -1000.0, "upper_hu": 1500.0, "mean_hu": 40.0, "std_hu": 300.0}
    with torch.no_grad():
        maps = encoder.features(slices)
        clipped = encoder.features(slices.clamp(-1000, 1500))
        shifted = encoder.features(slices + 100)
    assert all(torch.allclose(a, b) for a, b in zip(maps, clipped))
    assert not torch.allclose(maps[0], shifted[0])
    # A batch gives each slice what it gives alone.
    with torch.no_grad():
        alone = encoder.features(slices[1:])
    assert all(torch.allclose(a[1:], b, atol=1e-5) for a, b in zip(maps, alone))
    # The slice reaches the 3-D network one voxel deep and turned to canonical RAS (rows and columns reversed,
    # TotalSegmentator's orientation); the maps come back in the slice's own orientation.
    normalised = (slices.clamp(-1000, 1500) - 40) / 300
    with torch.no_grad():
        direct = encoder.encoder(normalised.flip(-2, -1).unsqueeze(2))
    assert all(torch.allclose(a, b[:, :, 0].flip(-2, -1), atol=1e-5) for a, b in zip(maps, direct))
    # Sizes that are not a multiple of the stride (2 here) are padded, never cropped.
    with torch.no_grad():
        odd = encoder.features(slices[:1, :, :37, :50])
    assert [tuple(m.shape[-2:]) for m in odd] == [(38, 50), (19, 25)]
    with pytest.raises(LowdoseError, match=r"\[B, 1, H, W\]"):
        encoder.features(slices[:, 0])


def test_totalsegmentator_full_mode_uses_the_organs_model(totalseg_env, slices):
    encoder = load_anatomy_encoder("totalsegmentator:full")
    assert "Dataset291" in str(encoder.model_folder)
    assert encoder.describe()["mode"] == "full"
    maps = encoder.features(slices)
    assert len(maps) == 2 and all(m.dim() == 4 for m in maps)
    # Its weights are those of Dataset291's checkpoint.
    checkpoint = torch.load(encoder.model_folder / "fold_0" / "checkpoint_final.pth", weights_only=True)
    assert torch.equal(
        encoder.encoder.state_dict()["stages.0.0.convs.0.conv.weight"],
        checkpoint["network_weights"]["encoder.stages.0.0.convs.0.conv.weight"],
    )
    with pytest.raises(LowdoseError, match="totalsegmentator:fast or totalsegmentator:full"):
        load_anatomy_encoder("totalsegmentator:huge")


def test_missing_totalsegmentator_weights_say_how_to_install_them(tmp_path, monkeypatch):
    monkeypatch.setenv("TOTALSEG_WEIGHTS_PATH", str(tmp_path / "weights"))
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path / "home"))
    with pytest.raises(TotalSegmentatorWeightsError) as fast:
        load_anatomy_encoder("totalsegmentator")
    message = str(fast.value)
    assert isinstance(fast.value, LowdoseError) and "\n" not in message
    for part in (
        str(tmp_path / "weights" / "Dataset297_TotalSegmentator_total_3mm_1559subj"),
        "is missing",
        "totalseg_download_weights -t total_fast",
        "TOTALSEG_WEIGHTS_PATH",
        "lowdose never downloads",
        "nnUNetTrainer_4000epochs_NoMirroring__nnUNetPlans__3d_fullres/fold_0/checkpoint_final.pth",
    ):
        assert part in message
    with pytest.raises(
        TotalSegmentatorWeightsError,
        match=r"Dataset291_TotalSegmentator_part1_organs_1559subj.*" r"totalseg_download_weights -t total`",
    ):
        load_anatomy_encoder("totalsegmentator:full")
    # weights_dir overrides the environment, and is named as the source.
    with pytest.raises(TotalSegmentatorWeightsError, match=r"from weights_dir"):
        TotalSegmentatorEncoder(weights_dir=tmp_path / "elsewhere")
    assert not (tmp_path / "home").exists()


def test_damaged_totalsegmentator_checkpoint_is_named(tiny_weights, tmp_path):
    weights = tmp_path / "weights"
    shutil.copytree(
        tiny_weights / "Dataset297_TotalSegmentator_total_3mm_1559subj",
        weights / "Dataset297_TotalSegmentator_total_3mm_1559subj",
    )
    [checkpoint] = weights.glob("*/*/fold_0/checkpoint_final.pth")
    checkpoint.write_bytes(checkpoint.read_bytes()[:1000])
    with pytest.raises(LowdoseError, match=str(checkpoint)):
        TotalSegmentatorEncoder(weights_dir=weights)


def _copy_fast_model(tiny_weights, tmp_path):
    weights = tmp_path / "weights"
    shutil.copytree(
        tiny_weights / "Dataset297_TotalSegmentator_total_3mm_1559subj",
        weights / "Dataset297_TotalSegmentator_total_3mm_1559subj",
    )
    [checkpoint] = weights.glob("*/*/fold_0/checkpoint_final.pth")
    return weights, checkpoint


def test_totalsegmentator_checkpoint_as_nnunet_saves_it_loads_without_unpickling_code(tiny_weights, tmp_path):
    """nnU-Net v2's trainer saves more than weights: optimiser and grad-scaler state, its training log and
    best EMA Dice as numpy float64, and its arguments with a torch.device. All of it loads with torch's
    weights_only loader once numpy scalars (and nothing else) are allowed."""
    from lowdose.bundle import nnunet_checkpoint_globals

    weights, path = _copy_fast_model(tiny_weights, tmp_path)
    checkpoint = torch.load(path, weights_only=True)
    network_weights = checkpoint["network_weights"]
    parameters = [torch.nn.Parameter(v.float()) for v in network_weights.values() if v.is_floating_point()]
    optimiser = torch.optim.SGD(parameters, lr=0.01, momentum=0.99, nesterov=True)
    sum(p.sum() for p in parameters).backward()
    optimiser.step()
    dice = np.array([0.8, np.nan, 0.6])
    checkpoint.update(
        {
            "optimizer_state": optimiser.state_dict(),
            "grad_scaler_state": None,
            "logging": {
                "mean_fg_dice": [np.nanmean(dice)],
                "ema_fg_dice": [np.float64(0.7)],
                "dice_per_class_or_region": [[np.float64(d) for d in dice]],
                "train_losses": [np.mean(np.array([0.5, 0.25], dtype=np.float32))],
                "lrs": [0.01],
                "epoch_start_timestamps": [1.0],
                "epoch_end_timestamps": [2.0],
            },
            "_best_ema": np.float64(0.7),
        }
    )
    checkpoint["init_args"]["device"] = torch.device("cpu")
    torch.save(checkpoint, path)
    with pytest.raises(Exception, match="numpy"):  # torch alone refuses numpy scalars: the allowance is needed
        torch.load(path, weights_only=True)
    with torch.serialization.safe_globals(nnunet_checkpoint_globals()):
        assert torch.load(path, weights_only=True)["_best_ema"] == 0.7
    encoder = TotalSegmentatorEncoder(weights_dir=weights)
    expected = {k[len("encoder.") :]: v for k, v in network_weights.items() if k.startswith("encoder.")}
    assert all(torch.equal(encoder.encoder.state_dict()[k], expected[k]) for k in expected)


def test_totalsegmentator_checkpoint_that_runs_code_is_refused(tiny_weights, tmp_path):
    weights, path = _copy_fast_model(tiny_weights, tmp_path)
    marker = tmp_path / "the_pickle_ran"
    real = torch.load(path, weights_only=True)
    write_crafted_checkpoint(path, marker, real, key="init_args")
    assert unsafe_load_runs_the_payload(path, marker)  # as nnU-Net itself (weights_only=False) would load it
    with pytest.raises(LowdoseError, match=f"{path}: refused: the checkpoint holds io.open") as info:
        TotalSegmentatorEncoder(weights_dir=weights)
    assert "\n" not in str(info.value)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------------ timm


def _timm_input(hu: torch.Tensor, channels: int = 1) -> torch.Tensor:
    """What the encoder should feed the backbone: [-1000, 1000] HU -> [0, 1] -> ImageNet mean/std averaged."""
    x = ((hu.clamp(-1000, 1000) + 1000) / 2000 - np.mean([0.485, 0.456, 0.406])) / np.mean([0.229, 0.224, 0.225])
    return x.float().repeat(1, channels, 1, 1)


@pytest.mark.parametrize("channels", [1, 3])
def test_timm_encoder_loads_the_checkpoint(tmp_path, small_slices, channels):
    import timm

    torch.manual_seed(channels)
    model = timm.create_model("resnet18", pretrained=False, num_classes=10, in_chans=channels).eval()
    path = tmp_path / "resnet18.pth"
    torch.save(model.state_dict(), path)  # the full classifier: fc.* is not used by features_only

    encoder = load_anatomy_encoder(f"timm:resnet18:{path}")
    assert isinstance(encoder, TimmEncoder) and encoder.in_chans == channels
    assert encoder.describe()["checkpoint"] == str(path)
    assert not any(p.requires_grad for p in encoder.parameters())
    hu = small_slices.clone().requires_grad_()
    maps = encoder.features(hu)
    assert [m.shape[1:] for m in maps] == [(64, 32, 32), (64, 16, 16), (128, 8, 8), (256, 4, 4), (512, 2, 2)]
    # The saved model itself (timm's forward_intermediates) gives the same maps: the weights were loaded.
    with torch.no_grad():
        expected = model.forward_intermediates(_timm_input(small_slices, channels), intermediates_only=True)
    assert len(expected) == len(maps)
    for got, want in zip(maps, expected):
        torch.testing.assert_close(got.detach(), want, rtol=1e-4, atol=1e-4)
    sum(m.sum() for m in maps).backward()
    assert hu.grad is not None and hu.grad.abs().sum() > 0
    # A random backbone of the same architecture gives other maps.
    other = timm.create_model("resnet18", pretrained=False, features_only=True, in_chans=channels).eval()
    with torch.no_grad():
        assert not torch.allclose(other(_timm_input(small_slices, channels))[-1], maps[-1].detach(), atol=1e-3)


def test_timm_checkpoint_formats(tmp_path, small_slices):
    import timm
    from safetensors.torch import save_file

    model = timm.create_model("convnext_atto", pretrained=False, in_chans=1).eval()
    with torch.no_grad():
        expected = model.forward_intermediates(_timm_input(small_slices), intermediates_only=True)
    # A timm training checkpoint: wrapped, DDP prefix, run arguments pickled alongside.
    wrapped = tmp_path / "checkpoint.pth.tar"
    torch.save(
        {
            "epoch": 3,
            "arch": "convnext_atto",
            "args": argparse.Namespace(lr=0.1),
            "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()},
        },
        wrapped,
    )
    tensors = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tensors))
    # A features_only model's own state dict (its keys are renamed: stem.0 -> stem_0), loaded by timm's
    # own pretrained-weights code from the local file.
    features = tmp_path / "features.pt"
    feature_model = timm.create_model(
        "convnext_atto", pretrained=True, features_only=True, in_chans=1, pretrained_cfg_overlay={"file": str(tensors)}
    )
    assert "stem_0.weight" in feature_model.state_dict()
    torch.save(feature_model.state_dict(), features)
    for path in (wrapped, features, tensors):
        encoder = load_anatomy_encoder(f"timm:convnext_atto:{path}")
        with torch.no_grad():
            maps = encoder.features(small_slices)
        assert len(maps) == len(expected) == 4
        for got, want in zip(maps, expected):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_wrong_timm_checkpoints_are_refused_naming_the_file(tmp_path):
    import timm

    resnet34 = tmp_path / "resnet34.pth"
    torch.save(timm.create_model("resnet34", pretrained=False, in_chans=1).state_dict(), resnet34)
    with pytest.raises(LowdoseError, match=rf"{resnet34}: not a checkpoint of timm's resnet18.*not in that"):
        TimmEncoder("resnet18", resnet34)
    resnet18 = tmp_path / "resnet18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False, in_chans=1).state_dict(), resnet18)
    with pytest.raises(LowdoseError, match=rf"{resnet18}: .*weights are missing"):
        TimmEncoder("resnet34", resnet18)
    with pytest.raises(LowdoseError, match=rf"{resnet18}: not a checkpoint of timm's mobilenetv3_small_050"):
        TimmEncoder("mobilenetv3_small_050", resnet18)  # shares a few names (bn1.*), lacks most
    wide = tmp_path / "wide.pth"  # same keys, other widths
    torch.save(timm.create_model("resnet18d", pretrained=False, in_chans=1).state_dict(), wide)
    with pytest.raises(LowdoseError, match=rf"{wide}: "):
        TimmEncoder("resnet18", wide)
    unrelated = tmp_path / "unrelated.pth"
    torch.save({"weight": torch.zeros(3), "step": 5}, unrelated)
    with pytest.raises(LowdoseError, match=rf"{unrelated}: .*none of its"):
        TimmEncoder("resnet18", unrelated)
    no_tensors = tmp_path / "no_tensors.pth"
    torch.save({"epoch": 1}, no_tensors)
    with pytest.raises(LowdoseError, match=rf"{no_tensors}: holds no state dict"):
        TimmEncoder("resnet18", no_tensors)
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    with pytest.raises(LowdoseError, match=rf"{garbage}: not a readable PyTorch weights file"):
        TimmEncoder("resnet18", garbage)


def test_timm_spec_errors(tmp_path):
    missing = tmp_path / "nowhere.pth"
    with pytest.raises(LowdoseError, match=rf"{missing}: timm checkpoint file not found"):
        load_anatomy_encoder(f"timm:resnet18:{missing}")
    with pytest.raises(LowdoseError, match=r"timm:<model name>:<checkpoint file>"):
        load_anatomy_encoder("timm:resnet18")
    with pytest.raises(LowdoseError, match=r"unknown timm model 'resnt18'.*timm.list_models\('\*resnet\*'\)"):
        load_anatomy_encoder(f"timm:resnt18:{missing}")
