"""Real servers on loopback for the server tests: `lowdose serve` (MONAI Label) and Orthanc (a PACS).

Both are started as a user would start them (a subprocess, a free port on 127.0.0.1), waited for until
they answer, and always stopped, with any process they started, when the test module ends.
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests

REPO = Path(__file__).resolve().parent.parent
APP_DIR = REPO / "apps" / "lowdose"
ORTHANC_PLUGIN = Path(os.environ.get("ORTHANC_DICOMWEB_PLUGIN", "/usr/share/orthanc/plugins/libOrthancDicomWeb.so"))
SERVER_START_SECONDS = 180  # MONAI Label imports torch and MONAI; on a busy 2-core machine that takes a while


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_random_bundle(models_dir: Path, name: str = "dose_unet", seed: int = 0) -> Path:
    """A dose-aware model bundle with randomly initialised weights.

    A random-weight model stands in for the trained one: the server tests check the server (transport,
    geometry, HU, queueing, PACS round trip), not denoising quality, and the result must equal what the
    library gives in-process for the same bundle, which holds for any weights.
    """
    import torch

    from lowdose.bundle import save_bundle
    from lowdose.networks import build_network

    torch.manual_seed(seed)
    network_kwargs = {"in_channels": 3, "dose_conditioning": True}
    net = build_network("dose_unet", **network_kwargs)
    torch.nn.init.normal_(net.head.weight, std=0.02)  # the noise head starts at zero: make it do something
    est = build_network("dose_estimator", in_channels=3)
    return save_bundle(
        models_dir / name,
        name=name,
        network_name="dose_unet",
        network_kwargs=network_kwargs,
        network_state=net.state_dict(),
        estimator_kwargs={"in_channels": 3},
        estimator_state=est.state_dict(),
    )


def make_random_diffusion_bundle(models_dir: Path, name: str, sampling_steps: int, seed: int = 0) -> Path:
    """A small diffusion model bundle (``dose_diffusion``, no dose input) with random weights that samples in
    ``sampling_steps`` steps by default; its noise head is not zero, so the number of steps changes the result."""
    import torch

    from lowdose.bundle import save_bundle
    from lowdose.networks import build_network

    torch.manual_seed(seed)
    network_kwargs = {
        "in_channels": 3,
        "features": [8, 16],
        "blocks_per_level": [1, 1],
        "embedding_dim": 16,
        "sampling_steps": sampling_steps,
    }
    net = build_network("dose_diffusion", **network_kwargs)
    torch.nn.init.normal_(net.head.weight, std=0.02)
    return save_bundle(
        models_dir / name,
        name=name,
        network_name="dose_diffusion",
        network_kwargs=network_kwargs,
        network_state=net.state_dict(),
    )


def crop_volume(volume, z: slice, y: slice = slice(None), x: slice = slice(None)):
    """A sub-volume with its true geometry (origin moved to the first kept voxel); DICOM headers dropped."""
    from lowdose import CTVolume

    z0, y0, x0 = (s.start or 0 for s in (z, y, x))
    offset = volume.direction @ (np.array([x0, y0, z0], dtype=float) * np.array(volume.spacing_mm))
    return CTVolume(
        hu=volume.hu[z, y, x].copy(),
        spacing_mm=volume.spacing_mm,
        origin_mm=tuple(np.array(volume.origin_mm) + offset),
        direction=volume.direction.copy(),
        metadata={"format": "nifti"},
    )


def _wait_until(check, seconds: float, process: subprocess.Popen, what: str, log_path: Path) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if process.poll() is not None:
            pytest.fail(
                f"{what} exited with status {process.returncode} before it was ready; its log ends:\n" + _tail(log_path)
            )
        try:
            if check():
                return
        except requests.RequestException:
            pass
        time.sleep(0.25)
    pytest.fail(f"{what} did not answer within {seconds:.0f} s; its log ends:\n" + _tail(log_path))


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop(process: subprocess.Popen) -> None:
    """Stop a process we started and everything it started (it leads its own process group)."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    try:  # workers (batch inference, training) that outlived the server
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@dataclasses.dataclass
class LowdoseServer:
    """A running `python -m lowdose.server` (the same as `lowdose serve`)."""

    url: str
    process: subprocess.Popen
    log_path: Path
    studies: str
    models_dir: Path
    startup_seconds: float
    token: str = ""  # the bearer token the server requires ("" when started with --no-auth)

    @property
    def headers(self) -> dict:
        """The Authorization header every request to this server needs."""
        return {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def get(self, path: str, **kwargs) -> requests.Response:
        """GET ``path`` with the token."""
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs) -> requests.Response:
        """POST ``path`` with the token."""
        return self.request("POST", path, **kwargs)

    def request(self, method: str, path: str, **kwargs) -> requests.Response:
        kwargs["headers"] = {**self.headers, **kwargs.get("headers", {})}
        kwargs.setdefault("timeout", 60)
        return requests.request(method, f"{self.url}{path}", **kwargs)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_lowdose_server(
    workdir: Path,
    studies: str | None,
    models_dir: Path | None,
    max_upload_mb: float = 64,
    extra: list[str] | None = None,
    env_extra: dict | None = None,
    token: str | None = None,
) -> LowdoseServer:
    """``lowdose serve`` in a subprocess on a free loopback port; ``studies``/``models_dir`` None = its defaults.

    The server requires a bearer token, given as a user would (``LOWDOSE_TOKEN``); a fresh random one unless
    ``token`` is given; ``token=""`` leaves the variable unset (the server then makes and stores its own,
    or runs without authentication when ``extra`` holds ``--no-auth``).
    """
    port = free_port()
    token = secrets.token_urlsafe(24) if token is None else token
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"lowdose-server-{port}.log"
    env = dict(os.environ)
    env["XDG_CACHE_HOME"] = str(workdir / "cache")  # PACS series cache, sample studies: all in the test's folder
    env["PYTHONUNBUFFERED"] = "1"
    env["XDG_STATE_HOME"] = str(workdir / "state")  # the server's generated token lives here
    env.pop("LOWDOSE_TOKEN", None)
    if token:
        env["LOWDOSE_TOKEN"] = token
    env.update(env_extra or {})
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    command = [
        sys.executable,
        "-m",
        "lowdose.server",
        "--port",
        str(port),
        "--max-upload-mb",
        str(max_upload_mb),
        *(["--studies", studies] if studies is not None else []),
        *(["--models-dir", str(models_dir)] if models_dir is not None else []),
        *(extra or []),
    ]
    started = time.time()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=workdir, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        # Any answer means it is up (401 when the token is the server's own, not known yet here).
        _wait_until(
            lambda: requests.get(f"{url}/info/", headers=headers, timeout=5).status_code in (200, 401),
            SERVER_START_SECONDS,
            process,
            "lowdose serve",
            log_path,
        )
    except BaseException:
        _stop(process)
        raise
    return LowdoseServer(
        url=url,
        process=process,
        log_path=log_path,
        studies=studies,
        models_dir=models_dir,
        startup_seconds=time.time() - started,
        token=token,
    )


