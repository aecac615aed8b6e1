"""The instance lock every model-opening program takes (cli.md §1.3).

Contract: `acquire(prog)` takes an exclusive, non-blocking `flock` on `ds4.lock` in the
system temp directory (or `$DS4_LOCK_FILE`), writes our pid into it and returns the open
file, which holds the lock until it is closed or the process ends. If another process
holds it, `LockHeld` carries ds4's message and exit code 2. The lock exists because the
model maps tens of GiB: two copies would thrash memory.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
from pathlib import Path
from typing import IO

LOCK_ENV = "DS4_LOCK_FILE"


class LockHeld(Exception):
    exit_code = 2


def lock_path() -> Path:
    return Path(os.environ.get(LOCK_ENV) or Path(tempfile.gettempdir()) / "ds4.lock")


def acquire(prog: str) -> IO[str]:
    path = lock_path()
    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        pid = handle.read().strip() or "?"
        handle.close()
        raise LockHeld(f"{prog}: another ds4 process is already running (pid {pid}); refusing to start") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle
