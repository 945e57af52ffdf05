"""Where studies come from: a local folder of CT files, or a PACS over DICOMweb (QIDO/WADO/STOW-RS).

MONAI Label's DICOMweb datastore converts every series to NIfTI (losing the DICOM headers a derived series
needs) and downloads the dcmqi tools from the internet when the app starts; ``PacsDatastore`` does
neither: it keeps each series as DICOM files in a local cache and stores results back as new series.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path

from monailabel.config import settings
from monailabel.datastore.dicom import DICOMwebClientX, DICOMWebDatastore
from monailabel.datastore.local import LocalDatastore
from monailabel.datastore.utils.dicom import dicom_web_download_series
from pydicom.dataset import Dataset

from lowdose.errors import LowdoseError

log = logging.getLogger("lowdose.app")

LOCAL_EXTENSIONS = ["*.nii.gz", "*.nii", "*.nrrd", "*.mha"]
DICOM_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
SERIES_LIST_SECONDS = 30
# Series whose description starts with this were written by lowdose (see lowdose.denoise).
DERIVED_PREFIX = "lowdose"


def local_datastore(studies: str) -> LocalDatastore:
    return LocalDatastore(studies, extensions=LOCAL_EXTENSIONS, auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
                          read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY)


def has_image(datastore, image_id: str) -> bool:
    """Whether ``image_id`` names an image of ``datastore`` (and nothing else, e.g. a path)."""
    if isinstance(datastore, PacsDatastore):
        return datastore.has_series(image_id)
    return image_id in datastore.list_images()


class PacsDatastore(DICOMWebDatastore):
    """A PACS reached by DICOMweb: images are CT series (by SeriesInstanceUID), cached as DICOM files."""

    def __init__(self, url: str, cache_path: str | None = None):
        from dicomweb_client.session_utils import create_session_from_user_pass

        username = settings.MONAI_LABEL_DATASTORE_USERNAME or settings.MONAI_LABEL_DICOMWEB_USERNAME
        password = settings.MONAI_LABEL_DATASTORE_PASSWORD or settings.MONAI_LABEL_DICOMWEB_PASSWORD
        session = create_session_from_user_pass(username, password) if username and password else None
        client = DICOMwebClientX(url=url, session=session, qido_url_prefix=settings.MONAI_LABEL_QIDO_PREFIX,
                                 wado_url_prefix=settings.MONAI_LABEL_WADO_PREFIX,
                                 stow_url_prefix=settings.MONAI_LABEL_STOW_PREFIX)
        cache_path = cache_path or settings.MONAI_LABEL_DATASTORE_CACHE_PATH or settings.MONAI_LABEL_DICOMWEB_CACHE_PATH
        if not cache_path:
            cache_path = str(Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lowdose" / "dicomweb")
        self._series: dict[str, dict] = {}
        self._listed_at = 0.0
        self._lock = threading.Lock()
        super().__init__(client=client, search_filter=dict(settings.MONAI_LABEL_DICOMWEB_SEARCH_FILTER),
                         cache_path=cache_path, fetch_by_frame=False, convert_to_nifti=False)

    # -- listing

    def list_images(self) -> list[str]:
        with self._lock:
            if time.time() - self._listed_at > SERIES_LIST_SECONDS:
                found = self._client.search_for_series(search_filters=self._search_filter,
                                                       fields=["SeriesDescription", "StudyInstanceUID"],
                                                       get_remaining=True)
                self._series = {}
                for item in found:
                    ds = Dataset.from_json(item)
                    self._series[str(ds.SeriesInstanceUID)] = {
                        "description": str(ds.get("SeriesDescription", "") or ""),
                        "study": str(ds.get("StudyInstanceUID", "") or "")}
                self._listed_at = time.time()
            return sorted(self._series)

    def has_series(self, series_uid: str) -> bool:
        if not isinstance(series_uid, str) or len(series_uid) > 64 or not DICOM_UID.match(series_uid):
            return False
        if series_uid in self.list_images():
            return True
        found = self._client.search_for_series(search_filters={**self._search_filter, "SeriesInstanceUID": series_uid})
        return any(str(Dataset.from_json(item).SeriesInstanceUID) == series_uid for item in found)

    def is_lowdose_series(self, series_uid: str) -> bool:
        self.list_images()
        return self._series.get(series_uid, {}).get("description", "").startswith(DERIVED_PREFIX)

    def status(self):
        return {"total": len(self.list_images()), "completed": 0, "label_tags": {}, "pacs": True}

    def get_labeled_images(self, label_tag=None, labels=None):
        return []  # lowdose writes images, not DICOM SEG label maps

    def get_unlabeled_images(self, label_tag=None, labels=None):
        return self.list_images()

    def datalist(self, full_path=True):
        return []

    # -- reading

    def get_image_uri(self, image_id: str) -> str:
        """A local folder holding the series' DICOM files (downloaded once, completely, then reused)."""
        if not isinstance(image_id, str) or not DICOM_UID.match(image_id):
            raise LowdoseError(f"{image_id!r} is not a SeriesInstanceUID")
        cache = Path(self._datastore.image_path())
        folder = cache / image_id
        if not (folder / ".complete").exists():
            partial = Path(tempfile.mkdtemp(prefix=f".{image_id}.partial-", dir=cache))
            try:
                dicom_web_download_series(None, image_id, str(partial), self._client, False)
                (partial / ".complete").touch()
                if folder.exists():
                    shutil.rmtree(folder)
                os.rename(partial, folder)
            except BaseException:
                shutil.rmtree(partial, ignore_errors=True)
                raise
        return str(folder)

    # -- writing

    def store_series(self, folder: str | Path) -> dict:
        """STOW-RS every DICOM file of ``folder`` (one new series) to the PACS; what the PACS confirmed."""
        import pydicom

        files = sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix == ".dcm")
        datasets = [pydicom.dcmread(p) for p in files]
        if not datasets:
            raise LowdoseError("no DICOM files to store")
        series_uid = str(datasets[0].SeriesInstanceUID)
        study_uid = str(datasets[0].StudyInstanceUID)
        response = self._client.store_instances(datasets, study_instance_uid=study_uid)
        failed = response.get("FailedSOPSequence") if response is not None else None
        if failed:
            reasons = sorted({str(item.get("FailureReason", "?")) for item in failed})
            raise LowdoseError(f"the PACS refused {len(failed)} of {len(datasets)} instances "
                               f"(failure reasons {', '.join(reasons)})")
        stored = len(response.get("ReferencedSOPSequence", [])) if response is not None else len(datasets)
        with self._lock:
            self._listed_at = 0.0  # list the new series next time
        log.info("stored series %s (%d instances) in study %s", series_uid, stored, study_uid)
        return {"stored": True, "series_instance_uid": series_uid, "study_instance_uid": study_uid,
                "instances": stored, "series_description": str(datasets[0].get("SeriesDescription", ""))}
