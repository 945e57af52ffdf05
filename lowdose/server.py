"""`lowdose serve`: the lowdose MONAI Label server (app in ``apps/lowdose``), on 127.0.0.1 by default.

``serve`` starts MONAI Label's own server (``monailabel start_server``) on 127.0.0.1 with the lowdose app,
the bundled sample study as a local datastore (or a PACS given by a DICOMweb URL) and the ASGI app below.
That ASGI app (``lowdose.server:app``) is MONAI Label's FastAPI app behind a guard that MONAI Label 0.8.5
lacks: inference runs in worker threads (queued, never blocking ``/info/``), uploads have a size limit,
bad input gets a 4xx that says what is wrong, an unknown model gets 404, and error responses never carry
file-system paths or tracebacks. The app's tasks call the lowdose library; no science lives here.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

log = logging.getLogger("lowdose.server")

REPO = Path(__file__).resolve().parent.parent
APP_DIR = REPO / "apps" / "lowdose"
DEFAULT_PORT = 8000
DEFAULT_MAX_UPLOAD_MB = 2048
SAMPLE_STUDY_NAME = "abdomen_ct_sample.nii.gz"
# Keys of an inference request that the server sets; a client's params may not override them.
RESERVED_PARAMS = ("image", "model", "label", "session", "session_id", "file", "image_id", "description",
                   "uploaded", "result_dir")
# A file name suffix a client may give an upload; anything else is sniffed from the content.
UPLOAD_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".dcm", ".zip")


# ----------------------------------------------------------------------------------------- command line


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``serve`` to the ``lowdose`` command's subparsers."""
    p = subparsers.add_parser(
        "serve", help="start the MONAI Label server (denoise, fidelity, fine-tune) on 127.0.0.1",
        description="Start the lowdose MONAI Label server. By default it serves the bundled sample study from a "
                    "local datastore on http://127.0.0.1:8000; --studies takes a folder of CT files or a DICOMweb "
                    "URL (PACS mode: results are stored back as new derived series).")
    _add_arguments(p)
    p.set_defaults(func=cmd_serve)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--studies", help="datastore: a folder of CT files (NIfTI/NRRD/MHA) or a DICOMweb URL such as "
                                     "http://127.0.0.1:8042/dicom-web (default: a folder holding the bundled sample)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 exposes the server "
                        "and the studies to the network)")
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument("--models-dir", help="folder of model bundles to serve (default: the repository's models/)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="default: the GPU when there is one")
    p.add_argument("--max-upload-mb", type=float, default=DEFAULT_MAX_UPLOAD_MB,
                   help=f"largest accepted request body in MB (default {DEFAULT_MAX_UPLOAD_MB})")
    p.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                   help="app option (see apps/lowdose/README.md), e.g. --conf infer_concurrency 1")
    p.add_argument("--dry-run", action="store_true", help="print the server command and exit")


def cmd_serve(args) -> None:
    serve(studies=args.studies, host=args.host, port=args.port, models_dir=args.models_dir, device=args.device,
          max_upload_mb=args.max_upload_mb, conf=dict(args.conf), dry_run=args.dry_run)


def serve(studies: str | None = None, host: str = "127.0.0.1", port: int = DEFAULT_PORT,
          models_dir: str | os.PathLike | None = None, device: str = "auto",
          max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, conf: dict | None = None, dry_run: bool = False) -> None:
    """Replace this process with MONAI Label's server running the lowdose app (does not return)."""
    from .errors import LowdoseError

    if not (APP_DIR / "main.py").is_file():
        raise LowdoseError(f"{APP_DIR}: the MONAI Label app is missing (run lowdose serve from its repository)")
    if not 0 < port < 65536:
        raise LowdoseError(f"--port {port}: not a TCP port")
    if studies is None:
        studies = str(prepare_sample_studies())
    elif not studies.startswith(("http://", "https://")):
        studies = str(Path(studies).expanduser().resolve())
    models_dir = Path(models_dir).expanduser().resolve() if models_dir else REPO / "models"
    if not models_dir.is_dir():
        raise LowdoseError(f"{models_dir}: no such models folder")
    options = {"models_dir": str(models_dir), "device": device, "max_upload_mb": f"{max_upload_mb:g}"}
    options.update(conf or {})
    argv = [sys.executable, "-m", "monailabel.main", "start_server", "--app", str(APP_DIR), "--studies", studies,
            "--host", host, "--port", str(port), "--uvicorn_app", "lowdose.server:app"]
    for key, value in options.items():
        argv += ["--conf", key, str(value)]
    env = server_environment(host, port, os.environ)
    if dry_run:
        print(" ".join(argv))
        return
    if not _is_loopback(host):
        print(f"lowdose serve: WARNING: listening on {host}: anyone who can reach this machine can read the "
              "studies and run the models (there is no authentication)", file=sys.stderr)
    print(f"lowdose serve: http://{_url_host(host)}:{port}/ (app {APP_DIR}, studies {studies}, models {models_dir})",
          file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, argv, env)


