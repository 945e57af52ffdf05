"""A cohort's output folder: one folder per study, written whole or not at all, and what a rerun may skip.

``OUTPUT/studies/<study>/`` holds the denoised volume, ``fidelity/`` (the report and label maps),
``thumbnail.png`` and ``study.json`` (the ``StudyResult``, with a checksum of every other file). A study is
written in ``OUTPUT/.staging/`` and renamed into place once complete, so a killed run leaves either the old
folder or the new one. A finished study is skipped on a rerun when its record has the same settings and input
fingerprint and its files are unchanged (size and modification time as recorded, else their checksums).
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import uuid
from pathlib import Path
from typing import TextIO

from .._version import __version__
from ..atomic import write_text_atomically
from ..errors import CTOutputError, LowdoseError
from .results import DONE, FAILED, CohortSettings, FileStamp, StudyResult
from .studies import Study

STUDIES, STAGING, RECORD, LOCK = "studies", ".staging", "study.json", ".lock"


def study_folder(out: Path, study_id: str) -> Path:
    return Path(out) / STUDIES / study_id


def new_staging(out: Path, study_id: str) -> Path:
    """A new, empty folder in which one attempt at a study is written (named after its host and process)."""
    folder = Path(out) / STAGING / f"{study_id}.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
    folder.mkdir(parents=True)
    return folder


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _stamp(path: Path) -> FileStamp:
    stat = path.stat()
    return FileStamp(sha256=sha256_of(path), size=stat.st_size, mtime_ns=stat.st_mtime_ns)


def seal(staging: Path, record: StudyResult) -> StudyResult:
    """Checksum every file of ``staging`` into ``record.files`` and write ``study.json`` beside them."""
    record.files = {
        p.relative_to(staging).as_posix(): _stamp(p)
        for p in sorted(staging.rglob("*"))
        if p.is_file() and p.name != RECORD
    }
    record.created = record.created or datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    record.lowdose_version = record.lowdose_version or __version__
    write_text_atomically(staging / RECORD, json.dumps(record.to_json(), indent=1) + "\n")
    return record


def commit(staging: Path, final: Path) -> None:
    """Put the complete ``staging`` folder in place of ``final`` (two renames: the old folder is set aside first,
    then removed)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    old = None
    try:
        if final.exists():
            old = staging.parent / f"{staging.name}.replaced"
            os.replace(final, old)
        os.replace(staging, final)
    except OSError as exc:
        raise CTOutputError(final, f"could not be written ({exc.strerror or exc})") from None
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def read_record(out: Path, study_id: str) -> StudyResult | None:
    """The study's ``study.json``, or None when there is none or it cannot be read."""
    try:
        return StudyResult.from_json(json.loads((study_folder(out, study_id) / RECORD).read_text()))
    except (OSError, ValueError, TypeError, KeyError):
        return None


def still_valid(
    record: StudyResult | None,
    study: Study,
    settings: CohortSettings,
    out: Path,
    verify_checksums: bool = False,
    retry_failed: bool = False,
) -> bool:
    """Whether an earlier result of ``study`` stands: same settings and input, and (done) every file as written."""
    if record is None or record.settings_key != _comparable(settings.key(), study):
        return False
    if record.fingerprint != study.fingerprint or record.status not in (DONE, FAILED):
        return False
    if record.status == FAILED:
        return not retry_failed
    folder = study_folder(out, study.study_id)
    return all(_file_unchanged(folder / name, stamp, verify_checksums) for name, stamp in record.files.items())


def settings_key(settings: CohortSettings, study: Study) -> dict:
    """The key a study's record carries: the cohort's settings, with the study's own dose when it has one."""
    return _comparable(settings.key(), study)


def _comparable(key: dict, study: Study) -> dict:
    key = dict(key)
    if study.dose is not None:
        key["dose"] = study.dose
    key["series_uid"] = study.series_uid
    return json.loads(json.dumps(key))  # as it reads back from study.json (tuples as lists)


def _file_unchanged(path: Path, stamp: FileStamp, verify: bool) -> bool:
    try:
        stat = path.stat()
    except OSError:
        return False
    if stat.st_size != stamp.size:
        return False
    if not verify and stat.st_mtime_ns == stamp.mtime_ns:
        return True
    return sha256_of(path) == stamp.sha256


def record_failure(out: Path, study: Study, settings: CohortSettings, error: str, **fields) -> StudyResult:
    """Write the record of a study that failed outside its worker (timed out, worker lost) and return it."""
    record = StudyResult(
        study=study.study_id,
        source=study.describe(),
        status=FAILED,
        error=error,
        settings_key=settings_key(settings, study),
        fingerprint=study.fingerprint,
        series_uid=study.series_uid,
        **fields,
    )
    staging = new_staging(out, study.study_id)
    seal(staging, record)
    commit(staging, study_folder(out, study.study_id))
    return record


def pack(folder: Path) -> dict[str, bytes]:
    """Every file of ``folder`` by relative path (to send a study's outputs through Ray's object store)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def unpack(files: dict[str, bytes], folder: Path) -> None:
    """Write ``pack``'s files under ``folder`` (names that would leave it are refused)."""
    root = folder.resolve()
    for name, data in files.items():
        target = (folder / name).resolve()
        if not target.is_relative_to(root):
            raise LowdoseError(f"refused an output name that leaves the study folder: {name!r}")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)


def sweep_staging(out: Path) -> None:
    """Remove what interrupted attempts left in ``OUTPUT/.staging`` (the run holds the cohort's lock)."""
    shutil.rmtree(Path(out) / STAGING, ignore_errors=True)


class CohortLock:
    """One run at a time per output folder: an exclusive lock on ``OUTPUT/.lock``, released when the run ends or
    its process dies (so a killed run never blocks the next)."""

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK
        self._file: TextIO | None = None

    def __enter__(self) -> CohortLock:
        lock = open(self.path, "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):  # a filesystem without locks: run unlocked
                self._file = lock
                return self
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            lock.close()
            raise LowdoseError(f"{self.path.parent}: another lowdose cohort run ({holder}) is writing here") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{socket.gethostname()} pid {os.getpid()}\n")
        lock.flush()
        self._file = lock
        return self

    def __exit__(self, *exc) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
