"""``POST /infer/{model}``: a lowdose task on an upload (form field ``file``) or a datastore image.

Replaces MONAI Label's route, which ran inference inside the event loop and read any server path given as
``image``. Here the place in the line is taken before the upload is read, inference runs in a worker
thread, and every name and parameter is checked.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import anyio
from fastapi.responses import FileResponse, Response
from monailabel.interfaces.exception import MONAILabelException
from monailabel.interfaces.utils.app import app_instance
from requests_toolbelt import MultipartEncoder
from starlette.background import BackgroundTask
from starlette.datastructures import UploadFile
from starlette.formparsers import MultiPartException

from ...errors import CTInputError, LowdoseError, ServiceUnavailableError
from ...fidelity import TotalSegmentatorWeightsError
from ..jobs import QueueFull
from ..messages import json_error, scrub, user_message
from ..validate import RequestError, checked_image_id, checked_name

log = logging.getLogger("lowdose.server")

# Keys of an inference request that the server sets; a client's params may not override them.
RESERVED_PARAMS = (
    "image",
    "model",
    "label",
    "session",
    "session_id",
    "file",
    "image_id",
    "description",
    "uploaded",
    "result_dir",
    "device",
    "save_label",
    "label_tag",
    "result_extension",
    "result_dtype",
    "client_id",
    "timeout",
)
# A file name suffix a client may give an upload; anything else is sniffed from the content.
UPLOAD_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha", ".dcm", ".zip")
MAX_PARAMS_CHARS = 8192


async def infer_route(request):
    """The route's entry: every refusal is a one-line JSON error with its status."""
    try:
        return await _infer(request)
    except QueueFull as exc:
        return json_error(503, str(exc), {"Retry-After": str(exc.retry_after)})
    except ServiceUnavailableError as exc:  # the PACS is down or too slow
        log.error("%s", exc)
        return json_error(503, user_message(exc), {"Retry-After": "30"})
    except RequestError as exc:
        return json_error(exc.status, exc.detail, exc.headers)


async def _infer(request):
    state = request.app.state
    model = checked_name(request.path_params["model"], "model")
    output = request.query_params.get("output")
    if output not in (None, "image", "json", "all"):
        raise RequestError(400, f"output must be image, json or all; got {scrub(str(output))[:40]!r}")
    instance = app_instance()
    models = instance.lowdose_models()
    if model not in models:
        raise RequestError(404, f"no model named {model!r}; available: {', '.join(models) or 'none'}")
    image = request.query_params.get("image", "")
    if image:
        image = checked_image_id(image, pacs=state.lowdose.pacs_url is not None)

    place = state.lowdose_queue.admit()  # before the upload is read: a full line costs the client nothing
    work = Path(tempfile.mkdtemp(prefix="request-", dir=state.lowdose.scratch))
    upload = None
    handed_over = False  # the response streams a file from ``work`` and removes it afterwards
    try:
        upload, params = await _read_form(request)
        infer_request = {**params, "model": model, "result_dir": str(work)}
        if upload is not None:
            infer_request["image"] = str(await anyio.to_thread.run_sync(_save_upload, upload, work))
            infer_request["uploaded"] = True
        elif image:
            if not await anyio.to_thread.run_sync(instance.has_image, image):
                raise RequestError(404, f"no image {image!r} in the datastore")
            infer_request["image"] = infer_request["image_id"] = image
        else:
            raise RequestError(
                400, "give a CT to process: a file upload (form field 'file') or ?image=<id> of a " "datastore image"
            )
        result = await _run(state, instance, infer_request)
        response = _response(result, model, output, work)
        handed_over = getattr(response, "background", None) is not None
        return response
    finally:
        place.release()
        if upload is not None:
            await upload.close()
        if not handed_over:
            shutil.rmtree(work, ignore_errors=True)


async def _read_form(request):
    """The upload (or None) and the params object of a multipart form; 400 when malformed."""
    content_type = request.headers.get("content-type", "")
    form = {}
    if content_type.startswith(("multipart/form-data", "application/x-www-form-urlencoded")):
        try:
            form = await request.form(max_files=1, max_fields=4)
        except MultiPartException as exc:
            raise RequestError(400, f"malformed form data ({scrub(str(exc))})") from None
    upload = form.get("file")
    if upload is not None and not isinstance(upload, UploadFile):
        raise RequestError(400, "the form field 'file' must be a file upload")
    params_text = form.get("params", "{}")
    params = None
    if isinstance(params_text, str) and len(params_text) <= MAX_PARAMS_CHARS:
        try:
            params = json.loads(params_text or "{}")
        except ValueError:
            pass
    if not isinstance(params, dict):
        raise RequestError(
            400,
            "the form field 'params' must be a JSON object (at most "
            f'{MAX_PARAMS_CHARS} characters), e.g. {{"dose": "auto"}}',
        )
    reserved = sorted(set(params) & set(RESERVED_PARAMS))
    if reserved:
        raise RequestError(400, f"params may not set {', '.join(reserved)} (the server sets them)")
    return upload, params


async def _run(state, instance, infer_request: dict) -> dict:
    """The task's result; the library's errors become the client's 4xx/503."""
    try:
        return await state.lowdose_queue.run(instance.infer, infer_request)
    except ServiceUnavailableError:
        raise
    except CTInputError as exc:
        raise RequestError(422, f"not a usable CT volume: {user_message(exc)}") from None
    except TotalSegmentatorWeightsError as exc:
        log.error("fidelity check unavailable: %s", exc)
        raise RequestError(
            503,
            "the fidelity check cannot run on this server (its segmentation model is not "
            "installed; the server log says how to install it)",
        ) from None
    except (LowdoseError, ValueError, TypeError) as exc:
        raise RequestError(400, user_message(exc)) from None
    except MONAILabelException as exc:
        raise RequestError(400, scrub(str(getattr(exc, "msg", exc)))) from None


def _response(result: dict, model: str, output: str | None, work: Path):
    params_out = result.get("params") or {}
    result_file = result.get("file")
    if result_file and not (os.path.isfile(result_file) and Path(result_file).resolve().is_relative_to(work)):
        result_file = None
    if output == "json" or (result_file is None and output != "image"):
        return Response(json.dumps(params_out), media_type="application/json")
    if result_file is None:
        raise RequestError(400, f"model {model} returns no image; ask for output=json")
    if output == "image":
        summary = json.dumps(params_out, separators=(",", ":"))
        headers = {"X-Lowdose-Result": summary} if len(summary) < 4000 and summary.isascii() else {}
        return FileResponse(
            result_file,
            filename=os.path.basename(result_file),
            headers=headers,
            media_type=_mime_type(result_file),
            background=BackgroundTask(shutil.rmtree, work, ignore_errors=True),
        )
    with open(result_file, "rb") as handle:
        encoder = MultipartEncoder(
            fields={
                "params": (None, json.dumps(params_out), "application/json"),
                "image": (os.path.basename(result_file), handle, _mime_type(result_file)),
            }
        )
        body = encoder.to_string()
    return Response(content=body, media_type=encoder.content_type)


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


def _mime_type(path: str) -> str:
    if path.endswith((".nii.gz", ".gz")):
        return "application/gzip"
    if path.endswith(".zip"):
        return "application/zip"
    if path.endswith(".json"):
        return "application/json"
    return "application/octet-stream"
