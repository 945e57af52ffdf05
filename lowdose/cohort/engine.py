"""``run_cohort``: every study of a list denoised and checked, resumably, then the cohort table and report.

Planning reads each study's earlier record (``studies/<id>/study.json``) and skips those that still stand; the
rest go to the scheduler (Ray by default); the table (``cohort.parquet``, ``cohort.csv``), ``report.html`` and
``cohort.json`` are written at the end, also after Ctrl-C (unfinished studies then show as pending), and every
few minutes during a long run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import platform
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from .._version import __version__
from ..atomic import write_text_atomically
from ..dicomweb import ENV_PACS_URL
from ..errors import CTOutputError, LowdoseError
from ..io import check_output_folder
from .report import write_report
from .results import DONE, FAILED, PENDING, CohortSettings, CohortSummary, StudyResult
from .schedulers import RayScheduler, SequentialScheduler
from .store import CohortLock, read_record, still_valid, sweep_staging
from .studies import PACS, Study, find_studies, fingerprint
from .table import write_tables

TABLE_EVERY_S = 300.0  # the table and report are rewritten this often during a run
PARQUET, CSV, REPORT, SUMMARY = "cohort.parquet", "cohort.csv", "report.html", "cohort.json"


class _Progress:
    """The progress bar on stderr: studies done, failed, in flight, and the time left (tqdm's estimate)."""

    def __init__(self, total: int, skipped: int, enabled: bool):
        from tqdm.auto import tqdm  # imported by the CLI's --help otherwise

        self.done = self.failed = self.in_flight = 0
        self.skipped = skipped
        self.bar = tqdm(total=total, desc="cohort", unit="study", disable=not enabled, file=sys.stderr)
        self._show()

    def _show(self, refresh: bool = True) -> None:
        skipped = f", {self.skipped} finished before" if self.skipped else ""
        text = f"done {self.done}, failed {self.failed}, in flight {self.in_flight}{skipped}"
        self.bar.set_postfix_str(text, refresh=refresh)

    def flight(self, count: int) -> None:
        if count != self.in_flight:
            self.in_flight = count
            self._show()

    def finished(self, record: StudyResult) -> None:
        if record.status == DONE:
            self.done += 1
        else:
            self.failed += 1
        self._show(refresh=False)
        self.bar.update(1)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def run_cohort(
    input_path: str | os.PathLike | list[Study],
    out_dir: str | os.PathLike,
    settings: CohortSettings | None = None,
    scheduler: RayScheduler | SequentialScheduler | None = None,
    retry_failed: bool = False,
    verify_checksums: bool = False,
    progress: bool = True,
    command: str | None = None,
) -> CohortSummary:
    """Denoise every study of ``input_path`` (a folder, CSV or UID list: ``find_studies``; or a list of ``Study``)
    with ``settings``, check each one's fidelity, and write ``out_dir``: ``studies/<id>/`` per study,
    ``cohort.parquet`` / ``cohort.csv`` (one row per study), ``report.html`` and ``cohort.json``.

    Studies finished before with the same settings and input are skipped (failed ones too, unless
    ``retry_failed``); ``verify_checksums`` re-reads their outputs instead of trusting unchanged sizes and
    modification times. ``scheduler`` defaults to ``RayScheduler()`` (a local Ray, or $RAY_ADDRESS). A bad study
    never stops the cohort; Ctrl-C writes the table of what finished and raises ``KeyboardInterrupt``.

    Example: ``run_cohort("studies/", "cohort_out").line()``
    """
    started = time.perf_counter()
    settings = settings or CohortSettings()
    out = Path(out_dir)
    studies = input_path if isinstance(input_path, list) else find_studies(input_path)
    if any(s.kind == PACS for s in studies) and not settings.pacs_url:
        where = "the study list" if isinstance(input_path, list) else os.fspath(input_path)
        raise LowdoseError(
            f"{where}: the input lists StudyInstanceUIDs but no PACS is configured (--pacs URL or ${ENV_PACS_URL})"
        )
    studies = [dataclasses.replace(s, fingerprint=fingerprint(s)) for s in studies]
    roots = () if isinstance(input_path, list) or not Path(input_path).is_dir() else (input_path,)
    _prepare_output(out, [*roots, *(s.source for s in studies if s.kind != PACS)])
    with CohortLock(out):
        sweep_staging(out)
        results: dict[str, StudyResult] = {}
        for s in studies:
            record = read_record(out, s.study_id)
            if record is not None and still_valid(record, s, settings, out, verify_checksums, retry_failed):
                results[s.study_id] = record
        todo = [s for s in studies if s.study_id not in results]
        context = _context(settings, command)
        this_run = _Run(out, studies, settings, results, context, started)
        if todo:
            this_run.execute(scheduler or RayScheduler(), todo, progress)
        return this_run.write()


class _Run:
    """One run's state: the records so far, and writing the table and report from them."""

    def __init__(
        self, out: Path, studies: list[Study], settings: CohortSettings, results: dict, context: dict, started
    ):
        self.out, self.studies, self.settings, self.results = out, studies, settings, results
        self.context, self.started = context, started
        self.ran = {DONE: 0, FAILED: 0}
        self.written_at = time.monotonic()
        self.previous_runs = _previous_runs(out)

    def execute(self, scheduler, todo: list[Study], progress: bool) -> None:
        bar = _Progress(len(todo), len(self.results), progress)

        def on_result(study: Study, record: StudyResult) -> None:
            self.results[study.study_id] = record
            self.ran[record.status] = self.ran.get(record.status, 0) + 1
            bar.finished(record)
            if time.monotonic() - self.written_at > TABLE_EVERY_S:
                self.write()

        try:
            self.context["scheduler"] = scheduler.start(self.settings, self.out, todo)
            scheduler.run(todo, self.settings, self.out, on_result, bar.flight)
        except BaseException:  # Ctrl-C, or the cluster lost: record what finished, then stop
            bar.close()
            scheduler.stop()  # cancel what is in flight first
            if self.results:  # something to record (this run's or an earlier one's)
                with contextlib.suppress(Exception):
                    self.write()
            raise
        finally:
            bar.close()
            scheduler.stop()
            sweep_staging(self.out)

    def ordered(self) -> list[StudyResult]:
        """One record per study of the input, in its order; a study without one is pending."""
        return [
            self.results.get(s.study_id)
            or StudyResult(study=s.study_id, source=s.describe(), status=PENDING, series_uid=s.series_uid)
            for s in self.studies
        ]

    def write(self) -> CohortSummary:
        records = self.ordered()
        parquet, csv = write_tables(records, self.out / PARQUET, self.out / CSV)
        self.context["created"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        ran = self.ran.get(DONE, 0) + self.ran.get(FAILED, 0)
        this_run = {k: self.context[k] for k in ("command", "created", "scheduler")}
        self.context["runs"] = (
            (self.previous_runs + [{**this_run, "studies_run": ran}])[-50:] if ran else self.previous_runs
        )
        report = write_report(self.out / REPORT, records, self.out, self.context, self.settings.thresholds)
        pending = sum(r.status == PENDING for r in records)
        summary = CohortSummary(
            output=self.out,
            total=len(records),
            done=self.ran.get(DONE, 0),
            failed=self.ran.get(FAILED, 0),
            skipped=len(records) - pending - self.ran.get(DONE, 0) - self.ran.get(FAILED, 0),
            pending=pending,
            seconds=round(time.perf_counter() - self.started, 2),
            table_parquet=parquet,
            table_csv=csv,
            report_html=report,
            scheduler=dict(self.context.get("scheduler", {})),
            results=records,
        )
        counts = {"total": summary.total, "done": summary.done_total, "failed": summary.failed_total}
        counts["pending"] = pending
        write_text_atomically(
            self.out / SUMMARY, json.dumps({**self.context, "counts": counts}, indent=1, default=str) + "\n"
        )
        self.written_at = time.monotonic()
        return summary


def _previous_runs(out: Path) -> list[dict]:
    """The runs that computed studies into ``out`` before (from cohort.json), for the report's provenance."""
    try:
        runs = json.loads((out / SUMMARY).read_text()).get("runs", [])
    except (OSError, ValueError, AttributeError):
        return []
    return [r for r in runs if isinstance(r, dict)] if isinstance(runs, list) else []


def _prepare_output(out: Path, inputs: list) -> None:
    """The output folder, made if needed; it must be writable and inside none of the inputs."""
    check_output_folder(out, inputs=tuple(inputs))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CTOutputError(out, f"cannot create the folder ({exc.strerror or exc})") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise CTOutputError(out, "the folder is not writable")


def _context(settings: CohortSettings, command: str | None) -> dict:
    """The command, settings and versions that the report and cohort.json record."""

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    key = settings.key()
    return {
        "command": command or " ".join(sys.argv),
        "settings": {
            **{k: v for k, v in key.items() if k != "thresholds"},
            "device": settings.device,
            "weights": settings.weights or "(TOTALSEG_WEIGHTS_PATH / TOTALSEG_HOME_DIR)",
            "timeout_s": settings.timeout_s,
            "pacs": settings.pacs_url or "-",
            "thresholds": json.dumps(key["thresholds"]),
        },
        "versions": {
            "lowdose": __version__,
            "python": platform.python_version(),
            **{name: installed(name) for name in ("torch", "ray", "TotalSegmentator", "nnunetv2", "numpy", "pyarrow")},
        },
        "scheduler": {},
    }
