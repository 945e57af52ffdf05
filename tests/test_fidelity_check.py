"""The fidelity check end to end: CT in -> TotalSegmentator -> label maps -> comparison -> JSON/HTML report.

TotalSegmentator's downloaded weights cannot exist here (no internet; they are the user's). A tiny randomly
initialised nnU-Net v2 model (tests/fidelity_fixtures.py) is written in their place, in a temporary
weights folder named by TOTALSEG_WEIGHTS_PATH, so the real code path runs: lowdose -> TotalSegmentator's
Python API -> nnU-Net -> label map on the CT's grid. Its labels are meaningless; the plumbing, the
geometry, the files and the offline behaviour are what is tested.
"""

from __future__ import annotations

import argparse
import json
import re
import socket

import numpy as np
import pytest

from lowdose import CTInputError, CTVolume, LowdoseError, save_ct
from lowdose.fidelity import (
    SCHEMA_VERSION,
    TotalSegmentatorSegmenter,
    TotalSegmentatorWeightsError,
    check_fidelity,
    load_label_map,
)
from lowdose.fidelity.command import FAIL_EXIT_STATUS, add_parser
from lowdose.fidelity.segmenter import (
    LPS_TO_RAS,
    SegmenterError,
    ct_to_nifti,
    ensure_usage_statistics_off,
    resolve_device,
)

from .conftest import SAMPLE_SEG
from .fidelity_fixtures import write_tiny_totalsegmentator_weights


@pytest.fixture(scope="module")
def tiny_totalsegmentator(tmp_path_factory):
    """A TotalSegmentator home and weights folder holding the tiny fast-mode model (Dataset297)."""
    home = tmp_path_factory.mktemp("totalseg_home")
    weights = home / "weights"
    write_tiny_totalsegmentator_weights(weights, fast=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TOTALSEG_HOME_DIR", str(home))
        mp.setenv("TOTALSEG_WEIGHTS_PATH", str(weights))
        yield home


@pytest.fixture(scope="module")
def small_sample(sample_volume):
    """The sample at half its in-plane resolution (256x256x20, 1.95x1.95x2 mm), to keep the tests quick."""
    nz, ny, nx = sample_volume.shape
    hu = sample_volume.hu.reshape(nz, ny // 2, 2, nx // 2, 2).mean(axis=(2, 4))
    sx, sy, sz = sample_volume.spacing_mm
    # Each new voxel is the centre of a 2x2 block of old ones.
    origin = np.asarray(sample_volume.origin_mm) + sample_volume.direction @ np.array([sx / 2, sy / 2, 0.0])
    return CTVolume(hu, (2 * sx, 2 * sy, sz), tuple(origin), sample_volume.direction.copy())


@pytest.fixture(scope="module")
def scans(small_sample, tmp_path_factory):
    """The small sample as normal-dose reference, a noisier 'low-dose' copy and a smoothed 'denoised' one."""
    from scipy.ndimage import gaussian_filter

    folder = tmp_path_factory.mktemp("scans")
    rng = np.random.default_rng(0)
    low = small_sample.with_hu(small_sample.hu + rng.normal(0, 30, small_sample.shape).astype(np.float32))
    denoised = low.with_hu(gaussian_filter(low.hu, (0, 0.7, 0.7)))
    paths = {
        "original": folder / "low.nii.gz",
        "denoised": folder / "denoised.nii.gz",
        "reference": folder / "normal.nii.gz",
    }
    save_ct(low, paths["original"], dtype="float32")
    save_ct(denoised, paths["denoised"], dtype="float32")
    save_ct(small_sample, paths["reference"])
    return paths


def _parser():
    parser = argparse.ArgumentParser(prog="lowdose")
    add_parser(parser.add_subparsers(dest="command", required=True))
    return parser


@pytest.fixture
def no_network(monkeypatch):
    """Record and refuse every attempt to reach another host (local pipes and Unix sockets still work)."""
    attempts = []
    real_connect = socket.socket.connect

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            attempts.append(address)
            raise OSError("network blocked by the test")
        return real_connect(self, address)

    def getaddrinfo(host, *args, **kwargs):
        attempts.append(host)
        raise socket.gaierror("name lookup blocked by the test")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return attempts


def test_missing_weights_say_how_to_install_them(tmp_path, monkeypatch, sample_volume):
    monkeypatch.setenv("TOTALSEG_WEIGHTS_PATH", str(tmp_path / "weights"))
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path / "home"))
    with pytest.raises(TotalSegmentatorWeightsError) as fast:
        TotalSegmentatorSegmenter(fast=True, device="cpu", progress=False).segment(sample_volume)
    message = str(fast.value)
    assert "\n" not in message
    for part in (
        str(tmp_path / "weights" / "Dataset297_TotalSegmentator_total_3mm_1559subj"),
        "is missing",
        "TOTALSEG_WEIGHTS_PATH",
        "totalseg_download_weights -t total_fast",
        "nnUNetTrainer_4000epochs_NoMirroring__nnUNetPlans__3d_fullres/fold_0/checkpoint_final.pth",
        "lowdose never downloads",
    ):
        assert part in message
    with pytest.raises(
        TotalSegmentatorWeightsError,
        match=r"Dataset291_TotalSegmentator_part1_organs_1559subj.*" r"totalseg_download_weights -t total`",
    ):
        TotalSegmentatorSegmenter(fast=False, device="cpu").check_weights()
    # A half-copied folder is named as incomplete, not missing.
    (tmp_path / "weights" / "Dataset297_TotalSegmentator_total_3mm_1559subj").mkdir(parents=True)
    with pytest.raises(TotalSegmentatorWeightsError, match="is incomplete"):
        TotalSegmentatorSegmenter(fast=True).check_weights()
    # Nothing was attempted: no download folder made, no model started.
    assert not (tmp_path / "home").exists()
    # The command fails the same way before reading any scan.
    args = _parser().parse_args(
        [
            "fidelity",
            "--original",
            "nowhere.nii.gz",
            "--denoised",
            "nowhere.nii.gz",
            "--out",
            str(tmp_path / "out"),
            "--device",
            "cpu",
        ]
    )
    with pytest.raises(TotalSegmentatorWeightsError):
        args.func(args)


