"""The `lowdose` command as a user runs it: a real subprocess, real files, exit codes and messages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from lowdose import load_ct
from lowdose.bundle import Bundle

from .conftest import SAMPLE_DICOM, shared

LOWDOSE = [str(Path(sys.executable).parent / "lowdose")]


def run(*args, cwd=None):
    return subprocess.run([*LOWDOSE, *map(str, args)], capture_output=True, text=True, cwd=cwd, timeout=600)


def _one_line_error(result, *fragments):
    command = result.args[len(LOWDOSE)]
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lowdose {command}: error: "), result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_simulate_dicom_series_writes_a_derived_series_with_the_same_geometry(tmp_path):
    """`lowdose simulate` on a shared DICOM series writes a DICOM series that loads back with the right
    geometry and a real dose reduction (more noise, same mean)."""
    source = tmp_path / "normal"
    source.mkdir()
    for f in sorted(shared("tcia_pancreatic_ct_cbct_seg").glob("*.dcm"))[60:64]:
        (source / f.name).write_bytes(f.read_bytes())
    result = run("simulate", source, tmp_path / "quarter", "--dose", "1/4", "--seed", "3", "--quiet")
    assert result.returncode == 0, result.stderr
    normal, low = load_ct(source), load_ct(tmp_path / "quarter")
    assert low.shape == normal.shape
    np.testing.assert_allclose(low.origin_mm, normal.origin_mm, atol=1e-4)
    np.testing.assert_allclose(low.spacing_mm, normal.spacing_mm, atol=1e-4)
    np.testing.assert_allclose(low.direction, normal.direction, atol=1e-6)
    difference = low.hu - normal.hu
    tissue = (normal.hu > 0) & (normal.hu < 100)
    assert 10.0 < difference[tissue].std() < 60.0
    assert abs(difference[tissue].mean()) < 3.0
    header = pydicom.dcmread(sorted((tmp_path / "quarter").iterdir())[0], stop_before_pixels=True)
    assert "25%" in header.SeriesDescription and "DERIVED" in header.ImageType


def test_simulate_accepts_dose_spellings_and_refuses_bad_doses(tmp_path):
    for bad in ("0", "1.5", "-1/4", "abc"):
        result = run("simulate", SAMPLE_DICOM, tmp_path / "x", "--dose", bad)
        assert result.returncode == 2 and "dose" in result.stderr
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "make_input, fragment",
    [
        (lambda d: d / "nope.nii.gz", "no such file"),
        (lambda d: (d / "bad.nii.gz").write_bytes(b"junk") and d / "bad.nii.gz", "not a readable"),
    ],
)
def test_bad_input_gives_one_line_and_exit_1(tmp_path, make_input, fragment):
    path = make_input(tmp_path)
    result = run("simulate", path, tmp_path / "out.nii.gz")
    _one_line_error(result, str(path), fragment)
    assert not (tmp_path / "out.nii.gz").exists()


def test_unwritable_output_gives_one_line_and_leaves_nothing(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    ct = shared("totalsegmentator/example_ct_sm.nii.gz")
    result = run("simulate", ct, blocker / "out.nii.gz", "--quiet")
    _one_line_error(result, "out.nii.gz", "cannot create the folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_metrics_prints_figures_for_two_volumes(tmp_path):
    ct = shared("totalsegmentator/example_ct_sm.nii.gz")
    result = run("simulate", ct, tmp_path / "low.nii.gz", "--dose", "10%", "--quiet")
    assert result.returncode == 0, result.stderr
    result = run("metrics", ct, tmp_path / "low.nii.gz", "--json")
    assert result.returncode == 0, result.stderr
    import json

    figures = json.loads(result.stdout)
    assert 10.0 < figures["psnr_abdomen"] < 40.0 and figures["rmse_hu"] > 5.0


def test_demo_simulates_denoises_and_draws_the_sample(tmp_path):
    """The README's main command with the shipped default model: before/after figures and a PNG."""
    result = run("demo", "--out", tmp_path / "demo")
    assert result.returncode == 0, result.stderr
    figures = {}
    for line in result.stdout.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] in ("psnr_abdomen", "rmse_hu", "soft_tissue_noise_std_hu"):
            figures[parts[0]] = (float(parts[1]), float(parts[2]))
    assert set(figures) == {"psnr_abdomen", "rmse_hu", "soft_tissue_noise_std_hu"}, result.stdout
    # the shipped model must make the quarter-dose sample closer to the normal dose, and less noisy
    assert figures["psnr_abdomen"][1] > figures["psnr_abdomen"][0] + 1.0
    assert figures["soft_tissue_noise_std_hu"][1] < 0.7 * figures["soft_tissue_noise_std_hu"][0]
    assert "estimated from the image" in result.stdout
    normal = load_ct(SAMPLE_DICOM)
    for folder in ("simulated_25pct_dose", "denoised_dose_unet"):
        written = load_ct(tmp_path / "demo" / folder)
        assert written.shape == normal.shape
        np.testing.assert_allclose(written.origin_mm, normal.origin_mm, atol=1e-3)
        np.testing.assert_allclose(written.spacing_mm, normal.spacing_mm, atol=1e-4)
    from PIL import Image

    png = Image.open(tmp_path / "demo" / "side_by_side.png")
    assert png.format == "PNG" and png.width > png.height > 600  # three panels, full slice and zoom rows


