"""The shipped models under models/: complete MONAI bundles that load, denoise, and are documented.

Denoising quality against the other methods is measured by benchmarks/denoising.py; here each shipped
bundle is checked as a user receives it.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lowdose import load_ct, sample_ct_path, simulate_low_dose
from lowdose.bundle import DEFAULT_MODEL, MODELS_DIR, Bundle, available_models
from lowdose.metrics import compare

SHIPPED = available_models()


def test_the_default_model_is_shipped():
    assert DEFAULT_MODEL in SHIPPED, f"models/{DEFAULT_MODEL} is missing; shipped: {SHIPPED}"


@pytest.mark.parametrize("name", SHIPPED)
def test_bundle_is_complete_small_and_documented(name):
    folder = MODELS_DIR / name
    meta = json.loads((folder / "configs" / "metadata.json").read_text())
    assert (folder / "models" / "model.pt").stat().st_size <= 20e6
    assert (folder / "configs" / "inference.json").is_file() and (folder / "configs" / "train.yaml").is_file()
    assert meta["training"]["validation_series"] and meta["training"]["train_series"]
    assert not set(meta["training"]["validation_series"]) & set(meta["training"]["train_series"])
    # on its held-out series the model is better than the low-dose input it was given
    assert meta["validation"]["val_psnr_abdomen"] > meta["validation"]["val_input_psnr_abdomen"] + 1.0
    card = (folder / "docs" / "README.md").read_text()
    for section in (
        "## Intended use",
        "## Limits",
        "## How it was trained",
        "lowdose train",
        "GFLOPs per 512x512 slice",
    ):
        assert section in card, f"{name} model card lacks {section!r}"


def test_default_model_denoises_a_held_out_quarter_dose_scan_with_its_own_dose_estimate():
    from lowdose.denoise import Denoiser

    normal = load_ct(sample_ct_path())
    normal = normal.slices(8, 12)
    # the scanner's own noise at a quarter of its dose (the simulator's fixed model adds more: it reads ~0.1)
    low = simulate_low_dose(normal, 0.25, seed=7, match_source=True)
    denoiser = Denoiser(DEFAULT_MODEL, device="cpu")
    result = denoiser(low, dose="auto")
    out = result.volume
    before, after = compare(normal, low), compare(normal, out)
    assert after["psnr_abdomen"] > before["psnr_abdomen"] + 1.0
    assert after["soft_tissue_noise_std_hu"] < 0.7 * before["soft_tissue_noise_std_hu"]
    assert abs(after["soft_tissue_mean_shift_hu"]) < 5.0  # HU kept
    assert 0.15 < result.dose_fraction < 0.4 and result.dose_source == "estimated" and result.dose_estimated
    assert result.model == DEFAULT_MODEL and result.device == "cpu" and result.seconds > 0
    shipped = Bundle.find(DEFAULT_MODEL)
    assert result.model_version == shipped.version != "unknown"
    assert result.description == (
        f"lowdose denoised ({DEFAULT_MODEL} {shipped.version}, dose {result.dose_fraction:.3g} estimated)"
    )
    # the weights that made it, traceable whatever the bundle folder is called
    assert result.weights_sha256 == hashlib.sha256(shipped.weights.read_bytes()).hexdigest()
    assert result.summary()["weights_sha256"] == result.weights_sha256
    assert out.spacing_mm == low.spacing_mm and out.origin_mm == low.origin_mm


def test_models_command_lists_the_shipped_models():
    result = subprocess.run(
        [str(Path(sys.executable).parent / "lowdose"), "models"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    lines = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    assert "anatomy encoder" in lines.pop("anatomy_encoder")  # listed apart: not a denoiser
    assert set(lines) == set(SHIPPED)
    assert "(default)" in lines[DEFAULT_MODEL] and "conditioned, estimated" in lines[DEFAULT_MODEL]
    assert f" {Bundle.find(DEFAULT_MODEL).version} " in lines[DEFAULT_MODEL]  # which version is installed
    assert np.isfinite(float(lines[DEFAULT_MODEL].split(" dB")[0].split()[-1]))


def test_anatomy_encoder_is_shipped_documented_and_segments_the_sample():
    """The anatomy encoder that anatomy-aware training and the ablation read: a complete bundle whose groups
    match TotalSegmentator's label map of the sample (in-sample: the sample is one of its two training series)."""
    from lowdose.anatomy import to_groups
    from lowdose.bundle import available_models as kinds
    from lowdose.fidelity.segmenter import AnatomyGroupSegmenter, total_class_names
    from lowdose.labels import load_label_map
    from lowdose.training.anatomy_encoder import dice_per_group

    assert kinds("anatomy_encoder") == ["anatomy_encoder"] and "anatomy_encoder" not in SHIPPED
    folder = MODELS_DIR / "anatomy_encoder"
    assert (folder / "models" / "model.pt").stat().st_size <= 20e6 and (folder / "configs" / "train.yaml").is_file()
    card = (folder / "docs" / "README.md").read_text()
    for section in ("## What it is for", "## Limits", "## How it was trained", "lowdose train", "| liver |"):
        assert section in card
    volume = load_ct(sample_ct_path())
    truth = to_groups(
        load_label_map(MODELS_DIR.parent / "sample" / "abdomen_ct_totalseg.nii.gz", volume)[0], total_class_names()
    )
    dice = dice_per_group(AnatomyGroupSegmenter().segment(volume), truth)
    assert dice["liver"] > 0.5 and dice["bone"] > 0.3, dice


