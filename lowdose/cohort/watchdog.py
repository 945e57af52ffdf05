"""A watchdog that kills a study worker's descendants when the worker dies without cleaning up (SIGKILL, OOM).

nnU-Net (inside TotalSegmentator) starts its preprocessing and export processes with the ``spawn`` context;
they block on queues their parent held. If the process that runs a study is killed while they exist (the
cohort's driver killed, so its local Ray's raylet and then its workers go), they are orphaned and wait
forever, holding memory and a core. A Ray worker cannot rely on ``PR_SET_PDEATHSIG`` for them (nnU-Net
starts them, and the signal follows the creating thread, not the process), so a separate small process
polls: while its parent lives it notes the parent's descendants (pid and start time); once the parent is
gone it kills the noted ones that still exist, then exits.

This file imports only the standard library: it runs as a script (``python watchdog.py <pid>``), so it
starts in milliseconds and does not load lowdose.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

POLL_S = 0.25
_WATCHED: set[int] = set()  # pids of this interpreter that have a watchdog (a fork gets its own)


def watch_descendants() -> None:
    """Start this process's watchdog, once per process (a no-op where there is no /proc)."""
    pid = os.getpid()
    if pid in _WATCHED or not Path(f"/proc/{pid}/stat").is_file():
        return
    # Its own process group, so a signal to the caller's group (Ctrl-C, kill -9 -PGID) leaves it to clean up; no
    # stdin/stdout: it never writes, and it must not hold the caller's pipes open after the caller dies.
    subprocess.Popen(
        [sys.executable, "-S", __file__, str(pid)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        close_fds=True,
        process_group=0,
    )
    _WATCHED.add(pid)


def _stat(pid: int) -> tuple[int, str] | None:
    """(parent pid, start time) of a living process, None if it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return None if fields[0] in ("Z", "X") else (int(fields[1]), fields[19])


def descendants(root: int, exclude: int) -> dict[int, str]:
    """Every living descendant of ``root`` but ``exclude`` (and its own descendants): pid -> start time."""
    children: dict[int, list[int]] = {}
    started: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None:
                children.setdefault(stat[0], []).append(int(entry.name))
                started[int(entry.name)] = stat[1]
    found: dict[int, str] = {}
    todo = [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child != exclude and child in started:
                found[child] = started[child]
                todo.append(child)
    return found


def watch(parent: int) -> None:
    """Poll until ``parent`` is gone, then kill the descendants last seen (those whose start time still matches,
    so a recycled pid is never hit)."""
    me = os.getpid()
    seen: dict[int, str] = {}
    while os.getppid() == parent and _stat(parent) is not None:
        seen = descendants(parent, exclude=me)
        time.sleep(POLL_S)
    for pid, started in seen.items():
        stat = _stat(pid)
        if stat is not None and stat[1] == started:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


if __name__ == "__main__":
    watch(int(sys.argv[1]))
