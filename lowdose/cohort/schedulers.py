"""Where a cohort's studies run: ``RayScheduler`` (Ray tasks on a local Ray or an existing cluster) or
``SequentialScheduler`` (one after another in this process, the plain loop).

Both hand every finished study to ``on_result(study, record)`` as soon as it is written, and keep at most as
many studies in flight as there are workers, so an interrupted run loses only those.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import signal
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .._version import __version__
from ..errors import LowdoseError
from .results import CohortSettings, StudyResult
from .store import STAGING, commit, new_staging, record_failure, seal, study_folder, unpack
from .studies import DICOM, PACS, Study
from .worker import OBJECT_STORE, PATH, StudyOutcome, one_line, preflight, process_study, process_study_on_ray

OnResult = Callable[[Study, StudyResult], None]
OnFlight = Callable[[int], None]
TRANSFERS = ("auto", PATH, OBJECT_STORE)
PREFLIGHT_TIMEOUT_S = 600.0  # a worker must start (and load the model) within this
RESOURCES_EVERY_S = 30.0  # how often the cluster's resources are read again (an autoscaler may add nodes)


class StudyTimeout(LowdoseError):
    """A study ran longer than the cohort's time limit."""


def timeout_message(seconds: float) -> str:
    return f"timed out after {seconds:g} s (--timeout)"


class SequentialScheduler:
    """One study after another in this process: no Ray, the model loaded once. ``--timeout`` is enforced with
    SIGALRM (main thread only)."""

    name = "sequential"

    def start(self, settings: CohortSettings, out: Path, studies: list[Study]) -> dict:
        preflight(settings)
        return {"scheduler": self.name, "workers": 1, "transfer": PATH}

    def run(self, todo: list[Study], settings: CohortSettings, out: Path, on_result: OnResult, on_flight: OnFlight):
        for study in todo:
            on_flight(1)
            with _alarm(settings.timeout_s):
                outcome = process_study(study, settings, out)
            on_flight(0)
            on_result(study, outcome.record)

    def stop(self) -> None:
        pass


@contextlib.contextmanager
def _alarm(seconds: float):
    """Raise ``StudyTimeout`` in the block after ``seconds`` (0: never; only in the main thread)."""
    if not seconds or seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def expire(signum, frame):
        raise StudyTimeout(timeout_message(seconds))

    try:
        previous = signal.signal(signal.SIGALRM, expire)
    except ValueError:  # not the main thread: no alarm
        yield
        return
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@dataclasses.dataclass(frozen=True)
class RayOptions:
    """How the cohort uses Ray.

    ``address``: an existing cluster (``ray://head:10001``, ``auto``, ``host:6379``); None uses $RAY_ADDRESS, or
    starts a local Ray on this machine (loopback only, no dashboard, usage statistics off) that is shut down
    at the end. ``num_cpus``: CPUs of that local Ray (default all). ``workers``: studies at once (default as
    many as the resources allow). Each study asks for ``cpus_per_study`` CPUs, ``gpus_per_study`` GPUs (None:
    1 when the cluster has GPUs, else 0) and ``memory_per_study_gb`` of memory (None: no reservation).
    ``transfer``: ``path`` (workers share the filesystem), ``object-store``, or ``auto`` (path when every node
    sees the output folder and the inputs, checked by a probe task per node). ``max_retries``: runs again of
    a study whose worker died.
    """

    address: str | None = None
    num_cpus: int | None = None
    workers: int | None = None
    cpus_per_study: float = 1.0
    gpus_per_study: float | None = None
    memory_per_study_gb: float | None = 6.0
    transfer: str = "auto"
    max_retries: int = 1

    def __post_init__(self):
        if self.transfer not in TRANSFERS:
            raise LowdoseError(f"transfer must be one of {', '.join(TRANSFERS)}; got {self.transfer!r}")
        if self.cpus_per_study <= 0 or (self.gpus_per_study or 0) < 0 or (self.memory_per_study_gb or 0) < 0:
            raise LowdoseError("--cpus-per-study must be > 0, --gpus-per-study and --memory-per-study >= 0")
        if self.workers is not None and self.workers < 1:
            raise LowdoseError(f"--workers must be 1 or more; got {self.workers}")


