"""Files that hold secrets: created 0600, replaced atomically, checked at start."""
from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import Iterable, List


def write(path: Path, text: str) -> None:
    """Replace ``path`` with ``text``, readable by the owner only.

    The temporary file is created 0600 before any byte is written, so there is no
    moment at which the secret sits in a world-readable file, and a crash mid-write
    leaves the old file intact.
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=str(path.parent))
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def create(path: Path) -> None:
    """Create ``path`` empty with mode 0600 unless it exists (SQLite copies this mode to -wal/-shm)."""
    try:
        fd = os.open(str(path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    except FileExistsError:
        return
    os.close(fd)


def readable_by_others(paths: Iterable[Path]) -> List[Path]:
    """The existing files among ``paths`` that group or others may read or write."""
    loose = []
    for p in paths:
        try:
            mode = os.stat(p).st_mode
        except FileNotFoundError:
            continue
        if stat.S_IMODE(mode) & 0o077:
            loose.append(Path(p))
    return loose
