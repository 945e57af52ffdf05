"""The MONAI Label server (`lowdose serve`) tested as a user meets it: a real server process on loopback,
real HTTP, real files; and a real PACS (Orthanc with DICOMweb) for the round trip.

A model bundle with randomly initialised weights stands in for the trained one: these tests check the
server (geometry, HU, dose reporting, queueing, errors, PACS round trip), not denoising quality, and the
server's result must equal what the library gives in-process with the same bundle, whatever the weights.
Inputs are small crops of the real CT series so that the whole module runs in about two minutes.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import threading
import time
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import requests

from .conftest import SAMPLE_DICOM, shared
from .server_fixtures import (
    APP_DIR,
    crop_volume,
    make_random_bundle,
    make_random_diffusion_bundle,
    start_lowdose_server,
    start_orthanc,
    stop_lowdose_server,
    stop_orthanc,
    upload_to_orthanc,
)

MODEL = "denoise_dose_unet"
DIFFUSION = "denoise_dose_diffusion"  # a diffusion model: the only kind that takes sampling steps
DIFFUSION_STEPS = 3  # its bundle's sampling steps (not the network's default, 2: the server reads the bundle)
BAD_STEPS = (0, 5, 10**9, "2", True, 2.5, [2], {"steps": 2})
BAD_ENSEMBLES = (0, 3, 16, -8, 10**9, "8", True, 2.0, [8], {"ensemble": 8}, None)
STUDY_ID = "abdomen_small"
MAX_UPLOAD_MB = 8
SERVER_STRENGTH = "medium"  # what the server applies unless a request asks for another strength
HU_SANE = (-3100.0, 4100.0)  # a denoised CT stays inside the range a CT can hold


# ----------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("server")


@pytest.fixture(scope="module")
def models_dir(work) -> Path:
    folder = work / "models"
    make_random_bundle(folder)
    make_random_diffusion_bundle(folder, "dose_diffusion", DIFFUSION_STEPS)
    return folder


@pytest.fixture(scope="module")
def denoiser(models_dir):
    """The same bundle loaded in this process: what the server must reproduce."""
    from lowdose.denoise import Denoiser

    return Denoiser(str(models_dir / "dose_unet"), device="cpu")


@pytest.fixture(scope="module")
def studies(work, sample_volume) -> Path:
    """A local datastore with one small study (4 slices, 256 x 256) cut from the bundled sample."""
    from lowdose import save_ct

    folder = work / "studies"
    folder.mkdir()
    save_ct(crop_volume(sample_volume, slice(8, 12), slice(128, 384), slice(128, 384)), folder / f"{STUDY_ID}.nii.gz")
    return folder


@pytest.fixture(scope="module")
def totalsegmentator_env(work) -> dict:
    """Tiny random TotalSegmentator weights (see tests/fidelity_fixtures.py) where the server will look."""
    from .fidelity_fixtures import write_tiny_totalsegmentator_weights

    weights = work / "totalseg" / "weights"
    write_tiny_totalsegmentator_weights(weights, fast=True)
    return {"TOTALSEG_WEIGHTS_PATH": str(weights), "TOTALSEG_HOME_DIR": str(work / "totalseg")}


@pytest.fixture(scope="module")
def server(work, studies, models_dir, totalsegmentator_env):
    running = start_lowdose_server(
        work, str(studies), models_dir, max_upload_mb=MAX_UPLOAD_MB, env_extra=totalsegmentator_env
    )
    print(f"\nlowdose serve answered after {running.startup_seconds:.1f} s")
    yield running
    stop_lowdose_server(running)


def _infer(server, files=None, params=None, output="image", model=MODEL, image=None, timeout=300):
    query = {"output": output} if output else {}
    if image is not None:
        query["image"] = image
    data = {"params": json.dumps(params)} if params is not None else None
    return server.post(f"/infer/{model}", params=query, files=files, data=data, timeout=timeout)


def _load_response_image(response, path: Path):
    from lowdose import load_ct

    path.write_bytes(response.content)
    return load_ct(path)


def _assert_same_geometry(result, reference):
    assert result.shape == reference.shape
    np.testing.assert_allclose(result.spacing_mm, reference.spacing_mm, atol=1e-4)
    np.testing.assert_allclose(result.origin_mm, reference.origin_mm, atol=1e-3)
    np.testing.assert_allclose(result.direction, reference.direction, atol=1e-6)


def _assert_clean_error(response, status: int, *fragments: str, forbidden=()):
    text = response.text
    assert response.status_code == status, f"{response.status_code}: {text}"
    detail = response.json()["detail"]
    for fragment in fragments:
        assert fragment in detail, detail
    for secret in ("/tmp", "/work", "/root", "/home", str(Path.cwd()), "Traceback", 'File "', *forbidden):
        assert secret not in text, f"response leaks {secret!r}: {text}"


# ----------------------------------------------------------------------------------------- local datastore


def test_error_texts_lose_paths_but_keep_doses_and_urls():
    from lowdose.server import scrub

    text = (
        "/tmp/lowdose-request-x1/upload.nii.gz: not readable (/work/main/a b.dcm); dose 1/4, "
        "see http://127.0.0.1:8000/info/ or tmpab12cd_x.nii.gz"
    )
    assert scrub(text) == (
        "<path>: not readable (<path> b.dcm); dose 1/4, see http://127.0.0.1:8000/info/ or " "<file>"
    )


def test_server_starts_on_loopback_with_the_models_of_models_dir(server):
    import psutil

    info = server.get("/info/", timeout=30).json()
    assert MODEL in info["models"]
    assert info["models"][MODEL]["type"] == "others"  # image to image
    assert "finetune" in info["trainers"]
    assert info["datastore"]["total"] == 1
    listening = [
        c.laddr
        for c in psutil.Process(server.process.pid).net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    ]
    assert listening and all(addr.ip == "127.0.0.1" for addr in listening), listening


def test_denoise_upload_gives_the_library_result_with_the_input_geometry(
    server, sample_volume, denoiser, work, tmp_path
):
    from lowdose import load_ct, save_ct

    source = save_ct(crop_volume(sample_volume, slice(8, 13)), tmp_path / "low_dose.nii.gz")
    volume = load_ct(source)
    with ThreadPoolExecutor(1) as pool:  # while it runs, the server keeps answering
        started = time.perf_counter()
        future = pool.submit(_infer, server, files={"file": (source.name, source.read_bytes())}, params={"dose": "1/4"})
        info_seconds = _poll_info_until_done(server, [future])
        response = future.result()
        http_seconds = time.perf_counter() - started
    assert response.status_code == 200, response.text
    assert len(info_seconds) >= 3 and max(info_seconds) < 3.0, info_seconds
    summary = json.loads(response.headers["X-Lowdose-Result"])
    assert summary["model"] == "dose_unet"
    assert summary["dose_fraction"] == pytest.approx(0.25)
    assert summary["dose_source"] == "given"
    assert "dose 0.25" in summary["description"]
    # which model version and which exact weights made it
    weights = (denoiser.model.path or Path()) / "models" / "model.pt"
    assert summary["model_version"] == "0.1.0" and f"dose_unet {summary['model_version']}" in summary["description"]
    assert summary["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()

    result = _load_response_image(response, tmp_path / "denoised.nii.gz")
    _assert_same_geometry(result, volume)
    started = time.perf_counter()
    expected = denoiser(volume, dose=0.25, strength=SERVER_STRENGTH).volume
    library_seconds = time.perf_counter() - started
    assert result.metadata["source_dtype"] == "int16"
    assert np.abs(result.hu - np.rint(expected.hu)).max() <= 1.0
    assert HU_SANE[0] <= result.hu.min() and result.hu.max() <= HU_SANE[1]
    assert not np.array_equal(result.hu, volume.hu)  # it did something

    timing = {
        "slices": volume.shape[0],
        "shape_zyx": list(volume.shape),
        "http_seconds": round(http_seconds, 2),
        "library_seconds": round(library_seconds, 2),
        "server_reported_seconds": summary["seconds"],
        "overhead_seconds": round(http_seconds - library_seconds, 2),
        "info_during_inference_ms": [round(1000 * t) for t in info_seconds],
    }
    (work / "latency.json").write_text(json.dumps(timing, indent=2))
    print(f"\nlatency {timing}")


def test_readme_command_serves_the_shipped_model_and_denoises_the_sample(tmp_path):
    """The README's server command with its defaults (the bundled sample as datastore, the repository's
    models/, no token given: the server makes one) and its first curl with the token that
    `lowdose serve --show-token` prints: the shipped default model denoises the sample over HTTP."""
    import os
    import stat
    import subprocess
    import sys

    from lowdose import load_ct, sample_ct_path

    running = start_lowdose_server(tmp_path / "work", None, None, token="")
    try:
        token_file = tmp_path / "work" / "state" / "lowdose" / "server-token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        shown = subprocess.run(
            [sys.executable, "-m", "lowdose.server", "--show-token"],
            capture_output=True,
            text=True,
            env={**os.environ, "XDG_STATE_HOME": str(tmp_path / "work" / "state")},
            timeout=60,
            check=True,
        ).stdout.strip()
        assert shown == token_file.read_text().strip() and len(shown) >= 32
        assert running.get("/info/").status_code == 401  # the fixture did not know the token
        running.token = shown
        assert str(token_file) in running.log() and shown not in running.log()  # where, never what
        info = running.get("/info/", timeout=30).json()
        assert MODEL in info["models"] and info["datastore"]["total"] == 1
        response = running.post(
            f"/infer/{MODEL}", params={"image": "abdomen_ct_sample", "output": "image"}, timeout=600
        )
    finally:
        stop_lowdose_server(running)
    assert response.status_code == 200, response.text
    summary = json.loads(response.headers["X-Lowdose-Result"])
    assert summary["model"] == "dose_unet" and summary["dose_source"] == "estimated"
    result = _load_response_image(response, tmp_path / "denoised.nii.gz")
    sample = load_ct(sample_ct_path())
    _assert_same_geometry(result, sample)
    from lowdose.denoise import Denoiser

    expected = Denoiser("dose_unet", device="cpu")(
        sample, dose=summary["dose_fraction"], strength=SERVER_STRENGTH
    ).volume
    assert np.abs(result.hu - np.rint(expected.hu)).max() <= 1.0


def test_denoise_datastore_image_returns_json_and_multipart(server):
    response = _infer(server, image=STUDY_ID, output="json")
    assert response.status_code == 200, response.text
    summary = response.json()
    assert summary["dose_source"] == "estimated" and 0 < summary["dose_fraction"] <= 1
    detail = summary["dose_detail"]
    assert detail.startswith("read by the model from the ") and " slices (median; slices " in detail, detail
    assert summary["shape_zyx"] == [4, 256, 256]

    from requests_toolbelt.multipart.decoder import MultipartDecoder

    response = _infer(server, image=STUDY_ID, output="json", params={"dose": 0.5, "strength": "low"})
    assert response.status_code == 200, response.text
    assert response.json()["strength"] == 0.4 and response.json()["description"].endswith("strength low)")
    assert summary["strength"] == 0.7  # the server's default: medium
    _assert_clean_error(_infer(server, image=STUDY_ID, params={"strength": "max"}), 400, "strength must be")
    # Sampling steps: only a diffusion model takes them, and only 1 to 4 (no huge loop, no type confusion).
    for steps in BAD_STEPS:
        _assert_clean_error(_infer(server, image=STUDY_ID, params={"steps": steps}), 400, "steps must be")
    _assert_clean_error(_infer(server, image=STUDY_ID, params={"steps": 2}), 400, "not a diffusion model")

    response = _infer(server, image=STUDY_ID, output=None, params={"dose": 0.5})
    assert response.status_code == 200, response.text
    parts = {
        p.headers[b"Content-Disposition"].split(b'name="')[1].split(b'"')[0]: p
        for p in MultipartDecoder.from_response(response).parts
    }
    assert json.loads(parts[b"params"].content)["dose_fraction"] == pytest.approx(0.5)
    assert parts[b"image"].content[:2] == b"\x1f\x8b"  # a gzipped NIfTI


def test_info_gives_each_models_sampling_steps_and_a_diffusion_model_samples_in_the_steps_asked(
    server, models_dir, studies, tmp_path
):
    """/info/ tells clients which models take sampling steps and how many they take by default; the steps
    asked for go to the sampler (the library's result for those steps) and the result JSON says them."""
    from lowdose import load_ct
    from lowdose.denoise import Denoiser

    models = server.get("/info/", timeout=30).json()["models"]
    assert models[MODEL]["lowdose"]["sampling_steps"] is None and "steps" not in models[MODEL]["config"]
    assert models[DIFFUSION]["lowdose"]["sampling_steps"] == DIFFUSION_STEPS
    assert models[DIFFUSION]["config"]["steps"] == DIFFUSION_STEPS

    response = _infer(server, image=STUDY_ID, output="json", model=DIFFUSION)
    assert response.status_code == 200, response.text
    assert response.json()["steps"] == DIFFUSION_STEPS  # none asked: the bundle's
    plain = _infer(server, image=STUDY_ID, output="json")
    assert plain.status_code == 200 and plain.json()["steps"] is None, plain.text  # not a diffusion model

    volume = load_ct(studies / f"{STUDY_ID}.nii.gz")
    denoiser = Denoiser(str(models_dir / "dose_diffusion"), device="cpu")
    for steps in (1, 4):
        response = _infer(server, image=STUDY_ID, model=DIFFUSION, params={"steps": steps})
        assert response.status_code == 200, response.text
        assert json.loads(response.headers["X-Lowdose-Result"])["steps"] == steps
        result = _load_response_image(response, tmp_path / f"steps_{steps}.nii.gz")
        expected = denoiser(volume, strength=SERVER_STRENGTH, steps=steps).volume.hu
        other = denoiser(volume, strength=SERVER_STRENGTH, steps=5 - steps).volume.hu
        assert np.abs(result.hu - np.rint(expected)).max() <= 1.0
        assert np.abs(result.hu - np.rint(other)).max() > 2.0  # the steps made a difference: they were used
    for steps in BAD_STEPS:
        _assert_clean_error(_infer(server, image=STUDY_ID, model=DIFFUSION, params={"steps": steps}), 400, "steps")


def test_ensemble_is_validated_and_a_valid_one_gives_the_library_result(server, studies, denoiser, tmp_path):
    """``ensemble`` (in-plane symmetries averaged) is an integer among 1, 2, 4, 8 on the denoise and fidelity
    routes, checked before any CT is read (no long loop, no type confusion); 2 gives the library's result, which
    differs from the network alone, and the result JSON says it."""
    from lowdose import load_ct

    for size in BAD_ENSEMBLES:
        _assert_clean_error(_infer(server, image=STUDY_ID, params={"ensemble": size}), 400, "ensemble must be one of")
        response = _infer(server, image=STUDY_ID, output="json", model="fidelity", params={"ensemble": size})
        _assert_clean_error(response, 400, "ensemble must be one of")
    response = _infer(server, image=STUDY_ID, params={"dose": 0.25, "ensemble": 2})
    assert response.status_code == 200, response.text
    assert json.loads(response.headers["X-Lowdose-Result"])["ensemble"] == 2
    result = _load_response_image(response, tmp_path / "ensemble.nii.gz")
    volume = load_ct(studies / f"{STUDY_ID}.nii.gz")
    expected = denoiser(volume, dose=0.25, strength=SERVER_STRENGTH, ensemble=2).volume.hu
    alone = denoiser(volume, dose=0.25, strength=SERVER_STRENGTH).volume.hu
    assert np.abs(result.hu - np.rint(expected)).max() <= 1.0
    assert np.abs(result.hu - np.rint(alone)).max() > 2.0  # the ensemble was used


def test_fidelity_refuses_bad_steps_and_steps_for_a_model_that_is_not_a_diffusion_model(server):
    """The fidelity task takes ``steps`` as the denoise task does: checked before any CT is read."""
    for steps in BAD_STEPS:
        params = {"denoise_model": "dose_diffusion", "steps": steps}
        response = _infer(server, image=STUDY_ID, output="json", model="fidelity", params=params)
        _assert_clean_error(response, 400, "steps must be an integer from 1 to 4")
    for params in ({"steps": 2}, {"denoise_model": "dose_unet", "steps": 1}):  # the default model: dose_unet
        response = _infer(server, image=STUDY_ID, output="json", model="fidelity", params=params)
        _assert_clean_error(response, 400, "model dose_unet is not a diffusion model")


def _poll_info_until_done(server, futures, interval: float = 0.05) -> list[float]:
    """Ask /info/ again and again until ``futures`` are done; how long each answer took (s)."""
    seconds = []
    while not all(f.done() for f in futures):
        t0 = time.perf_counter()
        assert server.get("/info/", timeout=10).status_code == 200
        seconds.append(time.perf_counter() - t0)
        time.sleep(interval)
    return seconds


def _consecutive_dicom_files(folder: Path, count: int, start: int = 0) -> list[Path]:
    import pydicom

    position = {}
    for f in folder.iterdir():
        try:
            position[f] = float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2])
        except (pydicom.errors.InvalidDicomError, AttributeError, IsADirectoryError):
            continue  # licence and citation files beside the series
    return sorted(position, key=position.get)[start : start + count]


