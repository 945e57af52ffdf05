"""Where studies come from: a local folder of CT files, or a PACS over DICOMweb (QIDO/WADO/STOW-RS).

MONAI Label's DICOMweb datastore converts every series to NIfTI (losing the DICOM headers a derived series
needs), downloads the dcmqi tools from the internet when the app starts, keeps patient data in a cache
folder forever and waits on a PACS that is down; ``PacsDatastore`` does none of that: a series is fetched
as DICOM files into the folder of the request that needs it (removed with the request), every PACS call
has time limits, and a PACS that cannot be reached is a ``ServiceUnavailableError`` naming its URL.
"""

from __future__ import annotations

import logging
import tempfile
import threading
import time
from pathlib import Path

import pydicom
import requests
from monailabel.config import settings
from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from pydicom.dataset import Dataset

from lowdose.dicomweb import TimedSession
from lowdose.errors import LowdoseError, ServiceUnavailableError
from lowdose.names import is_dicom_uid, is_safe_name

log = logging.getLogger("lowdose.app")

LOCAL_EXTENSIONS = ["*.nii.gz", "*.nii", "*.nrrd", "*.mha"]
SERIES_LIST_SECONDS = 30
STATUS_TIMEOUT = 0.4  # seconds /info/ may spend asking the PACS (it answers within 1 s even when the PACS is down)
UNAVAILABLE_RETRY_SECONDS = 10  # after a failed call, /info/ says "unavailable" without asking again for this long
# Series whose description starts with this were written by lowdose (see lowdose.denoise).
DERIVED_PREFIX = "lowdose"


class StudiesFolder(LocalDatastore):
    """A folder of CT files; an image id is a file's name without extension and never reaches outside it."""

    def get_image_uri(self, image_id: str) -> str:
        if not is_safe_name(image_id):
            raise LowdoseError(f"{str(image_id)[:80]!r} is not a study name of the datastore")
        if image_id not in self.list_images():
            raise LowdoseError(f"no study {image_id!r} in the datastore")
        uri = super().get_image_uri(image_id)
        if not Path(uri).resolve().is_relative_to(Path(self._datastore_path).resolve()):
            raise LowdoseError(f"study {image_id!r} lies outside the studies folder (a link?): refused")
        return uri


def local_datastore(studies: str) -> StudiesFolder:
    # No route writes into the studies folder (MONAI Label's datastore routes answer 404); MONAI Label keeps
    # its index file there.
    return StudiesFolder(
        studies,
        extensions=LOCAL_EXTENSIONS,
        auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
        read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY,
    )


def has_image(datastore, image_id: str) -> bool:
    """Whether ``image_id`` names an image of ``datastore`` (and nothing else, e.g. a path)."""
    if isinstance(datastore, PacsDatastore):
        return datastore.has_series(image_id)
    try:  # StudiesFolder.get_image_uri checks the name, the listing and that the file is inside the folder
        datastore.get_image_uri(image_id)
    except LowdoseError:
        return False
    return True


