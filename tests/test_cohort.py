"""Cohorts end to end: a real local Ray (2 CPUs, loopback only), real CT from the shared collection, real
TotalSegmentator code paths, a real Orthanc for StudyInstanceUIDs, the `lowdose cohort` command killed and rerun.

TotalSegmentator's downloaded weights cannot exist here (no internet; they are the user's): a tiny randomly
initialised nnU-Net v2 model (tests/fidelity_fixtures.py) is written in their place and named by
TOTALSEG_WEIGHTS_PATH, so lowdose -> TotalSegmentator's Python API -> nnU-Net runs for real in every Ray worker.
Its labels are meaningless; the verdict thresholds are made strict so that every study is flagged and the
report's thumbnails are drawn. Studies are a few slices of shared series, to keep the suite quick.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from lowdose import CTInputError, load_ct, save_ct
from lowdose.cohort import CohortSettings, RayOptions, RayScheduler, SequentialScheduler, find_studies, run_cohort
from lowdose.cohort.command import FAILED_EXIT_STATUS
from lowdose.cohort.store import STAGING, read_record, seal, still_valid, study_folder
from lowdose.cohort.studies import DICOM, FILE, PACS, fingerprint
from lowdose.fidelity import FidelityThresholds

from .conftest import shared
from .fidelity_fixtures import write_tiny_totalsegmentator_weights

LOWDOSE = str(Path(sys.executable).parent / "lowdose")
# Strict enough that the tiny random segmenter's differences flag every study (so thumbnails are drawn).
STRICT = FidelityThresholds(dice_kept=0.999, dice_changed=0.99, nsd_kept=0.999, nsd_changed=0.99)


@pytest.fixture(scope="module")
def tiny_totalsegmentator(tmp_path_factory):
    """TOTALSEG_HOME_DIR and TOTALSEG_WEIGHTS_PATH naming the tiny fast-mode model (set before Ray starts, so
    its workers inherit them)."""
    home = tmp_path_factory.mktemp("totalseg_home")
    write_tiny_totalsegmentator_weights(home / "weights", fast=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TOTALSEG_HOME_DIR", str(home))
        mp.setenv("TOTALSEG_WEIGHTS_PATH", str(home / "weights"))
        yield home


@pytest.fixture(scope="module")
def studies_folder(tmp_path_factory):
    """A study folder as a research group has one: a NIfTI file, a DICOM series in a sub-folder (4 slices each of
    two shared series) and a corrupt file."""
    root = tmp_path_factory.mktemp("studies")
    save_ct(load_ct(shared("totalsegmentator/example_ct_dicom")).slices(8, 12), root / "ts_abdomen.nii.gz")
    save_ct(load_ct(shared("crlm_1004_ge")).slices(20, 24), root / "site2" / "crlm")
    (root / "broken.nii.gz").write_bytes(b"\x1f\x8b" + b"not a NIfTI file" * 64)
    return root


@pytest.fixture(scope="module")
def local_ray(tiny_totalsegmentator):
    """A local Ray with 2 CPUs on loopback only, no dashboard; shut down after the module."""
    import ray

    from lowdose.cohort.schedulers import start_local_ray

    start_local_ray(num_cpus=2)
    try:
        yield ray
    finally:
        ray.shutdown()


def _kill_first_worker_of(out: Path, study: str, killed: list, stop: threading.Event) -> None:
    """Kill (SIGKILL) the Ray worker process that starts ``study``, once: its staging folder names its pid."""
    while not stop.is_set() and not killed:
        for folder in (out / STAGING).glob(f"{study}.*"):
            pid = int(folder.name.split(".")[-2])
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)
            return
        time.sleep(0.05)


@pytest.fixture(scope="module")
def ray_cohort(local_ray, studies_folder, tmp_path_factory):
    """The cohort run on the local Ray with 2 workers; the worker of one study is killed while it runs."""
    out = tmp_path_factory.mktemp("cohort") / "out"
    killed: list[int] = []
    stop = threading.Event()
    killer = threading.Thread(target=_kill_first_worker_of, args=(out, "ts_abdomen", killed, stop), daemon=True)
    killer.start()
    started = time.perf_counter()
    try:
        summary = run_cohort(
            studies_folder,
            out,
            CohortSettings(device="cpu", thresholds=STRICT),
            RayScheduler(RayOptions(workers=2, memory_per_study_gb=1)),
            progress=False,
            command="pytest ray_cohort",
        )
    finally:
        stop.set()
    return summary, out, killed, time.perf_counter() - started


def test_finding_studies_in_a_folder_a_csv_and_a_uid_list(studies_folder, tmp_path):
    studies = find_studies(studies_folder)
    assert [(s.study_id, s.kind) for s in studies] == [
        ("broken", FILE),
        ("ts_abdomen", FILE),
        ("site2__crlm", DICOM),
    ]
    table = tmp_path / "list.csv"
    table.write_text(f"path,study,dose\n{studies_folder / 'ts_abdomen.nii.gz'},p1,1/4\nsite2/crlm,,\n")
    (tmp_path / "site2").symlink_to(studies_folder / "site2")
    listed = find_studies(table)
    assert [(s.study_id, s.kind, s.dose) for s in listed] == [("p1", FILE, 0.25), ("crlm", DICOM, None)]
    uids = tmp_path / "uids.txt"
    uids.write_text("# study list\n1.2.840.1234.5\n\n1.2.840.1234.6  # second\n")
    assert [(s.study_id, s.kind) for s in find_studies(uids)] == [("1.2.840.1234.5", PACS), ("1.2.840.1234.6", PACS)]
    uids.write_text("1.2.3\n../etc/passwd\n")
    with pytest.raises(CTInputError, match=r"uids.txt: line 2: '../etc/passwd' is not a StudyInstanceUID"):
        find_studies(uids)
    table.write_text("path,dose\na.nii.gz,2\n")
    with pytest.raises(CTInputError, match=r"list.csv: line 2: dose fraction must be in \(0, 1\]"):
        find_studies(table)


def test_a_cohort_on_a_local_ray_with_two_workers(ray_cohort, local_ray, studies_folder):
    """One row per study, the corrupt one failed with its one-line error, each worker loaded the model once,
    a killed worker's study ran again, the table, report and per-study outputs written."""
    summary, out, killed, _ = ray_cohort
    assert local_ray.nodes()[0]["NodeManagerAddress"] == "127.0.0.1"  # loopback only
    assert (summary.total, summary.done_total, summary.failed_total, summary.pending) == (3, 2, 1, 0)
    assert summary.scheduler["transfer"] == "path"  # probed: the one node sees the output and the inputs
    assert summary.scheduler["workers"] == 2 and summary.scheduler["nodes"] == 1

    import pyarrow.parquet as pq

    table = pq.read_table(out / "cohort.parquet").to_pylist()
    rows = {r["study"]: r for r in table}
    assert [r["study"] for r in table] == ["broken", "ts_abdomen", "site2__crlm"]
    broken = rows["broken"]
    assert broken["status"] == "failed" and "\n" not in broken["error"]
    assert broken["error"].startswith(f"{studies_folder / 'broken.nii.gz'}: ") and broken["denoised"] is None
    for name in ("ts_abdomen", "site2__crlm"):
        row = rows[name]
        assert row["status"] == "done" and row["error"] == ""
        assert row["model"] == "dose_unet" and 0 < row["dose_fraction"] <= 1 and row["dose_source"] == "estimated"
        assert row["verdict"] in ("check", "changed")  # strict thresholds
        assert load_ct(out / row["denoised"]).shape == (4, 512, 512)
        assert (out / row["report"]).is_file() and (out / row["thumbnail"]).is_file()
        assert row["seconds_total"] >= row["seconds_fidelity"] > 0 and row["peak_rss_mb"] > 100
        assert row["model_loads"] == 1  # each worker loaded the model once, whatever it ran before
        assert row["liver.dice"] is None or 0 <= row["liver.dice"] <= 1
        assert row["liver.verdict"] in ("kept", "check", "changed", "absent")
        assert {"liver.nsd_1mm", "liver.nsd_2mm", "liver.hd95_mm", "liver.hu_shift"} <= set(row)
    workers = {rows[n]["worker"] for n in ("ts_abdomen", "site2__crlm")}
    assert all(re.fullmatch(r".+:\d+", w) for w in workers)

    # The worker killed while it ran ts_abdomen lost only that study, which Ray ran again on a new worker.
    assert len(killed) == 1 and rows["ts_abdomen"]["worker"].split(":")[1] != str(killed[0])

    with open(out / "cohort.csv", newline="") as f:
        csv_rows = list(csv.DictReader(f))
    assert [r["study"] for r in csv_rows] == ["broken", "ts_abdomen", "site2__crlm"]
    assert list(csv_rows[0]) == list(table[0])

    record = read_record(out, "ts_abdomen")
    folder = study_folder(out, "ts_abdomen")
    assert set(record.files) >= {"denoised.nii.gz", "fidelity/fidelity.json", "thumbnail.png"}
    for name, stamp in record.files.items():
        assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == stamp.sha256
    assert not (out / STAGING).exists()  # nothing half-written is left

    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 1 + 2  # the distributions + a thumbnail per flagged study
    assert not re.search(r"""(src|href)=["']?(https?:)?//|<link""", html)  # self-contained
    assert "pytest ray_cohort" in html and "not a NIfTI" not in html and "broken.nii.gz" in html
    assert re.search(r"ray</th><td><code>2\.\d+", html) and "TotalSegmentator" in html
    context = json.loads((out / "cohort.json").read_text())
    assert context["counts"] == {"total": 3, "done": 2, "failed": 1, "pending": 0}


class _MustNotRun:
    """A scheduler that fails the test if a finished cohort tries to run anything."""

    def start(self, *args):
        raise AssertionError("a rerun of a finished cohort started a scheduler")

    def stop(self):
        pass


def test_a_rerun_of_a_finished_cohort_recomputes_nothing(ray_cohort, studies_folder):
    summary, out, _, _ = ray_cohort
    before = {p: p.stat().st_mtime_ns for p in (out / "studies").rglob("*")}
    started = time.perf_counter()
    again = run_cohort(
        studies_folder,
        out,
        CohortSettings(device="cpu", thresholds=STRICT),
        _MustNotRun(),
        progress=False,
    )
    assert time.perf_counter() - started < 10
    assert (again.done, again.failed, again.skipped, again.scheduler) == (0, 0, 3, {})
    assert {p: p.stat().st_mtime_ns for p in (out / "studies").rglob("*")} == before
    assert [r.status for r in again.results] == ["failed", "done", "done"]

    # Another model (or dose, strength, thresholds, format) is another result: it would run again.
    studies = find_studies(studies_folder)
    record = read_record(out, "ts_abdomen")
    study = next(s for s in studies if s.study_id == "ts_abdomen")
    study = dataclasses.replace(study, fingerprint=fingerprint(study))
    assert still_valid(record, study, CohortSettings(device="cpu", thresholds=STRICT), out)
    assert not still_valid(record, study, CohortSettings(device="cpu", thresholds=STRICT, strength=1.0), out)
    # The self-ensemble: off (1) is what a cohort finished before it existed was run with; on is another result.
    assert "ensemble" not in CohortSettings().key() and CohortSettings(ensemble=8).key()["ensemble"] == 8
    assert still_valid(record, study, CohortSettings(device="cpu", thresholds=STRICT, ensemble=1), out)
    assert not still_valid(record, study, CohortSettings(device="cpu", thresholds=STRICT, ensemble=8), out)
    with pytest.raises(ValueError, match="ensemble must be one of 1, 2, 4, 8"):
        CohortSettings(ensemble=3)


