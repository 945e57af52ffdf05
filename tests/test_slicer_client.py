"""The 3D Slicer module's server client (slicer_extension/LowDoseDenoise/LowDoseDenoiseLib), tested against the
real lowdose server: `python -m lowdose.server` started as a subprocess on a free loopback port, real HTTP,
real CT files (small crops of the bundled sample series, written with lowdose.save_ct).

A model bundle with randomly initialised weights stands in for the trained one, and a tiny random
TotalSegmentator model for the real segmentation weights (neither can exist here): these tests check the
client (upload, progress, cancellation, time limits, errors, consent, geometry of what comes back), not
denoising or segmentation quality. The server requires its access token (a random one per test server,
given to it through LOWDOSE_TOKEN); the client sends it. 3D Slicer itself cannot run here; the module's
Slicer side is checked in tests/test_slicer_module.py and by its self-test inside Slicer.

Two answers the real server never gives (a result that is not a volume, a server that is not lowdose's)
are produced by a small stand-in HTTP server on loopback, the only way to see the client handle them.
"""

from __future__ import annotations

import http.server
import json
import re
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from .server_fixtures import crop_volume, free_port, make_random_bundle, start_lowdose_server, stop_lowdose_server

MODULE_DIR = Path(__file__).resolve().parent.parent / "slicer_extension" / "LowDoseDenoise"
sys.path.insert(0, str(MODULE_DIR))

from LowDoseDenoiseLib.client import (  # noqa: E402
    AuthenticationError,
    Cancelled,
    ConsentRequired,
    LowDoseClient,
    NotAVolume,
    ServerError,
    ServerUnreachable,
    Timeout,
    Timeouts,
    server_key,
    sniff_volume,
)
from LowDoseDenoiseLib.dose import parse_dose  # noqa: E402
from LowDoseDenoiseLib.ensemble import (  # noqa: E402
    ENSEMBLE_SIZES,
    check_ensemble,
    ensemble_choice,
    ensemble_label,
    ensemble_name,
)
from LowDoseDenoiseLib.jobs import BackgroundJob  # noqa: E402
from LowDoseDenoiseLib.messages import ensemble_tooltip  # noqa: E402
from LowDoseDenoiseLib.results import (  # noqa: E402
    denoised_record,
    denoised_volume_name,
    fidelity_label_names,
    fidelity_rows,
    made_with,
    record_ensemble,
)
from LowDoseDenoiseLib.settings import JsonConsentStore, MemorySettings, ModuleSettings  # noqa: E402
from LowDoseDenoiseLib.strength import parse_strength  # noqa: E402

MODEL_TASK = "denoise_dose_unet"
MAX_UPLOAD_MB = 8
HU_SANE = (-3100.0, 4100.0)
# what the server answers with 400 "ensemble must be one of 1, 2, 4, 8", so the client never sends them
BAD_ENSEMBLES = (0, 3, 16, -8, 10**9, "8", "x8", True, False, 2.0, 8.0, None, [8], {"ensemble": 8})


# ----------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("slicer_client")


@pytest.fixture(scope="module")
def server(work, sample_volume):
    from lowdose import save_ct

    from .fidelity_fixtures import write_tiny_totalsegmentator_weights

    models = work / "models"
    make_random_bundle(models)
    weights = work / "totalseg" / "weights"
    write_tiny_totalsegmentator_weights(weights, fast=True)
    studies = work / "studies"
    studies.mkdir()
    save_ct(crop_volume(sample_volume, slice(8, 11), slice(128, 256), slice(128, 256)), studies / "tiny.nii.gz")
    running = start_lowdose_server(
        work,
        str(studies),
        models,
        max_upload_mb=MAX_UPLOAD_MB,
        env_extra={"TOTALSEG_WEIGHTS_PATH": str(weights), "TOTALSEG_HOME_DIR": str(work / "totalseg")},
    )
    yield running
    stop_lowdose_server(running)


@pytest.fixture(scope="module")
def small_ct(work, sample_volume) -> Path:
    """4 slices of 256 x 256 from the sample series, as NIfTI (the geometry of a real crop: origin moved)."""
    from lowdose import save_ct

    return save_ct(crop_volume(sample_volume, slice(8, 12), slice(128, 384), slice(96, 352)), work / "small.nii.gz")


