"""Files replaced whole: checkpoints, models and run logs are written to a temporary file beside
their path and renamed over it, so an interruption never leaves half a file behind."""
from __future__ import annotations

import contextlib
import os
import uuid
from typing import Callable


def write_atomically(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` fills a temporary file beside ``path``, which then replaces ``path`` in one
    rename. The temporary name is the writer's own (process id and a random part), so two
    writers never write into one file; it is removed if ``write`` fails or is interrupted."""
    tmp = f"{path}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_lines_atomically(path: str, lines: list[str]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.writelines(lines)

    write_atomically(path, write)