def test_a_study_over_the_time_limit_is_stopped_and_recorded(ray_cohort, local_ray, studies_folder, tmp_path):
    """--timeout: the study's task is cancelled (its worker process killed) and the study recorded as failed."""
    study = next(s for s in find_studies(studies_folder) if s.study_id == "ts_abdomen")
    summary = run_cohort(
        [study],
        tmp_path / "out",
        CohortSettings(device="cpu", timeout_s=2),
        RayScheduler(RayOptions(workers=1, memory_per_study_gb=1)),
        progress=False,
    )
    (record,) = summary.results
    assert record.status == "failed" and record.error == "timed out after 2 s (--timeout)"
    assert read_record(tmp_path / "out", "ts_abdomen").error == record.error
    assert not (tmp_path / "out" / STAGING).exists()


class _Cluster:
    """Stands in for a Ray cluster with GPUs, which cannot exist here: only its resource totals are read."""

    def __init__(self, **resources):
        self.resources = resources

    def cluster_resources(self):
        return self.resources


def test_studies_ask_for_a_gpu_when_the_cluster_has_them():
    from lowdose.errors import LowdoseError

    gpus = _Cluster(CPU=8, GPU=2, memory=64 * 2**30)
    scheduler = RayScheduler()
    scheduler.gpus = scheduler._gpus_per_study(gpus.resources)
    assert scheduler.gpus == 1.0 and scheduler._slots(gpus) == 2  # GPUs bound it
    assert scheduler._task_options() == {"num_cpus": 1.0, "num_gpus": 1.0, "max_retries": 1, "memory": 6 * 2**30}
    half = RayScheduler(RayOptions(gpus_per_study=0.5))
    half.gpus = half._gpus_per_study(gpus.resources)
    assert half._slots(gpus) == 4
    cpus = _Cluster(CPU=8, memory=64 * 2**30)
    assert scheduler._gpus_per_study(cpus.resources) == 0.0
    capped = RayScheduler(RayOptions(workers=3))
    assert capped._slots(cpus) == 3
    with pytest.raises(LowdoseError, match="--gpus-per-study 1: the cluster has 0 GPUs"):
        RayScheduler(RayOptions(gpus_per_study=1))._gpus_per_study(cpus.resources)
    with pytest.raises(LowdoseError, match="cannot run one study with --cpus-per-study 1"):
        RayScheduler()._slots(_Cluster(CPU=1, memory=2 * 2**30))