def test_denoise_zipped_dicom_series_as_float32(server, denoiser, tmp_path):
    from lowdose import load_ct

    files = _consecutive_dicom_files(SAMPLE_DICOM, 4, start=6)
    series = tmp_path / "series"
    series.mkdir()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for f in files:
            archive.write(f, f"study/{f.name}")
            (series / f.name).write_bytes(f.read_bytes())
    response = _infer(
        server, files={"file": ("study.zip", buffer.getvalue())}, params={"dose": 0.5, "output_dtype": "float32"}
    )
    assert response.status_code == 200, response.text
    result = _load_response_image(response, tmp_path / "denoised.nii.gz")
    volume = load_ct(series)
    _assert_same_geometry(result, volume)
    assert result.metadata["source_dtype"] == "float32"
    np.testing.assert_allclose(result.hu, denoiser(volume, dose=0.5, strength=SERVER_STRENGTH).volume.hu, atol=0.05)


def test_bad_requests_get_a_clear_4xx_without_paths_or_patient_data(server, tmp_path):
    import pydicom
    import SimpleITK as sitk

    from lowdose import CTVolume, save_ct

    rng = np.random.default_rng(0)
    mr = pydicom.dcmread(_consecutive_dicom_files(SAMPLE_DICOM, 1)[0])
    mr.Modality, mr.PatientName = "MR", "Doe^Jane"
    mr_bytes = io.BytesIO()
    mr.save_as(mr_bytes)
    eight_bit = tmp_path / "display.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(rng.integers(0, 255, (3, 32, 32)).astype(np.uint8)), str(eight_bit))
    cases = [
        ({"file": ("notes.txt", b"this is not a scan\n" * 50)}, None, 422, "not a DICOM, NIfTI, NRRD or MHA file"),
        ({"file": ("scan.nii.gz", rng.bytes(50_000))}, None, 422, "not a readable .nii.gz image"),
        ({"file": ("series.zip", b"PK\x03\x04" + rng.bytes(5_000))}, None, 422, "damaged zip"),
        ({"file": ("display.nii.gz", eight_bit.read_bytes())}, None, 422, "8-bit"),
        ({"file": ("mr.dcm", mr_bytes.getvalue())}, None, 422, "modality is MR, not CT"),
        (
            {"file": ("big.nii.gz", rng.bytes(int((MAX_UPLOAD_MB + 1) * 2**20)))},
            None,
            413,
            f"limit of {MAX_UPLOAD_MB} MB",
        ),
        ({"file": ("scan.nii.gz", b"x")}, "{not json", 400, "must be a JSON object"),
        ({"file": ("scan.nii.gz", b"x")}, '{"image": "/etc/passwd"}', 400, "params may not set image"),
        (None, None, 400, "give a CT to process"),
    ]
    for files, params, status, fragment in cases:
        data = {"params": params} if params is not None else None
        response = server.post(f"/infer/{MODEL}", params={"output": "image"}, files=files, data=data, timeout=120)
        _assert_clean_error(response, status, fragment, forbidden=("Doe", "Jane"))

    save_ct(CTVolume(hu=rng.normal(-500, 50, (3, 40, 40)).astype(np.float32)), tmp_path / "ok.nii.gz")
    response = _infer(server, files={"file": ("ok.nii.gz", (tmp_path / "ok.nii.gz").read_bytes())}, params={"dose": 7})
    _assert_clean_error(response, 400, "dose fraction must be in (0, 1]")
    _assert_clean_error(_infer(server, image="no_such_study"), 404, "no image 'no_such_study'")
    _assert_clean_error(_infer(server, image="/etc/passwd"), 400, "not a valid name", forbidden=("/etc",))
    _assert_clean_error(_infer(server, image="../../etc"), 400, "not a valid name")
    _assert_clean_error(
        _infer(server, image=STUDY_ID, model="denoise_nonexistent"), 404, "no model named 'denoise_nonexistent'", MODEL
    )
    _assert_clean_error(_infer(server, image=STUDY_ID, output="pdf"), 400, "output must be")
    # Requests a web page elsewhere could make: refused.
    response = server.post(
        f"/infer/{MODEL}", params={"image": STUDY_ID}, headers={"Origin": "http://evil.example"}, timeout=30
    )
    _assert_clean_error(response, 403, "cross-origin")
    response = server.get("/info/", headers={"Host": "evil.example"}, timeout=30)
    _assert_clean_error(response, 400, "Host")
    assert server.get("/info/", timeout=30).status_code == 200  # still serving