def _crop(volume, y: slice, x: slice):
    """In-plane crop with its true geometry (origin moved to the first kept voxel)."""
    from lowdose import CTVolume

    offset = volume.direction @ (np.array([x.start, y.start, 0], dtype=float) * np.array(volume.spacing_mm))
    return CTVolume(
        hu=volume.hu[:, y, x].copy(),
        spacing_mm=volume.spacing_mm,
        origin_mm=tuple(np.array(volume.origin_mm) + offset),
        direction=volume.direction.copy(),
        metadata={"format": "nifti"},
    )


def test_every_model_listed_as_a_denoiser_denoises():
    """What `lowdose models` lists as denoisers, and only that, takes a low-dose CT to one closer to the normal
    dose: each on a 3x64x64 crop (liver and soft tissue) of the sample at a simulated quarter dose. The anatomy
    encoder is listed apart and refused as a denoiser."""
    from lowdose.denoise import Denoiser
    from lowdose.errors import LowdoseError

    result = subprocess.run(
        [str(Path(sys.executable).parent / "lowdose"), "models"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    rows = [line.split()[0] for line in result.stdout.splitlines()[1:]]
    listed = [name for name, line in zip(rows, result.stdout.splitlines()[1:]) if "anatomy encoder" not in line]
    assert sorted(listed) == sorted(SHIPPED) and len(listed) >= 4
    normal = load_ct(sample_ct_path()).slices(9, 12)
    low = simulate_low_dose(normal, 0.25, seed=11)
    window = (slice(224, 288), slice(224, 288))
    normal, low = _crop(normal, *window), _crop(low, *window)
    low_error = float(np.sqrt(np.mean((low.hu - normal.hu) ** 2)))
    for name in listed:
        out = Denoiser(name, device="cpu")(low, dose=0.25).volume
        error = float(np.sqrt(np.mean((out.hu - normal.hu) ** 2)))
        assert out.shape == low.shape == (3, 64, 64) and out.origin_mm == low.origin_mm, name
        assert error < 0.9 * low_error, (name, error, low_error)  # closer to the normal dose than its input
    for name in rows:
        if name not in listed:
            with pytest.raises(LowdoseError, match="not a denoising model"):
                Denoiser(name, device="cpu")


def test_models_lists_damaged_and_non_denoising_bundles_apart(tmp_path, monkeypatch, capsys):
    """A bundle whose metadata is unreadable or whose weights are missing is not offered as a denoiser."""
    import shutil

    import lowdose.bundle
    from lowdose.cli import main

    shutil.copytree(MODELS_DIR / "redcnn", tmp_path / "redcnn")
    shutil.copytree(MODELS_DIR / "anatomy_encoder", tmp_path / "anatomy_encoder")
    shutil.copytree(MODELS_DIR / "redcnn", tmp_path / "no_weights")
    (tmp_path / "no_weights" / "models" / "model.pt").unlink()
    shutil.copytree(MODELS_DIR / "redcnn", tmp_path / "broken")
    (tmp_path / "broken" / "configs" / "metadata.json").write_text("{not json")
    monkeypatch.setattr(lowdose.bundle, "MODELS_DIR", tmp_path)
    assert available_models() == ["redcnn"]
    assert main(["models"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()[1:]}
    assert set(rows) == {"redcnn", "anatomy_encoder", "no_weights", "broken"}
    meta = json.loads((MODELS_DIR / "redcnn" / "configs" / "metadata.json").read_text())
    assert rows["redcnn"].split()[1:3] == [meta["version"], meta["network"]["name"]] and " dB" in rows["redcnn"]
    assert "anatomy encoder" in rows["anatomy_encoder"]
    assert "damaged bundle" in rows["no_weights"] and "damaged bundle" in rows["broken"]


def test_bundle_is_the_one_reader_of_a_models_metadata(tmp_path):
    import shutil

    from lowdose.errors import LowdoseError

    bundle = Bundle.find(DEFAULT_MODEL)
    meta = json.loads((MODELS_DIR / DEFAULT_MODEL / "configs" / "metadata.json").read_text())
    assert bundle.folder == MODELS_DIR / DEFAULT_MODEL and bundle.name == meta["name"] and bundle.kind == "denoiser"
    assert bundle.network_name == meta["network"]["name"] and bundle.network_kwargs == meta["network"]["kwargs"]
    assert bundle.dose_conditioning and bundle.dose_estimator == meta["dose_estimator"]
    assert bundle.normalisation == meta["normalisation"] and bundle.validation == meta["validation"]
    assert bundle.created_by is None and bundle.weights.is_file()
    encoder = Bundle.find("anatomy_encoder")
    assert encoder.kind == "anatomy_encoder" and len(encoder.groups) == 11

    copy = Bundle.read(shutil.copytree(bundle.folder, tmp_path / "copy")).with_metadata(lowdose_created_by="finetune")
    assert Bundle.read(tmp_path / "copy").created_by == copy.created_by == "finetune"
    assert (
        Bundle.all_in(tmp_path) == {"copy": Bundle.read(tmp_path / "copy")} and Bundle.all_in(tmp_path, "damaged") == {}
    )
    (tmp_path / "copy" / "models" / "model.pt").unlink()
    assert Bundle.read(tmp_path / "copy").kind == "damaged" and Bundle.all_in(tmp_path) == {}
    (tmp_path / "copy" / "configs" / "metadata.json").write_text("{not json")
    with pytest.raises(LowdoseError, match="copy: damaged model bundle"):
        Bundle.read(tmp_path / "copy")


def test_the_data_road_is_offered_at_the_top_of_the_package():
    """load_ct -> simulate_low_dose -> denoise -> save_ct from ``lowdose`` itself; ``lowdose.denoise`` stays callable
    after the engine module of that name is imported (the package attribute then is the module)."""
    import lowdose

    normal = lowdose.load_ct(lowdose.sample_ct_path()).slices(9, 11)
    low = lowdose.simulate_low_dose(normal, 0.25, seed=3)
    first = lowdose.denoise(low, dose=0.25, device="cpu")
    again = lowdose.denoise(low, dose=0.25, device="cpu")
    assert isinstance(first, lowdose.DenoiseResult) and np.array_equal(first.volume.hu, again.volume.hu)
    assert first.dose_source == "given" and first.description == (
        f"lowdose denoised ({DEFAULT_MODEL} {first.model_version}, dose 0.25 given)"
    )


def test_default_model_reads_the_dose_of_a_single_slice_in_plane():
    """Issue 18: the shipped estimator reads one slice's own noise. A lone simulated quarter-dose slice reads
    as low dose (a 2.5-D estimator read a lone slice as ~1), and routine scans of other scanners, kernels and
    thicknesses read as routine, a volume and one of its slices alike: a held-out 8 mm Siemens B40f, a 3 mm Philips
    head-and-neck C, a 5 mm GE abdomen. The noise-variance bound (lowdose.dose) lifts the held-out 1 mm Philips D
    routine volume, which the network alone reads as 0.38, to 1. Not met, and said in the model card: the held-out
    5 mm Toshiba FC17 chest reads 0.26 (its "uniform" patches hold lung texture: 25 HU for a smooth kernel), and
    the noisiest routine scans (sharp B70f, 1 mm B45f) still read as 0.1-0.4."""
    from lowdose.denoise import Denoiser

    from .conftest import shared

    denoiser = Denoiser(DEFAULT_MODEL, device="cpu")
    assert denoiser.model.dose_estimator_in_plane
    normal = load_ct(sample_ct_path()).slices(10, 11)
    low = simulate_low_dose(normal, 0.25, seed=3, match_source=True)
    result = denoiser(low, dose="auto")
    assert 0.15 <= result.dose_fraction <= 0.4, result.dose_fraction
    assert result.dose_detail.startswith("read by the model from the in-plane noise of 1 slice"), result.dose_detail
    for series in (
        "lungpetctdx_A0002_siemens/B40f",
        "hnpetct_HN-CHUS-052_philips",
        "crlm_1006_ge",
    ):
        volume = load_ct(shared(series))
        middle = volume.shape[0] // 2
        assert denoiser.estimate_dose(volume) > 0.8, series
        assert denoiser.estimate_dose(volume.slices(middle, middle + 1)) > 0.8, series
    lidc = load_ct(shared("lidc_idri_0314_philips"))
    assert float(np.median(denoiser.dose_estimates(lidc))) < 0.45 < 0.55 < denoiser.estimate_dose(lidc)
    assert "noise 20 HU in" in denoiser.read_dose(lidc)[1]