@pytest.fixture(scope="module")
def tiny_ct(work, sample_volume) -> Path:
    """3 slices of 128 x 128: the fidelity check segments two scans, which is slow on 2 cores."""
    from lowdose import save_ct

    return save_ct(crop_volume(sample_volume, slice(8, 11), slice(200, 328), slice(192, 320)), work / "tiny.nii.gz")


@pytest.fixture(scope="module")
def slow_ct(work, sample_volume) -> Path:
    """6 whole 512 x 512 slices as NRRD (what the module exports): seconds of inference on 2 cores."""
    from lowdose import save_ct

    return save_ct(crop_volume(sample_volume, slice(7, 13)), work / "slices.nrrd")


@pytest.fixture()
def consent(tmp_path) -> JsonConsentStore:
    return JsonConsentStore(tmp_path / "settings" / "consent.json")


@pytest.fixture()
def client(server, consent) -> LowDoseClient:
    consent.allow(server.url)
    return LowDoseClient(server.url, consent, Timeouts(connect=5, response=300, idle=60), token=server.token)


def _assert_same_geometry(result, reference):
    assert result.shape == reference.shape
    np.testing.assert_allclose(result.spacing_mm, reference.spacing_mm, atol=1e-4)
    np.testing.assert_allclose(result.origin_mm, reference.origin_mm, atol=1e-3)
    np.testing.assert_allclose(result.direction, reference.direction, atol=1e-6)


# ----------------------------------------------------------------------------------------- the work


def test_info_lists_the_denoising_models_and_the_fidelity_check(client, work):
    from lowdose.bundle import Bundle

    info = client.info()
    models = client.models(info)
    assert [m.task for m in models] == [MODEL_TASK]
    assert models[0].model == "dose_unet" and models[0].dose_aware
    assert models[0].version == Bundle.read(work / "models" / "dose_unet").version == "0.1.0"  # the menu names it
    assert models[0].sampling_steps is None and "sampling_steps" in info["models"][MODEL_TASK]["lowdose"]
    assert "denoised CT out" in models[0].description
    assert client.has_fidelity(info)
    assert info["lowdose"]["max_upload_mb"] == MAX_UPLOAD_MB


def test_denoise_returns_a_volume_with_the_input_geometry_and_reports_progress(client, small_ct, tmp_path):
    from lowdose import load_ct

    reports = []
    result = client.denoise(small_ct, MODEL_TASK, dose="1/4", progress=reports.append, result_dir=tmp_path)
    assert result.path.parent == result.folder and result.folder.parent == tmp_path
    assert sniff_volume(result.path) == "nifti"
    assert result.summary["model"] == "dose_unet"
    assert result.summary["dose_fraction"] == pytest.approx(0.25) and result.summary["dose_source"] == "given"

    original, denoised = load_ct(small_ct), load_ct(result.path)
    _assert_same_geometry(denoised, original)
    assert HU_SANE[0] <= denoised.hu.min() and denoised.hu.max() <= HU_SANE[1]
    assert not np.array_equal(denoised.hu, original.hu)

    stages = [r.stage for r in reports]
    assert stages[0] == "upload" and stages[-1] == "download" and "waiting" in stages
    assert stages.index("waiting") < stages.index("download")
    uploads = [r for r in reports if r.stage == "upload"]
    assert uploads[-1].done == uploads[-1].total > small_ct.stat().st_size  # the file plus the form around it
    assert [r.done for r in uploads] == sorted(r.done for r in uploads)
    downloads = [r for r in reports if r.stage == "download"]
    assert downloads[-1].done == downloads[-1].total > result.path.stat().st_size  # image plus the JSON part


def test_denoise_nrrd_with_automatic_dose_in_a_background_job(client, slow_ct):
    """What the module does: an NRRD export, dose "auto", the request in a thread polled by the GUI."""
    from lowdose import load_ct

    job = BackgroundJob(
        lambda progress, cancel: client.denoise(slow_ct, MODEL_TASK, dose="auto", progress=progress, cancel=cancel)
    ).start()
    reports = []
    deadline = time.monotonic() + 300
    while not job.done and time.monotonic() < deadline:
        reports += job.poll()
        time.sleep(0.05)
    assert job.done and job.error is None, job.error
    result = job.result
    try:
        assert result.summary["dose_source"] == "estimated" and 0 < result.summary["dose_fraction"] <= 1
        _assert_same_geometry(load_ct(result.path), load_ct(slow_ct))
        assert {"upload", "waiting", "download"} <= {r.stage for r in reports}
        assert all(r.describe() for r in reports)
    finally:
        import shutil

        shutil.rmtree(result.folder)