def test_eight_concurrent_requests_all_succeed_while_info_answers(server, sample_volume, denoiser, tmp_path):
    from lowdose import load_ct, save_ct

    doses = [1 / 2, 1 / 4, 1 / 6, 1 / 10]
    jobs = []
    for k in range(8):  # different crops and doses: a mix-up of results would show
        crop = crop_volume(sample_volume, slice(2 * k, 2 * k + 3), slice(96, 416), slice(72 + 8 * k, 392 + 8 * k))
        path = save_ct(crop, tmp_path / f"crop{k}.nii.gz")
        jobs.append((path, doses[k % 4]))
    barrier = threading.Barrier(len(jobs) + 1)

    def send(job):
        path, dose = job
        barrier.wait()
        started = time.perf_counter()
        response = _infer(server, files={"file": (path.name, path.read_bytes())}, params={"dose": dose})
        return response, time.perf_counter() - started

    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = [pool.submit(send, job) for job in jobs]
        barrier.wait()
        started = time.perf_counter()
        info_seconds = _poll_info_until_done(server, futures)
        results = [f.result() for f in futures]
        wall = time.perf_counter() - started

    for (path, dose), (response, _) in zip(jobs, results):
        assert response.status_code == 200, response.text
        assert json.loads(response.headers["X-Lowdose-Result"])["dose_fraction"] == pytest.approx(dose)
        result = _load_response_image(response, path.with_name(path.name.replace("crop", "out")))
        volume = load_ct(path)
        _assert_same_geometry(result, volume)
        expected = denoiser(volume, dose=dose, strength=SERVER_STRENGTH).volume.hu
        assert np.abs(result.hu - np.rint(expected)).max() <= 1.0
    assert len(info_seconds) >= 3, "the requests finished before /info/ could be asked during them"
    assert max(info_seconds) < 3.0, f"/info/ took up to {max(info_seconds):.1f} s during inference"
    print(
        f"\n8 concurrent requests: all 200 in {wall:.1f} s (each {min(r[1] for r in results):.1f}-"
        f"{max(r[1] for r in results):.1f} s); /info/ answered {len(info_seconds)} times during them, "
        f"median {1000 * np.median(info_seconds):.0f} ms, max {1000 * max(info_seconds):.0f} ms"
    )


