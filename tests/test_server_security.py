"""`lowdose serve` attacked as a client on the hospital network would attack it (issue: server hardening).

Real servers on loopback (`python -m lowdose.server`), real HTTP sent byte for byte where a client library
would normalise it, real files. A model bundle with random weights stands in for a trained one (these
tests check the server, not denoising). The PACS that hangs is a plain socket that accepts connections and
never answers: the worst a PACS can do, which a real Orthanc cannot be made to do on demand.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from .server_fixtures import REPO, crop_volume, free_port, make_random_bundle, start_lowdose_server, stop_lowdose_server

MODEL = "denoise_dose_unet"
STUDY_ID = "abdomen_small"
MAX_UPLOAD_MB = 16


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("security")


@pytest.fixture(scope="module")
def models_dir(work) -> Path:
    """A denoiser and the shipped anatomy encoder (a bundle that does not denoise)."""
    folder = work / "models"
    make_random_bundle(folder)
    shutil.copytree(REPO / "models" / "anatomy_encoder", folder / "anatomy_encoder")
    return folder


@pytest.fixture(scope="module")
def outside(work) -> Path:
    """A file outside the studies folder that no request may read, change or remove."""
    secret = work / "outside" / "secret.nii.gz"
    secret.parent.mkdir()
    secret.write_bytes(b"not for clients")
    return secret


@pytest.fixture(scope="module")
def studies(work, sample_volume, outside) -> Path:
    """One small study and a link that points outside the studies folder."""
    from lowdose import save_ct

    folder = work / "studies"
    folder.mkdir()
    save_ct(crop_volume(sample_volume, slice(8, 12), slice(128, 384), slice(128, 384)), folder / f"{STUDY_ID}.nii.gz")
    (folder / "linked.nii.gz").symlink_to(outside)
    return folder


@pytest.fixture(scope="module")
def server(work, studies, models_dir):
    """One inference at a time, three more may wait."""
    running = start_lowdose_server(
        work, str(studies), models_dir, max_upload_mb=MAX_UPLOAD_MB, extra=["--conf", "infer_queue", "3"]
    )
    yield running
    stop_lowdose_server(running)


def _tree_digest(*roots: Path) -> dict:
    """Every file under ``roots`` (links not followed) with its content's digest: to prove nothing changed."""
    digest = {}
    for root in roots:
        for path in sorted(root.rglob("*")):
            if path.is_file() and not path.is_symlink():
                digest[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
            elif path.is_symlink():
                digest[str(path)] = f"-> {os.readlink(path)}"
    return digest


def _raw(server, method: str, path: str, headers: dict | None = None, body: bytes | None = None):
    """Send ``path`` exactly as written (no client-side normalisation of '..' or '%2e')."""
    parts = urllib.parse.urlsplit(server.url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read().decode(errors="replace"), dict(response.getheaders())
    finally:
        connection.close()


# ----------------------------------------------------------------------------------------- authentication

ROUTES = [
    ("GET", "/info/"),
    ("POST", f"/infer/{MODEL}?image={STUDY_ID}"),
    ("POST", "/train/finetune"),
    ("GET", "/train/"),
    ("DELETE", "/train/"),
    ("GET", "/proxy/dicom/qido/studies"),
    ("PUT", "/datastore/image?image=x"),
    ("DELETE", "/datastore/?id=x"),
    ("GET", "/docs"),
    ("GET", "/"),
    ("POST", "/infer/wsi/x"),
    ("GET", "/logs/"),
]


def test_every_route_needs_the_token(server):
    """No token, a wrong token (same length or not), another scheme: 401 with a one-line JSON reason, and
    nothing runs (a fine-tuning request without the token starts no training)."""
    wrong = server.token[:-1] + ("A" if server.token[-1] != "A" else "B")
    attempts = [
        {},
        {"Authorization": f"Bearer {wrong}"},
        {"Authorization": "Bearer short"},
        {"Authorization": f"Basic {server.token}"},
        {"Authorization": server.token},
        {"Authorization": f"Bearer {server.token} extra"},
        {"X-Token": server.token},
    ]
    for method, path in ROUTES:
        for headers in attempts:
            status, body, answer_headers = _raw(server, method, path, headers, b"{}" if method == "POST" else None)
            assert status == 401, f"{method} {path} with {list(headers)}: {status} {body[:200]}"
            assert "Bearer" in answer_headers.get("www-authenticate", "")
            detail = json.loads(body)["detail"]
            assert "access token" in detail and "\n" not in detail
    assert server.get("/train/").status_code == 404  # no training was started ("No Train Tasks")
    info = server.get("/info/")
    assert info.status_code == 200
    assert info.headers["Cache-Control"] == "no-store" and info.headers["X-Content-Type-Options"] == "nosniff"
    assert server.token not in server.log()


def test_no_auth_is_refused_unless_on_loopback(tmp_path):
    for host in ("0.0.0.0", "192.168.1.20", "::"):
        result = subprocess.run(
            [sys.executable, "-m", "lowdose.server", "--no-auth", "--host", host, "--dry-run"],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "XDG_STATE_HOME": str(tmp_path)},
        )
        assert result.returncode == 1, result.stderr
        assert "--no-auth" in result.stderr and "loopback" in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "lowdose.server", "--no-auth", "--dry-run"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "XDG_STATE_HOME": str(tmp_path)},
    )
    assert result.returncode == 0 and "start_server" in result.stdout


def test_guard_without_auth_answers_loopback_connections_only():
    """The guard itself (in-process ASGI): with authentication off, a connection to any address but loopback
    is refused, whatever the launcher did."""
    import asyncio

    from lowdose.server.guard import Guard

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ran"})

    def call(server_address):
        sent = []

        async def receive():
            return {"type": "http.request", "body": b""}

        async def send(message):
            sent.append(message)

        scope = {
            "type": "http",
            "method": "GET",
            "path": "/info/",
            "headers": [(b"host", b"x")],
            "server": (server_address, 8000),
            "client": ("10.0.0.9", 5000),
        }
        asyncio.run(Guard(app, None, 1024)(scope, receive, send))
        return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])

    assert call("10.0.0.5") == (
        403,
        json.dumps({"detail": "this server runs without authentication and answers on loopback only"}).encode(),
    )
    status, body = call("127.0.0.1")
    assert status == 400  # Host "x" is not loopback (DNS rebinding guard); the app was not reached
    assert body != b"ran"


def test_a_token_file_others_can_read_is_refused(tmp_path):
    from lowdose.errors import LowdoseError
    from lowdose.server.auth import read_token_file, resolve_token

    token_file = tmp_path / "token"
    token_file.write_text("a-long-enough-token-0123456789\n")
    token_file.chmod(0o644)
    with pytest.raises(LowdoseError, match="chmod 600"):
        read_token_file(token_file)
    token_file.chmod(0o600)
    token = resolve_token(token_file=token_file, env={})
    assert token.matches("a-long-enough-token-0123456789") and not token.matches("a-long-enough-token-012345678")
    assert "0123456789" not in repr(token)
    with pytest.raises(LowdoseError, match="at least 16"):
        resolve_token(env={"LOWDOSE_TOKEN": "short"})
    made = resolve_token(state_folder=tmp_path / "state", env={})
    assert made.created and (tmp_path / "state" / "server-token").stat().st_mode & 0o077 == 0
    assert resolve_token(state_folder=tmp_path / "state", env={}).value == made.value  # kept across starts


# ----------------------------------------------------------------------------------------- routes and paths


def test_routes_nobody_uses_are_404_and_traversal_changes_nothing(server, studies, models_dir, outside):
    """MONAI Label's datastore writes with '../' in ids and tags, wsi inference of any server path, logs,
    sessions, batch, scoring, active learning, OHIF and the API docs: 404, and the studies, the models and
    the file outside are byte for byte as before."""
    before = _tree_digest(studies, models_dir, outside.parent)
    upload = {"file": ("x.nii.gz", gzip.compress(b"x" * 100))}
    attacks = [
        ("PUT", "/datastore/image?image=../../outside/secret", upload),
        ("PUT", "/datastore/label?image=abdomen_small&tag=../../../outside", upload),
        ("PUT", "/datastore/label?image=../outside/secret&tag=final", upload),
        ("DELETE", "/datastore/?id=../outside/secret", None),
        ("DELETE", f"/datastore/?id={STUDY_ID}", None),
        ("GET", f"/datastore/image?image={STUDY_ID}", None),
        ("GET", "/datastore/?output=all", None),
        ("POST", "/infer/wsi/x?image=/etc/passwd", None),
        ("POST", "/infer/wsi_v2/x?image=/etc/passwd", None),
        ("POST", f"/batch/infer/{MODEL}", None),
        ("GET", "/logs/", None),
        ("GET", "/logs/gpu", None),
        ("POST", "/session/", upload),
        ("POST", "/activelearning/random", None),
        ("POST", "/scoring/x", None),
        ("GET", "/ohif/", None),
        ("GET", "/docs", None),
        ("GET", "/openapi.json", None),
        ("GET", "/", None),
        ("POST", "/train/", None),
        ("POST", "/train/finetune_other", None),
        ("POST", "/model/x", None),
        ("GET", "/proxy/dicom/qido/studies", None),  # a local datastore has no PACS to proxy
    ]
    for method, path, files in attacks:
        response = server.request(method, path, files=files)
        assert response.status_code == 404, f"{method} {path}: {response.status_code} {response.text[:200]}"
    for path in (
        f"/infer/{MODEL}?image=..%2Foutside%2Fsecret",
        f"/infer/{MODEL}?image=%2Fetc%2Fpasswd",
        f"/infer/{MODEL}?image=a%2Fb",
        f"/infer/{MODEL}?image=..",
        f"/infer/{MODEL}?image=abd%00omen",
        f"/infer/{MODEL}?image={'a' * 300}",
        "/infer/..%2F..%2Fx?image=abdomen_small",
    ):
        status, body, _ = _raw(server, "POST", path, server.headers)
        assert status in (400, 404), f"{path}: {status} {body[:200]}"
        assert "/work" not in body and "/tmp" not in body
    response = server.post(f"/infer/{MODEL}", params={"image": "linked", "output": "json"})
    assert response.status_code == 404, response.text  # the link out of the studies folder is not an image
    assert _tree_digest(studies, models_dir, outside.parent) == before


def test_only_denoisers_are_listed_and_each_answers(server):
    info = server.get("/info/").json()
    denoisers = sorted(m for m in info["models"] if m.startswith("denoise_"))
    assert denoisers == [MODEL]  # not denoise_anatomy_encoder
    for model in denoisers:
        response = server.post(
            f"/infer/{model}",
            params={"image": STUDY_ID, "output": "json"},
            files={"params": (None, '{"dose": 0.5}')},
            timeout=300,
        )
        assert response.status_code == 200, response.text
    assert server.post("/infer/denoise_anatomy_encoder", params={"image": STUDY_ID}).status_code == 404


@pytest.mark.parametrize(
    "body, status, fragment",
    [
        ({"epochs": 0}, 422, "out of range"),
        ({"epochs": 10**6}, 422, "out of range"),
        ({"epochs": "2"}, 422, "must be a number"),
        ({"epochs": True}, 422, "must be a number"),
        ({"epochs": 1.5}, 422, "whole number"),
        ({"learning_rate": 1.0}, 422, "out of range"),
        ({"learning_rate": -1e-4}, 422, "out of range"),
        ({"batch_size": 10**9}, 422, "out of range"),
        ({"patch_size": 50}, 422, "multiple of 16"),
        ({"slices": 5}, 422, "unknown setting"),
        ({"output_model": "../../outside"}, 422, "not a valid name"),
        ({"output_model": "/tmp/x"}, 422, "valid name"),
        ({"output_model": "a/b"}, 422, "valid name"),
        ({"output_model": 7}, 422, "valid name"),
        ({"overwrite": "yes"}, 422, "true or false"),
        ([1, 2], 422, "JSON object"),
        ({"output_model": "dose_unet"}, 409, "source model"),
        ({"output_model": "anatomy_encoder"}, 409, "exists"),
        ({"output_model": "anatomy_encoder", "overwrite": True}, 409, "not made by fine-tuning"),
    ],
)
def test_finetune_requests_are_checked_before_anything_runs(server, models_dir, body, status, fragment):
    before = _tree_digest(models_dir)
    response = server.post("/train/finetune", json=body, timeout=30)
    assert response.status_code == status, response.text
    assert fragment in response.json()["detail"]
    assert server.get("/train/").status_code == 404  # no training started
    assert _tree_digest(models_dir) == before