def test_a_self_ensemble_of_2_goes_to_the_real_server_and_comes_back_in_the_summary_and_the_record(
    client, small_ct, tmp_path
):
    """One real round trip with ``ensemble=2``: the server averages two symmetries (a different result from the
    network alone), says so in its summary, and the record and name of the denoised volume carry it."""
    from lowdose import load_ct

    alone = client.denoise(small_ct, MODEL_TASK, dose="1/4", result_dir=tmp_path)  # 1: not sent
    two = client.denoise(small_ct, MODEL_TASK, dose="1/4", ensemble=2, result_dir=tmp_path)
    assert alone.summary["ensemble"] == 1 and two.summary["ensemble"] == 2
    assert "2-fold self-ensemble" in two.summary["description"]
    assert "self-ensemble" not in alone.summary["description"]
    original, plain, averaged = load_ct(small_ct), load_ct(alone.path), load_ct(two.path)
    _assert_same_geometry(averaged, original)
    assert HU_SANE[0] <= averaged.hu.min() and averaged.hu.max() <= HU_SANE[1]
    assert np.abs(averaged.hu - plain.hu).max() >= 1.0  # the server did average, not ignore the parameter

    record = denoised_record("dose_unet", MODEL_TASK, two.summary, "medium", None, 1)  # the server's 2 wins
    assert record_ensemble(record) == 2
    assert made_with(record, "dose_unet", 0.25, "medium", None, 2)
    assert not made_with(record, "dose_unet", 0.25, "medium", None, 1)
    assert not made_with(record, "dose_unet", 0.25, "medium")  # the default is the network alone
    assert made_with(denoised_record("dose_unet", MODEL_TASK, alone.summary), "dose_unet", 0.25, "medium")
    name = denoised_volume_name("ct", "dose_unet", "medium", None, record_ensemble(record))
    assert name == "ct_denoised_dose_unet_medium_x2"


# ----------------------------------------------------------------------------------------- errors


def test_without_its_token_or_with_a_wrong_one_the_server_refuses_and_says_where_to_find_it(server, consent, small_ct):
    assert server.token, "the test server was started without a token"
    consent.allow(server.url)
    wrong = "not-the-servers-token-0123456789"
    for token in (None, wrong):
        client = LowDoseClient(server.url, consent, Timeouts(connect=5, response=60, idle=60), token=token)
        for request in (
            client.info,
            lambda: client.denoise(small_ct, MODEL_TASK),
            lambda: client.fidelity(small_ct, "dose_unet"),
        ):
            with pytest.raises(AuthenticationError) as caught:
                request()
            error = caught.value
            assert isinstance(error, ServerError) and error.status == 401
            assert error.token_given == (token is not None)
            assert "Server token field" in str(error) and "lowdose serve --show-token" in str(error)
            for secret in (server.token, wrong):
                assert secret not in str(error) and secret not in repr(error) and secret not in repr(client)
    right = LowDoseClient(server.url, consent, token=f"  Bearer {server.token}\n")  # pasted with the header's word
    assert right.models() and server.token not in repr(right)


def test_server_down_is_server_unreachable(consent):
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    consent.allow(url)
    client = LowDoseClient(url, consent, Timeouts(connect=5))
    with pytest.raises(ServerUnreachable, match="connection refused"):
        client.info()
    with pytest.raises(ServerUnreachable):
        client.denoise(__file__, MODEL_TASK)


def test_unknown_model_is_a_404_server_error_with_the_servers_message(client, small_ct):
    with pytest.raises(ServerError) as caught:
        client.denoise(small_ct, "denoise_no_such_model")
    assert caught.value.status == 404
    assert "no model named 'denoise_no_such_model'" in caught.value.message and MODEL_TASK in caught.value.message