def test_fidelity_report_and_label_maps(server, studies):
    """The fidelity task with a tiny random TotalSegmentator stand-in: the plumbing, not the verdicts."""
    from requests_toolbelt.multipart.decoder import MultipartDecoder

    from lowdose import load_ct
    from lowdose.fidelity import load_label_map

    response = _infer(
        server, image=STUDY_ID, output=None, model="fidelity", params={"dose": 0.25, "labels": True}, timeout=900
    )  # two TotalSegmentator runs: nnU-Net starts worker processes for each
    assert response.status_code == 200, response.text
    parts = {
        p.headers[b"Content-Disposition"].split(b'name="')[1].split(b'"')[0]: p
        for p in MultipartDecoder.from_response(response).parts
    }
    report = json.loads(parts[b"params"].content)
    assert report["study"]["verdict"] in ("kept", "check", "changed")
    assert report["denoising"]["model"] == "dose_unet" and report["denoising"]["dose_fraction"] == 0.25
    assert report["denoising"]["steps"] is None  # not a diffusion model
    assert report["segmenter"]["classes"] == 117
    archive = zipfile.ZipFile(io.BytesIO(parts[b"image"].content))
    html = archive.read("fidelity/fidelity.html").decode()
    for secret in ("/tmp", "/work", "/root", "weights_dir"):
        assert secret not in parts[b"params"].content.decode(), secret
        assert secret not in html, secret
    names = {Path(n).name for n in archive.namelist()}
    assert {
        "fidelity.json",
        "fidelity.html",
        "labels_original.nii.gz",
        "labels_denoised.nii.gz",
        "denoised.nii.gz",
    } <= names
    original = load_ct(studies / f"{STUDY_ID}.nii.gz")
    target = server.log_path.parent / "fidelity_labels.nii.gz"
    target.write_bytes(archive.read("fidelity/labels_denoised.nii.gz"))
    labels, _ = load_label_map(target, original)
    assert labels.shape == original.shape