def stop_lowdose_server(server: LowdoseServer) -> None:
    _stop(server.process)


@dataclasses.dataclass
class Orthanc:
    url: str  # REST root, e.g. http://127.0.0.1:8042
    dicomweb: str  # DICOMweb root
    process: subprocess.Popen
    log_path: Path


def start_orthanc(workdir: Path) -> Orthanc:
    """Orthanc with its DICOMweb plug-in on 127.0.0.1 only; a missing install fails (never skips) the test."""
    binary = shutil.which("Orthanc")
    if binary is None or not ORTHANC_PLUGIN.is_file():
        pytest.fail(
            "Orthanc with its DICOMweb plug-in is needed for the PACS tests and is missing "
            f"(Orthanc on PATH: {binary or 'no'}; plug-in {ORTHANC_PLUGIN}: "
            f"{'yes' if ORTHANC_PLUGIN.is_file() else 'no'}): run scripts/install_orthanc.sh"
        )
    port = free_port()
    storage = workdir / "orthanc-db"
    storage.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "lowdose-test",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "HttpPort": port,
        "DicomServerEnabled": False,  # no DICOM listener: DICOMweb over HTTP only
        "RemoteAccessAllowed": False,  # Orthanc has no bind address; it refuses every client but loopback
        "AuthenticationEnabled": False,
        "Plugins": [str(ORTHANC_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
    }
    config_path = workdir / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2))
    log_path = workdir / "orthanc.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [binary, str(config_path)], stdout=log, stderr=subprocess.STDOUT, cwd=workdir, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_until(
            lambda: requests.get(f"{url}/system", timeout=5).status_code == 200, 60, process, "Orthanc", log_path
        )
    except BaseException:
        _stop(process)
        raise
    return Orthanc(url=url, dicomweb=f"{url}/dicom-web", process=process, log_path=log_path)


def stop_orthanc(orthanc: Orthanc) -> None:
    _stop(orthanc.process)


def upload_to_orthanc(orthanc: Orthanc, files: list[Path]) -> None:
    for f in files:
        response = requests.post(f"{orthanc.url}/instances", data=f.read_bytes(), timeout=60)
        assert response.status_code == 200, f"Orthanc refused {f.name}: {response.status_code} {response.text[:200]}"