def test_denoise_prints_the_dose_estimate_and_how_it_was_read(tmp_path):
    """Issue 18: ``lowdose denoise`` says what dose it used and how it got it, here from one lone slice."""
    from lowdose import save_ct, simulate_low_dose

    low = simulate_low_dose(load_ct(SAMPLE_DICOM).slices(9, 10), 0.25, seed=5)
    save_ct(low, tmp_path / "low.nii.gz")
    result = run("denoise", tmp_path / "low.nii.gz", tmp_path / "out.nii.gz", "--quiet")
    assert result.returncode == 0 and result.stdout == "", result.stderr
    result = run("denoise", tmp_path / "low.nii.gz", tmp_path / "out2.nii.gz")
    assert result.returncode == 0, result.stderr
    line = next(line for line in result.stdout.splitlines() if line.startswith(f"wrote {tmp_path / 'out2.nii.gz'}"))
    version = Bundle.find("dose_unet").version  # the line names the model's version
    assert (
        "(read by the model from the in-plane noise of 1 slice" in line
        and f"model dose_unet {version}, dose 0." in line
    ), line
    given = run("denoise", tmp_path / "low.nii.gz", tmp_path / "out3.nii.gz", "--dose", "1/4")
    assert "dose 0.25 (given)" in given.stdout, given.stdout


def test_demo_with_a_missing_model_fails_before_simulating(tmp_path):
    result = run("demo", "--out", tmp_path / "demo", "--model", tmp_path / "nowhere")
    _one_line_error(result, "nowhere", "no such model")
    assert not (tmp_path / "demo").exists()


# ------------------------------------------------------------------------------------ outputs checked first


@pytest.fixture
def spies(monkeypatch):
    """Record whether the input is read, a model loaded, or training started: none may happen when the
    output is refused."""
    import lowdose.cli
    import lowdose.denoise
    import lowdose.training

    calls = []

    def spy(name):
        def called(*args, **kwargs):
            calls.append(name)
            raise AssertionError(f"{name} was called before the output was checked")

        return called

    monkeypatch.setattr(lowdose.cli, "load_ct", spy("load_ct"))
    monkeypatch.setattr(lowdose.denoise, "get_denoiser", spy("get_denoiser"))
    monkeypatch.setattr(lowdose.training, "train", spy("train"))
    return calls


def _main_error(capsys, argv):
    from lowdose.cli import main

    status = main([str(a) for a in argv])
    lines = capsys.readouterr().err.strip().splitlines()
    assert status == 1 and len(lines) == 1, lines
    assert lines[0].startswith(f"lowdose {argv[0]}: error: "), lines
    return lines[0]


def _folder_with_a_file(folder: Path) -> Path:
    folder.mkdir()
    (folder / "keep.dcm").write_text("the user's file")
    return folder


@pytest.mark.parametrize(
    "make_output, fragment",
    [
        (lambda d, ct: Path("/no/such/dir/out.nii.gz"), "the folder /no/such/dir does not exist"),
        (lambda d, ct: ct, "would overwrite or write into the input"),
        (lambda d, ct: d / "out.png", "cannot write .png files"),
        (lambda d, ct: _folder_with_a_file(d / "taken"), "already exists and is not an empty folder"),
    ],
)
@pytest.mark.parametrize("command", ["denoise", "simulate"])
def test_a_bad_output_fails_before_the_input_is_read_or_a_model_loaded(
    tmp_path, capsys, spies, command, make_output, fragment
):
    ct = tmp_path / "ct.nii.gz"
    ct.write_bytes(shared("totalsegmentator/example_ct_sm.nii.gz").read_bytes())
    output = make_output(tmp_path, ct)
    line = _main_error(capsys, [command, ct, output])
    assert str(output) in line and fragment in line, line
    assert spies == []
    assert ct.read_bytes() == shared("totalsegmentator/example_ct_sm.nii.gz").read_bytes()