def test_fidelity_denoises_with_the_sampling_steps_asked(server, models_dir, studies, tmp_path):
    """A diffusion model's fidelity check samples in the steps asked: its denoised scan is the library's."""
    from requests_toolbelt.multipart.decoder import MultipartDecoder

    from lowdose import load_ct
    from lowdose.denoise import Denoiser

    params = {"denoise_model": "dose_diffusion", "steps": 1, "labels": True}
    response = _infer(server, image=STUDY_ID, output=None, model="fidelity", params=params, timeout=900)
    assert response.status_code == 200, response.text
    parts = {
        p.headers[b"Content-Disposition"].split(b'name="')[1].split(b'"')[0]: p
        for p in MultipartDecoder.from_response(response).parts
    }
    denoising = json.loads(parts[b"params"].content)["denoising"]
    assert (denoising["model"], denoising["steps"]) == ("dose_diffusion", 1)
    target = tmp_path / "denoised.nii.gz"
    target.write_bytes(zipfile.ZipFile(io.BytesIO(parts[b"image"].content)).read("fidelity/denoised.nii.gz"))
    volume = load_ct(studies / f"{STUDY_ID}.nii.gz")
    denoiser = Denoiser(str(models_dir / "dose_diffusion"), device="cpu")
    one, default = (denoiser(volume, strength=SERVER_STRENGTH, steps=k).volume.hu for k in (1, DIFFUSION_STEPS))
    result = load_ct(target).hu
    assert np.abs(result - np.rint(one)).max() <= 1.0
    assert np.abs(result - np.rint(default)).max() > 2.0  # not the bundle's own steps


