"""One study, start to end, wherever it runs (a Ray worker or this process): fetch, load, denoise, check, write.

``process_study`` never raises for a bad study: any error becomes a failed ``StudyResult`` with the one-line
message. The denoiser is ``lowdose.denoise.get_denoiser``'s, cached per process, so a worker loads a model once
for all the studies it runs. With ``payload`` (the input's files, sent through Ray's object store) the study is
processed in a private temporary folder and its outputs go back the same way; without it the worker reads the
input by path and writes the finished study folder into the cohort's output itself.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
import os
import resource
import shutil
import socket
import tempfile
import time
from pathlib import Path

from .._version import __version__
from ..dicomweb import fetch_study_series
from ..errors import LowdoseError
from ..io import load_ct, save_ct
from .report import write_thumbnail
from .results import DONE, FAILED, CohortSettings, StructureFigures, StudyResult
from .store import commit, new_staging, pack, seal, settings_key, study_folder, unpack
from .studies import PACS, Study
from .watchdog import watch_descendants

PATH, OBJECT_STORE = "path", "object-store"  # how a study's data travel between the driver and a worker
_FORKSERVER = False  # whether this process's child processes start from a fork server (Ray workers)
MODEL_LOADS = 0  # models this process has loaded (a worker that keeps its model stays at 1)
INPUT_DIR = "input"  # inside a staging folder: a copy of the input (object store) or the PACS download


@dataclasses.dataclass
class StudyOutcome:
    """What a worker hands back: the study's record, and its files when they travel through the object store."""

    record: StudyResult
    files: dict[str, bytes] | None = None


def one_line(exc: BaseException) -> str:
    """An error in one line: a LowdoseError's own message, an OSError's file and reason, else the type and text."""
    if isinstance(exc, LowdoseError):
        return " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, MemoryError):
        return "out of memory (the study is too large for this worker)"
    if isinstance(exc, OSError) and exc.strerror:
        return f"{exc.filename + ': ' if exc.filename else ''}{exc.strerror}"
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def process_study(
    study: Study,
    settings: CohortSettings,
    out: str | os.PathLike,
    transfer: str = PATH,
    payload: dict[str, bytes] | None = None,
) -> StudyOutcome:
    """Denoise one study and check its fidelity. ``transfer`` ``path``: read the input by path and write the study
    folder into ``out/studies/<id>/``; ``object-store``: the input's files are ``payload`` (none for a PACS
    study) and the outputs are returned."""
    started = time.perf_counter()
    by_path = transfer == PATH
    staging = new_staging(Path(out), study.study_id) if by_path else Path(tempfile.mkdtemp(prefix="lowdose-cohort-"))
    record = StudyResult(
        study=study.study_id,
        source=study.describe(),
        status=FAILED,
        settings_key=settings_key(settings, study),
        fingerprint=study.fingerprint,
        series_uid=study.series_uid,
        worker=f"{socket.gethostname()}:{os.getpid()}",
        transfer=transfer,
    )
    try:
        _run(study, settings, staging, None if by_path else payload or {}, record)
        record.status = DONE
    except Exception as exc:  # any failure of one study is recorded, never raised: the cohort goes on
        record.error = _named(one_line(exc), staging / INPUT_DIR, study)
        record.denoised = record.report = record.thumbnail = None  # only the record is kept
        _clear(staging)
    finally:
        shutil.rmtree(staging / INPUT_DIR, ignore_errors=True)  # the input copy is not an output
    record.timings_s["total"] = round(time.perf_counter() - started, 3)
    record.peak_rss_mb = _peak_rss_mb()
    seal(staging, record)
    if by_path:
        commit(staging, study_folder(Path(out), study.study_id))
        return StudyOutcome(record)
    try:
        return StudyOutcome(record, pack(staging))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def process_study_on_ray(*args, **kwargs) -> StudyOutcome:
    """``process_study`` in a Ray worker, whose child processes start from a fork server.

    nnU-Net lists its input files with a default-context ``multiprocessing.Pool`` (fork); forking a Ray worker,
    whose gRPC threads may hold locks, can leave the child deadlocked (seen here: a study hung for minutes).
    A fork server is a fresh single-threaded process, so its forks are safe; preloading the module nnU-Net's
    pool needs keeps them cheap.
    """
    global _FORKSERVER
    watch_descendants()  # nnU-Net's processes must not outlive this worker if it is killed
    if not _FORKSERVER:
        multiprocessing.set_forkserver_preload(["nnunetv2.utilities.utils"])
        multiprocessing.set_start_method("forkserver", force=True)
        _FORKSERVER = True
    return process_study(*args, **kwargs)