def test_ct_is_handed_over_in_hu_with_its_geometry(sample_volume, tmp_path):
    import nibabel as nib
    import SimpleITK as sitk

    image = ct_to_nifti(sample_volume)
    assert image.get_fdata().shape == sample_volume.shape[::-1]
    assert np.array_equal(np.asarray(image.dataobj)[:, :, 3], sample_volume.hu[3].T)  # real HU, unscaled
    # What nibabel writes (RAS), SimpleITK reads back as the CTVolume's own LPS geometry.
    nib.save(image, tmp_path / "ct.nii.gz")
    again = sitk.ReadImage(str(tmp_path / "ct.nii.gz"))
    assert np.allclose(again.GetOrigin(), sample_volume.origin_mm, atol=1e-4)
    assert np.allclose(np.reshape(again.GetDirection(), (3, 3)), sample_volume.direction, atol=1e-6)
    assert np.allclose(again.GetSpacing(), sample_volume.spacing_mm)
    assert np.allclose(LPS_TO_RAS @ sample_volume.affine_lps(), image.affine)


def test_devices():
    import torch

    assert resolve_device("auto") == ("gpu" if torch.cuda.is_available() else "cpu")
    assert resolve_device("CPU") == "cpu"
    with pytest.raises(SegmenterError, match="unknown device 'tpu'"):
        resolve_device("tpu")
    if torch.cuda.is_available():
        assert resolve_device("cuda") == "gpu" and resolve_device("cuda:0") == "gpu:0"
    else:  # asking for a GPU that is not there is an error, not a silent fallback to the CPU
        with pytest.raises(SegmenterError, match="device cuda requested but torch sees no CUDA GPU"):
            resolve_device("cuda")