def _wait_for_task(server, path: str, seconds: float) -> dict:
    deadline = time.time() + seconds
    while time.time() < deadline:
        response = server.get(path, timeout=30)
        if response.status_code == 200 and response.json().get("status") not in ("SUBMITTED", "RUNNING"):
            return response.json()
        time.sleep(1)
    pytest.fail(f"{path} still running after {seconds:.0f} s; server log ends:\n{server.log()[-3000:]}")


def test_finetune_on_the_datastore_makes_a_new_model_that_the_server_offers(server, models_dir):
    params = {"epochs": 1, "slices_per_epoch": 2, "patches_per_slice": 2, "patch_size": 64, "batch_size": 4}
    response = server.post("/train/finetune", json=params, timeout=60)
    assert response.status_code == 200, response.text
    task = _wait_for_task(server, "/train/", 900)
    assert task["status"] == "DONE", "\n".join(task.get("details", []))
    assert (models_dir / "dose_unet_finetuned" / "models" / "model.pt").is_file()
    assert (models_dir / "dose_unet" / "models" / "model.pt").is_file()  # the source model is kept
    info = server.get("/info/", timeout=30).json()
    assert "denoise_dose_unet_finetuned" in info["models"]
    response = _infer(server, image=STUDY_ID, output="json", model="denoise_dose_unet_finetuned")
    assert response.status_code == 200, response.text
    assert response.json()["model"] == "dose_unet_finetuned"
    # it names the version it grew from (the random test bundle's 0.1.0)
    assert info["models"]["denoise_dose_unet_finetuned"]["lowdose"]["version"] == "0.1.0+finetuned"
    assert response.json()["model_version"] == "0.1.0+finetuned"


def test_finetune_never_overwrites_other_models_and_stopping_needs_the_token(server, models_dir):
    """After the fine-tune above: its model may be overwritten only when asked; the shipped one never; the
    running training cannot be stopped without the token."""
    made = models_dir / "dose_unet_finetuned" / "models" / "model.pt"
    assert made.is_file(), "runs after test_finetune_on_the_datastore_makes_a_new_model_that_the_server_offers"
    shipped = (models_dir / "dose_unet" / "models" / "model.pt").read_bytes()
    quick = {"epochs": 1, "slices_per_epoch": 1, "patches_per_slice": 1, "patch_size": 64, "batch_size": 1}
    response = server.post("/train/finetune", json={**quick, "output_model": "dose_unet_finetuned"})
    _assert_clean_error(response, 409, "exists")
    response = server.post("/train/finetune", json={**quick, "output_model": "dose_unet", "overwrite": True})
    _assert_clean_error(response, 409, "source model")
    shutil.copytree(models_dir / "dose_unet", models_dir / "shipped_copy")  # a model fine-tuning did not make
    try:
        response = server.post("/train/finetune", json={**quick, "output_model": "shipped_copy", "overwrite": True})
        _assert_clean_error(response, 409, "not made by fine-tuning")
    finally:
        shutil.rmtree(models_dir / "shipped_copy")

    response = server.post(
        "/train/finetune",
        json={**quick, "epochs": 50, "slices_per_epoch": 200, "output_model": "dose_unet_finetuned", "overwrite": True},
    )
    assert response.status_code == 200, response.text
    assert requests.delete(f"{server.url}/train/", timeout=30).status_code == 401
    assert (
        requests.delete(
            f"{server.url}/train/", headers={"Authorization": "Bearer wrong-token-0123456789"}, timeout=30
        ).status_code
        == 401
    )
    # MONAI Label starts the task on a worker thread: it may take a moment to show as running
    running = server.get("/train/", params={"check_if_running": True}).status_code
    for _ in range(50):
        if running == 200:
            break
        time.sleep(0.1)
        running = server.get("/train/", params={"check_if_running": True}).status_code
    assert running == 200  # running, the refused stop requests did not stop it
    assert server.request("DELETE", "/train/").status_code == 200
    task = _wait_for_task(server, "/train/", 120)
    assert task["status"] in ("STOPPED", "ERROR"), task["status"]
    assert (models_dir / "dose_unet" / "models" / "model.pt").read_bytes() == shipped


