"""HTTP client of the lowdose server (MONAI Label app) for the 3D Slicer module: standard library only, no Slicer.

It sends a CT volume file to ``POST /infer/{task}`` and brings the result back to a temporary file, with
progress reports (bytes sent, waiting, bytes received), cancellation between chunks and while waiting,
separate time limits for connecting, waiting for the inference and stalled transfers, and one exception
class per thing that can go wrong. It never uploads to a server the user has not allowed (a
``settings.ConsentStore``), and sends the server's access token (``Authorization: Bearer``) with every
request, never in a message.
Written for the Python of 3D Slicer 5 (3.9 and later).
"""

from __future__ import annotations

import dataclasses
import gzip
import http.client
import json
import mmap
import os
import re
import select
import shutil
import socket
import ssl
import struct
import tempfile
import threading
import time
import uuid
import zipfile
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote, urlencode, urlsplit

from .ensemble import DEFAULT_ENSEMBLE, check_ensemble
from .steps import check_steps
from .strength import DEFAULT_STRENGTH, parse_strength

if TYPE_CHECKING:  # settings imports this module
    from .settings import ConsentStore

__all__ = [
    "AuthenticationError",
    "CHUNK_BYTES",
    "Cancelled",
    "ConsentRequired",
    "DenoiseResult",
    "FidelityResult",
    "LowDoseClient",
    "LowDoseClientError",
    "ModelInfo",
    "NotAVolume",
    "Progress",
    "ServerError",
    "ServerUnreachable",
    "Timeout",
    "Timeouts",
    "normalise_token",
    "server_key",
    "sniff_volume",
]

USER_AGENT = "lowdose-slicer/0.1"
CHUNK_BYTES = 256 * 1024
MAX_ERROR_BODY = 1024 * 1024  # an error answer larger than this is cut (it is text for a message box)
_POLL_SECONDS = 0.1  # how often a wait looks at the cancel flag
_WAIT_REPORT_SECONDS = 0.5  # how often a wait reports progress


# ----------------------------------------------------------------------------------------- errors


class LowDoseClientError(Exception):
    """Base class: every failure of the client is one of these, with a message fit for a message box."""


class ServerUnreachable(LowDoseClientError):
    """No connection to the server (nothing listening, wrong address, network down, connection lost)."""


class ServerError(LowDoseClientError):
    """The server answered with an error: ``status`` is the HTTP status, ``message`` the server's own words."""

    def __init__(self, status: int | None, message: str):
        self.status = status
        self.message = message
        super().__init__(f"the server answered {status}: {message}" if status else message)


class AuthenticationError(ServerError):
    """The server refused the request (HTTP 401) because its access token was missing or wrong.

    ``token_given`` says which; the message says where to find the token. It never holds the token.
    """

    HOW_TO_FIND = (
        "paste it into the module's Server token field (the server's administrator finds it with "
        "`lowdose serve --show-token`, or in the file that lowdose serve printed at start-up)"
    )

    def __init__(self, server: str, token_given: bool):
        self.server = server
        self.token_given = token_given
        what = (
            "did not accept the token it was given; it needs its access token"
            if token_given
            else "needs its access token"
        )
        self.status = 401
        self.message = f"the server {server} {what}: {self.HOW_TO_FIND}"
        LowDoseClientError.__init__(self, self.message)


class Timeout(LowDoseClientError):
    """The server did not answer, or a transfer stalled, within the configured time."""


class Cancelled(LowDoseClientError):
    """The user cancelled the request."""


class NotAVolume(LowDoseClientError):
    """The server's result is not a NIfTI or NRRD volume (or a zip of them, for the fidelity check)."""


class ConsentRequired(LowDoseClientError):
    """The user has not allowed sending volumes to this server; nothing was sent."""

    def __init__(self, server: str):
        self.server = server
        super().__init__(f"sending volumes to {server} has not been allowed; allow it first (nothing was sent)")


