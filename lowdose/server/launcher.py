"""`lowdose serve`: start MONAI Label's server with the lowdose app, its guard and its access token.

``serve`` runs ``monailabel start_server`` with the app in ``apps/lowdose``, the bundled sample study as a
local datastore (or a PACS given by a DICOMweb URL) and the ASGI app ``lowdose.server:app``. The app's
tasks call the lowdose library; no science lives here.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from collections.abc import Mapping
from pathlib import Path

from ..errors import LowdoseError
from ..resources import sample_ct_path, shipped_path
from .auth import NO_AUTH_ENV, TOKEN_ENV, TOKEN_FILE_ENV, resolve_token
from .guard import is_loopback
from .settings import DEFAULT_MAX_UPLOAD_MB

# The MONAI Label app: in the installed package (lowdose/_shipped/apps/lowdose) or the checkout's apps/lowdose.
APP_DIR = shipped_path("apps/lowdose")
DEFAULT_PORT = 8000
SAMPLE_STUDY_NAME = "abdomen_ct_sample.nii.gz"


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``serve`` to the ``lowdose`` command's subparsers."""
    p = subparsers.add_parser(
        "serve",
        help="start the MONAI Label server (denoise, fidelity, fine-tune) on 127.0.0.1",
        description="Start the lowdose MONAI Label server. By default it serves the bundled sample study from a "
        "local datastore on http://127.0.0.1:8000; --studies takes a folder of CT files or a DICOMweb "
        "URL (PACS mode: results are stored back as new derived series). Every request needs the "
        "header 'Authorization: Bearer <token>' (see --token-file and docs/security.md).",
    )
    add_arguments(p)
    p.set_defaults(func=cmd_serve)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--studies",
        help="datastore: a folder of CT files (NIfTI/NRRD/MHA) or a DICOMweb URL such as "
        "http://127.0.0.1:8042/dicom-web (default: a folder holding the bundled sample)",
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 exposes the server "
        "to the network: put it behind a TLS reverse proxy, see docs/security.md)",
    )
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument(
        "--models-dir",
        help="folder of model bundles to serve (default: the first folder of "
        "$LOWDOSE_MODELS, else the models installed with lowdose)",
    )
    p.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="default: the GPU when there is one"
    )
    p.add_argument(
        "--max-upload-mb",
        type=float,
        default=DEFAULT_MAX_UPLOAD_MB,
        help=f"largest accepted request body in MB (default {DEFAULT_MAX_UPLOAD_MB})",
    )
    p.add_argument(
        "--token-file",
        help=f"file whose first line is the access token (mode 0600); default: "
        f"${TOKEN_ENV}, else a token made on first start in the state folder",
    )
    p.add_argument(
        "--state-dir", help="the server's state folder (default $XDG_STATE_HOME/lowdose or " "~/.local/state/lowdose)"
    )
    p.add_argument(
        "--show-token",
        action="store_true",
        help="print the access token clients must send, and exit (for the administrator)",
    )
    p.add_argument(
        "--no-auth", action="store_true", help="no access token (refused unless --host is a loopback address)"
    )
    p.add_argument(
        "--conf",
        nargs=2,
        action="append",
        default=[],
        metavar=("KEY", "VALUE"),
        help="app option (see apps/lowdose/README.md), e.g. --conf infer_concurrency 1",
    )
    p.add_argument("--dry-run", action="store_true", help="print the server command and exit")


def cmd_serve(args) -> None:
    if args.show_token:
        print(resolve_token(args.token_file, args.state_dir).value)
        return
    serve(
        studies=args.studies,
        host=args.host,
        port=args.port,
        models_dir=args.models_dir,
        device=args.device,
        max_upload_mb=args.max_upload_mb,
        conf=dict(args.conf),
        dry_run=args.dry_run,
        token_file=args.token_file,
        state_dir=args.state_dir,
        no_auth=args.no_auth,
    )