# ----------------------------------------------------------------------------------------- bounded input


def _nifti_header_bomb() -> bytes:
    """A 1.4 kB .nii.gz whose header claims 2048 x 2048 x 64 int16 voxels (512 MB) and holds none."""
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_shape((2048, 2048, 64))
    header.set_data_dtype(np.int16)
    header["vox_offset"] = 352
    raw = header.binaryblock + b"\0" * 4
    return gzip.compress(raw + b"\0" * 1024)


def _truncated_nifti(tmp_path: Path, sample_volume) -> bytes:
    from lowdose import save_ct

    path = save_ct(crop_volume(sample_volume, slice(0, 4), slice(0, 256), slice(0, 256)), tmp_path / "full.nii")
    data = path.read_bytes()
    return data[: len(data) // 2]


def _zip_bomb() -> bytes:
    """About 2 MB that unpacks to 2 GiB of zeros (one member)."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        with archive.open("scan.nii", "w", force_zip64=True) as member:
            block = b"\0" * (64 * 2**20)
            for _ in range(32):
                member.write(block)
    return buffer.getvalue()


def test_truncated_bombs_and_lying_headers_are_refused_fast(server, sample_volume, tmp_path):
    """Each is answered 422 with the reason within seconds; the zip bomb is refused without being unpacked
    (the server's scratch folder never holds more than the upload itself)."""
    from lowdose.server.settings import scratch_parent

    bomb = _zip_bomb()
    assert len(bomb) < 4 * 2**20
    cases = [
        ("truncated.nii", _truncated_nifti(tmp_path, sample_volume), "truncated"),
        ("header_bomb.nii.gz", _nifti_header_bomb(), ""),
        ("bomb.zip", bomb, ""),
    ]
    scratch = scratch_parent() / str(server.process.pid)
    for name, content, fragment in cases:
        peak = [0]
        done = threading.Event()

        def watch():
            while not done.is_set():
                try:
                    peak[0] = max(peak[0], sum(p.stat().st_size for p in scratch.rglob("*") if p.is_file()))
                except OSError:  # a file removed while counting
                    pass
                time.sleep(0.05)

        watcher = threading.Thread(target=watch)
        watcher.start()
        started = time.perf_counter()
        try:
            response = server.post(
                f"/infer/{MODEL}", params={"output": "json"}, files={"file": (name, content)}, timeout=120
            )
        finally:
            done.set()
            watcher.join()
        seconds = time.perf_counter() - started
        assert response.status_code == 422, f"{name}: {response.status_code} {response.text}"
        assert fragment in response.json()["detail"], response.text
        assert seconds < 10, f"{name} took {seconds:.1f} s to refuse"
        assert peak[0] < len(content) + 8 * 2**20, f"{name}: {peak[0] / 2**20:.0f} MB written while refusing it"
        print(f"\n{name} ({len(content) / 1024:.0f} kB) refused in {seconds:.2f} s: {response.json()['detail']}")


# ----------------------------------------------------------------------------------------- the inference line


def test_a_full_line_gets_503_with_retry_after_and_info_stays_fast(server, sample_volume, tmp_path):
    """One running and three waiting fill the line (infer_queue 3); more requests get 503 with Retry-After at
    once; /info/ keeps answering fast (p95 under 200 ms) while the four jobs run."""
    from lowdose import save_ct

    path = save_ct(crop_volume(sample_volume, slice(0, 12)), tmp_path / "slow.nii.gz")
    content = path.read_bytes()
    barrier = threading.Barrier(7)

    def send(_):
        barrier.wait()
        started = time.perf_counter()
        response = server.post(
            f"/infer/{MODEL}",
            params={"output": "json"},
            files={"file": (path.name, content)},
            data={"params": '{"dose": 0.25}'},
            timeout=600,
        )
        return response, time.perf_counter() - started

    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(send, k) for k in range(6)]
        barrier.wait()
        time.sleep(1.0)  # the six requests reach the server
        info_seconds = []
        while not all(f.done() for f in futures):
            t0 = time.perf_counter()
            assert server.get("/info/", timeout=10).status_code == 200
            info_seconds.append(time.perf_counter() - t0)
            time.sleep(0.1)
        results = [f.result() for f in futures]
    statuses = sorted(r.status_code for r, _ in results)
    assert statuses == [200] * 4 + [503] * 2, [(r.status_code, r.text[:100]) for r, _ in results]
    for response, seconds in results:
        if response.status_code == 503:
            assert int(response.headers["Retry-After"]) >= 1 and seconds < 5, (response.headers, seconds)
            assert "busy" in response.json()["detail"]
    p95 = float(np.percentile(info_seconds, 95))
    print(
        f"\n/info/ while 4 jobs ran: {len(info_seconds)} answers, median {1000 * np.median(info_seconds):.0f} ms, "
        f"p95 {1000 * p95:.0f} ms"
    )
    assert len(info_seconds) >= 5 and p95 < 0.2, info_seconds


# ----------------------------------------------------------------------------------------- a PACS that hangs


class _HungPacs:
    """A TCP listener that accepts connections and never answers (a PACS that hangs)."""

    def __init__(self):
        self.port = free_port()
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind(("127.0.0.1", self.port))
        self.socket.listen(64)
        self.held: list[socket.socket] = []
        self.running = True
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self):
        self.socket.settimeout(0.2)
        while self.running:
            try:
                connection, _ = self.socket.accept()
                self.held.append(connection)
            except OSError:
                continue

    def close(self):
        self.running = False
        self.thread.join()
        for connection in self.held:
            connection.close()
        self.socket.close()