def server_environment(host: str, port: int, base: dict) -> dict:
    """The environment MONAI Label's server runs in: offline, no sessions, no MLflow."""
    env = dict(base)
    env.setdefault("MONAI_LABEL_SESSIONS", "false")  # upload-once sessions are not used by lowdose's tasks
    env.setdefault("MONAI_LABEL_TRACKING_ENABLED", "false")  # no MLflow
    env.setdefault("MONAI_LABEL_DICOMWEB_CACHE_EXPIRY", "60")  # see new PACS series within a minute
    env.setdefault("MONAI_LABEL_DICOMWEB_READ_TIMEOUT", "60")
    env.setdefault("MONAI_LABEL_SERVER_PORT", str(port))
    return env


def prepare_sample_studies(folder: str | os.PathLike | None = None) -> Path:
    """A writable local datastore folder that holds the bundled sample CT (as NIfTI, HU as int16)."""
    from . import load_ct, sample_ct_path, save_ct

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    folder = Path(folder) if folder else cache / "lowdose" / "sample_studies"
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / SAMPLE_STUDY_NAME
    if not target.exists():
        save_ct(load_ct(sample_ct_path()), target)
    return folder


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def main(argv: list[str] | None = None) -> int:
    """``python -m lowdose.server``: the same as ``lowdose serve``."""
    from .errors import LowdoseError

    parser = argparse.ArgumentParser(prog="python -m lowdose.server", description=__doc__.splitlines()[0])
    _add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        cmd_serve(args)
    except LowdoseError as exc:
        print(f"lowdose serve: error: {exc}", file=sys.stderr)
        return 1
    return 0


# ----------------------------------------------------------------------------------------- error texts

# An absolute path with at least one folder (not preceded by a word character, so 1/4 and URLs survive).
_PATH = re.compile(r"(?<![\w:/.~-])(?:~)?/(?:[^\s/'\"`,;:()\[\]{}<>]+/)+[^\s/'\"`,;:()\[\]{}<>]*")
_TEMP_NAME = re.compile(r"\btmp[\w-]{6,}(?:\.[\w.]+)?")


def scrub(text: str) -> str:
    """``text`` without file-system paths or temporary file names (for messages sent to a client)."""
    return _TEMP_NAME.sub("<file>", _PATH.sub("<path>", text))


def _user_message(exc: BaseException) -> str:
    problem = getattr(exc, "problem", None)  # CTInputError/CTOutputError: the problem without the path
    text = problem if isinstance(problem, str) else str(exc)
    return scrub(text.strip().splitlines()[0] if text.strip() else type(exc).__name__)


# ----------------------------------------------------------------------------------------- the guard


class _BodyTooLarge(Exception):
    pass


class Guard:
    """ASGI middleware around MONAI Label's app: body size limit, Host and Origin checks, error scrubbing.

    Every error response (status >= 400) is held back and rewritten before it leaves: a 500 becomes a
    generic message with a reference that finds the details in the server log; a 4xx (or a 503 saying
    what the server lacks) keeps its message with paths removed. Exceptions that escape the app are logged
    here, never sent.
    """

    def __init__(self, app, max_body_bytes: int | None = None):
        self.app = app
        self._max_body_bytes = max_body_bytes

    @property
    def max_body_bytes(self) -> int:
        if self._max_body_bytes is None:
            self._max_body_bytes = int(float(_app_conf().get("max_upload_mb", DEFAULT_MAX_UPLOAD_MB)) * 1024 * 1024)
        return self._max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        server = scope.get("server") or ("", 0)
        if server and _is_loopback(str(server[0])) and not _host_allowed(headers.get("host", "")):
            # A web page whose host name was made to point at 127.0.0.1 (DNS rebinding) must not get in.
            return await _send_json(send, 400, {"detail": "invalid Host header for a server on this machine only"})
        origin = headers.get("origin")
        if origin and not _origin_allowed(origin, headers.get("host", "")):
            # MONAI Label allows every origin; a web page elsewhere must not drive this server (CSRF).
            return await _send_json(send, 403, {"detail": "cross-origin request refused (allow it with "
                                                          "--conf allowed_origins URL[,URL])"})
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            return await _send_json(send, 413, _too_large_detail(int(length), self.max_body_bytes))
        await _GuardedRequest(self.app, scope, receive, send, self.max_body_bytes).run()


