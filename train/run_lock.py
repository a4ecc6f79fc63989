"""One run per output folder: a lock file rank 0 holds for the whole run.

``<output_dir>/condmoe.lock`` holds who has the folder (host, pid, start time). It is created atomically
(``O_CREAT | O_EXCL``), refreshed every ``REFRESH_S`` by a thread of the holder and removed on exit. A second run on the
folder refuses with one line naming the holder. A lock is stale, and is taken over with a warning, when its process
is gone (same host) or when it has not been refreshed for ``STALE_S`` (a holder on another host that died).

Orphan ranks of a killed launcher end through ``train.dist.exit_with_launcher``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

log = logging.getLogger("condmoe.lock")

LOCK_NAME = "condmoe.lock"
REFRESH_S = 20.0
STALE_S = 90.0


class RunLock:
    """The output folder's lock, held by this process until ``release``."""

    def __init__(self, path: Path, refresh_s: float = REFRESH_S):
        self.path = path
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._refresh, args=(refresh_s,), name="condmoe-lock", daemon=True)
        self._thread.start()

    @classmethod
    def acquire(cls, output_dir: str | Path, stale_s: float = STALE_S, refresh_s: float = REFRESH_S) -> RunLock:
        """Takes the folder's lock, or raises ValueError naming the run that holds it."""
        folder = Path(output_dir)
        if folder.exists() and not folder.is_dir():
            raise ValueError(f"run.output_dir={folder} is a file, not a folder")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / LOCK_NAME
        holder = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
                  "slurm_job": os.environ.get("SLURM_JOB_ID")}
        for _ in range(2):  # a second try after taking over a stale lock
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                other = _read(path)
                why = _stale(path, other, stale_s)
                if why is None:
                    raise ValueError(f"run.output_dir={folder} is in use by another run (pid {other.get('pid')} on "
                                     f"{other.get('host')}, since {_when(other.get('started'))}; {path}); stop it "
                                     f"or choose another run.output_dir") from None
                log.warning("%s: taking over a stale lock (%s)", path, why)
                path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(holder, f)
            return cls(path, refresh_s)
        raise ValueError(f"{path}: another run took the lock while a stale one was replaced; try again")

    def _refresh(self, every_s: float) -> None:
        while not self._stop.wait(every_s):
            try:
                os.utime(self.path)
            except OSError as exc:  # the folder went away: nothing to protect any more
                log.warning("%s: cannot refresh the lock (%s)", self.path, exc)

    def release(self) -> None:
        self._stop.set()
        self._thread.join()
        self.path.unlink(missing_ok=True)


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}  # being written, or torn: judged by its age


def _stale(path: Path, holder: dict, stale_s: float) -> str | None:
    """Why the lock ``holder`` wrote is stale, or None if its run may still be alive."""
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return "released meanwhile"
    job = os.environ.get("SLURM_JOB_ID")
    if job and holder.get("slurm_job") == job and holder.get("pid") != os.getpid():
        return f"written by an earlier run of SLURM job {job}"
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        if not _alive(holder["pid"]):
            return f"pid {holder['pid']} on this host has exited"
        return None
    if age > stale_s:
        return f"not refreshed for {age:.0f} s"
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _when(started) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started)) if isinstance(started, int | float) else "?"


REPLACED_PREFIX = "replaced-"


def prepare_fresh_run(output_dir: str | Path, overwrite: bool) -> Path | None:
    """``run.resume=none``: a fresh run in ``output_dir``. A folder that already holds a run (anything but the lock and
    earlier ``replaced-*`` folders) is refused, or with ``overwrite`` its contents move into ``replaced-<time>/`` (no
    file is deleted); returns that folder, or None if there was nothing to move."""
    folder = Path(output_dir)
    entries = sorted(e for e in folder.iterdir() if e.name != LOCK_NAME and not e.name.startswith(REPLACED_PREFIX))
    if not entries:
        return None
    if not overwrite:
        names = ", ".join(e.name for e in entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise ValueError(f"run.resume=none but run.output_dir={folder} already holds a run ({names}): resume it "
                         f"(run.resume=auto), choose another run.output_dir, or set run.overwrite=true to move it "
                         f"aside into {REPLACED_PREFIX}<time>/")
    target = folder / time.strftime(f"{REPLACED_PREFIX}%Y%m%d-%H%M%S")
    target.mkdir()
    for entry in entries:
        entry.rename(target / entry.name)
    return target
