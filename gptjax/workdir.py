"""One run owns a workdir: a lock held for the run's life, and a writable directory.

`claim(workdir, command)` creates the workdir, checks that it can be written (a
read-only or full filesystem is one clear error before any work) and takes an exclusive
`fcntl.flock` on WORKDIR/gptjax.lock, which also records the holder (pid, host, command,
start time). The kernel releases the lock when the holder exits in any way, kill -9
included, so a lock left by a dead run is never in the way; on NFS (Linux emulates flock
with NFS byte-range locks) a crashed client's lock lasts until the server's lease ends.
Deleting gptjax.lock breaks a lock by hand: the next run locks a new file. With several
processes only process 0 takes the lock; all of them learn whether it got it.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from pathlib import Path

LOCK = "gptjax.lock"


class WorkdirError(RuntimeError):
    """A workdir that cannot be used: held by another run, or not writable."""


def _holder(lock: Path) -> str:
    try:
        info = json.loads(lock.read_text(encoding="utf-8"))
        return (
            f"pid {info['pid']} on host {info['host']} (gptjax {info['command']} "
            f"since {info['started']})"
        )
    except (OSError, ValueError, KeyError, TypeError):  # the holder is writing it
        return "a process that is starting"


def _lock(workdir: Path, command: str) -> int:
    """The locked file descriptor of workdir's lock file, or a WorkdirError."""
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        fd = os.open(workdir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise WorkdirError(f"workdir {workdir} is not writable: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise WorkdirError(
            f"workdir {workdir} is in use by another run: {_holder(workdir / LOCK)}; wait "
            f"for it to end or use another workdir (a lock left by a crashed host on a "
            f"network filesystem: delete {workdir / LOCK})"
        ) from None
    info = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": command,
        "started": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
    }
    try:  # also proves that the workdir takes writes (a full disk fails here)
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(info).encode())
    except OSError as e:
        os.close(fd)
        raise WorkdirError(f"workdir {workdir} is not writable: {e.strerror}") from None
    return fd


@contextlib.contextmanager
def claim(workdir: str | Path, command: str) -> Iterator[Path]:
    """Own `workdir` for the block (see the module docstring); yields its Path."""
    import jax

    workdir = Path(workdir)
    fd, error = None, None
    if jax.process_index() == 0:
        try:
            fd = _lock(workdir, command)
        except WorkdirError as e:
            error = e
    if jax.process_count() > 1:  # every process stops when process 0 got no lock
        import numpy as np
        from jax.experimental import multihost_utils

        ok = multihost_utils.broadcast_one_to_all(np.int32(error is None))
        if not ok and error is None:
            error = WorkdirError(f"workdir {workdir} cannot be used (process 0 says why)")
    if error is not None:
        raise error
    try:
        yield workdir
    finally:
        if fd is not None:
            os.close(fd)  # releases the lock; the file stays (deleting it would race)