def test_bad_input_and_too_large_uploads_give_the_servers_message(client, tmp_path):
    text = tmp_path / "notes.nii.gz"
    text.write_bytes(b"this is not a scan\n" * 50)
    with pytest.raises(ServerError) as caught:
        client.denoise(text, MODEL_TASK)
    assert caught.value.status == 422 and "not a readable .nii.gz image" in caught.value.message

    big = tmp_path / "big.nii.gz"
    big.write_bytes(np.random.default_rng(0).bytes((MAX_UPLOAD_MB + 2) * 2**20))
    with pytest.raises(ServerError) as caught:  # refused from its size before the body is read
        client.denoise(big, MODEL_TASK)
    assert caught.value.status == 413 and f"limit of {MAX_UPLOAD_MB} MB" in caught.value.message

    with pytest.raises(ServerError) as caught:
        client.denoise(text, MODEL_TASK, dose=7)
    assert caught.value.status in (400, 422)


def test_a_very_small_time_limit_is_timeout(server, consent, slow_ct):
    consent.allow(server.url)
    client = LowDoseClient(server.url, consent, Timeouts(connect=5, response=0.2, idle=60), token=server.token)
    started = time.monotonic()
    with pytest.raises(Timeout, match="no answer within 0.2 s"):
        client.denoise(slow_ct, MODEL_TASK, dose=0.25)
    assert time.monotonic() - started < 5


def test_cancel_while_the_server_works_returns_promptly(client, slow_ct):
    cancel = threading.Event()
    cancelled_at = []

    def progress(report):
        if report.stage == "waiting" and not cancel.is_set():
            cancelled_at.append(time.monotonic())
            cancel.set()

    with pytest.raises(Cancelled):
        client.denoise(slow_ct, MODEL_TASK, progress=progress, cancel=cancel)
    assert cancelled_at and time.monotonic() - cancelled_at[0] < 0.5


def test_cancel_during_upload_stops_sending_and_a_cancelled_job_reports_cancelled(server, consent, slow_ct):
    consent.allow(server.url)
    client = LowDoseClient(server.url, consent, chunk_bytes=16 * 1024, token=server.token)
    uploads = []
    cancel = threading.Event()

    def progress(report):  # cancel as soon as sending starts (on loopback the rest would take milliseconds)
        if report.stage == "upload":
            uploads.append(report)
            cancel.set()

    with pytest.raises(Cancelled):
        client.denoise(slow_ct, MODEL_TASK, progress=progress, cancel=cancel)
    assert uploads and uploads[-1].done < uploads[-1].total  # it stopped part-way

    job = BackgroundJob(
        lambda progress, cancel: client.denoise(slow_ct, MODEL_TASK, progress=progress, cancel=cancel)
    ).start()
    time.sleep(0.3)
    job.cancel()
    cancelled = time.monotonic()
    assert job.wait(timeout=5)
    assert isinstance(job.error, Cancelled) and job.result is None
    assert time.monotonic() - cancelled < 1.0
    assert client.info()  # the server is still there


def test_without_consent_nothing_is_sent(server, slow_ct, tmp_path):
    """No recorded permission: refused before any connection, checked with a listener that counts them."""
    store = JsonConsentStore(tmp_path / "consent.json")
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(5)
    listener.settimeout(0.5)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        for client in (LowDoseClient(url, store), LowDoseClient(server.url, store)):
            with pytest.raises(ConsentRequired, match="has not been allowed"):
                client.denoise(slow_ct, MODEL_TASK)
            with pytest.raises(ConsentRequired):
                client.fidelity(slow_ct, "dose_unet")
        with pytest.raises(socket.timeout):
            listener.accept()  # nobody connected
    finally:
        listener.close()
    assert not store.path.exists()  # asking wrote nothing

    store.allow(server.url + "/")
    again = JsonConsentStore(store.path)  # remembered: a new session reads the same file
    assert again.is_allowed(server.url) and again.is_allowed(server.url + "/info/")
    assert not again.is_allowed(url)  # per server: another port is another server
    assert again.allowed_servers() == [server_key(server.url)]
    again.revoke(server.url)
    with pytest.raises(ConsentRequired):
        LowDoseClient(server.url, JsonConsentStore(store.path)).denoise(slow_ct, MODEL_TASK)

    store.path.write_text("{not json")  # a damaged settings file never counts as consent
    assert not JsonConsentStore(store.path).is_allowed(server.url)