# ----------------------------------------------------------------------------------------- PACS (Orthanc)


@pytest.fixture(scope="module")
def pacs_series() -> list[Path]:
    """Six consecutive slices of the shared 134-slice series (proper UIDs, as a PACS holds them)."""
    return _consecutive_dicom_files(shared("tcia_pancreatic_ct_cbct_seg"), 6, start=60)


@pytest.fixture(scope="module")
def orthanc(work, pacs_series):
    running = start_orthanc(work / "orthanc")
    upload_to_orthanc(running, pacs_series)
    yield running
    stop_orthanc(running)


@pytest.fixture(scope="module")
def pacs_server(work, orthanc, models_dir):
    no_weights = work / "pacs" / "no_totalseg_weights"
    no_weights.mkdir(parents=True)
    running = start_lowdose_server(
        work / "pacs",
        orthanc.dicomweb,
        models_dir,
        max_upload_mb=MAX_UPLOAD_MB,
        env_extra={"TOTALSEG_WEIGHTS_PATH": str(no_weights), "TOTALSEG_HOME_DIR": str(no_weights)},
    )
    yield running
    stop_lowdose_server(running)


def test_pacs_round_trip_stores_a_new_derived_series_in_the_same_study(
    orthanc, pacs_server, pacs_series, denoiser, tmp_path
):
    import pydicom
    from dicomweb_client.api import DICOMwebClient

    from lowdose import load_ct

    original = [pydicom.dcmread(f) for f in pacs_series]
    series_uid, study_uid = str(original[0].SeriesInstanceUID), str(original[0].StudyInstanceUID)
    info = pacs_server.get("/info/", timeout=30).json()
    assert info["lowdose"]["pacs"] and info["datastore"]["total"] == 1
    assert not (APP_DIR / "bin" / "itkimage2segimage").exists()  # no dcmqi download at start-up

    response = _infer(pacs_server, image=series_uid, output="json", params={"dose": 0.25})
    assert response.status_code == 200, response.text
    stored = response.json()["pacs"]
    assert stored["stored"] and stored["instances"] == len(original)
    assert stored["study_instance_uid"] == study_uid and stored["series_instance_uid"] != series_uid

    client = DICOMwebClient(orthanc.dicomweb)
    listed = {s["0020000E"]["Value"][0]: s for s in client.search_for_series(study_uid)}
    assert set(listed) == {series_uid, stored["series_instance_uid"]}
    derived = client.retrieve_series(study_uid, stored["series_instance_uid"])
    assert len(derived) == len(original)
    original_sops = {str(ds.SOPInstanceUID) for ds in original}
    for ds in derived:
        assert str(ds.SOPInstanceUID) not in original_sops
        assert str(ds.StudyInstanceUID) == study_uid
        assert str(ds.FrameOfReferenceUID) == str(original[0].FrameOfReferenceUID)
        assert str(ds.PatientID) == str(original[0].PatientID)
        assert ds.Modality == "CT" and list(ds.ImageType)[:2] == ["DERIVED", "SECONDARY"]
        assert "dose_unet" in ds.SeriesDescription and "0.25" in ds.SeriesDescription

    folder = tmp_path / "derived"
    folder.mkdir()
    for k, ds in enumerate(derived):
        ds.save_as(folder / f"{k:03d}.dcm")
    original_folder = tmp_path / "original"
    original_folder.mkdir()
    for f in pacs_series:
        (original_folder / f.name).write_bytes(f.read_bytes())
    result, volume = load_ct(folder), load_ct(original_folder)
    _assert_same_geometry(result, volume)
    assert np.abs(result.hu - np.rint(denoiser(volume, dose=0.25, strength=SERVER_STRENGTH).volume.hu)).max() <= 1.0
    assert HU_SANE[0] <= result.hu.min() and result.hu.max() <= HU_SANE[1]

    # The original series is untouched.
    again = client.retrieve_series(study_uid, series_uid)
    assert {str(ds.SOPInstanceUID) for ds in again} == original_sops
    by_uid = {str(ds.SOPInstanceUID): ds for ds in original}
    for ds in again:
        assert np.array_equal(ds.pixel_array, by_uid[str(ds.SOPInstanceUID)].pixel_array)


def test_fidelity_without_segmentation_weights_is_503(pacs_server, pacs_series):
    import pydicom

    series_uid = str(pydicom.dcmread(pacs_series[0], stop_before_pixels=True).SeriesInstanceUID)
    response = _infer(pacs_server, image=series_uid, output="json", model="fidelity", params={"dose": 0.25})
    _assert_clean_error(response, 503, "segmentation model is not installed")