@dataclasses.dataclass
class _Flight:
    study: Study
    submitted: float


class RayScheduler:
    """Studies as Ray tasks; see ``RayOptions``. Finished studies are written where they ran (path transfer) or
    by this process from what the task returned (object store); a timed-out study's task is cancelled (its
    worker process killed), a task whose worker died is run again up to ``max_retries`` times."""

    name = "ray"

    def __init__(self, options: RayOptions | None = None):
        self.options = options or RayOptions()
        self._started_ray = False
        self._flights: dict = {}
        self._task: Any = None  # the Ray remote function of process_study, made once Ray is imported
        self.transfer = PATH
        self.gpus = 0.0

    # -- connecting

    def start(self, settings: CohortSettings, out: Path, studies: list[Study]) -> dict:
        ray = _import_ray()
        address = self.options.address or os.environ.get("RAY_ADDRESS") or None
        if ray.is_initialized():
            pass  # the caller's own Ray (a notebook, a test): used as it is, left running
        elif address:
            _init(ray, address=address)
        else:
            start_local_ray(self.options.num_cpus)
            self._started_ray = True
        resources = ray.cluster_resources()
        self.gpus = self._gpus_per_study(resources)
        workers = self._slots(ray)  # before any task: one the cluster cannot hold would wait for ever
        # max_calls=0: a worker process is kept for all the studies it runs, and so is its model.
        self._task = ray.remote(max_calls=0)(process_study_on_ray)
        self.transfer = self._transfer(ray, out, studies)
        info = self._preflight(ray, settings)
        return {
            "scheduler": self.name,
            "ray_address": "local (started by this run)" if self._started_ray else (address or "existing"),
            "ray_version": ray.__version__,
            "nodes": sum(1 for n in ray.nodes() if n.get("Alive")),
            "cluster_cpus": resources.get("CPU", 0),
            "cluster_gpus": resources.get("GPU", 0),
            "workers": workers,
            "cpus_per_study": self.options.cpus_per_study,
            "gpus_per_study": self.gpus,
            "memory_per_study_gb": self.options.memory_per_study_gb,
            "transfer": self.transfer,
            "preflight_host": info["host"],
        }

    def _gpus_per_study(self, resources: dict) -> float:
        if self.options.gpus_per_study is not None:
            if self.options.gpus_per_study > resources.get("GPU", 0):
                raise LowdoseError(
                    f"--gpus-per-study {self.options.gpus_per_study:g}: the cluster has "
                    f"{resources.get('GPU', 0):g} GPUs"
                )
            return float(self.options.gpus_per_study)
        return 1.0 if resources.get("GPU", 0) >= 1 else 0.0

    def _task_options(self) -> dict:
        options = {
            "num_cpus": self.options.cpus_per_study,
            "num_gpus": self.gpus,
            "max_retries": self.options.max_retries,
        }
        if self.options.memory_per_study_gb:
            options["memory"] = int(self.options.memory_per_study_gb * 2**30)
        return options

    def _slots(self, ray) -> int:
        """Studies at once: what the cluster's CPUs, GPUs and memory allow, capped by ``workers``."""
        resources = ray.cluster_resources()
        limits = [int(resources.get("CPU", 0) // self.options.cpus_per_study)]
        if self.gpus:
            limits.append(int(resources.get("GPU", 0) // self.gpus))
        if self.options.memory_per_study_gb:
            limits.append(int(resources.get("memory", 0) // (self.options.memory_per_study_gb * 2**30)))
        slots = min(limits)
        if self.options.workers:
            slots = min(slots, self.options.workers) if slots else 0
        if slots < 1:
            raise LowdoseError(
                f"the Ray cluster ({resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs, "
                f"{resources.get('memory', 0) / 2**30:.1f} GB memory) cannot run one study with "
                f"--cpus-per-study {self.options.cpus_per_study:g}, --gpus-per-study {self.gpus:g}, "
                f"--memory-per-study {self.options.memory_per_study_gb or 0:g}"
            )
        return slots

    def _transfer(self, ray, out: Path, studies: list[Study]) -> str:
        """``path`` when every node sees the output folder and the inputs (a probe task per node), else the
        object store; a local Ray started here shares this machine's files."""
        if self.options.transfer != "auto":
            return self.options.transfer
        if self._started_ray:
            return PATH
        probe_dir = Path(out) / STAGING
        probe_dir.mkdir(parents=True, exist_ok=True)
        token = uuid.uuid4().hex
        probe = probe_dir / f"probe-{token}"
        probe.write_text(token)
        sample = next((s.source for s in studies if s.kind != PACS), None)
        try:
            from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

            check = ray.remote(num_cpus=0)(_sees_files)
            refs = [
                check.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(
                    str(probe), token, sample
                )
                for n in ray.nodes()
                if n.get("Alive")
            ]
            shared = all(ray.get(refs, timeout=120))
        finally:
            probe.unlink(missing_ok=True)
        return PATH if shared else OBJECT_STORE

    def _preflight(self, ray, settings: CohortSettings) -> dict:
        """One task where studies run: the model loads, TotalSegmentator's weights are there, same lowdose."""
        task = ray.remote(max_calls=0)(preflight).options(**{**self._task_options(), "max_retries": 0})
        try:
            info = ray.get(task.remote(settings), timeout=PREFLIGHT_TIMEOUT_S)
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None) or exc
            raise LowdoseError(f"on the Ray cluster: {one_line(cause)}") from None
        except ray.exceptions.GetTimeoutError:
            raise LowdoseError(
                f"no Ray worker started the first check within {PREFLIGHT_TIMEOUT_S:g} s: does a node have "
                "the CPUs, GPUs and memory one study asks for?"
            ) from None
        if info["lowdose_version"] != __version__:
            raise LowdoseError(
                f"the Ray cluster runs lowdose {info['lowdose_version']}, this machine {__version__}: "
                "install the same version on every node"
            )
        return info

    # -- running

    def run(self, todo: list[Study], settings: CohortSettings, out: Path, on_result: OnResult, on_flight: OnFlight):
        ray = _import_ray()
        waiting = deque(todo)
        slots, slots_read = self._slots(ray), time.monotonic()
        while waiting or self._flights:
            while waiting and len(self._flights) < slots:
                study = waiting.popleft()
                self._flights[self._submit(ray, study, settings, out)] = _Flight(study, time.monotonic())
            on_flight(len(self._flights))
            ready, _ = ray.wait(list(self._flights), num_returns=1, timeout=1.0)
            for ref in ready:
                flight = self._flights.pop(ref)
                on_result(flight.study, self._collect(ray, ref, flight.study, settings, out))
            for study in self._expired(ray, settings.timeout_s):
                on_result(study, record_failure(out, study, settings, timeout_message(settings.timeout_s)))
            if time.monotonic() - slots_read > RESOURCES_EVERY_S:
                slots, slots_read = self._slots(ray), time.monotonic()
        on_flight(0)

    def _submit(self, ray, study: Study, settings: CohortSettings, out: Path):
        payload = None
        if self.transfer == OBJECT_STORE:
            payload = ray.put(_read_input(study))
        return self._task.options(**self._task_options()).remote(study, settings, str(out), self.transfer, payload)

    def _collect(self, ray, ref, study: Study, settings: CohortSettings, out: Path) -> StudyResult:
        """The finished task's record (its outputs written here when they came through the object store)."""
        try:
            outcome: StudyOutcome = ray.get(ref)
        except ray.exceptions.RayTaskError as exc:  # an error outside process_study's own handling
            return record_failure(out, study, settings, one_line(getattr(exc, "cause", None) or exc))
        except ray.exceptions.RayError as exc:
            return record_failure(out, study, settings, _ray_failure(exc, self.options.max_retries))
        if outcome.files is not None:
            staging = new_staging(out, study.study_id)
            unpack(outcome.files, staging)
            seal(staging, outcome.record)
            commit(staging, study_folder(out, study.study_id))
        return outcome.record

    def _expired(self, ray, timeout_s: float) -> list[Study]:
        """The studies in flight for longer than ``timeout_s``, their tasks cancelled (worker processes killed);
        one that finished meanwhile is left for the next wait to collect."""
        if not timeout_s or timeout_s <= 0:
            return []
        now, expired = time.monotonic(), []
        for ref, flight in list(self._flights.items()):
            if now - flight.submitted > timeout_s and not ray.wait([ref], timeout=0)[0]:
                ray.cancel(ref, force=True)  # kills the worker process running it
                del self._flights[ref]
                expired.append(flight.study)
        return expired

    def stop(self) -> None:
        """Cancel what is in flight; shut down the local Ray this scheduler started."""
        if "ray" not in sys.modules:
            return
        ray = _import_ray()
        for ref in list(self._flights):
            with contextlib.suppress(Exception):
                ray.cancel(ref, force=True)
        self._flights.clear()
        if self._started_ray and ray.is_initialized():
            ray.shutdown()
            self._started_ray = False


def _sees_files(probe: str, token: str, sample: str | None) -> bool:
    """Run on each node: whether it sees the driver's probe file (and a sample input) at the same paths."""
    try:
        same = Path(probe).read_text() == token
    except OSError:
        return False
    return same and (sample is None or Path(sample).exists())


def _read_input(study: Study) -> dict[str, bytes]:
    """The study's input files by name, to send through the object store (none for a PACS study)."""
    if study.kind == PACS:
        return {}
    path = Path(study.source)
    try:
        if study.kind == DICOM:
            return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}
        return {path.name: path.read_bytes()}
    except OSError:
        return {}  # the worker reports the missing input by name


def _ray_failure(exc: BaseException, retries: int) -> str:
    name = type(exc).__name__
    if "OutOfMemory" in name:
        return "Ray stopped the study: its node ran out of memory (raise --memory-per-study or use bigger nodes)"
    if "Cancelled" in name:
        return "cancelled"
    tries = f" (and its {retries} retr{'y' if retries == 1 else 'ies'})" if retries else ""
    return f"the Ray worker running the study died{tries}: killed, out of memory, or its node was lost ({name})"


def _import_ray():
    try:
        import ray  # a cohort's dependency, imported only when a cohort runs on Ray
    except ImportError:
        raise LowdoseError("Ray is not installed (pip install -r requirements.txt, or use --sequential)") from None
    return ray


def _init(ray, **kwargs) -> None:
    """``ray.init`` quietly (workers' output stays in Ray's logs), as a ``LowdoseError`` when it fails."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # no usage statistics leave the machine
    try:
        ray.init(log_to_driver=False, logging_level=logging.ERROR, **kwargs)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = kwargs.get("address") or "a local Ray"
        raise LowdoseError(f"cannot start or reach {where}: {' '.join(str(exc).split())[:300]}") from None


def start_local_ray(num_cpus: int | None = None) -> None:
    """Start Ray on this machine for this process: loopback only, no dashboard, no usage statistics, workers'
    output kept in Ray's logs. Shut it down with ``ray.shutdown()``."""
    ray = _import_ray()
    with _loopback_only(ray):
        _init(ray, num_cpus=num_cpus, include_dashboard=False)


@contextlib.contextmanager
def _loopback_only(ray):
    """A local Ray whose node address is 127.0.0.1, so its servers listen on loopback only.

    Ray turns 127.0.0.1 given as ``_node_ip_address`` into the machine's routable address unless
    ``ray_constants.ENABLE_RAY_CLUSTER`` is off (its setting for single-machine platforms); it is switched off
    while the local Ray starts and restored after (tests/test_cohort.py checks the address).
    """
    from ray._private import ray_constants  # no public switch for a loopback-only local Ray (Ray 2.60)

    before = ray_constants.ENABLE_RAY_CLUSTER
    ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = before