# ------------------------------------------------------------------------------ answers the real server never gives


class _StandIn(http.server.BaseHTTPRequestHandler):
    """Answers what a broken or foreign server might: set ``reply`` on the server object."""

    def do_GET(self):
        self._answer()

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        sent = re.search(rb'name="params"\r\n\r\n(.*?)\r\n--', body, re.S)  # the request's params field
        self.server.params.append(json.loads(sent.group(1)) if sent else None)
        self._answer()

    def _answer(self):
        self.server.authorization.append(self.headers.get("Authorization"))
        status, content_type, body = self.server.reply
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture()
def stand_in():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _StandIn)
    httpd.authorization = []
    httpd.params = []  # the params JSON of each POST
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _multipart(params: dict, image: bytes, filename: str = "denoised.nii.gz") -> tuple[str, bytes]:
    b = "XyZ123"
    head = (
        f'--{b}\r\nContent-Disposition: form-data; name="params"\r\nContent-Type: application/json\r\n\r\n'
        f'{json.dumps(params)}\r\n--{b}\r\nContent-Disposition: form-data; name="image"; '
        f'filename="{filename}"\r\nContent-Type: application/gzip\r\n\r\n'
    )
    body = head.encode() + image + f"\r\n--{b}--\r\n".encode()
    return f"multipart/form-data; boundary={b}", body


def test_a_result_that_is_not_a_volume_is_not_a_volume(stand_in, consent, small_ct):
    url = f"http://127.0.0.1:{stand_in.server_address[1]}"
    consent.allow(url)
    client = LowDoseClient(url, consent)
    stand_in.reply = (200, *_multipart({"model": "x"}, b"<html>login page</html>"))
    with pytest.raises(NotAVolume):
        client.denoise(small_ct, MODEL_TASK)

    stand_in.reply = (200, *_multipart({"model": "x"}, small_ct.read_bytes()))  # a real NIfTI passes
    result = client.denoise(small_ct, MODEL_TASK)
    assert result.path.read_bytes() == small_ct.read_bytes() and result.summary == {"model": "x"}

    report = {"study": {"verdict": "kept"}, "structures": []}  # output=json: the report alone
    stand_in.reply = (200, "application/json", json.dumps(report).encode())
    only_report = client.fidelity(small_ct, "dose_unet", labels=False)
    assert only_report.report == report and only_report.files == {} and only_report.folder is None

    stand_in.reply = (200, "application/json", json.dumps({"name": "other", "models": {}}).encode())
    with pytest.raises(ServerError, match="without the lowdose app"):
        client.info()
    stand_in.reply = (502, "text/html", b"<html>Bad gateway</html>")
    with pytest.raises(ServerError) as caught:
        client.info()
    assert caught.value.status == 502 and caught.value.message == "Bad Gateway"


def test_the_token_goes_with_every_request_and_a_401_from_anywhere_is_an_authentication_error(
    stand_in, consent, small_ct
):
    url = f"http://127.0.0.1:{stand_in.server_address[1]}"
    consent.allow(url)
    token = "tok-" + "a1B2" * 8
    client = LowDoseClient(url, consent, token=token)
    stand_in.reply = (200, *_multipart({"model": "x"}, small_ct.read_bytes()))
    client.denoise(small_ct, MODEL_TASK)
    stand_in.reply = (200, "application/json", json.dumps({"name": "lowdose", "lowdose": {}, "models": {}}).encode())
    client.info()
    assert stand_in.authorization == [f"Bearer {token}"] * 2  # the upload (POST) and the question (GET)

    stand_in.authorization.clear()
    LowDoseClient(url, consent).info()
    assert stand_in.authorization == [None]  # no token: no header at all

    stand_in.reply = (401, "application/json", b'{"detail": "missing or invalid bearer token"}')
    with pytest.raises(AuthenticationError, match="lowdose serve --show-token") as caught:
        client.denoise(small_ct, MODEL_TASK)
    assert caught.value.token_given and token not in str(caught.value)


