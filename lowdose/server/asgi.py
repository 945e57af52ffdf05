"""The ASGI app ``lowdose.server:app``: MONAI Label's FastAPI app cut down to lowdose's routes, behind the Guard.

Only what lowdose's clients use is left: ``GET /info/``, ``POST /infer/{model}``, ``POST /train/finetune``,
``GET /train/`` (status), ``DELETE /train/`` (stop), and in PACS mode ``/proxy/dicom/...``. Every other
MONAI Label route (datastore writes, wsi, active learning, scoring, batch, logs, sessions, OHIF, docs)
answers 404 from the Guard before it reaches MONAI Label. See docs/security.md.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import re
import signal
import tempfile

from monailabel.app import app as monailabel_app  # MONAI Label's FastAPI app (importing it builds it)
from monailabel.config import settings as monailabel_settings
from starlette.routing import Route

from .guard import Guard
from .jobs import InferQueue
from .routes.infer import infer_route
from .routes.proxy import proxy_route
from .routes.train import finetune_route
from .settings import ServerSettings

log = logging.getLogger("lowdose.server")

# Every (method, path) the server answers, after MONAI Label's API prefix; anything else is 404 in the Guard.
ROUTES = (
    ("GET", r"/info/?"),  # MONAI Label's: models, trainers, datastore and PACS status
    ("POST", r"/infer/[^/]+"),  # lowdose's: denoise_<model>, fidelity
    ("POST", r"/train/finetune"),  # lowdose's: checked fine-tuning request
    ("GET", r"/train/?"),  # MONAI Label's: training status
    ("DELETE", r"/train/?"),  # MONAI Label's: stop the training
    ("GET", r"/proxy/dicom/(qido|wado)/.+"),  # lowdose's: DICOMweb of the PACS, checked paths only
    ("POST", r"/proxy/dicom/stow/.+"),
)


def route_allowed(method: str, path: str, prefix: str = "") -> bool:
    """Whether ``method path`` is one of the server's routes."""
    if not path.startswith(prefix):
        return False
    rest = path[len(prefix) :]
    return any(method == m and re.fullmatch(pattern, rest) for m, pattern in ROUTES)


def build_app():
    """MONAI Label's app with lowdose's routes only, behind the Guard; scratch files in a private folder."""
    settings = ServerSettings.from_monailabel()
    # Every temporary file of this process and its children (uploads, PACS series, training, segmentation)
    # goes to the scratch folder, which the next start removes if this server is killed.
    os.environ["TMPDIR"] = str(settings.scratch)
    tempfile.tempdir = str(settings.scratch)
    prefix = monailabel_settings.MONAI_LABEL_API_STR or ""
    ours = [
        Route(f"{prefix}/infer/{{model}}", infer_route, methods=["POST"], name="lowdose_infer"),
        Route(f"{prefix}/train/finetune", finetune_route, methods=["POST"], name="lowdose_finetune"),
        Route(
            f"{prefix}/proxy/dicom/{{op}}/{{path:path}}",
            proxy_route,
            methods=["GET", "POST"],
            name="lowdose_dicomweb_proxy",
        ),
    ]
    # Starlette matches routes in order: ours answer before MONAI Label's routes of the same paths.
    monailabel_app.router.routes[:0] = ours
    monailabel_app.state.lowdose = settings
    monailabel_app.state.lowdose_queue = InferQueue(settings.infer_concurrency, settings.infer_queue)
    os.environ["LOWDOSE_SERVER_GUARD"] = "1"
    _dump_stacks_on_sigusr1()
    if settings.token is None:
        log.warning("authentication is OFF (--no-auth): any program on this machine can use the server")
    else:
        log.info("access token required on every route (token from %s)", settings.token.source)
    return Guard(
        monailabel_app,
        settings.token,
        settings.max_body_bytes,
        settings.allowed_origins,
        allowed=lambda method, path: route_allowed(method, path, prefix),
    )


def _dump_stacks_on_sigusr1() -> None:
    """``kill -USR1 <server pid>`` writes every thread's stack to the server log (a stuck request's cause)."""
    if hasattr(signal, "SIGUSR1"):
        faulthandler.register(signal.SIGUSR1, all_threads=True)