def test_usage_statistics_are_switched_off_keeping_the_rest(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(
        json.dumps(
            {
                "totalseg_id": "totalseg_ABC",
                "send_usage_stats": True,
                "prediction_counter": 7,
                "license_number": "x" * 18,
            }
        )
    )
    ensure_usage_statistics_off(tmp_path)
    config = json.loads(path.read_text())
    assert config == {
        "totalseg_id": "totalseg_ABC",
        "send_usage_stats": False,
        "prediction_counter": 7,
        "license_number": "x" * 18,
        "statistics_disclaimer_shown": True,
    }
    fresh = tmp_path / "fresh"
    ensure_usage_statistics_off(fresh)
    assert json.loads((fresh / "config.json").read_text())["send_usage_stats"] is False


def test_command_runs_totalsegmentator_and_writes_the_report(
    tiny_totalsegmentator, scans, small_sample, tmp_path, no_network, capsys
):
    out = tmp_path / "report"
    args = _parser().parse_args(
        [
            "fidelity",
            "--original",
            str(scans["original"]),
            "--denoised",
            str(scans["denoised"]),
            "--reference",
            str(scans["reference"]),
            "--reference-labels",
            str(SAMPLE_SEG),
            "--out",
            str(out),
            "--fast",
            "--device",
            "cpu",
        ]
    )
    args.func(args)
    printed = capsys.readouterr()
    assert re.search(r"^fidelity: (kept|check|changed) - ", printed.out, re.M)
    assert "[fidelity] 1/2: segmenting original" in printed.err and "[fidelity] verdict:" in printed.err
    assert no_network == []  # TotalSegmentator ran offline: no statistics, no download
    config = json.loads((tiny_totalsegmentator / "config.json").read_text())
    assert config["send_usage_stats"] is False and config["prediction_counter"] == 2  # it ran twice

    assert sorted(p.name for p in out.iterdir()) == [
        "fidelity.html",
        "fidelity.json",
        "labels_denoised.nii.gz",
        "labels_original.nii.gz",
        "labels_reference.nii.gz",
    ]
    report = json.loads((out / "fidelity.json").read_text())
    assert report["schema_version"] == SCHEMA_VERSION
    assert report["segmenter"]["name"] == "TotalSegmentator" and report["segmenter"]["mode"] == "fast"
    assert report["segmenter"]["device"] == "cpu"
    assert report["inputs"]["original"]["labels"] == "segmented by TotalSegmentator"
    # The real label map of the full-resolution sample, resampled onto the half-resolution grid.
    assert report["inputs"]["reference"]["labels"].endswith("(resampled)")
    assert report["pairs"] == ["denoised_vs_original", "denoised_vs_reference", "original_vs_reference"]
    assert report["thresholds"]["dice_kept"] == 0.9
    assert set(report["timings_s"]["segmentation"]) == {"original", "denoised"}
    structures = {s["name"]: s for s in report["structures"]}
    assert len(structures) == 117
    order = [s["verdict"] for s in report["structures"]]
    assert order == sorted(order, key=["changed", "check", "kept", "absent"].index)  # flagged first
    counts = report["study"]["counts"]
    assert sum(counts.values()) == 117 and report["study"]["verdict"] in ("kept", "check", "changed")
    assert report["study"]["reference"]["counts"]["absent"] < 117
    liver = structures["liver"]
    assert liver["images"]["reference"]["present"]  # from the real label map given for the reference
    assert liver["images"]["reference"]["hu_mean"] == pytest.approx(
        float(small_sample.hu[load_label_map(SAMPLE_SEG, small_sample)[0] == 5].mean()), abs=1e-3
    )

    # The label maps TotalSegmentator returned sit on the CT's grid and are saved with its geometry.
    segmented = {}
    for role in ("original", "denoised"):
        labels, how = load_label_map(out / f"labels_{role}.nii.gz", small_sample)
        assert how == "same grid" and labels.shape == small_sample.shape
        segmented[role] = labels
    found = np.unique(segmented["original"])
    assert 0 in found and 3 <= len(found) <= 118 and found.max() <= 117
    assert 0.5 < np.mean(segmented["original"] == 0) < 1.0  # a tiny random model: mostly background
    voxels = np.bincount(segmented["original"].ravel(), minlength=118)
    assert [
        s["images"]["original"]["voxels"] for s in sorted(report["structures"], key=lambda s: s["label"])
    ] == voxels[1:].tolist()

    html = (out / "fidelity.html").read_text()
    assert html.count("data:image/png;base64,") == 3  # Dice bars, HU before/after, slices
    assert "<script>" in html and "table.sortable" in html
    assert not re.search(r"""(src|href)=["']?(https?:)?//|<link""", html)  # self-contained: nothing fetched
    assert html.count("<tr class=") == sum(
        1 for s in report["structures"] if any(i["present"] for i in s["images"].values())
    )


def test_library_call_with_precomputed_labels_needs_no_model(sample_volume, tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("TOTALSEG_WEIGHTS_PATH", str(tmp_path / "no_weights_here"))
    labels, _ = load_label_map(SAMPLE_SEG, sample_volume)
    moved = np.roll(labels, 2, axis=2)
    smoothed = sample_volume.with_hu(sample_volume.hu + 12.0)
    result = check_fidelity(sample_volume, smoothed, labels={"original": labels, "denoised": moved}, progress=False)
    assert result.files == {} and result.segmenter is None and result.to_json()["segmenter"] is None
    liver = result.structure("liver")
    assert liver.pairs["denoised_vs_original"]["hu_shift"] == pytest.approx(12.0, abs=0.01)
    assert liver.pairs["denoised_vs_original"]["hd95_mm"] == pytest.approx(2 * 0.9765625)
    assert result.verdict == result.study.verdict in ("check", "changed") and "liver" in result.study.flagged
    assert np.array_equal(result.label_maps["denoised"], moved)
    report = result.to_json()  # fidelity.json's content
    assert list(report) == [
        "schema_version",
        "lowdose_version",
        "created",
        "inputs",
        "segmenter",
        "thresholds",
        "pairs",
        "study",
        "structures",
        "timings_s",
    ]
    assert {s["name"]: s for s in report["structures"]}["liver"] == liver.to_json()


def test_command_with_label_maps_made_elsewhere(small_sample, scans, tmp_path, monkeypatch, capsys):
    from lowdose.fidelity import save_label_map

    monkeypatch.setenv("TOTALSEG_WEIGHTS_PATH", str(tmp_path / "no_weights_here"))
    labels, _ = load_label_map(SAMPLE_SEG, small_sample)
    save_label_map(labels, small_sample, tmp_path / "same.nii.gz")
    eroded = labels.copy()
    eroded[:, :, ::7] = 0
    save_label_map(eroded, small_sample, tmp_path / "eroded.nii.gz")
    thresholds = tmp_path / "thresholds.json"
    thresholds.write_text(json.dumps({"dice_kept": 0.95, "hu_shift_kept": 5}))
    argv = [
        "fidelity",
        "--original",
        str(scans["reference"]),
        "--denoised",
        str(scans["reference"]),
        "--original-labels",
        str(SAMPLE_SEG),
        "--denoised-labels",
        str(tmp_path / "same.nii.gz"),
        "--out",
        str(tmp_path / "same"),
        "--quiet",
        "--json",
        "--thresholds",
        str(thresholds),
        "--fail-on",
        "check",
    ]
    args = _parser().parse_args(argv)
    args.func(args)  # identical label maps: kept, no failure exit
    printed = json.loads(capsys.readouterr().out)
    assert printed["verdict"] == "kept" and printed["flagged"] == []
    report = json.loads((tmp_path / "same" / "fidelity.json").read_text())
    assert report["thresholds"]["dice_kept"] == 0.95 and report["segmenter"] is None

    argv[argv.index(str(tmp_path / "same.nii.gz"))] = str(tmp_path / "eroded.nii.gz")
    argv[argv.index(str(tmp_path / "same"))] = str(tmp_path / "eroded")
    args = _parser().parse_args(argv)
    with pytest.raises(SystemExit) as exit_:
        args.func(args)
    assert exit_.value.code == FAIL_EXIT_STATUS
    assert json.loads(capsys.readouterr().out)["verdict"] == "changed"

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"dice_minimum": 0.9}))
    args = _parser().parse_args(argv[:-4] + ["--thresholds", str(bad)])
    with pytest.raises(LowdoseError, match=r"bad.json: unknown threshold\(s\) dice_minimum"):
        args.func(args)


