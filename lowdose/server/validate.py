"""Checks on every name a client sends (model, study id, output model): a short allow-list, no path tricks."""

from __future__ import annotations

from ..names import is_dicom_uid, is_safe_name


class RequestError(Exception):
    """A client's request that cannot be served: an HTTP status and a one-line reason."""

    def __init__(self, status: int, detail: str, headers: dict | None = None):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers


def checked_name(value, what: str) -> str:
    """``value`` when it is a safe name (no separator, no '..', no absolute path); 400 otherwise."""
    if not is_safe_name(value):
        shown = repr(value)[:80] if isinstance(value, str) else type(value).__name__
        raise RequestError(
            400, f"{what} {shown} is not a valid name (letters, digits, '.', '_' and '-' only, " "at most 128, no '..')"
        )
    return value


def checked_image_id(value, pacs: bool) -> str:
    """A datastore id: a SeriesInstanceUID in PACS mode, a study name otherwise; 400 when malformed."""
    if pacs:
        if not is_dicom_uid(value):
            raise RequestError(
                400, f"image {str(value)[:80]!r} is not a SeriesInstanceUID (digits and dots, " "at most 64)"
            )
        return value
    return checked_name(value, "image")
