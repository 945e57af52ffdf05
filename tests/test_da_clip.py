"""lowdose's DA-CLIP: the encoder's outputs, its two contrastive losses, the region labels from real
TotalSegmentator label maps and the series table, and a tiny training through `lowdose train` into a bundle.

The model trained here is tiny and trained for seconds on real CT: the test proves the machinery (data, losses,
engine, bundle), not the encoder's quality, which benchmarks/da_clip.py measures.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
import yaml

from lowdose.anatomy import REGIONS, DoseAnatomyReader, known_series_regions, region_of_structures, slice_regions
from lowdose.bundle import Bundle, available_models
from lowdose.io import load_ct
from lowdose.labels import load_label_map
from lowdose.networks import build_network
from lowdose.totalseg import total_class_names
from lowdose.training.da_clip import dose_rank_contrastive_loss, source_regions, supervised_contrastive_loss

from .conftest import SAMPLE_DICOM, SAMPLE_SEG, shared
from .test_dose_diffusion import TINY, TINY_KWARGS


def test_embeddings_are_unit_norm_of_the_right_shapes_and_read_the_centre_slice():
    torch.manual_seed(0)
    network = build_network("da_clip", embedding_dim=32).eval()
    x = 0.25 + 0.02 * torch.randn(3, 3, 96, 80)
    out = network(x)
    assert out.dose_embedding.shape == (3, 32) and out.region_embedding.shape == (3, 32)
    assert out.log_dose.shape == (3,) and out.region_logits.shape == (3, len(REGIONS)) == (3, 5)
    for embedding in (out.dose_embedding, out.region_embedding):
        assert torch.allclose(embedding.norm(dim=1), torch.ones(3), atol=1e-5)
    assert (out.log_dose <= 0).all() and set(out.region()) <= set(REGIONS)
    centre = network(x[:, 1:2])  # a 2.5-D slab is read by its centre slice, in-plane only
    assert torch.allclose(centre.dose_embedding, out.dose_embedding, atol=1e-6)


def _on_a_circle(log_dose: torch.Tensor) -> torch.Tensor:
    """Unit vectors whose angle grows with log dose: embeddings ordered by dose."""
    angle = (log_dose - log_dose.min()) / (log_dose.max() - log_dose.min()) * math.pi / 2
    return torch.stack([angle.cos(), angle.sin()], dim=1)


def test_ordinal_dose_loss_prefers_embeddings_ordered_by_dose():
    doses = torch.tensor([1 / 2, 1 / 4, 1 / 6, 1 / 10, 1 / 20] * 4)
    log_dose = doses.log()
    ordered = dose_rank_contrastive_loss(_on_a_circle(log_dose), log_dose)
    generator = torch.Generator().manual_seed(0)
    shuffled = [
        float(dose_rank_contrastive_loss(_on_a_circle(log_dose[torch.randperm(20, generator=generator)]), log_dose))
        for _ in range(5)
    ]
    assert float(ordered) < min(shuffled)
    # only the order matters: the embeddings of 1/2 and 1/4 swapped is worse than the right order
    swapped = log_dose.clone()
    swapped[doses == 1 / 2], swapped[doses == 1 / 4] = math.log(1 / 4), math.log(1 / 2)
    assert float(ordered) < float(dose_rank_contrastive_loss(_on_a_circle(swapped), log_dose))


def test_supervised_contrastive_loss_prefers_region_clusters_and_ignores_unknown_regions():
    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([0, 2, 3, 4] * 5)
    centres = torch.nn.functional.normalize(torch.randn(5, 16, generator=generator), dim=1)
    clustered = torch.nn.functional.normalize(centres[labels] + 0.05 * torch.randn(20, 16, generator=generator), dim=1)
    scattered = torch.nn.functional.normalize(torch.randn(20, 16, generator=generator), dim=1)
    assert float(supervised_contrastive_loss(clustered, labels)) < float(supervised_contrastive_loss(scattered, labels))
    unknown = torch.cat([labels, torch.full((4,), -1)])
    with_unknown = torch.cat([clustered, scattered[:4]])
    assert torch.isclose(
        supervised_contrastive_loss(with_unknown, unknown), supervised_contrastive_loss(clustered, labels)
    )


def test_region_rule_on_real_totalsegmentator_label_maps():
    names = total_class_names()
    for ct, seg in (
        (shared("totalsegmentator/example_ct_sm.nii.gz"), shared("totalsegmentator/example_seg.nii.gz")),
        (SAMPLE_DICOM, SAMPLE_SEG),
    ):
        volume = load_ct(ct)
        labels, _ = load_label_map(seg, volume)
        regions = slice_regions(labels, names, volume.spacing_mm[0] * volume.spacing_mm[1])
        assert len(regions) == volume.shape[0]
        assert regions.count("abdomen") == len(regions), regions  # both are upper-abdomen scans
        assert source_regions(volume, str(seg)) == regions
    # the liver dome under large lungs is chest, lung bases beside a large liver are abdomen
    assert region_of_structures({"liver": 3000.0, "lung_lower_lobe_left": 9000.0, "heart": 500.0}) == "chest"
    assert region_of_structures({"liver": 15000.0, "lung_lower_lobe_right": 2000.0}) == "abdomen"
    assert region_of_structures({"brain": 12000.0}) == "head"
    assert region_of_structures({"vertebrae_C5": 600.0, "thyroid_gland": 400.0}) == "neck"
    assert region_of_structures({"hip_left": 2000.0, "colon": 900.0}) == "pelvis"
    assert region_of_structures({"hip_left": 2000.0, "kidney_left": 900.0}) == "abdomen"
    assert region_of_structures({"liver": 40.0}) is None  # a speck is not a structure in the slice


def test_series_without_a_label_map_take_their_regions_from_the_table():
    head = load_ct(shared("dcmqa_ge_head"))
    assert set(source_regions(head)) == {"head"}
    mixed = known_series_regions(shared("tcia_pancreatic_ct_cbct_seg"), 134)
    assert mixed is not None and (mixed[0], mixed[60], mixed[133]) == ("pelvis", "abdomen", "chest")
    assert known_series_regions("/elsewhere/some_series", 10) is None
    assert known_series_regions(shared("covid19_ny_sbu_slices/A046441/19010101-23.dcm"), 1) == ["chest"]


def _lowdose(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lowdose.cli", *args], capture_output=True, text=True, cwd=cwd)


@pytest.fixture(scope="module")
def tiny_da_clip(tmp_path_factory):
    """A tiny DA-CLIP trained by `lowdose train` on three real series (chest and abdomen; head held out)."""
    root = tmp_path_factory.mktemp("da_clip")
    config = {
        "name": "tiny_da_clip",
        "output_dir": "run",
        "seed": 1,
        "device": "cpu",
        "data": {
            "train": [
                str(shared("lungmask_chest")),
                str(shared("totalsegmentator/pulmonary_report_ct_cropped.nii.gz")),
                str(shared("totalsegmentator/example_ct_sm.nii.gz")),
                str(shared("dcmqa_ge_head")),  # held out below: none of its slices may be trained on
            ],
            "validation": [str(SAMPLE_DICOM)],
            "doses": [0.5, 0.25, 0.1, 0.05],
            "validation_doses": [0.25],
            "slices_per_epoch": 32,
            "simulation_pool": 16,
            "validation_slices": 2,
            "patch_size": 64,
        },
        "network": {
            "name": "da_clip",
            "kwargs": {"embedding_dim": 16, "noise_filters": 4, "dose_features": [8, 16], "region_features": [8, 16]},
            "dose_estimator": False,
        },
        "optim": {"epochs": 6, "batch_size": 16, "learning_rate": 0.003},
        "da_clip": {
            "label_maps": {
                str(shared("totalsegmentator/example_ct_sm.nii.gz")): str(
                    shared("totalsegmentator/example_seg.nii.gz")
                ),
                str(SAMPLE_DICOM): str(SAMPLE_SEG),
            },
            "held_out_regions": ["head"],
        },
    }
    (root / "train.yaml").write_text(yaml.safe_dump(config))
    result = _lowdose("train", str(root / "train.yaml"), "--bundle", str(root / "bundle"), "--quiet", cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return root


def test_tiny_training_through_lowdose_train_lowers_the_loss_and_holds_the_head_out(tiny_da_clip):
    history = json.loads((tiny_da_clip / "run" / "history.json").read_text())
    losses = [e["loss"] for e in history["epochs"]]
    assert len(losses) == 6 and all(np.isfinite(losses))
    assert np.mean(losses[-2:]) < losses[0]
    trained = history["trained_slices_by_region"]
    assert trained["head"] == 0 and "head" not in history["training_slices_by_region"]  # listed, and held out
    assert trained["abdomen"] > 0 and trained["chest"] > 0
    last = history["epochs"][-1]
    assert 0 <= last["val_region_accuracy"] <= 1 and last["val_dose_median_rel_error"] >= 0
    assert history["config"]["network"]["name"] == "da_clip" and history["config"]["da_clip"]["held_out_regions"]
    calibrated = history["after_batch_norm_calibration"]  # the batch norms' statistics made afresh, then scored
    assert 0 <= calibrated["val_region_accuracy"] <= 1 and calibrated["val_dose_median_rel_error"] >= 0
    assert Bundle.read(tiny_da_clip / "bundle").validation == calibrated  # the shipped weights' own figures


def test_the_exported_bundle_loads_and_reads_a_volume(tiny_da_clip):
    bundle = Bundle.read(tiny_da_clip / "bundle")
    assert bundle.kind == "da_clip" and bundle.metadata["regions"] == list(REGIONS)
    assert bundle.metadata["training"]["held_out_regions"] == ["head"]
    assert "dose_embedding" in bundle.metadata["network_data_format"]["outputs"]
    assert (tiny_da_clip / "bundle" / "docs" / "README.md").read_text().startswith("# bundle: lowdose's DA-CLIP")
    inference = json.loads((tiny_da_clip / "bundle" / "configs" / "inference.json").read_text())
    assert "DoseAnatomyReader" in inference["reader"]
    reader = DoseAnatomyReader(tiny_da_clip / "bundle")
    volume = load_ct(shared("totalsegmentator/example_ct_sm.nii.gz"))
    out = reader.embed(volume.hu[:3])
    assert out.dose_embedding.shape == (3, 16)
    assert torch.allclose(out.region_embedding.norm(dim=1), torch.ones(3), atol=1e-5)
    read = reader.read_volume(volume)
    assert len(read["slice_regions"]) == volume.shape[0] and 0 < read["dose_fraction"] <= 1
    assert "bundle" not in available_models()  # not a denoiser: `lowdose models` does not list it


def test_region_conditioned_diffusion_trains_on_labelled_patches_and_ships_the_encoder(tiny_da_clip):
    """DA-Diff with region conditioning: training patches carry their slice's one-hot region from the label map,
    the bundle ships the DA-CLIP encoder named in ``diffusion.region_encoder``, and at inference the encoder's
    region probabilities of each slice reach the network (the output moves when they are withheld)."""
    from lowdose.denoise import Denoiser
    from lowdose.training.da_clip import labelled_regions
    from lowdose.training.data import PairSampler, load_sources

    source = load_sources([str(SAMPLE_DICOM)], "simulated")
    regions = labelled_regions(source.normal, {str(SAMPLE_DICOM.resolve()): str(SAMPLE_SEG.resolve())})
    assert set(regions[0].tolist()) <= {REGIONS.index("abdomen"), REGIONS.index("pelvis"), REGIONS.index("chest")}
    sampler = PairSampler(
        source, [0.25], 3, {"hu_min": -1024.0, "hu_max": 3071.0, "scale_hu": 1000.0}, 48, 2, 8, 0.2, 3,
        regions=regions,
    )  # fmt: skip
    items = sampler.epoch(0)
    assert items and all(item["region"].sum() == 1 and item["region"].shape == (len(REGIONS),) for item in items)
    assert {int(np.argmax(item["region"])) for item in items} <= set(regions[0].tolist())

    root = tiny_da_clip / "diffusion"
    root.mkdir()
    config = {  # dose_diffusion's tiny run, with region conditioning and no dose estimator
        **TINY,
        "name": "tiny_region_diffusion",
        "data": {**TINY["data"], "doses": [0.25]},
        "network": {
            "name": "dose_diffusion",
            "kwargs": {**TINY_KWARGS, "dose_conditioning": True, "region_classes": len(REGIONS)},
            "dose_estimator": False,
        },
        "diffusion": {
            "label_maps": {str(SAMPLE_DICOM): str(SAMPLE_SEG)},
            "region_encoder": str(tiny_da_clip / "bundle"),
        },
        "optim": {"epochs": 1, "batch_size": 8, "learning_rate": 3e-3},
    }
    (root / "train.yaml").write_text(yaml.safe_dump(config))
    result = _lowdose("train", str(root / "train.yaml"), "--bundle", str(root / "bundle"), "--quiet", cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    bundle = Bundle.read(root / "bundle")
    assert bundle.region_encoder is not None and bundle.region_encoder["name"] == "da_clip"
    assert bundle.region_encoder["source"] == "bundle" and bundle.network_kwargs["region_classes"] == len(REGIONS)

    denoiser = Denoiser(root / "bundle", device="cpu")
    sample = load_ct(SAMPLE_DICOM)
    low = dataclasses.replace(sample, hu=sample.hu[8:11].copy(), slice_positions_mm=None)
    centre = torch.from_numpy(low.hu[:, None])
    probabilities = denoiser.model.region_probabilities(centre)
    assert probabilities is not None and probabilities.shape == (3, len(REGIONS))
    torch.testing.assert_close(probabilities.sum(1), torch.ones(3))
    with_regions = denoiser(low, dose=0.25).volume.hu
    denoiser.model.region_encoder = None  # the same network, told nothing of the region
    assert not np.array_equal(with_regions, denoiser(low, dose=0.25).volume.hu)