def test_a_pacs_that_hangs_or_is_down_gives_fast_clear_answers(work, models_dir):
    """/info/ answers within 1 s saying the PACS is unavailable; /infer on a PACS series answers 503 naming
    the PACS within 10 s; the same once the PACS is down (connection refused); a stale scratch folder of a
    killed server (its process gone) is removed when the server starts."""
    from lowdose.server.settings import scratch_parent

    stale = scratch_parent() / "999999999" / "request-x"
    stale.mkdir(parents=True, exist_ok=True)
    (stale / "patient.dcm").write_bytes(b"patient data of a killed request")
    pacs = _HungPacs()
    url = f"http://127.0.0.1:{pacs.port}/dicom-web"
    try:
        running = start_lowdose_server(
            work / "hung",
            url,
            models_dir,
            extra=["--conf", "pacs_read_timeout", "3", "--conf", "pacs_connect_timeout", "2"],
        )
        try:
            assert not stale.parent.exists(), "the killed server's scratch folder was not swept"
            for state in ("hung", "down"):
                for _ in range(3):
                    started = time.perf_counter()
                    info = running.get("/info/", timeout=30)
                    seconds = time.perf_counter() - started
                    assert info.status_code == 200 and seconds < 1.0, (state, seconds)
                    assert info.json()["datastore"]["pacs"] == {"url": url, "available": False}
                started = time.perf_counter()
                response = running.post(f"/infer/{MODEL}", params={"image": "1.2.3.4", "output": "json"}, timeout=60)
                seconds = time.perf_counter() - started
                assert response.status_code == 503, (state, response.status_code, response.text)
                assert url in response.json()["detail"] and seconds < 10, (state, seconds, response.text)
                assert response.headers.get("Retry-After")
                print(f"\nPACS {state}: /infer 503 in {seconds:.1f} s: {response.json()['detail']}")
                pacs.close()
        finally:
            stop_lowdose_server(running)
    finally:
        pacs.close() if pacs.running else None


def test_tokens_are_printable_ascii():
    """A token must fit an HTTP header: non-ASCII, spaces and control characters are refused."""
    from lowdose.errors import LowdoseError
    from lowdose.server.auth import resolve_token

    for bad in ("ünïcödé-token-0123456789", "token with spaces 0123456789", "token\x07bell-0123456789"):
        with pytest.raises(LowdoseError, match="printable ASCII"):
            resolve_token(env={"LOWDOSE_TOKEN": bad})
    assert resolve_token(env={"LOWDOSE_TOKEN": "Abc-123_~.+/=:0123456789"}).value == "Abc-123_~.+/=:0123456789"