class PacsDatastore(DICOMWebDatastore):
    """A PACS reached by DICOMweb: images are CT series (by SeriesInstanceUID), cached as DICOM files."""

    def __init__(self, url: str, connect_timeout: float = 3.0, read_timeout: float = 60.0):
        username = settings.MONAI_LABEL_DATASTORE_USERNAME or settings.MONAI_LABEL_DICOMWEB_USERNAME
        password = settings.MONAI_LABEL_DATASTORE_PASSWORD or settings.MONAI_LABEL_DICOMWEB_PASSWORD
        self.url = url
        self._timeouts = (connect_timeout, read_timeout)
        session = TimedSession(connect_timeout, read_timeout, (username, password) if username and password else None)
        client = DICOMwebClientX(
            url=url,
            session=session,
            qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
            wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
            stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX,
        )
        self._status_client = DICOMwebClientX(
            url=url,
            session=TimedSession(STATUS_TIMEOUT, STATUS_TIMEOUT, session.auth),
            qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
            wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
            stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX,
        )
        for c in (client, self._status_client):
            # dicomweb_client retries every failed call 5 times with growing waits (30 s and more for a PACS that
            # is down); a clear 503 at once is better: the client may retry.
            c.set_http_retry_params(retry=False)
        self._series: dict[str, dict] = {}
        self._listed_at = 0.0
        self._failed_at = 0.0
        self._lock = threading.Lock()
        # MONAI Label's datastore wants a cache folder; nothing is kept there (series go to request folders).
        cache_path = tempfile.mkdtemp(prefix="dicomweb-cache-")
        super().__init__(
            client=client,
            search_filter=dict(settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER),
            cache_path=cache_path,
            fetch_by_frame=False,
            convert_to_nifti=False,
        )

    def _unavailable(self, exc: Exception) -> ServiceUnavailableError:
        self._failed_at = time.time()
        if isinstance(exc, requests.Timeout):
            problem = f"the PACS did not answer within {self._timeouts[0]:g} s (connect) / {self._timeouts[1]:g} s"
        elif isinstance(exc, requests.HTTPError) and exc.response is not None:
            problem = f"the PACS answered HTTP {exc.response.status_code}"
        else:
            problem = f"the PACS cannot be reached ({type(exc).__name__})"
        return ServiceUnavailableError(self.url, problem)

    def _pacs_call(self, function, *args, **kwargs):
        """``function(...)``, with the PACS's failures as ServiceUnavailableError."""
        try:
            return function(*args, **kwargs)
        except requests.HTTPError as exc:
            status = exc.response.status_code if exc.response is not None else 0
            if 400 <= status < 500:  # the PACS is up and said no: not an outage
                raise LowdoseError(f"the PACS refused the request (HTTP {status})") from None
            raise self._unavailable(exc) from None
        except requests.RequestException as exc:
            raise self._unavailable(exc) from None

    # -- listing

    def list_images(self, client=None) -> list[str]:
        """The PACS's series (listed again when older than SERIES_LIST_SECONDS; no lock held while asking)."""
        if time.time() - self._listed_at > SERIES_LIST_SECONDS:
            found = self._pacs_call(
                (client or self._client).search_for_series,
                search_filters=self._search_filter,
                fields=["SeriesDescription", "StudyInstanceUID"],
                get_remaining=True,
            )
            series = {}
            for item in found:
                ds = Dataset.from_json(item)
                series[str(ds.SeriesInstanceUID)] = {
                    "description": str(ds.get("SeriesDescription", "") or ""),
                    "study": str(ds.get("StudyInstanceUID", "") or ""),
                }
            with self._lock:
                self._series, self._listed_at = series, time.time()
        with self._lock:
            return sorted(self._series)

    def has_series(self, series_uid: str) -> bool:
        if not is_dicom_uid(series_uid):
            return False
        if series_uid in self.list_images():
            return True
        found = self._pacs_call(
            self._client.search_for_series, search_filters={**self._search_filter, "SeriesInstanceUID": series_uid}
        )
        return any(str(Dataset.from_json(item).SeriesInstanceUID) == series_uid for item in found)

    def is_lowdose_series(self, series_uid: str) -> bool:
        self.list_images()
        return self._series.get(series_uid, {}).get("description", "").startswith(DERIVED_PREFIX)

    def status(self):
        """The PACS's state for ``/info/``, within a second even when the PACS is down."""
        state = {"url": self.url, "available": True}
        if time.time() - self._failed_at < UNAVAILABLE_RETRY_SECONDS:
            state["available"] = False
        else:
            try:
                self.list_images(client=self._status_client)
            except ServiceUnavailableError:
                state["available"] = False
        return {"total": len(self._series), "completed": 0, "label_tags": {}, "pacs": state}

    def get_labeled_images(self, label_tag=None, labels=None):
        return []  # lowdose writes images, not DICOM SEG label maps

    def get_unlabeled_images(self, label_tag=None, labels=None):
        return self.list_images()

    def datalist(self, full_path=True):
        return []

    # -- reading

    def download_series(self, image_id: str, into: Path) -> Path:
        """Fetch the series' DICOM files, as stored (compressed ones too), into a new folder under ``into``."""
        if not is_dicom_uid(image_id):
            raise LowdoseError(f"{str(image_id)[:80]!r} is not a SeriesInstanceUID")
        folder = Path(tempfile.mkdtemp(prefix="series-", dir=into))
        found = self._pacs_call(
            self._client.search_for_series, search_filters={"SeriesInstanceUID": image_id}, fields=["StudyInstanceUID"]
        )
        studies = {
            str(Dataset.from_json(s).StudyInstanceUID)
            for s in found
            if str(Dataset.from_json(s).SeriesInstanceUID) == image_id
        }
        if not studies:
            raise LowdoseError(f"no series {image_id} on the PACS")
        # Ask for the stored transfer syntax ("*"): the PACS then need not transcode JPEG 2000 and the like.
        instances = self._pacs_call(
            self._client.retrieve_series, studies.pop(), image_id, media_types=(("application/dicom", "*"),)
        )
        for k, instance in enumerate(instances):
            instance.save_as(folder / f"{k:05d}.dcm", write_like_original=False)
        return folder

    def get_image_uri(self, image_id: str) -> str:
        """A new scratch folder holding the series (the caller removes it; a killed server's is swept)."""
        return str(self.download_series(image_id, Path(tempfile.gettempdir())))

    # -- writing

    def store_series(self, folder: str | Path) -> dict:
        """STOW-RS every DICOM file of ``folder`` (one new series) to the PACS; what the PACS confirmed."""
        files = sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix == ".dcm")
        datasets = [pydicom.dcmread(p) for p in files]
        if not datasets:
            raise LowdoseError("no DICOM files to store")
        series_uid = str(datasets[0].SeriesInstanceUID)
        study_uid = str(datasets[0].StudyInstanceUID)
        response = self._pacs_call(self._client.store_instances, datasets, study_instance_uid=study_uid)
        failed = response.get("FailedSOPSequence") if response is not None else None
        if failed:
            reasons = sorted({str(item.get("FailureReason", "?")) for item in failed})
            raise LowdoseError(
                f"the PACS refused {len(failed)} of {len(datasets)} instances "
                f"(failure reasons {', '.join(reasons)})"
            )
        stored = len(response.get("ReferencedSOPSequence", [])) if response is not None else len(datasets)
        with self._lock:
            self._listed_at = 0.0  # list the new series next time
        log.info("stored series %s (%d instances) in study %s", series_uid, stored, study_uid)
        return {
            "stored": True,
            "series_instance_uid": series_uid,
            "study_instance_uid": study_uid,
            "instances": stored,
            "series_description": str(datasets[0].get("SeriesDescription", "")),
        }