# ----------------------------------------------------------------------------------------- server and token


def server_key(url: str) -> str:
    """The identity of a server for consent: ``scheme://host:port`` (lower case, default port filled in)."""
    parts = _parse_url(url)
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"
    return f"{parts.scheme}://{host}:{parts.port or (443 if parts.scheme == 'https' else 80)}"


def normalise_token(token: str | None) -> str:
    """The token as it goes into the header: spaces around it and a pasted "Bearer " dropped.

    ValueError (without the token in its message) when it holds spaces, line breaks or non-ASCII characters.
    """
    token = (token or "").strip()
    if token[:7].lower() == "bearer ":
        token = token[7:].strip()
    if any(not 0x21 <= ord(c) <= 0x7E for c in token):
        raise ValueError(
            "the server token cannot hold spaces, line breaks or accented letters: copy it again "
            "(one line, nothing else)"
        )
    return token


# ----------------------------------------------------------------------------------------- results


@dataclasses.dataclass(frozen=True)
class Timeouts:
    """Time limits in seconds.

    ``connect``: to open the connection. ``response``: from the end of the upload until the server starts
    answering (the inference runs then, and may wait in the server's queue). ``idle``: the longest pause
    while bytes are being sent or received.
    """

    connect: float = 10.0
    response: float = 1800.0
    idle: float = 120.0


@dataclasses.dataclass(frozen=True)
class Progress:
    """One progress report: ``stage`` is "upload", "waiting" or "download"; byte counts (total may be None)."""

    stage: str
    done: int = 0
    total: int | None = None
    elapsed_s: float = 0.0

    @property
    def fraction(self) -> float | None:
        return self.done / self.total if self.total else None

    def describe(self) -> str:
        if self.stage == "waiting":
            return f"server working... {self.elapsed_s:.0f} s"
        total = f" of {self.total / 1e6:.1f} MB" if self.total else ""
        verb = "sending" if self.stage == "upload" else "receiving"
        return f"{verb} {self.done / 1e6:.1f} MB{total}"


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """A denoising model the server offers: its infer ``task`` name and the ``model`` (bundle) name.
    ``sampling_steps``: a diffusion model's own sampling steps (``denoise(steps=)`` chooses others); None for a
    model that is not a diffusion model (it takes no steps). ``version``: the bundle's version ("" from a server
    that does not say it)."""

    task: str
    model: str
    description: str = ""
    version: str = ""
    dose_aware: bool = False
    validation: dict = dataclasses.field(default_factory=dict)
    sampling_steps: int | None = None


@dataclasses.dataclass
class DenoiseResult:
    """The denoised volume in ``path`` (inside ``folder``, a temporary folder the caller removes) and the
    server's summary (model, dose_fraction, dose_source, description, seconds, geometry...)."""

    path: Path
    summary: dict
    folder: Path


@dataclasses.dataclass
class FidelityResult:
    """The fidelity report (the server's fidelity.json) and, when asked for, its files in ``folder``:
    ``labels_original``, ``labels_denoised`` (label maps on the input's grid), ``denoised``, ``html``."""

    report: dict
    files: dict[str, Path]
    folder: Path | None


# ----------------------------------------------------------------------------------------- volumes