def test_scans_on_another_grid_are_refused_naming_the_file(sample_volume, tmp_path):
    other = sample_volume
    cropped = type(sample_volume)(
        sample_volume.hu[:, :256, :256], sample_volume.spacing_mm, sample_volume.origin_mm, sample_volume.direction
    )
    save_ct(cropped, tmp_path / "cropped.nii.gz")
    with pytest.raises(CTInputError, match=r"cropped.nii.gz: has \(256, 256, 20\) voxels.*resample it first"):
        check_fidelity(
            other, tmp_path / "cropped.nii.gz", labels={"original": np.zeros(other.shape, np.uint8)}, progress=False
        )
    with pytest.raises(CTInputError, match="missing.nii.gz: no such file"):
        check_fidelity(other, tmp_path / "missing.nii.gz", progress=False)
    (tmp_path / "file").write_text("")
    with pytest.raises(LowdoseError, match="exists and is not a folder"):
        check_fidelity(other, other, out_dir=tmp_path / "file", progress=False)


def test_a_crafted_totalsegmentator_checkpoint_is_refused_before_nnunet_unpickles_it(tmp_path, monkeypatch):
    """nnU-Net reads its checkpoints with weights_only=False; lowdose reads each one first with torch's
    weights-only loader, so a checkpoint whose pickle would run code is refused and its payload never runs,
    while real-format weights (the tiny stand-in, saved as nnU-Net saves) pass."""
    from lowdose.errors import LowdoseError

    from .checkpoint_fixtures import unsafe_load_runs_the_payload, write_crafted_checkpoint
    from .fidelity_fixtures import write_tiny_totalsegmentator_weights

    weights = tmp_path / "weights"
    write_tiny_totalsegmentator_weights(weights, fast=True)
    monkeypatch.setenv("TOTALSEG_WEIGHTS_PATH", str(weights))
    monkeypatch.setenv("TOTALSEG_HOME_DIR", str(tmp_path / "home"))
    assert TotalSegmentatorSegmenter(fast=True, device="cpu").check_weights() == weights
    checkpoint = next(weights.rglob("checkpoint_final.pth"))
    marker = tmp_path / "payload-ran"
    import torch

    write_crafted_checkpoint(checkpoint, marker, torch.load(checkpoint, weights_only=False), key="init_args")
    with pytest.raises(LowdoseError, match="refused"):
        TotalSegmentatorSegmenter(fast=True, device="cpu").check_weights()
    assert not marker.exists()
    assert unsafe_load_runs_the_payload(checkpoint, marker)  # the control: nnU-Net's own load would run it
