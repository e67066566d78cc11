"""One run per output folder: a run holds an exclusive lock on ``out/.lock`` while it trains, so
that a second run started in the same folder stops at once instead of interleaving its log,
checkpoints and model with the first one's. The lock is the operating system's (``flock``): it
goes with the process, however the process ends. Where ``fcntl`` does not exist (Windows) runs
are not locked."""
from __future__ import annotations

import contextlib
import os

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None

LOCK = ".lock"


@contextlib.contextmanager
def folder_lock(out: str):
    """Hold ``out``'s lock for the block; ValueError if another process holds it."""
    if fcntl is None:
        yield
        return
    path = os.path.join(out, LOCK)
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ValueError(
                f"another run is training in {out} (it holds {path}): wait for it to finish, or use another --out"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
