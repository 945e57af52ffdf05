"""A cohort's study list: a folder of studies, a CSV of paths, or a list of StudyInstanceUIDs on a PACS.

``find_studies(INPUT)`` returns one ``Study`` per study, each with the name its outputs get (unique, safe as a
folder name). A folder: every NIfTI/NRRD/MHA file in it (sub-folders included) and every folder that directly
holds DICOM files (one series). A CSV: a ``path`` column (relative to the CSV's folder) or a
``StudyInstanceUID`` column, with optional ``study`` (name), ``series`` (SeriesInstanceUID) and ``dose``
columns. A text file: one StudyInstanceUID a line (``#`` comments).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import os
import re
from pathlib import Path

from ..dose import parse_dose
from ..errors import CTInputError, LowdoseError
from ..names import is_dicom_uid, is_safe_name

CT_FILE_SUFFIXES = (".nii.gz", ".nii", ".nrrd", ".mha")
FILE, DICOM, PACS = "file", "dicom", "pacs"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_UID_COLUMNS = ("studyinstanceuid", "study_instance_uid", "study_uid")


@dataclasses.dataclass(frozen=True)
class Study:
    """One study of a cohort: its name (output folder and table row), where it comes from, and how.

    ``kind`` is ``file`` (a NIfTI/NRRD/MHA or DICOM file), ``dicom`` (a folder holding one series) or
    ``pacs`` (``source`` is a StudyInstanceUID on the PACS). ``series_uid`` picks a series; ``dose`` overrides
    the cohort's dose for this study. ``fingerprint`` says which version of the input a result was made from.
    """

    study_id: str
    source: str
    kind: str
    series_uid: str | None = None
    dose: float | str | None = None
    fingerprint: str = ""

    def describe(self) -> str:
        return f"StudyInstanceUID {self.source} on the PACS" if self.kind == PACS else self.source


def find_studies(input_path: str | os.PathLike) -> list[Study]:
    """The studies of ``input_path`` (a folder, a CSV file or a text file of StudyInstanceUIDs), in a stable
    order, each with a unique name. Raises ``LowdoseError`` naming the input when it lists none."""
    path = Path(input_path)
    if not path.exists():
        raise CTInputError(path, "no such file or folder (a folder of studies, a CSV or a list of UIDs)")
    if path.is_dir():
        studies = _studies_in_folder(path)
    elif path.suffix.lower() == ".csv":
        studies = _studies_in_csv(path)
    else:
        studies = _studies_in_uid_list(path)
    if not studies:
        raise CTInputError(
            path,
            "no study found (a folder needs NIfTI/NRRD/MHA files or sub-folders of DICOM files; a CSV a path or "
            "StudyInstanceUID column; a text file one StudyInstanceUID a line)",
        )
    return _unique_names(studies)


def fingerprint(study: Study) -> str:
    """Which version of the input this is, cheaply: size and modification time of its file(s); the UIDs for a
    PACS study (DICOM UIDs name immutable data)."""
    if study.kind == PACS:
        return f"pacs:{study.source}:{study.series_uid or ''}"
    path = Path(study.source)
    try:
        if path.is_dir():
            stats = [p.stat() for p in sorted(path.iterdir()) if p.is_file()]
            total = sum(s.st_size for s in stats)
            newest = max((s.st_mtime_ns for s in stats), default=0)
            return f"dicom:{len(stats)}:{total}:{newest}:{study.series_uid or ''}"
        stat = path.stat()
    except OSError:
        return "missing"
    return f"file:{stat.st_size}:{stat.st_mtime_ns}:{study.series_uid or ''}"


def is_dicom_file(path: Path) -> bool:
    """A ``.dcm`` file, or a file with the DICOM preamble's ``DICM`` marker."""
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as f:
            return f.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _studies_in_folder(root: Path) -> list[Study]:
    studies = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        here = Path(folder)
        names = sorted(f for f in files if not f.startswith("."))
        ct_files = [n for n in names if n.lower().endswith(CT_FILE_SUFFIXES)]
        for name in ct_files:
            relative = (here / name).relative_to(root)
            studies.append(Study(_strip_suffix(str(relative)), str(here / name), FILE))
        others = [here / n for n in names if n not in ct_files]
        if any(is_dicom_file(p) for p in others[:64]):
            relative = here.relative_to(root)
            studies.append(Study(root.name if str(relative) == "." else str(relative), str(here), DICOM))
    return studies


