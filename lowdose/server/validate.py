"""Checks on every name a client sends (model, study id, output model): a short allow-list, no path tricks."""

from __future__ import annotations

import re
from pathlib import Path

# A name: letters, digits, '.', '_', '-'; starts with a letter or digit; no '..'; at most 128 characters.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
DICOM_UID = re.compile(r"[0-9]+(\.[0-9]+)*")


class RequestError(Exception):
    """A client's request that cannot be served: an HTTP status and a one-line reason."""

    def __init__(self, status: int, detail: str, headers: dict | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers


def checked_name(value, what: str) -> str:
    """``value`` when it is a safe name (no separator, no '..', no absolute path); 400 otherwise."""
    if not isinstance(value, str) or not NAME.fullmatch(value) or ".." in value:
        shown = repr(value)[:80] if isinstance(value, str) else type(value).__name__
        raise RequestError(
            400, f"{what} {shown} is not a valid name (letters, digits, '.', '_' and '-' only, " "at most 128, no '..')"
        )
    return value


def checked_image_id(value, pacs: bool) -> str:
    """A datastore id: a SeriesInstanceUID in PACS mode, a study name otherwise; 400 when malformed."""
    if pacs:
        if not isinstance(value, str) or len(value) > 64 or not DICOM_UID.fullmatch(value):
            raise RequestError(
                400, f"image {str(value)[:80]!r} is not a SeriesInstanceUID (digits and dots, " "at most 64)"
            )
        return value
    return checked_name(value, "image")


def inside(path: str | Path, root: str | Path) -> bool:
    """Whether ``path``, links resolved, lies inside the folder ``root``."""
    try:
        return Path(path).resolve().is_relative_to(Path(root).resolve())
    except (OSError, RuntimeError):
        return False