def _run(study: Study, settings: CohortSettings, staging: Path, payload, record: StudyResult) -> None:
    """The study's steps, each timed into ``record``; raises on the first failure."""
    timings = record.timings_s
    t = time.perf_counter()
    source = _materialise(study, settings, staging, payload, record)
    timings["fetch"] = round(time.perf_counter() - t, 3)

    t = time.perf_counter()
    volume = load_ct(source, series_uid=None if study.kind == PACS else study.series_uid, limits=settings.limits)
    timings["load"] = round(time.perf_counter() - t, 3)

    denoiser, timings["model_load"] = _denoiser(settings)
    record.model_loads = MODEL_LOADS
    dose = settings.dose if study.dose is None else study.dose
    result = denoiser(volume, dose=dose, strength=settings.strength, ensemble=settings.ensemble)
    timings["denoise"] = result.seconds
    record.model, record.device, record.strength = result.model, result.device, result.strength
    record.dose_fraction, record.dose_source = result.dose_fraction, result.dose_source

    t = time.perf_counter()
    save_ct(result.volume, staging / settings.denoised_name, description=result.description)
    record.denoised = settings.denoised_name
    timings["save"] = round(time.perf_counter() - t, 3)

    t = time.perf_counter()
    report = _check(volume, result.volume, settings, staging / "fidelity")
    timings["fidelity"] = round(time.perf_counter() - t, 3)
    record.report = "fidelity/fidelity.html"
    study_verdict = report.study
    record.verdict, record.summary, record.flagged = study_verdict.verdict, study_verdict.summary, study_verdict.flagged
    record.counts, record.structures_present = dict(study_verdict.counts), study_verdict.structures_present
    record.structures = [StructureFigures.from_fidelity(s) for s in sorted(report.structures, key=lambda s: s.label)]

    t = time.perf_counter()
    write_thumbnail(staging / "thumbnail.png", volume, result.volume, report.label_maps.get("original"), report)
    record.thumbnail = "thumbnail.png"
    timings["thumbnail"] = round(time.perf_counter() - t, 3)


def _materialise(study: Study, settings: CohortSettings, staging: Path, payload, record: StudyResult) -> Path:
    """The input as a local path: the study's own path, the object store's copy, or the PACS download."""
    if study.kind == PACS:
        if not settings.pacs_url:
            raise LowdoseError("the input lists StudyInstanceUIDs but no PACS is configured (--pacs URL)")
        folder, record.series_uid = fetch_study_series(
            settings.pacs_url, study.source, staging / INPUT_DIR, study.series_uid, settings.limits
        )
        return folder
    if payload is None:
        return Path(study.source)
    target = staging / INPUT_DIR
    unpack(payload, target)
    if study.kind == "file":
        return target / Path(study.source).name
    return target


def _denoiser(settings: CohortSettings):
    """The process's cached denoiser and the seconds spent loading it now (0 when it was loaded before)."""
    import torch  # 4 s to import: the CLI imports this package for --help

    from ..denoise import get_denoiser  # imports torch, as above

    t = time.perf_counter()
    misses = get_denoiser.cache_info().misses
    denoiser = get_denoiser(settings.model, settings.device)
    loaded = get_denoiser.cache_info().misses > misses
    global MODEL_LOADS
    MODEL_LOADS += int(loaded)
    cpus = _assigned_cpus()
    if cpus:  # the CPUs Ray gave this task, not the machine's (Denoiser takes all it may use)
        torch.set_num_threads(cpus)
    return denoiser, round(time.perf_counter() - t, 3) if loaded else 0.0


def _assigned_cpus() -> int | None:
    try:
        import ray  # present when this runs as a Ray task; absent or idle otherwise

        if not ray.is_initialized():
            return None
        cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
    except Exception:  # not inside a Ray worker
        return None
    return max(1, int(cpus)) if cpus else None


def _check(original, denoised, settings: CohortSettings, out: Path):
    from ..fidelity import TotalSegmentatorSegmenter, check_fidelity  # torch, nnU-Net (seconds): only when run

    segmenter = TotalSegmentatorSegmenter(
        fast=settings.fast, device=settings.device, weights_dir=settings.weights, progress=False
    )
    return check_fidelity(
        original, denoised, out_dir=out, segmenter=segmenter, thresholds=settings.thresholds, progress=False
    )


def preflight(settings: CohortSettings) -> dict:
    """Check, where studies will run, that the model loads and TotalSegmentator's weights are there; returns
    the host, lowdose's version and the seconds the model took to load. Raises ``LowdoseError``."""
    from ..fidelity import TotalSegmentatorSegmenter  # nnU-Net and torch: only when a cohort runs

    TotalSegmentatorSegmenter(fast=settings.fast, device=settings.device, weights_dir=settings.weights).check_weights()
    _, seconds = _denoiser(settings)
    return {"host": socket.gethostname(), "lowdose_version": __version__, "model_load_s": seconds}


def _named(message: str, copy: Path, study: Study) -> str:
    """An error about the worker's copy of the input names the study's own input instead."""
    for path in sorted({str(copy / Path(study.source).name), str(copy)}, key=len, reverse=True):
        message = message.replace(path, study.describe())
    return message


def _clear(folder: Path) -> None:
    """Empty a staging folder of a failed study (only its record is kept)."""
    for child in folder.iterdir():
        if child.is_dir():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)


def _peak_rss_mb() -> float:
    """This process's peak resident memory plus its largest child's (nnU-Net's worker processes), in MB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round((own + children) / 1024, 1)