def _studies_in_csv(path: Path) -> list[Study]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise CTInputError(path, f"cannot read the CSV ({exc})") from None
    if not rows:
        return []
    columns = {c.strip().lower(): c for c in rows[0] if c}
    path_column = columns.get("path")
    uid_column = next((columns[c] for c in _UID_COLUMNS if c in columns), None)
    if path_column is None and uid_column is None:
        raise CTInputError(path, f"the CSV needs a 'path' or 'StudyInstanceUID' column; it has {sorted(columns)}")
    studies, named = [], set()
    for line, row in enumerate(rows, start=2):
        study = _csv_study(path, line, row, columns, path_column, uid_column)
        if study is None:
            continue
        if study.study_id in named:
            raise CTInputError(path, f"line {line}: the study name {study.study_id!r} is used twice")
        if columns.get("study") and (row.get(columns["study"]) or "").strip():
            named.add(study.study_id)
        studies.append(study)
    return studies


def _csv_study(path: Path, line: int, row: dict, columns: dict, path_column, uid_column) -> Study | None:
    """The study of one CSV row (None for an empty row)."""

    def cell(name: str) -> str:
        column = columns.get(name)
        return (row.get(column) or "").strip() if column else ""

    source = (row.get(path_column) or "").strip() if path_column else ""
    uid = (row.get(uid_column) or "").strip() if uid_column else ""
    if not source and not uid:
        return None
    dose = None
    if cell("dose"):
        try:
            dose = parse_dose(cell("dose"))
        except ValueError as exc:
            raise CTInputError(path, f"line {line}: {exc}") from None
    series = cell("series") or None
    if series is not None and not is_dicom_uid(series):
        raise CTInputError(path, f"line {line}: {series[:80]!r} is not a SeriesInstanceUID")
    if source:
        full = Path(source) if Path(source).is_absolute() else path.parent / source
        kind = DICOM if full.is_dir() else FILE
        name = cell("study") or _strip_suffix(full.name if full.name else source)
        return Study(name, str(full), kind, series, dose)
    if not is_dicom_uid(uid):
        raise CTInputError(path, f"line {line}: {uid[:80]!r} is not a StudyInstanceUID")
    return Study(cell("study") or uid, uid, PACS, series, dose)


def _studies_in_uid_list(path: Path) -> list[Study]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise CTInputError(
            path, f"cannot read it as a list of StudyInstanceUIDs ({getattr(exc, 'strerror', None) or exc})"
        ) from None
    studies = []
    for number, text in enumerate(lines, start=1):
        uid = text.split("#", 1)[0].strip()
        if not uid:
            continue
        if not is_dicom_uid(uid):
            raise CTInputError(
                path,
                f"line {number}: {uid[:80]!r} is not a StudyInstanceUID (INPUT is a folder of studies, a .csv, "
                "or a text file of StudyInstanceUIDs)",
            )
        studies.append(Study(uid, uid, PACS))
    return studies


def _strip_suffix(name: str) -> str:
    lower = name.lower()
    for suffix in (*CT_FILE_SUFFIXES, ".dcm"):
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def _safe(name: str, source: str) -> str:
    """``name`` as a safe folder name (separators as ``__``); long or odd names get a hash of their source."""
    text = _UNSAFE.sub("_", name.replace(os.sep, "__").replace("/", "__")).strip("._-") or "study"
    if not is_safe_name(text) or len(text) > 100:
        text = f"{text[:80].strip('._-') or 'study'}-{hashlib.sha1(source.encode()).hexdigest()[:8]}"
    return text.replace("..", "_")


def _unique_names(studies: list[Study]) -> list[Study]:
    """Every study with a safe name of its own (a clash gets a short hash of the source appended)."""
    safe = [dataclasses.replace(s, study_id=_safe(s.study_id, s.source)) for s in studies]
    counts: dict[str, int] = {}
    for s in safe:
        counts[s.study_id.lower()] = counts.get(s.study_id.lower(), 0) + 1
    unique = []
    for s in safe:
        if counts[s.study_id.lower()] > 1:
            key = f"{s.source}|{s.series_uid or ''}"
            s = dataclasses.replace(s, study_id=f"{s.study_id}-{hashlib.sha1(key.encode()).hexdigest()[:8]}")
        unique.append(s)
    if len({s.study_id.lower() for s in unique}) != len(unique):
        raise LowdoseError("the input lists the same study twice (same path or UID, same series)")
    return unique