def serve(
    studies: str | None = None,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    models_dir: str | os.PathLike | None = None,
    device: str = "auto",
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
    conf: dict | None = None,
    dry_run: bool = False,
    token_file: str | None = None,
    state_dir: str | None = None,
    no_auth: bool = False,
) -> None:
    """Replace this process with MONAI Label's server running the lowdose app (does not return)."""
    app_dir = app_folder()
    if not 0 < port < 65536:
        raise LowdoseError(f"--port {port}: not a TCP port")
    if no_auth and not is_loopback(host):
        raise LowdoseError(
            f"--no-auth with --host {host}: a server without authentication may listen on a "
            "loopback address only (127.0.0.1, ::1 or localhost)"
        )
    if studies is None:
        studies = str(prepare_sample_studies())
    elif not studies.startswith(("http://", "https://")):
        studies = str(Path(studies).expanduser().resolve())
    models_dir = Path(models_dir).expanduser().resolve() if models_dir else default_models_dir()
    if not models_dir.is_dir():
        raise LowdoseError(f"{models_dir}: no such models folder")
    options = {"models_dir": str(models_dir), "device": device, "max_upload_mb": f"{max_upload_mb:g}"}
    options.update(conf or {})
    argv = [
        sys.executable,
        "-m",
        "monailabel.main",
        "start_server",
        "--app",
        str(app_dir),
        "--studies",
        studies,
        "--host",
        host,
        "--port",
        str(port),
        "--uvicorn_app",
        "lowdose.server:app",
    ]
    for key, value in options.items():
        argv += ["--conf", key, str(value)]
    env = server_environment(host, port, os.environ)
    said = _set_authentication(env, no_auth, token_file, state_dir)
    if dry_run:
        print(" ".join(argv))
        return
    print(
        f"lowdose serve: http://{_url_host(host)}:{port}/ (app {app_dir}, studies {studies}, models {models_dir})",
        file=sys.stderr,
    )
    print(f"lowdose serve: {said}", file=sys.stderr)
    if not is_loopback(host):
        print(
            f"lowdose serve: listening on {host}: reachable from the network; serve it through a TLS reverse "
            "proxy (docs/security.md), the token travels in clear text otherwise",
            file=sys.stderr,
        )
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)


def _set_authentication(env: dict[str, str], no_auth: bool, token_file: str | None, state_dir: str | None) -> str:
    """Tell the server in ``env`` how to authenticate (no auth, or the token file to read); returns what
    clients need to know, for the start-up message."""
    if no_auth:
        env[NO_AUTH_ENV] = "1"
        env.pop(TOKEN_FILE_ENV, None)
        return "authentication is OFF (--no-auth): any program on this machine can use the server"
    env.pop(NO_AUTH_ENV, None)
    token = resolve_token(token_file, state_dir, env)
    if token.source != TOKEN_ENV:
        env[TOKEN_FILE_ENV] = token.source
    where = (
        f"in {token.source}" + (" (made now)" if token.created else "")
        if token.source != TOKEN_ENV
        else f"from ${TOKEN_ENV}"
    )
    return (
        f"clients must send 'Authorization: Bearer <token>'; the token is {where} "
        "(`lowdose serve --show-token` prints it)"
    )


def app_folder() -> Path:
    """The MONAI Label app's folder, or a copy of it in the cache when it is read-only (an installed lowdose in a
    system folder): MONAI Label writes logs/, model/ and bin/ into the app's folder."""
    if not (APP_DIR / "main.py").is_file():
        raise LowdoseError(
            f"{APP_DIR}: the MONAI Label app is missing (lowdose's wheel and its source checkout "
            "both have it; reinstall lowdose)"
        )
    if os.access(APP_DIR, os.W_OK):
        return APP_DIR
    copy = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lowdose" / "app" / APP_DIR.name
    shutil.copytree(APP_DIR, copy, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    return copy


def default_models_dir() -> Path:
    """The models the server offers when not told: the first folder of $LOWDOSE_MODELS, else the shipped ones."""
    from ..bundle import models_dirs  # numpy: not for `lowdose --help`, which imports this module

    return models_dirs()[0].resolve()


def server_environment(host: str, port: int, base: Mapping[str, str]) -> dict[str, str]:
    """The environment MONAI Label's server runs in: offline, no sessions, no MLflow, no MONAI Label auth."""
    env = dict(base)
    env.setdefault("MONAI_LABEL_SESSIONS", "false")  # upload-once sessions are not used by lowdose's tasks
    env.setdefault("MONAI_LABEL_TRACKING_ENABLED", "false")  # no MLflow
    env.setdefault("MONAI_LABEL_DICOMWEB_CACHE_EXPIRY", "60")  # see new PACS series within a minute
    env.setdefault("MONAI_LABEL_DICOMWEB_READ_TIMEOUT", "60")
    env.setdefault("MONAI_LABEL_SERVER_PORT", str(port))
    return env


def prepare_sample_studies(folder: str | os.PathLike | None = None) -> Path:
    """A writable local datastore folder that holds the bundled sample CT (as NIfTI, HU as int16)."""
    from ..io import load_ct, save_ct  # SimpleITK/pydicom: only when the sample is written

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    folder = Path(folder) if folder else cache / "lowdose" / "sample_studies"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / SAMPLE_STUDY_NAME
    if not target.exists():
        save_ct(load_ct(sample_ct_path()), target)
    return folder


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def main(argv: list[str] | None = None) -> int:
    """``python -m lowdose.server``: the same as ``lowdose serve``."""
    parser = argparse.ArgumentParser(prog="python -m lowdose.server", description=__doc__.splitlines()[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        cmd_serve(args)
    except LowdoseError as exc:
        print(f"lowdose serve: error: {exc}", file=sys.stderr)
        return 1
    return 0
