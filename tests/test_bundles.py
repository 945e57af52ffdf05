"""The shipped models as MONAI bundles, and lowdose as an installable package.

Each bundle under models/ runs with MONAI's bundle tooling (its inference.json resolves and
`python -m monai.bundle run` denoises a CT file as lowdose does) and its metadata passes
`monai.bundle.verify_metadata` offline against the schema lowdose ships. A wheel built from the checkout
carries the models, the sample CT with its licence and the MONAI Label app, and lowdose installed from it
finds them from any folder (or the bundles of $LOWDOSE_MODELS instead).
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import zipfile
from importlib.metadata import packages_distributions
from pathlib import Path

import numpy as np
import pytest
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from lowdose import load_ct, sample_ct_path, save_ct
from lowdose.bundle import MODELS_DIR, MODELS_ENV, available_models, find_bundle, load_checkpoint
from lowdose.bundle_configs import MONAI_SCHEMA_URL, inference_config, monai_metadata
from lowdose.resources import BUNDLE_SCHEMA

from .conftest import REPO

BUNDLES = sorted(p.name for p in MODELS_DIR.iterdir() if (p / "configs" / "metadata.json").is_file())
PYTHON = Path(sys.executable)


def test_every_shipped_model_is_a_bundle():
    assert {"dose_unet", "dose_unet_anatomy", "redcnn", "esaunet", "anatomy_encoder"} <= set(BUNDLES)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test (verify_metadata downloads its schema unless it has it)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[1:]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize("name", BUNDLES)
def test_metadata_passes_monai_verify_metadata_offline(name, no_network):
    from monai.bundle import verify_metadata

    before = hashlib.sha256(BUNDLE_SCHEMA.read_bytes()).hexdigest()
    meta_file = MODELS_DIR / name / "configs" / "metadata.json"
    verify_metadata(meta_file=str(meta_file), filepath=str(BUNDLE_SCHEMA))
    assert hashlib.sha256(BUNDLE_SCHEMA.read_bytes()).hexdigest() == before  # used as it is, not replaced
    meta = json.loads(meta_file.read_text())
    assert meta["schema"] == MONAI_SCHEMA_URL and meta["version"] in meta["changelog"]
    # the configs are what the writer makes now (scripts/rewrite_bundle_configs.py was run)
    assert meta == monai_metadata(meta)
    assert json.loads((MODELS_DIR / name / "configs" / "inference.json").read_text()) == inference_config(meta)


def test_the_schema_refuses_metadata_without_what_monai_or_lowdose_needs(tmp_path, no_network):
    from monai.bundle import verify_metadata

    meta = json.loads((MODELS_DIR / "dose_unet" / "configs" / "metadata.json").read_text())
    for key in ("copyright", "network_data_format", "network", "normalisation"):
        broken = {k: v for k, v in meta.items() if k != key}
        (tmp_path / "metadata.json").write_text(json.dumps(broken))
        with pytest.raises(ValueError, match=key):
            verify_metadata(meta_file=str(tmp_path / "metadata.json"), filepath=str(BUNDLE_SCHEMA))


@pytest.mark.parametrize("name", BUNDLES)
def test_inference_config_resolves_with_monai_config_parser(name):
    """MONAI's ConfigParser builds the network (which takes the bundle's weights) and lowdose's engine."""
    from monai.bundle import ConfigParser

    folder = MODELS_DIR / name
    parser = ConfigParser()
    parser.read_config(str(folder / "configs" / "inference.json"))
    parser.read_meta(str(folder / "configs" / "metadata.json"))
    parser["bundle_root"] = str(folder)
    parser.parse()
    network = parser.get_parsed_content("network_def")
    assert isinstance(network, torch.nn.Module)
    network.load_state_dict(load_checkpoint(folder / "models" / "model.pt")["network"])  # strict: same network
    if parser["_meta_"].get("lowdose_kind") == "anatomy_encoder":
        assert parser.get_parsed_content("encoder").groups == {int(k): v for k, v in parser["_meta_"]["groups"].items()}
    else:
        denoiser = parser.get_parsed_content("denoiser")
        assert denoiser.name == name and parser["device"] == "auto"


