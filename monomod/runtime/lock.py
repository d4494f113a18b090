"""One process at a time per RUN_DIR: a lock file created with O_EXCL that names its holder (pid and host).

Two drivers on one RUN_DIR would train the same jobs and overwrite each other's checkpoints, so the second is
refused at once with one line naming the holder. A lock left by a killed process does not block: on the holder's
own host a lock whose pid is no longer alive is stale and taken over. (A lock from another host cannot be checked
from here; the message says how to remove it.) Locks are re-entrant inside one process, so ``monomod convert``
can hold the lock from preparing RUN_DIR to the end of ``execute``, which takes it again. Workers of the process and
Ray executors run inside the holder's ``execute`` and never take it; under torchrun only rank 0 does.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from monomod.errors import MonomodError, shorten
from monomod.rundir import LOCK_FILE

_held: dict[Path, int] = {}  # lock path -> nesting depth, in this process


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    except (OverflowError, ValueError):
        return False
    return True


def _read_holder(path: Path) -> dict | None:
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _is_stale(holder: dict | None, path: Path) -> bool:
    """A lock nobody holds any more: its process died on this host, or it was torn while being written."""
    if holder is None:
        try:  # a torn lock file: stale once it is old enough not to be a writer between create and write
            return time.time() - path.stat().st_mtime > 10
        except OSError:
            return True
    pid = holder.get("pid")
    return holder.get("host") == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid)


def _try_create(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}, f)
    return True


def _acquire(path: Path) -> None:
    if path.is_symlink():  # planted: clearing it as stale or reading it would touch a file elsewhere
        raise MonomodError(f"{shorten(str(path))} is a symbolic link, not a lock monomod wrote",
                           "remove that link (monomod never follows it)")
    for _ in range(3):  # create, or clear a stale lock and create (another process may win that race)
        if _try_create(path):
            return
        holder = _read_holder(path)
        if _is_stale(holder, path):
            path.unlink(missing_ok=True)
            continue
        who = f"pid {holder.get('pid')} on {holder.get('host')}" if holder else "another process"
        raise MonomodError(f"{shorten(str(path.parent))} is in use by {who} (lock {LOCK_FILE})",
                           f"wait for it to finish, or if that process is gone delete {shorten(str(path))}")
    raise MonomodError(f"cannot take the lock {shorten(str(path))}", "try again")


def _should_lock() -> bool:
    """Only the driver locks: under torchrun that is rank 0 (the other ranks run inside its session)."""
    return os.environ.get("RANK", "0") == "0"


@contextlib.contextmanager
def run_dir_lock(run_dir: str | Path) -> Iterator[None]:
    """Hold RUN_DIR's lock for the ``with`` block (re-entrant in this process); refuse at once if another holds it."""
    if not _should_lock():
        yield
        return
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MonomodError(f"cannot create RUN_DIR {shorten(str(run_dir))} ({e.strerror})",
                           "choose a writable --out folder with a shorter path") from None
    path = run_dir.resolve() / LOCK_FILE  # the folder resolved, never the lock itself (it may be a planted link)
    if _held.get(path):
        _held[path] += 1
    else:
        try:
            _acquire(path)
        except OSError as e:
            raise MonomodError(f"cannot write the lock in {shorten(str(run_dir))} ({e.strerror})",
                               "choose a writable --out folder") from None
        _held[path] = 1
    try:
        yield
    finally:
        _held[path] -= 1
        if not _held[path]:
            del _held[path]
            path.unlink(missing_ok=True)