class _GuardedRequest:
    """One request through the Guard: counts the body, holds back and rewrites error responses."""

    def __init__(self, app, scope, receive, send, limit: int):
        self.app, self.scope, self._receive, self._send, self.limit = app, scope, receive, send, limit
        self.received = 0
        self.too_large = False
        self.started = False  # a response (ours or the app's) has begun on the wire
        self.held: dict | None = None
        self.reference: str | None = None

    async def run(self):
        try:
            await self.app(self.scope, self.receive, self.send)
        except Exception as exc:  # the app failed; the client gets a clean message, the log the details
            if self.too_large or isinstance(exc, _BodyTooLarge):
                return await self._finish(413, _too_large_detail(None, self.limit))
            self.reference = self.reference or uuid.uuid4().hex[:12]
            log.error("request %s %s failed (reference %s)", self.scope.get("method"), self.scope.get("path"),
                      self.reference, exc_info=exc)
            return await self._finish(500, _internal_detail(self.reference))
        if self.held is not None and not self.started:  # the app never finished its error body
            await self._flush_held()

    async def receive(self):
        message = await self._receive()
        if message["type"] == "http.request":
            self.received += len(message.get("body", b""))
            if self.received > self.limit:
                self.too_large = True
                raise _BodyTooLarge()
        return message

    async def send(self, message):
        if message["type"] == "http.response.start":
            if message["status"] >= 400:
                self.held = {"start": message, "body": b""}
                return
            self.started = True
            return await self._send(message)
        if message["type"] == "http.response.body" and self.held is not None:
            self.held["body"] += message.get("body", b"")
            if not message.get("more_body", False) and not self.started:
                await self._flush_held()
            return
        return await self._send(message)

    async def _finish(self, status: int, payload: dict) -> None:
        if not self.started:
            self.started = True
            await _send_json(self._send, status, payload)

    async def _flush_held(self) -> None:
        start, body = self.held["start"], self.held["body"]
        status = start["status"]
        if self.too_large:
            return await self._finish(413, _too_large_detail(None, self.limit))
        if status == 500 or (status > 500 and not body.lstrip().startswith(b"{")):
            # The exception behind it (if any) reaches run() next and is logged under the same reference.
            self.reference = uuid.uuid4().hex[:12]
            log.warning("request %s %s answered %d (reference %s): %s", self.scope.get("method"),
                        self.scope.get("path"), status, self.reference, body[:2000].decode("utf-8", "replace"))
            return await self._finish(status, _internal_detail(self.reference))
        try:
            payload = json.loads(body) if body else {"detail": ""}
            if not isinstance(payload, dict):
                payload = {"detail": payload}
        except ValueError:
            payload = {"detail": body.decode("utf-8", "replace")}
        payload = json.loads(scrub(json.dumps(payload)))
        keep = (b"allow", b"www-authenticate", b"access-control-allow-origin", b"access-control-allow-credentials",
                b"vary")
        if not self.started:
            self.started = True
            await _send_json(self._send, status, payload, [(k, v) for k, v in start.get("headers", [])
                                                           if k.lower() in keep])


def _too_large_detail(size: int | None, limit: int) -> dict:
    mb = limit / 1024 / 1024
    said = f" ({size / 1024 / 1024:.1f} MB)" if size is not None else ""
    return {"detail": f"the upload{said} is larger than this server's limit of {mb:g} MB "
                      "(start the server with a larger --max-upload-mb, or send a smaller volume)"}


def _internal_detail(reference: str) -> dict:
    return {"detail": f"internal server error (reference {reference}); the server log has the details"}


async def _send_json(send, status: int, payload: dict, headers: list | None = None) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})


def _host_allowed(host_header: str) -> bool:
    host = host_header.strip().lower()
    if host.startswith("["):
        host = host[1:].split("]", 1)[0]
    elif host.count(":") == 1:
        host = host.split(":", 1)[0]
    return host in ("localhost", "") or _is_loopback(host)