def test_the_strength_goes_in_the_params_of_denoise_and_fidelity_and_a_bad_one_is_never_sent(
    stand_in, consent, small_ct
):
    url = f"http://127.0.0.1:{stand_in.server_address[1]}"
    consent.allow(url)
    client = LowDoseClient(url, consent)
    stand_in.reply = (200, *_multipart({"model": "x", "strength": 0.7}, small_ct.read_bytes()))
    client.denoise(small_ct, MODEL_TASK)  # the default: medium
    client.denoise(small_ct, MODEL_TASK, dose="1/4", strength="low")
    client.denoise(small_ct, MODEL_TASK, strength=" High ")
    client.denoise(small_ct, MODEL_TASK, strength=0.55)
    report = {"study": {"verdict": "kept"}, "structures": []}
    stand_in.reply = (200, "application/json", json.dumps(report).encode())
    client.fidelity(small_ct, "dose_unet", labels=False)
    client.fidelity(small_ct, "dose_unet", labels=False, strength="high")
    sent = stand_in.params
    assert [p["strength"] for p in sent] == ["medium", "low", "high", 0.55, "medium", "high"]
    assert sent[1]["dose"] == "1/4" and sent[0]["output_format"] == "nifti"
    assert sent[4]["denoise_model"] == "dose_unet" and sent[4]["labels"] is False

    stand_in.params.clear()
    for bad in ("strong", 1.5, -0.1, "nan"):
        with pytest.raises(ValueError, match="strength must"):
            client.denoise(small_ct, MODEL_TASK, strength=bad)
        with pytest.raises(ValueError, match="strength must"):
            client.fidelity(small_ct, "dose_unet", strength=bad)
    assert stand_in.params == []  # refused before anything was sent


def test_the_ensemble_goes_in_the_params_only_when_not_1_and_a_bad_one_is_never_sent(stand_in, consent, small_ct):
    url = f"http://127.0.0.1:{stand_in.server_address[1]}"
    consent.allow(url)
    client = LowDoseClient(url, consent)
    stand_in.reply = (200, *_multipart({"model": "x", "ensemble": 2}, small_ct.read_bytes()))
    client.denoise(small_ct, MODEL_TASK)  # the default: the network alone
    client.denoise(small_ct, MODEL_TASK, ensemble=1)
    client.denoise(small_ct, MODEL_TASK, ensemble=2)
    client.denoise(small_ct, MODEL_TASK, dose="1/4", strength="low", ensemble=8)
    report = {"study": {"verdict": "kept"}, "structures": []}
    stand_in.reply = (200, "application/json", json.dumps(report).encode())
    client.fidelity(small_ct, "dose_unet", labels=False)
    client.fidelity(small_ct, "dose_unet", labels=False, ensemble=4)
    sent = stand_in.params
    assert [p.get("ensemble", "absent") for p in sent] == ["absent", "absent", 2, 8, "absent", 4]
    assert all(type(p.get("ensemble", 1)) is int for p in sent)  # JSON integers, as the server wants them
    assert (sent[3]["dose"], sent[3]["strength"], sent[5]["denoise_model"]) == ("1/4", "low", "dose_unet")

    stand_in.params.clear()
    stand_in.authorization.clear()
    for bad in BAD_ENSEMBLES:
        with pytest.raises(ValueError, match="must be one of 1, 2, 4, 8"):
            client.denoise(small_ct, MODEL_TASK, ensemble=bad)
        with pytest.raises(ValueError, match="must be one of 1, 2, 4, 8"):
            client.fidelity(small_ct, "dose_unet", ensemble=bad)
    assert stand_in.params == [] and stand_in.authorization == []  # refused before any request was made


def test_the_ensemble_checker_menu_texts_and_names():
    assert tuple(ENSEMBLE_SIZES) == (1, 2, 4, 8)
    for size in ENSEMBLE_SIZES:
        assert check_ensemble(size) == size
        assert ensemble_choice(ensemble_label(size)) == size  # every menu text reads back as its size
    for bad in BAD_ENSEMBLES:
        with pytest.raises(ValueError, match="must be one of 1, 2, 4, 8") as caught:
            check_ensemble(bad)
        assert repr(bad) in str(caught.value)  # the message names what was given
    labels = [ensemble_label(size) for size in ENSEMBLE_SIZES]
    assert labels[0].startswith("Off") and "fastest" in labels[0]
    for size, label in zip(ENSEMBLE_SIZES[1:], labels[1:]):
        assert label.startswith(f"{size} ") and f"{size}x time" in label, label  # the cost is on the menu
    assert len(set(labels)) == len(labels) and max(map(len, labels)) <= 40  # short, told apart
    for bad in ("", None, "3 symmetries", "16 symmetries", "x8", "eight", "2.0", "\u00b2 symmetries"):
        with pytest.raises(ValueError, match="must be one of 1, 2, 4, 8"):
            ensemble_choice(bad)
    assert [ensemble_name(size) for size in ENSEMBLE_SIZES] == ["", "x2", "x4", "x8"]
    for bad in (3, True, "8"):
        with pytest.raises(ValueError):
            ensemble_name(bad)