def _monai_bundle_run(folder: Path, cwd: Path, *overrides: str) -> None:
    result = subprocess.run(
        [
            str(PYTHON),
            "-m",
            "monai.bundle",
            "run",
            "--bundle_root",
            str(folder),
            "--config_file",
            str(folder / "configs" / "inference.json"),
            *overrides,
        ],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_monai_bundle_run_denoises_as_lowdose_does(tmp_path):
    """`python -m monai.bundle run` with dose_unet's inference.json on a 4-slice crop of the sample: the HU of
    lowdose's Denoiser (within int16 rounding) on the input's grid."""
    from lowdose.denoise import Denoiser

    crop = save_ct(load_ct(sample_ct_path()).slices(8, 12), tmp_path / "crop.nii.gz")
    volume = load_ct(crop)
    _monai_bundle_run(
        MODELS_DIR / "dose_unet",
        tmp_path,
        "--input_file",
        str(crop),
        "--output_file",
        str(tmp_path / "denoised.nii.gz"),
        "--device",
        "cpu",
    )
    out = load_ct(tmp_path / "denoised.nii.gz")
    expected = Denoiser("dose_unet", device="cpu")(volume).volume
    assert out.shape == volume.shape
    assert np.abs(out.hu - expected.hu).max() <= 0.5 + 1e-3
    assert np.abs(out.hu - volume.hu).max() > 5  # it did denoise
    assert out.spacing_mm == volume.spacing_mm and out.origin_mm == volume.origin_mm
    assert np.allclose(out.direction, volume.direction)


def test_monai_bundle_run_segments_with_the_anatomy_encoder(tmp_path):
    """The anatomy encoder's inference.json writes its group label map on the CT's grid."""
    from lowdose.labels import load_label_map

    crop = save_ct(load_ct(sample_ct_path()).slices(9, 11), tmp_path / "crop.nii.gz")
    _monai_bundle_run(
        MODELS_DIR / "anatomy_encoder",
        tmp_path,
        "--input_file",
        str(crop),
        "--output_file",
        str(tmp_path / "groups.nii.gz"),
    )
    labels, how = load_label_map(tmp_path / "groups.nii.gz", load_ct(crop))
    assert how != "resampled" and labels.shape == (2, 512, 512)
    assert 1 in labels and 9 in labels  # liver and bone in these abdomen slices


def test_save_bundle_writes_bundles_monai_runs(tmp_path, no_network):
    """A bundle written by training (save_bundle) has metadata that verifies and an inference.json that resolves."""
    from monai.bundle import ConfigParser, verify_metadata

    from .server_fixtures import make_random_bundle

    folder = make_random_bundle(tmp_path, "fresh")
    verify_metadata(meta_file=str(folder / "configs" / "metadata.json"), filepath=str(BUNDLE_SCHEMA))
    parser = ConfigParser()
    parser.read_config(str(folder / "configs" / "inference.json"))
    parser["bundle_root"] = str(folder)
    parser.parse()
    assert parser.get_parsed_content("denoiser").model.path == folder


# -- packaging --------------------------------------------------------------------------------------------------


def _requirements_pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def test_pyproject_dependencies_are_pinned_in_requirements_and_cover_the_imports():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+: the CI's and setup.sh's Python
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = {canonicalize_name(Requirement(text).name): Requirement(text) for text in project["dependencies"]}
    pins = _requirements_pins()
    for name, requirement in declared.items():
        assert name in pins, f"{name} is a dependency but requirements.txt does not pin it"
        assert requirement.specifier.contains(pins[name], prereleases=True), (requirement, pins[name])
    # every third-party module that lowdose or its MONAI Label app imports comes from a declared dependency
    distributions = packages_distributions()
    imported = set()
    for path in [*(REPO / "lowdose").rglob("*.py"), *(REPO / "apps" / "lowdose").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
    third_party = imported - set(sys.stdlib_module_names) - {"lowdose", "lib", "__future__"}
    undeclared = {
        module
        for module in third_party
        if not {canonicalize_name(d) for d in distributions.get(module, [module])} & set(declared)
    }
    assert not undeclared, f"imported but not in pyproject's dependencies: {sorted(undeclared)}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built, as `pip wheel .` builds it, from a copy of the checkout's packaging inputs (the copy keeps
    concurrent builds out of the checkout's build/ folder)."""
    source = tmp_path_factory.mktemp("source")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("lowdose", "models", "sample", "apps"):
        shutil.copytree(REPO / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "setup.py", "MANIFEST.in", "README.md", "LICENSE"):
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, source / name)
    (source / "apps" / "lowdose" / "logs").mkdir(exist_ok=True)
    (source / "apps" / "lowdose" / "logs" / "app.log").write_text("a server's log: not for the wheel\n")
    dist = tmp_path_factory.mktemp("dist")
    result = subprocess.run(
        [
            str(PYTHON),
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "-q",
            "-w",
            str(dist),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (built,) = dist.glob("lowdose-*.whl")
    return built


def test_wheel_ships_the_models_the_sample_with_its_licence_and_the_app(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = "lowdose/_shipped/"
    for bundle in BUNDLES:
        for part in ("configs/metadata.json", "configs/inference.json", "models/model.pt", "docs/README.md"):
            assert f"{shipped}models/{bundle}/{part}" in names
    assert {
        f"{shipped}sample/LICENSE",
        f"{shipped}sample/README.md",
        f"{shipped}sample/abdomen_ct_totalseg.nii.gz",
        f"{shipped}apps/lowdose/main.py",
        "lowdose/bundle_metadata_schema.json",
        "lowdose/cli.py",
    } <= names
    dicom = [n for n in names if n.startswith(f"{shipped}sample/abdomen_ct_dicom/")]
    assert len(dicom) == len(list((REPO / "sample" / "abdomen_ct_dicom").iterdir()))
    assert not [n for n in names if "__pycache__" in n or "/logs/" in n or n.endswith(".pyc")]
    metadata = next(n for n in names if n.endswith(".dist-info/METADATA"))
    requires = [
        line
        for line in zipfile.ZipFile(wheel).read(metadata).decode().splitlines()
        if line.startswith("Requires-Dist: ")
    ]
    assert any("monailabel" in line for line in requires) and any("nibabel" in line for line in requires)


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A fresh virtual environment with the wheel installed (no download: the project's other dependencies are
    reused from .venv through a .pth file); returns its bin/ folder."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    site = next((venv / "lib").glob("python3.*/site-packages"))
    project_site = next(Path(p) for p in sys.path if p.endswith("site-packages") and Path(p, "torch").is_dir())
    (site / "project_dependencies.pth").write_text(f"{project_site}\n")
    result = subprocess.run(
        [
            str(PYTHON),
            "-m",
            "pip",
            "--python",
            str(venv / "bin" / "python"),
            "install",
            "--no-deps",
            "--no-index",
            "-q",
            str(wheel),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return venv / "bin"


def _run_installed(bin_dir: Path, args: list[str], cwd: Path, **env: str) -> str:
    environment = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", MODELS_ENV)}
    result = subprocess.run(args, cwd=cwd, env={**environment, **env}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_installed_lowdose_finds_its_models_and_sample_from_any_folder(installed, tmp_path):
    """What `lowdose models` and `lowdose demo` need (`lowdose demo` itself takes 10-40 s here: run by hand)."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    paths = json.loads(
        _run_installed(
            installed,
            [
                str(installed / "python"),
                "-c",
                (
                    "import json, lowdose, lowdose.bundle as b; from lowdose.server.launcher import APP_DIR; "
                    "v = lowdose.load_ct(lowdose.sample_ct_path()); paths = [lowdose.__file__, b.MODELS_DIR, "
                    "lowdose.sample_ct_path(), APP_DIR]; print(json.dumps([*map(str, paths), v.shape]))"
                ),
            ],
            elsewhere,
        )
    )
    venv = installed.parent.resolve()
    assert all(Path(p).resolve().is_relative_to(venv) for p in paths[:4]), paths  # the installed copies
    assert paths[4] == [20, 512, 512]
    rows = {
        line.split()[0]: line
        for line in _run_installed(installed, [str(installed / "lowdose"), "models"], elsewhere).splitlines()[1:]
    }
    assert set(rows) == set(BUNDLES) and "(default)" in rows["dose_unet"]
    assert set(rows) - {"anatomy_encoder"} == set(available_models())


def test_lowdose_models_env_replaces_the_shipped_models(installed, tmp_path):
    mine, more = tmp_path / "my_models", tmp_path / "more_models"
    shutil.copytree(MODELS_DIR / "redcnn", mine / "my_redcnn", ignore=shutil.ignore_patterns("docs"))
    shutil.copytree(MODELS_DIR / "esaunet", more / "my_esaunet", ignore=shutil.ignore_patterns("docs"))
    out = _run_installed(installed, [str(installed / "lowdose"), "models"], tmp_path, **{MODELS_ENV: str(mine)})
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["my_redcnn"]
    out = _run_installed(
        installed,
        [str(installed / "lowdose"), "models"],
        tmp_path,
        **{MODELS_ENV: os.pathsep.join([str(mine), str(more)])},
    )
    assert [line.split()[0] for line in out.splitlines()[1:]] == ["my_esaunet", "my_redcnn"]


def test_models_env_in_process(tmp_path, monkeypatch):
    """Several folders: names from all, the first folder's bundle for a name in two; a missing folder is an error."""
    from lowdose.errors import LowdoseError

    first, second = tmp_path / "first", tmp_path / "second"
    shutil.copytree(MODELS_DIR / "redcnn", first / "shared_name")
    shutil.copytree(MODELS_DIR / "esaunet", second / "shared_name")
    shutil.copytree(MODELS_DIR / "anatomy_encoder", second / "anatomy_encoder")
    monkeypatch.setenv(MODELS_ENV, os.pathsep.join([str(first), str(second)]))
    assert available_models() == ["shared_name"] and available_models("anatomy_encoder") == ["anatomy_encoder"]
    assert find_bundle("shared_name") == first / "shared_name"
    with pytest.raises(LowdoseError, match="no such model"):
        find_bundle("dose_unet")  # the shipped models are not used when LOWDOSE_MODELS is set
    monkeypatch.setenv(MODELS_ENV, str(tmp_path / "missing"))
    with pytest.raises(LowdoseError, match=re.escape(MODELS_ENV)):
        available_models()