def test_finished_outputs_are_checked_against_their_checksums(tmp_path):
    """A changed output makes a finished study run again; a touched but unchanged one does not."""
    from lowdose.cohort.results import StudyResult
    from lowdose.cohort.studies import Study

    settings = CohortSettings()
    study = Study("s1", str(tmp_path / "s1.nii.gz"), FILE, fingerprint="file:1:2:")
    folder = study_folder(tmp_path, "s1")
    folder.mkdir(parents=True)
    (folder / "denoised.nii.gz").write_bytes(b"x" * 1000)
    from lowdose.cohort.store import settings_key

    record = seal(
        folder,
        StudyResult(
            "s1", study.source, "done", settings_key=settings_key(settings, study), fingerprint=study.fingerprint
        ),
    )
    assert still_valid(record, study, settings, tmp_path)
    os.utime(folder / "denoised.nii.gz", ns=(1, 1))  # touched, same bytes: re-read and accepted
    assert still_valid(record, study, settings, tmp_path)
    (folder / "denoised.nii.gz").write_bytes(b"y" * 1000)  # same size, other bytes
    assert not still_valid(record, study, settings, tmp_path)
    assert not still_valid(record, Study("s1", study.source, FILE, fingerprint="file:9:9:"), settings, tmp_path)


def _wait_for(stream_lines: list[str], pattern: str, process: subprocess.Popen, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if re.search(pattern, "".join(stream_lines)):
            return
        assert process.poll() is None, "".join(stream_lines)[-3000:]
        time.sleep(0.2)
    raise AssertionError(f"{pattern!r} not seen in {seconds} s:\n{''.join(stream_lines)[-3000:]}")


def _session_processes(session: int) -> list[str]:
    """Processes still alive in a session (the killed run's, its local Ray's): pid and command line each."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            command = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if int(fields[3]) == session and fields[0] != "Z":
            alive.append(f"{stat.parent.name}: {command[:300]}")
    return alive


_ORPHANING_PARENT = """
import multiprocessing, sys, time
from lowdose.cohort.watchdog import watch_descendants

def wait_forever():  # like nnU-Net's preprocessing worker blocked on a queue nobody reads
    time.sleep(3600)

if __name__ == "__main__":
    if sys.argv[1] == "watched":
        watch_descendants()
    child = multiprocessing.get_context("spawn").Process(target=wait_forever, daemon=True)
    child.start()
    print(child.pid, flush=True)
    time.sleep(3600)
"""


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


@pytest.mark.parametrize("watched", [True, False])
def test_a_killed_workers_spawned_children_die_with_it_when_watched(tmp_path, watched):
    """A process that runs studies (a Ray worker, the cohort command) is SIGKILLed while a ``spawn`` child of
    it waits (as nnU-Net's do): with its watchdog the child is killed within seconds and the watchdog exits;
    without one (the control) the child lives on, orphaned."""
    script = tmp_path / "parent.py"
    script.write_text(_ORPHANING_PARENT)
    parent = subprocess.Popen(
        [sys.executable, str(script), "watched" if watched else "bare"], stdout=subprocess.PIPE, text=True
    )
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    try:
        time.sleep(1.0)  # the watchdog has seen the child (it looks every 0.25 s)

        def watchdogs() -> list[str]:
            return [p for p in _session_processes(os.getsid(0)) if "watchdog.py" in p and p.endswith(f" {parent.pid} ")]

        assert _alive(child) and bool(watchdogs()) is watched
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 10
        while (_alive(child) or watchdogs()) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _alive(child) is not watched
        assert watchdogs() == []
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)


def test_the_command_killed_mid_run_resumes(tiny_totalsegmentator, studies_folder, tmp_path):
    """`lowdose cohort` (its own local Ray, data through the object store) is killed (SIGKILL to the whole
    process group) while a study is in flight; the rerun skips what finished and completes the rest."""
    studies = tmp_path / "studies"
    studies.mkdir()
    shutil.copy(studies_folder / "broken.nii.gz", studies)
    shutil.copy(studies_folder / "ts_abdomen.nii.gz", studies / "volume.nii.gz")
    out = tmp_path / "out"
    command = [LOWDOSE, "cohort", str(studies), str(out), "--device", "cpu", "--workers", "1"]
    command += ["--transfer", "object-store", "--memory-per-study", "1"]
    process = subprocess.Popen(command, stderr=subprocess.PIPE, start_new_session=True)
    lines: list[str] = []

    def read_stderr() -> None:
        while chunk := os.read(process.stderr.fileno(), 65536):  # what is there, as soon as it is there
            lines.append(chunk.decode(errors="replace"))

    threading.Thread(target=read_stderr, daemon=True).start()
    try:
        # The progress bar: done, failed, in flight (and tqdm's time left once a study finished).
        _wait_for(lines, r"done 0, failed 1, in flight 1", process, 240)
        time.sleep(3)
        assert process.poll() is None
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(30)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    # Ray's own daemons live in process groups of their own: they exit when they notice the driver has gone,
    # which took over 30 s once on 2 cores loaded by other jobs.
    deadline = time.monotonic() + 120
    while _session_processes(process.pid) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _session_processes(process.pid) == []  # nothing of the killed run (or its Ray) lives on
    assert re.search(r"1/2 \[[\d:]+<[\d:]+,", "".join(lines))  # elapsed<remaining
    broken_record = study_folder(out, "broken") / "study.json"
    assert broken_record.is_file() and not study_folder(out, "volume").exists()  # in flight: lost, nothing half
    written = broken_record.stat().st_mtime_ns

    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == FAILED_EXIT_STATUS, result.stderr[-3000:]
    assert "cohort: 2 studies: 1 done, 1 failed (1 run now, 1 finished before)" in result.stdout
    assert "failed: broken: " in result.stdout and "broken.nii.gz" in result.stdout
    assert broken_record.stat().st_mtime_ns == written  # not run again
    record = read_record(out, "volume")
    assert record.status == "done" and record.transfer == "object-store"
    assert np.array_equal(load_ct(out / "studies/volume/denoised.nii.gz").hu.shape, (4, 512, 512))
    assert json.loads((out / "cohort.json").read_text())["scheduler"]["ray_address"] == "local (started by this run)"


def test_ctrl_c_keeps_what_finished_and_loses_only_the_study_in_flight(tiny_totalsegmentator, studies_folder, tmp_path):
    """Without Ray (--sequential, the plain loop): Ctrl-C while a study runs writes the table (that study
    pending, the finished one kept), leaves no half-written study and raises KeyboardInterrupt."""
    import _thread

    studies = [s for s in find_studies(studies_folder) if s.study_id in ("broken", "ts_abdomen")]
    out = tmp_path / "out"

    def interrupt_when_running() -> None:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not list((out / STAGING).glob("ts_abdomen.*")):
            time.sleep(0.02)
        _thread.interrupt_main()

    threading.Thread(target=interrupt_when_running, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        run_cohort(studies, out, CohortSettings(device="cpu"), SequentialScheduler(), progress=False)
    import pyarrow.parquet as pq

    rows = pq.read_table(out / "cohort.parquet").to_pylist()
    assert [(r["study"], r["status"]) for r in rows] == [("broken", "failed"), ("ts_abdomen", "pending")]
    assert not study_folder(out, "ts_abdomen").exists() and not (out / STAGING).exists()
    assert json.loads((out / "cohort.json").read_text())["counts"]["pending"] == 1


def test_the_command_documents_its_exit_status_and_refuses_bad_input_in_one_line(studies_folder, tmp_path):
    result = subprocess.run([LOWDOSE, "cohort", "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0
    assert f"{FAILED_EXIT_STATUS} the cohort finished but some studies failed" in " ".join(result.stdout.split())
    assert "--ensemble {1,2,4,8}" in result.stdout
    uids = tmp_path / "uids.txt"
    uids.write_text("1.2.826.0.1.3680043.8.498.1\n")
    for args, fragment in (
        ([uids, tmp_path / "out"], "uids.txt: the input lists StudyInstanceUIDs but no PACS is configured"),
        ([studies_folder, studies_folder / "site2" / "out"], "would overwrite or write into the input"),
        ([tmp_path / "missing", tmp_path / "out"], "missing: no such file or folder"),
    ):
        env = {k: v for k, v in os.environ.items() if k != "LOWDOSE_PACS_URL"}
        result = subprocess.run(
            [LOWDOSE, "cohort", *map(str, args)], capture_output=True, text=True, env=env, timeout=120
        )
        lines = result.stderr.strip().splitlines()
        assert (
            result.returncode == 1 and len(lines) == 1 and lines[0].startswith("lowdose cohort: error: ")
        ), result.stderr
        assert fragment in lines[0], lines[0]
    assert not (studies_folder / "site2" / "out").exists()


def test_a_study_is_read_from_the_pacs_by_its_study_instance_uid(tmp_path):
    """A real Orthanc (DICOMweb on loopback) holding a shared series and a lowdose-derived series of the same
    study: the study's CT series is chosen (not the derived one, though it has more slices) and fetched whole."""
    import pydicom

    from lowdose.dicomweb import choose_ct_series, fetch_study_series

    from .server_fixtures import start_orthanc, stop_orthanc, upload_to_orthanc

    series = tmp_path / "series"
    series.mkdir()
    files = [shared("crlm_1004_ge") / f"1-{k:02d}.dcm" for k in range(10, 16)]
    for f in files:
        shutil.copy(f, series)
    derived = tmp_path / "derived"
    save_ct(load_ct(series), derived, description="lowdose denoised (test)")  # 6 slices, same study
    for f in files[4:]:
        (series / f.name).unlink()  # the study's own series: 4 slices
    orthanc = start_orthanc(tmp_path / "orthanc")
    try:
        upload_to_orthanc(orthanc, sorted(series.iterdir()) + sorted(derived.iterdir()))
        header = pydicom.dcmread(files[0], stop_before_pixels=True)
        study_uid, series_uid = str(header.StudyInstanceUID), str(header.SeriesInstanceUID)
        assert choose_ct_series(orthanc.dicomweb, study_uid) == series_uid
        folder, chosen = fetch_study_series(orthanc.dicomweb, study_uid, tmp_path / "fetched")
        assert chosen == series_uid and len(list(folder.iterdir())) == 4
        np.testing.assert_array_equal(load_ct(folder).hu, load_ct(series).hu)
        with pytest.raises(Exception, match=r"127\.0\.0\.1:\d+/dicom-web: no study 1\.2\.3\.4 on the PACS"):
            fetch_study_series(orthanc.dicomweb, "1.2.3.4", tmp_path / "none")
    finally:
        stop_orthanc(orthanc)