def test_a_denoised_volume_records_its_ensemble_and_is_not_taken_for_another():
    name = denoised_volume_name
    assert name("ct", "dose_unet", "medium", None, 8) == "ct_denoised_dose_unet_medium_x8"
    assert name("ct", "dose_diffusion", 1.0, 2, 4) == "ct_denoised_dose_diffusion_high_2steps_x4"  # after the steps
    assert name("ct", "dose_unet", "medium", None, 1) == "ct_denoised_dose_unet_medium"  # 1: nothing added
    assert name("ct", "dose_unet", "medium") == "ct_denoised_dose_unet_medium"
    assert name("ct", "dose_unet", "low", None, None) == "ct_denoised_dose_unet_low"  # an unreadable one: none

    summary = {"dose_fraction": 0.25, "dose_source": "given", "strength": 0.7, "steps": None, "ensemble": 4}
    four = denoised_record("dose_unet", "denoise_dose_unet", summary, "medium", None, 8)
    assert json.loads(four)["ensemble"] == 4 and record_ensemble(four) == 4  # the server's wins over the asked
    assert made_with(four, "dose_unet", 0.25, "medium", None, 4)
    for other in (1, 2, 8):
        assert not made_with(four, "dose_unet", 0.25, "medium", None, other), other
    assert not made_with(four, "dose_unet", 0.25, "medium")  # the default: the network alone

    # a summary without it (a server from before the ensemble) records the size asked for
    asked = denoised_record("dose_unet", "t", {"dose_fraction": 0.25, "dose_source": "given"}, "high", None, 2)
    assert json.loads(asked)["ensemble"] == 2 and record_ensemble(asked) == 2
    assert made_with(asked, "dose_unet", 0.25, "high", None, 2)
    assert not made_with(asked, "dose_unet", 0.25, "high", None, 1)
    with pytest.raises(ValueError, match="must be one of"):
        denoised_record("dose_unet", "t", {}, "high", None, 3)

    # a record made before the ensemble existed means the network alone
    old = json.dumps({"model": "dose_unet", "dose_fraction": 0.25, "dose_source": "given", "strength": 0.7})
    assert record_ensemble(old) == 1 and "ensemble" not in json.loads(denoised_record("dose_unet", "t", {}))
    assert made_with(old, "dose_unet", 0.25, "medium") and made_with(old, "dose_unet", 0.25, "medium", None, 1)
    assert not made_with(old, "dose_unet", 0.25, "medium", None, 2)

    for junk in ("8", True, 2.0, 3, None, [8]):  # a size that is not one matches nothing
        record = json.dumps({"model": "dose_unet", "dose_fraction": 0.25, "strength": 0.7, "ensemble": junk})
        assert record_ensemble(record) is None, junk
        for size in ENSEMBLE_SIZES:
            assert not made_with(record, "dose_unet", 0.25, "medium", None, size), (junk, size)
    for junk in (None, "", "{not json", "[8]"):
        assert record_ensemble(junk) is None, junk
    with pytest.raises(ValueError):
        made_with(four, "dose_unet", 0.25, "medium", None, 3)  # a bad size asked is an error, not "no"