def _origin_allowed(origin: str, host_header: str) -> bool:
    origin = origin.strip().rstrip("/").lower()
    if origin in (f"http://{host_header.lower()}", f"https://{host_header.lower()}"):
        return True  # the server's own pages (/, /docs, OHIF under /ohif/)
    allowed = str(_app_conf().get("allowed_origins", ""))
    return origin in {o.strip().rstrip("/").lower() for o in allowed.split(",") if o.strip()}


def _app_conf() -> dict:
    from monailabel.config import settings

    return dict(settings.MONAI_LABEL_APP_CONF or {})


# ----------------------------------------------------------------------------------------- /infer route


def _json_error(status: int, detail: str):
    from fastapi.responses import JSONResponse

    return JSONResponse({"detail": detail}, status_code=status)


_limiter = None


def _infer_limiter():
    """At most ``infer_concurrency`` inferences at a time (default 1); the others wait in line, unlost."""
    global _limiter
    if _limiter is None:
        import anyio

        _limiter = anyio.CapacityLimiter(max(1, int(_app_conf().get("infer_concurrency", 1))))
    return _limiter


def _upload_suffix(filename: str | None, head: bytes) -> str:
    name = (filename or "").lower()
    for suffix in UPLOAD_SUFFIXES:
        if name.endswith(suffix):
            return suffix
    if head.startswith(b"PK\x03\x04"):
        return ".zip"
    if head.startswith(b"\x1f\x8b"):
        return ".nii.gz"
    if head[128:132] == b"DICM":
        return ".dcm"
    if head.startswith(b"NRRD"):
        return ".nrrd"
    return ""


def _save_upload(upload, folder: Path) -> Path:
    upload.file.seek(0)
    head = upload.file.read(132)
    upload.file.seek(0)
    target = folder / f"upload{_upload_suffix(upload.filename, head)}"
    with open(target, "wb") as handle:
        shutil.copyfileobj(upload.file, handle, 1024 * 1024)
    return target


async def infer_endpoint(request, model: str, image: str = "", output: str | None = None):
    """POST /infer/{model}: run a lowdose task on an upload (form field ``file``) or a datastore image."""
    import anyio
    from fastapi.responses import FileResponse, Response
    from monailabel.interfaces.exception import MONAILabelException
    from monailabel.interfaces.utils.app import app_instance
    from starlette.background import BackgroundTask
    from starlette.datastructures import UploadFile
    from starlette.formparsers import MultiPartException

    from .errors import CTInputError, LowdoseError

    if output not in (None, "image", "json", "all"):
        return _json_error(400, f"output must be image, json or all; got {scrub(str(output))!r}")
    instance = app_instance()
    models = instance.lowdose_models() if hasattr(instance, "lowdose_models") else sorted(instance._infers)
    if model not in models:
        return _json_error(404, f"no model named {scrub(model)!r}; available: {', '.join(models) or 'none'}")
    try:
        form = await request.form(max_files=1, max_fields=4) if request.headers.get("content-type", "").startswith(
            ("multipart/form-data", "application/x-www-form-urlencoded")) else {}
    except MultiPartException as exc:
        return _json_error(400, f"malformed form data ({scrub(str(exc))})")
    upload = form.get("file") if form else None
    params_text = form.get("params", "{}") if form else "{}"
    if upload is not None and not isinstance(upload, UploadFile):
        return _json_error(400, "the form field 'file' must be a file upload")
    try:
        params = json.loads(params_text or "{}") if isinstance(params_text, str) else None
    except ValueError:
        params = None
    if not isinstance(params, dict):
        return _json_error(400, "the form field 'params' must be a JSON object, e.g. {\"dose\": \"auto\"}")
    reserved = sorted(set(params) & set(RESERVED_PARAMS))
    if reserved:
        return _json_error(400, f"params may not set {', '.join(reserved)} (the server sets them)")

    work = Path(tempfile.mkdtemp(prefix="lowdose-request-"))
    handed_over = False  # the response streams a file from ``work`` and removes it afterwards
    try:
        infer_request = {**params, "model": model, "result_dir": str(work)}
        if upload is not None:
            infer_request["image"] = str(await anyio.to_thread.run_sync(_save_upload, upload, work))
            infer_request["uploaded"] = True
        elif image:
            if not await anyio.to_thread.run_sync(_has_image, instance, image):
                return _json_error(404, f"no image {scrub(image)!r} in the datastore")
            infer_request["image"] = infer_request["image_id"] = image
        else:
            return _json_error(400, "give a CT to process: a file upload (form field 'file') or ?image=<id> of "
                                    "a datastore image")
        try:
            result = await anyio.to_thread.run_sync(instance.infer, infer_request, limiter=_infer_limiter())
        except CTInputError as exc:
            return _json_error(422, f"not a usable CT volume: {_user_message(exc)}")
        except LowdoseError as exc:
            if _lacks_segmentation_weights(exc):
                log.error("fidelity check unavailable: %s", exc)
                return _json_error(503, "the fidelity check cannot run on this server (its segmentation model is "
                                        "not installed; the server log says how to install it)")
            return _json_error(400, _user_message(exc))
        except ValueError as exc:
            return _json_error(400, _user_message(exc))
        except MONAILabelException as exc:
            return _json_error(400, scrub(str(getattr(exc, "msg", exc))))

        params_out = result.get("params") or {}
        result_file = result.get("file")
        if result_file and not os.path.isfile(result_file):
            result_file = None
        if output == "json" or (result_file is None and output != "image"):
            return Response(json.dumps(params_out), media_type="application/json")
        if result_file is None:
            return _json_error(400, f"model {model} returns no image; ask for output=json")
        if output == "image":
            summary = json.dumps(params_out, separators=(",", ":"))
            headers = {"X-Lowdose-Result": summary} if len(summary) < 4000 and summary.isascii() else {}
            handed_over = True
            return FileResponse(result_file, filename=os.path.basename(result_file), headers=headers,
                                media_type=_mime_type(result_file),
                                background=BackgroundTask(shutil.rmtree, work, ignore_errors=True))
        from requests_toolbelt import MultipartEncoder

        with open(result_file, "rb") as handle:
            encoder = MultipartEncoder(fields={
                "params": (None, json.dumps(params_out), "application/json"),
                "image": (os.path.basename(result_file), handle, _mime_type(result_file))})
            body = encoder.to_string()
        return Response(content=body, media_type=encoder.content_type)
    finally:
        if upload is not None:
            await upload.close()
        if not handed_over:
            shutil.rmtree(work, ignore_errors=True)