def test_denoise_into_a_missing_folder_fails_at_once_from_the_command_line(tmp_path):
    result = run("denoise", shared("totalsegmentator/example_ct_sm.nii.gz"), "/no/such/dir/out.nii.gz")
    _one_line_error(result, "/no/such/dir/out.nii.gz", "does not exist")


def test_demo_and_train_outputs_are_checked_before_any_work(tmp_path, capsys, spies):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    line = _main_error(capsys, ["demo", "--out", blocker / "demo"])
    assert f"cannot create the folder {blocker / 'demo'} ({blocker} is a file)" in line
    config = tmp_path / "train.yaml"
    config.write_text(f"output_dir: {blocker / 'run'}\ndata: {{train: [{shared('lungmask_chest')}]}}\n")
    line = _main_error(capsys, ["train", config])
    assert f"{blocker / 'run'}: cannot create the folder" in line
    config.write_text(f"output_dir: {tmp_path / 'run'}\ndata: {{train: [{shared('lungmask_chest')}]}}\n")
    line = _main_error(capsys, ["train", config, "--bundle", shared("lungmask_chest")])
    assert "would overwrite or write into the input" in line
    assert spies == []


# ------------------------------------------------------------------------------------ no tracebacks

DRIVER = """
import os, signal, sys, time
import lowdose.cli
from lowdose.cli import main

def failing_load_ct(*args, **kwargs):
    if sys.argv[1] == "interrupt":
        os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, delivered while lowdose is at work
        time.sleep(30)
    raise ZeroDivisionError("float division by zero")  # a bug lowdose did not foresee

lowdose.cli.load_ct = failing_load_ct
sys.exit(main(sys.argv[2:]))
"""


def _driver(*args):
    return subprocess.run([sys.executable, "-c", DRIVER, *map(str, args)], capture_output=True, text=True, timeout=300)


def test_an_unexpected_error_is_one_line_and_the_traceback_needs_debug(tmp_path):
    ct = shared("totalsegmentator/example_ct_sm.nii.gz")
    result = _driver("bug", "metrics", ct, ct)
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == [
        "lowdose metrics: error: internal error (ZeroDivisionError: float division by zero); "
        "`lowdose --debug metrics ...` prints the traceback"
    ]
    for argv in (["--debug", "metrics", ct, ct], ["metrics", ct, ct, "--debug"]):
        result = _driver("bug", *argv)
        assert result.returncode == 1
        assert "Traceback (most recent call last)" in result.stderr and "failing_load_ct" in result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith("lowdose metrics: error: internal error")


def test_ctrl_c_exits_130_with_one_line(tmp_path):
    ct = shared("totalsegmentator/example_ct_sm.nii.gz")
    result = _driver("interrupt", "simulate", ct, tmp_path / "out.nii.gz")
    assert result.returncode == 130, result.stderr
    assert result.stderr.strip().splitlines() == ["lowdose simulate: interrupted"]
    assert not (tmp_path / "out.nii.gz").exists()


def test_strength_is_checked_by_the_command_line(capsys):
    from lowdose.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["denoise", "in.nii.gz", "out.nii.gz"]).strength == 0.7  # medium by default
    assert parser.parse_args(["denoise", "a", "b", "--strength", "high"]).strength == 1.0
    assert parser.parse_args(["demo", "--strength", "0.55"]).strength == 0.55
    with pytest.raises(SystemExit) as refused:
        parser.parse_args(["denoise", "a", "b", "--strength", "max"])
    assert refused.value.code == 2 and "strength must be low, medium, high" in capsys.readouterr().err


def test_ensemble_is_checked_by_the_command_line(capsys):
    from lowdose.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["denoise", "in.nii.gz", "out.nii.gz"]).ensemble == 1  # the network alone by default
    assert parser.parse_args(["denoise", "a", "b", "--ensemble", "8"]).ensemble == 8
    with pytest.raises(SystemExit) as refused:
        parser.parse_args(["denoise", "a", "b", "--ensemble", "3"])
    assert refused.value.code == 2 and "--ensemble" in capsys.readouterr().err


def test_denoise_steps_only_for_a_diffusion_model(tmp_path):
    """Issue 16: ``--steps`` sets a diffusion model's sampling steps; the default model does not sample, so it is
    refused with a clear error and nothing is written; a step count outside 1-4 is refused by the parser."""
    result = run("denoise", SAMPLE_DICOM, tmp_path / "out.nii.gz", "--steps", "2", "--quiet")
    assert result.returncode != 0 and "not a diffusion model" in result.stderr, result.stderr
    assert not (tmp_path / "out.nii.gz").exists()
    result = run("denoise", SAMPLE_DICOM, tmp_path / "out.nii.gz", "--steps", "9")
    assert result.returncode == 2 and "--steps" in result.stderr
