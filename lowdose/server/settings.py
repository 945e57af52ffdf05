"""What the running server was started with: access token, limits, PACS and its time limits, scratch folder."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import LowdoseError
from .auth import ServerToken, server_token_from_environment

DEFAULT_MAX_UPLOAD_MB = 2048
DEFAULT_INFER_QUEUE = 8
SCRATCH_PREFIX = "lowdose-server-"


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """The guard's and the routes' settings, read once when the server starts."""

    token: ServerToken | None
    max_body_bytes: int
    allowed_origins: tuple[str, ...]
    infer_concurrency: int
    infer_queue: int
    studies: str
    scratch: Path  # this server's temporary files (requests, PACS downloads); removed at the next start if left
    pacs_connect_timeout: float
    pacs_read_timeout: float

    @property
    def pacs_url(self) -> str | None:
        return self.studies.rstrip("/") if self.studies.startswith(("http://", "https://")) else None

    @classmethod
    def from_monailabel(cls) -> ServerSettings:
        from monailabel.config import settings  # the CLI imports this module; MONAI Label only in the server

        conf = dict(settings.MONAI_LABEL_APP_CONF or {})
        try:
            return cls(
                token=server_token_from_environment(),
                max_body_bytes=int(float(conf.get("max_upload_mb", DEFAULT_MAX_UPLOAD_MB)) * 2**20),
                allowed_origins=tuple(o for o in str(conf.get("allowed_origins", "")).split(",") if o.strip()),
                infer_concurrency=max(1, int(conf.get("infer_concurrency", 1))),
                infer_queue=max(0, int(conf.get("infer_queue", DEFAULT_INFER_QUEUE))),
                studies=str(settings.MONAI_LABEL_STUDIES or ""),
                scratch=make_scratch(),
                pacs_connect_timeout=float(conf.get("pacs_connect_timeout", 3)),
                pacs_read_timeout=float(conf.get("pacs_read_timeout", 60)),
            )
        except ValueError as exc:
            raise LowdoseError(f"--conf: a number was expected ({exc})") from None


def scratch_parent(base: str | None = None) -> Path:
    """The folder holding every lowdose server's scratch folder of this user (private to the user)."""
    return Path(base or tempfile.gettempdir()) / f"{SCRATCH_PREFIX}{os.getuid()}"


def make_scratch(base: str | None = None, pid: int | None = None) -> Path:
    """This process's scratch folder, after sweeping those of servers that no longer run (killed ones).

    Every temporary file of the server (uploads, series fetched from the PACS, results) lives under it, as
    ``TMPDIR`` of the process and its children, so nothing with patient data outlives a killed server.
    """
    parent = scratch_parent(base)
    parent.mkdir(mode=0o700, exist_ok=True)
    info = parent.lstat()
    if parent.is_symlink() or info.st_uid != os.getuid():
        raise LowdoseError(f"{parent}: the server's scratch folder is not a folder owned by this user; remove it")
    os.chmod(parent, 0o700)
    sweep_scratch(parent)
    scratch = parent / str(pid or os.getpid())
    scratch.mkdir(mode=0o700, exist_ok=True)
    return scratch


def sweep_scratch(parent: Path) -> list[Path]:
    """Remove the scratch folders of server processes that are gone; the folders removed."""
    removed = []
    for folder in parent.iterdir():
        if folder.name.isdigit() and not _running(int(folder.name)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