def _has_image(instance, image_id: str) -> bool:
    if hasattr(instance, "has_image"):
        return instance.has_image(image_id)
    return image_id in instance.datastore().list_images()


def _lacks_segmentation_weights(exc: Exception) -> bool:
    from .fidelity import TotalSegmentatorWeightsError

    return isinstance(exc, TotalSegmentatorWeightsError)


def _mime_type(path: str) -> str:
    if path.endswith((".nii.gz", ".gz")):
        return "application/gzip"
    if path.endswith(".zip"):
        return "application/zip"
    if path.endswith(".json"):
        return "application/json"
    return "application/octet-stream"


def build_app():
    """MONAI Label's FastAPI app with lowdose's /infer route, behind the Guard."""
    from fastapi import Request
    from monailabel.app import app as monailabel_app
    from starlette.routing import Route

    async def endpoint(request: Request):
        return await infer_endpoint(request, request.path_params["model"], request.query_params.get("image", ""),
                                    request.query_params.get("output"))

    prefix = _api_prefix()
    route = Route(f"{prefix}/infer/{{model}}", endpoint, methods=["POST"], name="lowdose_infer")
    # Starlette matches routes in order: ours answers /infer/{model} before MONAI Label's blocking one.
    monailabel_app.router.routes.insert(0, route)
    os.environ["LOWDOSE_SERVER_GUARD"] = "1"
    _dump_stacks_on_sigusr1()
    return Guard(monailabel_app)


def _dump_stacks_on_sigusr1() -> None:
    """``kill -USR1 <server pid>`` writes every thread's stack to the server log (a stuck request's cause)."""
    import faulthandler
    import signal

    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, all_threads=True)


def _api_prefix() -> str:
    from monailabel.config import settings

    return settings.MONAI_LABEL_API_STR or ""


_app = None


def __getattr__(name: str):
    # ``lowdose.server:app`` for uvicorn, built on first use (importing this module for the CLI stays light).
    global _app
    if name == "app":
        if _app is None:
            _app = build_app()
        return _app
    raise AttributeError(name)


if __name__ == "__main__":
    sys.exit(main())