def test_the_ensemble_chosen_is_remembered_and_explained():
    store = MemorySettings()
    module = ModuleSettings(store)
    assert module.ensemble() == 1  # at first: off
    module.set_ensemble(8)
    assert (store.values["LowDoseDenoise/SelfEnsemble"], module.ensemble()) == ("8", 8)
    assert ModuleSettings(store).ensemble() == 8  # the next session
    for bad in (3, 0, "8", True, 2.0, None):
        with pytest.raises(ValueError, match="must be one of 1, 2, 4, 8"):
            module.set_ensemble(bad)
    assert module.ensemble() == 8  # a refused value changed nothing
    module.set_ensemble(1)
    assert (store.values["LowDoseDenoise/SelfEnsemble"], module.ensemble()) == ("1", 1)
    for junk in ("3", "eight", "2.5", "-8", "", "true"):  # damaged settings: off, no crash
        assert ModuleSettings(MemorySettings({"LowDoseDenoise/SelfEnsemble": junk})).ensemble() == 1, junk
    assert ModuleSettings(MemorySettings({"LowDoseDenoise/SelfEnsemble": 4})).ensemble() == 4  # QSettings' int

    tip = ensemble_tooltip()  # what it does and what it costs
    assert "flipped" in tip and "averages" in tip
    assert "2, 4 or 8 times as long" in tip and "Off" in tip


def test_strength_text():
    assert parse_strength(None) == parse_strength("") == parse_strength("Medium") == "medium"
    assert parse_strength("LOW") == "low" and parse_strength("high") == "high"
    assert parse_strength("0.5") == parse_strength("50%") == parse_strength(0.5) == 0.5
    for bad in ("max", "1.01", "-1", "inf", True):
        with pytest.raises(ValueError, match="strength must"):
            parse_strength(bad)


def test_dose_text_and_server_addresses():
    assert parse_dose("auto") == parse_dose("") == parse_dose(None) == "auto"
    assert parse_dose("1/4") == parse_dose("25%") == parse_dose("0.25") == parse_dose("1/4 (25 %)") == 0.25
    for bad in ("0", "1.5", "x", "1/0"):
        with pytest.raises(ValueError):
            parse_dose(bad)
    assert server_key("HTTP://LocalHost:8000/") == "http://localhost:8000"
    assert server_key("https://example.org") == "https://example.org:443"
    for bad in ("ftp://x", "127.0.0.1:8000", "http://", "http://h:99999"):
        with pytest.raises(ValueError):
            LowDoseClient(bad, JsonConsentStore("/nonexistent/consent.json"))


# ----------------------------------------------------------------------------------------- fidelity


def test_fidelity_check_returns_the_report_and_label_maps_on_the_input_grid(server, consent, tiny_ct, tmp_path):
    from lowdose import load_ct

    """Last in this file: the check segments two scans (minutes on a busy 2-core machine) and holds the
    server's single inference slot meanwhile."""
    from lowdose.fidelity import load_label_map

    consent.allow(server.url)
    client = LowDoseClient(server.url, consent, Timeouts(connect=5, response=600, idle=60), token=server.token)
    try:
        result = client.fidelity(tiny_ct, "dose_unet", dose=0.25, labels=True, result_dir=tmp_path)
    except Timeout:
        pytest.fail(
            "the server's fidelity task gave no answer within 600 s; the server log ends:\n"
            + "\n".join(server.log().splitlines()[-40:])
        )
    report = result.report
    assert report["study"]["verdict"] in ("kept", "check", "changed")
    assert report["denoising"] == {**report["denoising"], "model": "dose_unet", "dose_fraction": 0.25}
    assert report["segmenter"]["classes"] == 117
    assert {"labels_original", "labels_denoised", "denoised", "html"} <= set(result.files)
    original = load_ct(tiny_ct)
    for key in ("labels_original", "labels_denoised"):
        labels, how = load_label_map(result.files[key], original)
        assert labels.shape == original.shape and how == "same grid"
    _assert_same_geometry(load_ct(result.files["denoised"]), original)

    rows = fidelity_rows(report)
    present = [s for s in report["structures"] if s["verdict"] != "absent"]
    assert len(rows) == len(present)
    for row in rows:
        assert set(row) >= {
            "name",
            "verdict",
            "dice",
            "hu_mean_before",
            "hu_mean_after",
            "hu_sd_before",
            "hu_sd_after",
            "flagged",
        }
        assert row["flagged"] == (row["verdict"] in ("check", "changed"))
    assert [r["flagged"] for r in rows] == sorted((r["flagged"] for r in rows), reverse=True)
    assert fidelity_rows(report, flagged_only=True) == [r for r in rows if r["flagged"]]
    names = fidelity_label_names(report)
    assert len(names) == len(report["structures"]) and all(isinstance(k, int) for k in names)