def test_pacs_data_lives_only_as_long_as_its_request_and_stays_out_of_the_log(orthanc, pacs_server, pacs_series):
    """After PACS requests (the round trip above and one more here) no series is left on the server's disk
    (no cache folder, an empty scratch folder) and no patient name or id is in the server log."""
    import pydicom

    from lowdose.server.settings import scratch_parent

    first = pydicom.dcmread(pacs_series[0], stop_before_pixels=True)
    response = _infer(
        pacs_server, image=str(first.SeriesInstanceUID), output="json", params={"dose": 0.5, "store_to_pacs": False}
    )
    assert response.status_code == 200, response.text
    assert response.json()["pacs"] == {"stored": False}
    scratch = scratch_parent() / str(pacs_server.process.pid)
    assert scratch.is_dir()
    left = [p for p in scratch.rglob("*") if p.is_file() and p.name != ".lock"]  # MONAI Label's datastore lock
    assert not left, f"left on the server's disk after the request: {left}"
    cache = pacs_server.log_path.parent / "cache"
    assert not any(cache.rglob("*.dcm")), "DICOM files kept in the cache folder"
    log = pacs_server.log()
    for value in (str(first.PatientName), str(first.PatientID)):
        assert value and value not in log, f"patient data {value!r} in the server log"


def test_pacs_jpeg2000_series_is_decoded(orthanc, pacs_server, tmp_path):
    """The shared JPEG 2000 (lossless) series, stored in Orthanc with its compressed pixel data as it is, is
    fetched and denoised (was 500). Its files have no UIDs (anonymised), which a PACS needs: the test gives
    them some; the pixel data are untouched."""
    import pydicom
    from pydicom.uid import generate_uid

    study, series = generate_uid(entropy_srcs=["j2k study"]), generate_uid(entropy_srcs=["j2k series"])
    files = []
    for k, source in enumerate(sorted(shared("totalsegmentator/example_ct_dicom").iterdir())[:6]):
        ds = pydicom.dcmread(source)
        assert ds.file_meta.TransferSyntaxUID.is_compressed
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=["j2k", str(k)])
        ds.save_as(tmp_path / f"{k}.dcm")
        files.append(tmp_path / f"{k}.dcm")
    upload_to_orthanc(orthanc, files)
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    response = _infer(
        pacs_server, image=str(first.SeriesInstanceUID), output="json", params={"dose": 0.25, "store_to_pacs": False}
    )
    assert response.status_code == 200, response.text
    assert response.json()["shape_zyx"] == [6, 512, 512]


def test_dicomweb_proxy_forwards_dicomweb_only(orthanc, pacs_server, pacs_series):
    """The proxy answers DICOMweb paths of the PACS; traversal, the PACS's REST API and non-DICOMweb paths are
    400 and never reach it; only STOW-RS may send, within the upload limit; the token is required."""
    import http.client
    import urllib.parse

    import pydicom

    first = pydicom.dcmread(pacs_series[0], stop_before_pixels=True)
    study, series = str(first.StudyInstanceUID), str(first.SeriesInstanceUID)
    response = pacs_server.get("/proxy/dicom/qido/studies")
    assert response.status_code == 200 and study in response.text
    response = pacs_server.get(f"/proxy/dicom/wado/studies/{study}/series/{series}/metadata")
    assert response.status_code == 200 and response.json()[0]["0020000E"]["Value"] == [series]
    assert requests.get(f"{pacs_server.url}/proxy/dicom/qido/studies", timeout=30).status_code == 401

    host, port = urllib.parse.urlsplit(pacs_server.url).hostname, urllib.parse.urlsplit(pacs_server.url).port
    attacks = [
        "/proxy/dicom/qido/../../system",
        "/proxy/dicom/qido/studies/../../patients",
        "/proxy/dicom/qido/%2e%2e/%2e%2e/patients",
        "/proxy/dicom/qido/studies/..%2f..%2fpatients",
        "/proxy/dicom/wado/patients",
        "/proxy/dicom/wado/instances/../../tools/now",
        f"/proxy/dicom/wado/studies/{study}/archive",
        "/proxy/dicom/qido/studies/1.2;x",
        "/proxy/dicom/wado/studies/%252e%252e/system",
        "/proxy/dicom/qido/studies\\..\\..\\system",
    ]
    for path in attacks:  # sent as they are (no client-side normalisation of '..')
        connection = http.client.HTTPConnection(host, port, timeout=30)
        connection.request("GET", path, headers=pacs_server.headers)
        answer = connection.getresponse()
        body = answer.read().decode(errors="replace")
        connection.close()
        assert answer.status in (400, 404), f"{path}: {answer.status} {body[:200]}"
        assert "Orthanc" not in body and "PatientID" not in body and "00100020" not in body, path
    dataset = pydicom.dcmread(pacs_series[0])
    assert pacs_server.post("/proxy/dicom/qido/studies", data=b"x").status_code == 404
    too_big = pacs_server.post(
        "/proxy/dicom/stow/studies",
        data=b"\0" * int((MAX_UPLOAD_MB + 1) * 2**20),
        headers={"Content-Type": "application/dicom"},
    )
    assert too_big.status_code == 413
    assert dataset.SeriesInstanceUID  # the PACS still holds only what the tests stored
    listed = pacs_server.get(f"/proxy/dicom/qido/studies/{study}/series").json()
    assert series in {s["0020000E"]["Value"][0] for s in listed}
