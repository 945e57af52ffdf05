"""``POST /train/finetune``: fine-tuning, with every field checked before a training process starts.

MONAI Label's own route passed any JSON on to the trainer (unbounded epochs, any output folder, a shipped
model overwritten). Here the request is checked at once by ``lowdose.training.finetune`` (422 with the
reason; 409 when it names a model that must not be written) and only then does training start.
"""

from __future__ import annotations

import json
import logging

import anyio
from fastapi.responses import JSONResponse
from monailabel.interfaces.utils.app import app_instance
from monailabel.utils.async_tasks.task import AsyncTask

from ...training.finetune import FineTuneRequestError, checked_finetune_request
from ..messages import json_error

log = logging.getLogger("lowdose.server")

MAX_BODY_BYTES = 16384


async def finetune_route(request):
    """Check the request, then start the training process (409 when one already runs)."""
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        return json_error(413, f"the request body is larger than {MAX_BODY_BYTES} bytes")
    try:
        body = json.loads(raw or b"{}")
    except ValueError:
        return json_error(422, "the request body must be JSON")
    instance = app_instance()
    trainer = instance._trainers.get("finetune")
    if trainer is None:
        return json_error(404, "this server has no model to fine-tune")
    try:
        settings = checked_finetune_request(body, instance.options.models_dir, trainer.model_name)
    except FineTuneRequestError as exc:
        return json_error(409 if exc.conflict else 422, str(exc))
    result, _ = await anyio.to_thread.run_sync(
        lambda: AsyncTask.run("train", request={"model": "finetune"}, params=settings, enqueue=False)
    )
    if result is None:
        return json_error(409, "a training already runs; wait for it or stop it (DELETE /train/)")
    log.info("fine-tuning started -> %s", settings["output_model"])
    return JSONResponse(json.loads(json.dumps(result, default=str)))