def sniff_volume(path) -> str | None:
    """ "nifti" or "nrrd" when the file holds a 3-D volume of that format (gzip or not), else None."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(2)
            handle.seek(0)
            if head == b"\x1f\x8b":
                with gzip.GzipFile(fileobj=handle) as unzipped:
                    head = unzipped.read(560)
            else:
                head = handle.read(560)
    except (OSError, EOFError, zlib.error):  # gzip.BadGzipFile is an OSError
        return None
    if head.startswith(b"NRRD000"):
        match = re.search(rb"\ndimension:\s*(\d+)", head)
        return "nrrd" if match is None or int(match.group(1)) >= 3 else None
    for order in ("<", ">"):
        if len(head) >= 348 and struct.unpack(order + "i", head[:4])[0] == 348 and head[344:347] in (b"n+1", b"ni1"):
            ndim = struct.unpack(order + "h", head[40:42])[0]
            return "nifti" if 3 <= ndim <= 7 else None
        if len(head) >= 540 and struct.unpack(order + "i", head[:4])[0] == 540 and head[4:7] in (b"n+2", b"ni2"):
            ndim = struct.unpack(order + "q", head[16:24])[0]
            return "nifti" if 3 <= ndim <= 7 else None
    return None


_VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".nhdr", ".mha")


def _upload_name(path: Path) -> str:
    # The server learns the format from the suffix; the file's own name (which may hold a patient's name
    # when it came from a series description) is not sent.
    name = path.name.lower()
    for suffix in _VOLUME_SUFFIXES:
        if name.endswith(suffix):
            return "volume" + suffix
    return "volume" + "".join(path.suffixes[-2:]).lower()


# ----------------------------------------------------------------------------------------- the client


def _parse_url(url: str):
    parts = urlsplit(str(url).strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not a server address: {url!r} (expected e.g. http://127.0.0.1:8000)")
    try:
        _ = parts.port  # raises ValueError when the port is not a number in 0-65535
    except ValueError:
        raise ValueError(f"not a server address: {url!r} (bad port)") from None
    return parts


class _Multipart:
    """A multipart/form-data body of text fields and one file, produced chunk by chunk (never all in memory)."""

    def __init__(self, fields: dict[str, str], file_field: str, file_path: Path, filename: str):
        self.boundary = uuid.uuid4().hex
        b = self.boundary
        head = b"".join(
            f'--{b}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n'.encode() + v.encode() + b"\r\n"
            for k, v in fields.items()
        )
        head += (
            f'--{b}\r\nContent-Disposition: form-data; name="{file_field}"; filename="{filename}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n"
        ).encode()
        self.head, self.tail = head, f"\r\n--{b}--\r\n".encode()
        self.file_path = file_path
        self.length = len(head) + file_path.stat().st_size + len(self.tail)
        self.content_type = f"multipart/form-data; boundary={b}"

    def chunks(self, size: int):
        yield self.head
        with open(self.file_path, "rb") as handle:
            while True:
                block = handle.read(size)
                if not block:
                    break
                yield block
        yield self.tail


@dataclasses.dataclass
class _Response:
    status: int
    headers: dict[str, str]
    body: bytes = b""
    path: Path | None = None  # the body, when it was written to a file


class LowDoseClient:
    """Client of one lowdose server.

    ``consent`` is where the user's permission to send volumes to servers is kept; without a recorded
    permission for this server, ``denoise`` and ``fidelity`` refuse before anything is sent. ``token`` is the
    server's access token, sent as ``Authorization: Bearer <token>`` with every request (none: no header);
    a server that refuses it raises ``AuthenticationError``. The token appears in no message and no repr.

    Example::

        client = LowDoseClient("http://127.0.0.1:8000", settings.JsonConsentStore("consent.json"), token=token)
        client.consent.allow(client.url)            # after asking the user
        result = client.denoise("ct.nrrd", client.models()[0].task, dose="auto", strength="medium")
        print(result.path, result.summary["dose_fraction"])
    """

    def __init__(
        self,
        url: str,
        consent: ConsentStore,
        timeouts: Timeouts | None = None,
        chunk_bytes: int = CHUNK_BYTES,
        *,
        token: str | None = None,
    ):
        parts = _parse_url(url)
        self.url = f"{parts.scheme}://{parts.netloc}{parts.path.rstrip('/')}"
        self._scheme, self._host = parts.scheme, parts.hostname
        self._port = parts.port or (443 if parts.scheme == "https" else 80)
        self._prefix = parts.path.rstrip("/")
        self.consent = consent
        self.timeouts = timeouts or Timeouts()
        self.chunk_bytes = int(chunk_bytes)
        self._token = normalise_token(token)

    @property
    def has_token(self) -> bool:
        return bool(self._token)

    def __repr__(self) -> str:
        return f"LowDoseClient({self.url!r}, token={'given' if self._token else 'none'})"

    # -- what the server offers

    def info(self, timeout: float | None = 30.0) -> dict:
        """The server's ``/info/`` (MONAI Label app info); ServerError when it is not a lowdose server."""
        response = self._request("GET", "/info/", response_timeout=timeout or self.timeouts.response)
        try:
            info = json.loads(response.body.decode("utf-8"))
        except ValueError:
            raise ServerError(
                response.status, f"{self.url} did not answer /info/ with JSON: is it a MONAI Label " "server?"
            ) from None
        if not isinstance(info, dict) or not isinstance(info.get("models"), dict):
            raise ServerError(response.status, f"{self.url} is not a MONAI Label server (its /info/ lists no models)")
        if "lowdose" not in info:
            raise ServerError(
                response.status,
                f"{self.url} is a MONAI Label server without the lowdose app " f"(app: {info.get('name', '?')})",
            )
        return info

    def models(self, info: dict | None = None) -> list[ModelInfo]:
        """The denoising models (infer tasks that produce a denoised CT), in the server's order."""
        info = info if info is not None else self.info()
        found = []
        for task, meta in info["models"].items():
            extra = meta.get("lowdose") if isinstance(meta, dict) else None
            if isinstance(extra, dict) and extra.get("task") == "denoise":
                found.append(
                    ModelInfo(
                        task=task,
                        model=str(extra.get("model") or task),
                        version=str(extra.get("version") or ""),
                        description=str(meta.get("description", "")),
                        dose_aware=bool(extra.get("dose_aware")),
                        validation=dict(extra.get("validation") or {}),
                        sampling_steps=_sampling_steps(extra.get("sampling_steps")),
                    )
                )
        return found

    @staticmethod
    def has_fidelity(info: dict) -> bool:
        return "fidelity" in (info.get("models") or {})

    # -- the work

    @property
    def upload_allowed(self) -> bool:
        return self.consent.is_allowed(self.url)

    def denoise(
        self,
        volume_path,
        task: str,
        dose="auto",
        output_dtype: str | None = None,
        progress: Callable[[Progress], None] | None = None,
        cancel: threading.Event | None = None,
        result_dir=None,
        strength=DEFAULT_STRENGTH,
        steps: int | None = None,
        ensemble: int = DEFAULT_ENSEMBLE,
    ) -> DenoiseResult:
        """Send the CT in ``volume_path`` (NRRD/NIfTI/MHA, HU) to infer task ``task``; the denoised CT comes back
        to a NIfTI file in a new temporary folder (under ``result_dir`` when given). ``strength``: "low",
        "medium", "high" or a number in [0, 1] (``strength.parse_strength``; ValueError, nothing sent, when bad).
        ``steps``: a diffusion model's sampling steps, 1 to 4 (None: the model's own; ValueError, nothing sent,
        when bad). ``ensemble``: the self-ensemble, 1 (off), 2, 4 or 8 (``ensemble.check_ensemble``; ValueError,
        nothing sent, when bad); sent only when not 1, so servers from before it keep working."""
        strength, steps, ensemble = parse_strength(strength), check_steps(steps), check_ensemble(ensemble)
        volume_path = self._check_upload(volume_path)
        params = {"dose": dose, "strength": strength, "output_format": "nifti"}
        if steps is not None:
            params["steps"] = steps
        if ensemble != DEFAULT_ENSEMBLE:
            params["ensemble"] = ensemble
        if output_dtype:
            params["output_dtype"] = output_dtype
        folder = Path(tempfile.mkdtemp(prefix="lowdose-slicer-", dir=result_dir))
        try:
            parts = self._infer(task, volume_path, params, folder, progress, cancel)
            image = parts.get("image")
            if image is None:
                raise NotAVolume(f"the server sent no image for {task}")
            if sniff_volume(image) is None:
                raise NotAVolume(f"the server's result for {task} is not a NIfTI or NRRD volume")
            summary = parts.get("params") or {}
            return DenoiseResult(path=image, summary=summary, folder=folder)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise

    def fidelity(
        self,
        volume_path,
        model: str,
        dose="auto",
        labels: bool = True,
        progress: Callable[[Progress], None] | None = None,
        cancel: threading.Event | None = None,
        result_dir=None,
        fast: bool = True,
        strength=DEFAULT_STRENGTH,
        steps: int | None = None,
        ensemble: int = DEFAULT_ENSEMBLE,
    ) -> FidelityResult:
        """Run the server's fidelity check on the low-dose CT in ``volume_path`` denoised with ``model`` (a
        model name such as "dose_unet") at ``strength``, in ``steps`` and with ``ensemble`` (as for ``denoise``);
        with ``labels`` the label maps and the denoised CT come back too."""
        strength, steps, ensemble = parse_strength(strength), check_steps(steps), check_ensemble(ensemble)
        volume_path = self._check_upload(volume_path)
        params = {"denoise_model": model, "dose": dose, "strength": strength}
        if steps is not None:
            params["steps"] = steps
        if ensemble != DEFAULT_ENSEMBLE:
            params["ensemble"] = ensemble
        params.update(labels=bool(labels), fast=bool(fast))
        folder = Path(tempfile.mkdtemp(prefix="lowdose-slicer-fidelity-", dir=result_dir))
        try:
            parts = self._infer(
                "fidelity", volume_path, params, folder, progress, cancel, output="all" if labels else "json"
            )
            report = parts.get("params")
            if not isinstance(report, dict) or "structures" not in report:
                raise ServerError(200, "the server's fidelity answer has no report")
            files: dict[str, Path] = {}
            if labels:
                archive = parts.get("image")
                if archive is None:
                    raise NotAVolume("the server sent no label maps with the fidelity report")
                files = _extract_fidelity_zip(archive, folder / "fidelity")
                archive.unlink()
            else:
                shutil.rmtree(folder, ignore_errors=True)
                folder = None
            return FidelityResult(report=report, files=files, folder=folder)
        except BaseException:
            if folder is not None:
                shutil.rmtree(folder, ignore_errors=True)
            raise

    # -- transport

    def _check_upload(self, volume_path) -> Path:
        # Consent first: with no permission, not even the file is looked at, and no connection is made.
        if not self.consent.is_allowed(self.url):
            raise ConsentRequired(server_key(self.url))
        path = Path(volume_path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such volume file")
        return path

    def _infer(
        self, task: str, volume_path: Path, params: dict, folder: Path, progress, cancel, output: str = "all"
    ) -> dict:
        body = _Multipart({"params": json.dumps(params)}, "file", volume_path, _upload_name(volume_path))
        response = self._request(
            "POST",
            f"/infer/{quote(task, safe='')}",
            query={"output": output},
            body=body,
            download_to=folder / "response.bin",
            progress=progress,
            cancel=cancel,
        )
        try:
            return _split_response(response, folder)
        finally:
            if response.path is not None and response.path.exists():
                response.path.unlink()

    def _connect(self) -> http.client.HTTPConnection:
        if self._scheme == "https":
            conn = http.client.HTTPSConnection(
                self._host, self._port, timeout=self.timeouts.connect, context=ssl.create_default_context()
            )
        else:
            conn = http.client.HTTPConnection(self._host, self._port, timeout=self.timeouts.connect)
        try:
            conn.connect()
        except socket.timeout:  # noqa: UP041 (on Slicer's Python 3.9 it is not yet TimeoutError)
            conn.close()
            raise ServerUnreachable(
                f"no answer from {self.url} within {self.timeouts.connect:g} s (is the server "
                "running, and is the address right?)"
            ) from None
        except ssl.SSLError as exc:
            conn.close()
            raise ServerUnreachable(f"secure connection to {self.url} failed: {exc.reason or exc}") from None
        except OSError as exc:
            conn.close()
            raise ServerUnreachable(
                f"cannot reach {self.url}: {_os_reason(exc)} (is the server running, and is " "the address right?)"
            ) from None
        conn.sock.settimeout(self.timeouts.idle)
        return conn

    def _request(
        self,
        method: str,
        path: str,
        query: dict | None = None,
        body: _Multipart | None = None,
        download_to: Path | None = None,
        progress=None,
        cancel: threading.Event | None = None,
        response_timeout: float | None = None,
    ) -> _Response:
        started = time.monotonic()
        report = _Reporter(progress, started)
        _check_cancel(cancel)
        target = self._prefix + path + (f"?{urlencode(query)}" if query else "")
        conn = self._connect()
        try:
            conn.putrequest(method, target, skip_accept_encoding=True)
            conn.putheader("User-Agent", USER_AGENT)
            conn.putheader("Accept", "application/json, multipart/form-data, application/octet-stream, */*")
            if self._token:
                conn.putheader("Authorization", f"Bearer {self._token}")
            if body is not None:
                conn.putheader("Content-Type", body.content_type)
                conn.putheader("Content-Length", str(body.length))
            conn.endheaders()
            send_failed = None
            if body is not None:
                send_failed = self._send_body(conn, body, report, cancel)
            self._wait_for_answer(conn, response_timeout or self.timeouts.response, report, cancel)
            try:
                answer = conn.getresponse()
            except socket.timeout:  # noqa: UP041 (on Slicer's Python 3.9 it is not yet TimeoutError)
                raise Timeout(f"{self.url} began answering but stalled for {self.timeouts.idle:g} s") from None
            except (http.client.HTTPException, OSError) as exc:
                what = "while the volume was being sent" if send_failed else "before it answered"
                raise ServerUnreachable(
                    f"the connection to {self.url} was lost {what} " f"({_os_reason(send_failed or exc)})"
                ) from None
            headers = {k.lower(): v for k, v in answer.getheaders()}
            if answer.status == 401:
                raise AuthenticationError(server_key(self.url), token_given=bool(self._token))
            if answer.status >= 400:
                raise ServerError(answer.status, _error_message(answer.status, answer.read(MAX_ERROR_BODY), headers))
            if answer.status >= 300:
                raise ServerError(
                    answer.status,
                    f"unexpected redirect to {headers.get('location', '?')} (check the " "server address)",
                )
            return self._read_body(answer, headers, download_to, report, cancel)
        except socket.timeout:  # noqa: UP041 (on Slicer's Python 3.9 it is not yet TimeoutError)
            raise Timeout(f"the transfer with {self.url} stalled for {self.timeouts.idle:g} s") from None
        except (ConnectionError, http.client.HTTPException) as exc:
            raise ServerUnreachable(f"the connection to {self.url} was lost ({_os_reason(exc)})") from None
        finally:
            conn.close()

    def _send_body(self, conn, body: _Multipart, report: _Reporter, cancel) -> BaseException | None:
        """Send the body; a connection the server closed early is returned (it may have answered already)."""
        sent = 0
        report("upload", 0, body.length, force=True)
        for chunk in body.chunks(self.chunk_bytes):
            _check_cancel(cancel)
            try:
                conn.send(chunk)
            except socket.timeout:  # noqa: UP041 (on Slicer's Python 3.9 it is not yet TimeoutError)
                raise Timeout(
                    f"{self.url} took no data for {self.timeouts.idle:g} s while the volume was being " "sent"
                ) from None
            except OSError as exc:  # e.g. the server refused the request (413, 404) and closed the connection
                return exc
            sent += len(chunk)
            report("upload", sent, body.length)
        report("upload", sent, body.length, force=True)
        return None

    def _wait_for_answer(self, conn, seconds: float, report: _Reporter, cancel) -> None:
        """Wait until the server starts answering, looking at the cancel flag every 0.1 s."""
        sock = conn.sock
        deadline = time.monotonic() + seconds
        waited_since = time.monotonic()
        while True:
            _check_cancel(cancel)
            if isinstance(sock, ssl.SSLSocket) and sock.pending():
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise Timeout(
                    f"{self.url} gave no answer within {seconds:g} s (the inference may still be running "
                    "on the server; a larger time limit, a smaller volume or a GPU server helps)"
                )
            try:
                readable, _, _ = select.select([sock], [], [], min(_POLL_SECONDS, remaining))
            except (OSError, ValueError):
                return  # a closed socket: getresponse() says what happened
            if readable:
                return
            report("waiting", 0, None, elapsed=time.monotonic() - waited_since)

    def _read_body(self, answer, headers: dict, download_to: Path | None, report: _Reporter, cancel) -> _Response:
        length = headers.get("content-length")
        total = int(length) if length and length.isdigit() else None
        done = 0
        if download_to is None:
            chunks = []
            while True:
                _check_cancel(cancel)
                block = answer.read(self.chunk_bytes)
                if not block:
                    break
                chunks.append(block)
            return _Response(answer.status, headers, body=b"".join(chunks))
        report("download", 0, total, force=True)
        try:
            with open(download_to, "wb") as handle:
                while True:
                    _check_cancel(cancel)
                    block = answer.read(self.chunk_bytes)
                    if not block:
                        break
                    handle.write(block)
                    done += len(block)
                    report("download", done, total)
            if total is not None and done < total:
                raise ServerUnreachable(f"the connection to {self.url} was lost after {done} of {total} bytes")
        except BaseException:
            if download_to.exists():
                download_to.unlink()
            raise
        report("download", done, total, force=True)
        return _Response(answer.status, headers, path=download_to)


class _Reporter:
    """Calls the progress callback, at most every 0.1 s per stage unless forced (a slow callback slows nothing)."""

    def __init__(self, callback, started: float):
        self.callback = callback
        self.started = started
        self.last = {}

    def __call__(
        self, stage: str, done: int, total: int | None, elapsed: float | None = None, force: bool = False
    ) -> None:
        if self.callback is None:
            return
        now = time.monotonic()
        every = _WAIT_REPORT_SECONDS if stage == "waiting" else _POLL_SECONDS
        if not force and now - self.last.get(stage, 0.0) < every:
            return
        self.last[stage] = now
        self.callback(Progress(stage, done, total, now - self.started if elapsed is None else elapsed))


def _sampling_steps(value) -> int | None:
    """A model's sampling steps as /info/ gives them; None for none, or for anything but an integer from 1 to 4."""
    try:
        return check_steps(value)
    except ValueError:
        return None


def _check_cancel(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled("cancelled")


def _os_reason(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, socket.gaierror):
        return "unknown host name"
    return getattr(exc, "strerror", None) or str(exc) or type(exc).__name__


def _error_message(status: int, body: bytes, headers: dict) -> str:
    """The server's own message from a JSON error body ({"detail": ...}), else its text, else the status."""
    text = body.decode("utf-8", "replace").strip()
    try:
        payload = json.loads(text)
    except ValueError:
        payload = None
    if isinstance(payload, dict) and "detail" in payload:
        detail = payload["detail"]
        if isinstance(detail, list):  # FastAPI's validation errors
            detail = "; ".join(str(d.get("msg", d)) if isinstance(d, dict) else str(d) for d in detail)
        return str(detail)
    if text and "html" not in headers.get("content-type", ""):
        return text[:500]
    return http.client.responses.get(status, "error")


# ----------------------------------------------------------------------------------------- answers


def _split_response(response: _Response, folder: Path) -> dict:
    """{"params": dict, "image": Path} from an answer that is multipart (MONAI Label's output=all), JSON, or a file."""
    content_type = response.headers.get("content-type", "")
    path = response.path
    if content_type.startswith("multipart/"):
        match = re.search(r'boundary="?([^";]+)"?', content_type)
        if not match:
            raise ServerError(response.status, "the server's multipart answer has no boundary")
        return _split_multipart(path, match.group(1).encode("latin-1"), folder)
    if content_type.startswith("application/json"):
        data = path.read_bytes() if path is not None else response.body
        try:
            return {"params": json.loads(data.decode("utf-8"))}
        except ValueError:
            raise ServerError(response.status, "the server's JSON answer cannot be read") from None
    target = folder / "result.nii.gz"
    os.replace(path, target)
    summary = response.headers.get("x-lowdose-result")
    return {"image": target, "params": json.loads(summary) if summary else {}}


_DISPOSITION = re.compile(rb'name="([^"]*)"(?:;\s*filename="([^"]*)")?')


def _split_multipart(path: Path, boundary: bytes, folder: Path) -> dict:
    """Split a multipart body on disk without reading it all into memory: JSON parts parsed, files written."""
    out = {}
    delimiter = b"--" + boundary
    size = path.stat().st_size
    if size == 0:
        raise ServerError(200, "the server's answer is empty")
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
        position = data.find(delimiter)
        while position >= 0:
            start = position + len(delimiter)
            if data[start : start + 2] == b"--":
                break  # the closing delimiter
            header_end = data.find(b"\r\n\r\n", start)
            following = data.find(b"\r\n" + delimiter, header_end + 4) if header_end >= 0 else -1
            if header_end < 0 or following < 0:
                raise ServerError(200, "the server's multipart answer is cut short")
            headers = data[start:header_end]
            match = _DISPOSITION.search(headers)
            name = match.group(1).decode("utf-8", "replace") if match else f"part{len(out)}"
            filename = match.group(2).decode("utf-8", "replace") if match and match.group(2) else ""
            content_start, content_end = header_end + 4, following
            if filename:
                target = folder / _safe_name(filename)
                with open(target, "wb") as dest:
                    for offset in range(content_start, content_end, 1 << 22):
                        dest.write(data[offset : min(offset + (1 << 22), content_end)])
                out[name] = target
            else:
                text = data[content_start:content_end].decode("utf-8", "replace")
                try:
                    out[name] = json.loads(text)
                except ValueError:
                    out[name] = text
            position = following + 2
    return out


def _safe_name(filename: str) -> str:
    name = os.path.basename(filename.replace("\\", "/")).strip() or "result"
    name = re.sub(r"[^\w.\-]", "_", name)
    return name if not name.startswith(".") else "result" + name


def _extract_fidelity_zip(archive: Path, folder: Path) -> dict[str, Path]:
    """The fidelity zip's files by stem (labels_original, labels_denoised, denoised, fidelity_html, ...)."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    try:
        with zipfile.ZipFile(archive) as z:
            for member in z.infolist():
                if member.is_dir():
                    continue
                name = _safe_name(member.filename)
                target = folder / name
                with z.open(member) as src, open(target, "wb") as dest:
                    shutil.copyfileobj(src, dest, 1 << 20)
                stem = name.split(".", 1)[0]
                files["html" if name.endswith(".html") else "json" if name.endswith(".json") else stem] = target
    except zipfile.BadZipFile:
        raise NotAVolume("the server's fidelity files are not a readable zip") from None
    for key in ("labels_original", "labels_denoised"):
        if key not in files:
            raise NotAVolume(f"the server's fidelity files lack {key}")
        if sniff_volume(files[key]) is None:
            raise NotAVolume(f"the server's {key} is not a NIfTI or NRRD volume")
    return files
