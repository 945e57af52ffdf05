"""``/proxy/dicom/{qido,wado,stow}/...``: the configured PACS's DICOMweb, and nothing else of it.

MONAI Label's proxy forwarded any path (``../`` reached the PACS's own REST API, patient data included)
with the server's PACS credentials for anyone. Here the path is decoded once, must be a DICOMweb resource
(studies / series / instances / metadata / rendered / thumbnail / frames) and nothing else; uploads
(STOW-RS) are bounded by the server's body limit; the PACS is asked with time limits.
"""

from __future__ import annotations

import logging
import re

import anyio
import requests
from fastapi.responses import Response
from monailabel.config import settings as monailabel_settings

from ...errors import ServiceUnavailableError
from ...names import is_dicom_uid
from ..messages import json_error
from ..validate import RequestError

log = logging.getLogger("lowdose.server")

OPERATIONS = ("qido", "wado", "stow")
LEVELS = ("studies", "series", "instances")
VIEWS = ("metadata", "rendered", "thumbnail")
FRAMES = re.compile(r"[0-9]{1,6}(,[0-9]{1,6}){0,99}")
FORWARDED_REQUEST_HEADERS = ("accept", "content-type")
FORWARDED_RESPONSE_HEADERS = ("content-type",)


def dicomweb_path(path: str) -> str:
    """``path`` when it names a DICOMweb resource (checked segment by segment); 400 otherwise."""
    if not path or "%" in path or "\\" in path or path.startswith("/") or len(path) > 1024:
        raise RequestError(400, "not a DICOMweb path")
    parts = path.rstrip("/").split("/")
    if not _is_resource(parts):
        raise RequestError(
            400,
            "only DICOMweb paths (studies, series, instances, metadata, rendered, thumbnail, "
            "frames) are forwarded to the PACS",
        )
    return "/".join(parts)


def _is_resource(parts: list[str]) -> bool:
    if len(parts) == 1:
        return parts[0] in LEVELS  # QIDO-RS search at the top level
    expected = ("studies", "series", "instances")
    k = 0
    for level in expected:
        if k == len(parts):
            return True
        if parts[k] != level:
            return _is_view(parts[k:])
        if k + 1 == len(parts):
            return True  # a search below the previous level, e.g. studies/{uid}/series
        if not is_dicom_uid(parts[k + 1]):
            return False
        k += 2
    return k == len(parts) or _is_view(parts[k:])


def _is_view(rest: list[str]) -> bool:
    if len(rest) == 1:
        return rest[0] in VIEWS
    if rest and rest[0] == "frames":
        return (len(rest) == 2 and bool(FRAMES.fullmatch(rest[1]))) or (
            len(rest) == 3 and bool(FRAMES.fullmatch(rest[1])) and rest[2] == "rendered"
        )
    return False


def checked_operation(op: str, method: str, path: str) -> None:
    if op not in OPERATIONS:
        raise RequestError(404, f"no proxy operation {op[:20]!r}; use qido, wado or stow")
    if method == "POST" and not (op == "stow" and (path == "studies" or re.fullmatch(r"studies/[0-9.]+", path))):
        raise RequestError(405, "only STOW-RS (POST to stow/studies[/{uid}]) may send data to the PACS")
    if method != "POST" and op == "stow":
        raise RequestError(405, "stow takes POST only")


async def proxy_route(request):
    """Forward one checked DICOMweb request to the PACS (PACS mode only)."""
    settings = request.app.state.lowdose
    try:
        if settings.pacs_url is None:
            raise RequestError(404, "this server reads studies from a folder, not a PACS: there is no DICOMweb proxy")
        op = request.path_params["op"]
        path = dicomweb_path(request.path_params["path"])
        checked_operation(op, request.method, path)
        body = await request.body() if request.method == "POST" else None
        headers = {k: v for k, v in request.headers.items() if k.lower() in FORWARDED_REQUEST_HEADERS}
        query = list(request.query_params.multi_items())
        upstream = await anyio.to_thread.run_sync(_forward, settings, op, request.method, path, query, headers, body)
    except RequestError as exc:
        return json_error(exc.status, exc.detail, exc.headers)
    except ServiceUnavailableError as exc:
        log.error("%s", exc)
        return json_error(503, str(exc), {"Retry-After": "30"})
    kept = {k: v for k, v in upstream.headers.items() if k.lower() in FORWARDED_RESPONSE_HEADERS}
    return Response(content=upstream.content, status_code=upstream.status_code, headers=kept)


def _forward(settings, op: str, method: str, path: str, query: list, headers: dict, body: bytes | None):
    prefix = {
        "qido": monailabel_settings.MONAI_LABEL_QIDO_PREFIX,
        "wado": monailabel_settings.MONAI_LABEL_WADO_PREFIX,
        "stow": monailabel_settings.MONAI_LABEL_STOW_PREFIX,
    }[op] or ""
    prefix = prefix.strip("/")
    url = f"{settings.pacs_url}/{prefix + '/' if prefix else ''}{path}"
    user = monailabel_settings.MONAI_LABEL_DICOMWEB_USERNAME or monailabel_settings.MONAI_LABEL_DATASTORE_USERNAME
    password = monailabel_settings.MONAI_LABEL_DICOMWEB_PASSWORD or monailabel_settings.MONAI_LABEL_DATASTORE_PASSWORD
    try:
        return requests.request(
            method,
            url,
            params=query,
            headers=headers,
            data=body,
            auth=(user, password) if user and password else None,
            allow_redirects=False,
            timeout=(settings.pacs_connect_timeout, settings.pacs_read_timeout),
        )
    except requests.RequestException as exc:
        raise ServiceUnavailableError(settings.pacs_url, f"the PACS did not answer ({type(exc).__name__})") from None
