"""Reading a study's CT series from a PACS over DICOMweb (QIDO-RS to choose the series, WADO-RS to fetch it).

The server's PACS datastore (apps/lowdose) is MONAI Label's and lives in a door; this is the library's own,
plain reader (used by cohorts): time limits on every call, no retries that would hang a cohort on a PACS that is
down, and the download bounded by ``InputLimits`` before ``load_ct`` reads it. Credentials come from
``LOWDOSE_PACS_USERNAME`` / ``LOWDOSE_PACS_PASSWORD`` (or the server's ``MONAI_LABEL_DATASTORE_USERNAME`` /
``MONAI_LABEL_DATASTORE_PASSWORD``).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import requests

from .errors import LowdoseError, ServiceUnavailableError
from .limits import InputLimits
from .names import is_dicom_uid

ENV_PACS_URL = "LOWDOSE_PACS_URL"
# Series lowdose wrote (derived, denoised) are never taken as a study's CT.
DERIVED_PREFIX = "lowdose"
_TAG_SERIES_UID, _TAG_MODALITY, _TAG_DESCRIPTION, _TAG_COUNT = "0020000E", "00080060", "0008103E", "00201209"


class TimedSession(requests.Session):
    """A requests session whose every call has time limits unless the caller sets its own (the server's PACS
    datastore uses it too)."""

    def __init__(self, connect: float, read: float, auth=None):
        super().__init__()
        self.timeouts = (connect, read)
        self.auth = auth

    def request(self, *args, **kwargs):
        kwargs.setdefault("timeout", self.timeouts)
        return super().request(*args, **kwargs)


def pacs_client(url: str, connect_timeout: float = 5.0, read_timeout: float = 120.0):
    """A DICOMweb client of ``url`` with time limits and without retries."""
    from dicomweb_client.api import DICOMwebClient  # only cohorts that read a PACS need it

    user = os.environ.get("LOWDOSE_PACS_USERNAME") or os.environ.get("MONAI_LABEL_DATASTORE_USERNAME")
    password = os.environ.get("LOWDOSE_PACS_PASSWORD") or os.environ.get("MONAI_LABEL_DATASTORE_PASSWORD")
    session = TimedSession(connect_timeout, read_timeout, (user, password) if user and password else None)
    client = DICOMwebClient(url=url.rstrip("/"), session=session)
    client.set_http_retry_params(retry=False)
    return client


def _value(item: dict, tag: str, default=""):
    values = item.get(tag, {}).get("Value") or [default]
    return values[0]


@contextlib.contextmanager
def _pacs_errors(url: str, what: str):
    """The PACS's failures inside the block as one-line errors naming the PACS."""
    try:
        yield
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else 0
        if 400 <= status < 500:
            raise LowdoseError(f"{url}: the PACS refused to {what} (HTTP {status})") from None
        raise ServiceUnavailableError(url, f"the PACS failed to {what} (HTTP {status})") from None
    except requests.Timeout:
        raise ServiceUnavailableError(url, f"the PACS did not answer in time to {what}") from None
    except requests.RequestException as exc:
        raise ServiceUnavailableError(url, f"the PACS cannot be reached ({type(exc).__name__})") from None


def choose_ct_series(url: str, study_uid: str, series_uid: str | None = None, client=None) -> str:
    """The study's CT series to denoise: ``series_uid`` when given (it must be in the study), else the CT series
    with the most instances that lowdose did not write."""
    client = client or pacs_client(url)
    with _pacs_errors(url, f"list the series of study {study_uid}"):
        found = client.search_for_series(
            study_instance_uid=study_uid, fields=["Modality", "SeriesDescription", "NumberOfSeriesRelatedInstances"]
        )
    if not found:
        raise LowdoseError(f"{url}: no study {study_uid} on the PACS (or it holds no series)")
    series = {
        str(_value(s, _TAG_SERIES_UID)): (
            str(_value(s, _TAG_MODALITY)),
            str(_value(s, _TAG_DESCRIPTION)),
            int(_value(s, _TAG_COUNT, 0) or 0),
        )
        for s in found
    }
    if series_uid is not None:
        if series_uid not in series:
            raise LowdoseError(f"{url}: study {study_uid} has no series {series_uid}")
        return series_uid
    candidates = [
        (count, uid)
        for uid, (modality, description, count) in series.items()
        if modality == "CT" and not description.startswith(DERIVED_PREFIX)
    ]
    if not candidates:
        raise LowdoseError(
            f"{url}: study {study_uid} has no CT series (modalities {sorted({m for m, _, _ in series.values()})})"
        )
    return max(candidates)[1]


def fetch_study_series(
    url: str, study_uid: str, into: str | os.PathLike, series_uid: str | None = None, limits: InputLimits | None = None
) -> tuple[Path, str]:
    """Download the study's CT series (as stored, compressed ones too) into the new folder ``into``; returns the
    folder and the SeriesInstanceUID. Stops with an error once the download passes ``limits.max_expanded_bytes``."""
    if not is_dicom_uid(study_uid):
        raise LowdoseError(f"{study_uid[:80]!r} is not a StudyInstanceUID")
    limits = limits or InputLimits.from_env()
    client = pacs_client(url)
    chosen = choose_ct_series(url, study_uid, series_uid, client)
    folder = Path(into)
    folder.mkdir(parents=True, exist_ok=False)
    written = 0
    # "*": the stored transfer syntax, so the PACS need not transcode JPEG 2000 and the like.
    with _pacs_errors(url, f"send series {chosen}"):
        instances = client.iter_series(study_uid, chosen, media_types=(("application/dicom", "*"),))
        for k, instance in enumerate(instances):
            path = folder / f"{k:05d}.dcm"
            instance.save_as(path, write_like_original=False)
            written += path.stat().st_size
            if written > limits.max_expanded_bytes:
                raise LowdoseError(
                    f"{url}: series {chosen} of study {study_uid} is larger than the input limit "
                    f"({limits.max_expanded_bytes / 2**20:.0f} MiB, LOWDOSE_MAX_EXPANDED_MB)"
                )
    if written == 0:
        raise LowdoseError(f"{url}: series {chosen} of study {study_uid} came back empty")
    return folder, chosen
