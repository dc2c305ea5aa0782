"""Compact on-disk indexes of the offline plugins' package data, built once per data version.

An offline plugin whose data is large (the MISP warning lists: 65 MB of JSON, ~300 MB once in
Python objects) keeps it in a SQLite file instead of in every process: a lookup reads a few
B-tree pages (the OS page cache shares them between the gunicorn workers and the CLI), and
nothing is loaded up front.

Where: ``$TQ_MW_OFFLINE_INDEX_DIR`` when set (several daemons, or test runs, sharing one copy),
else ``<state dir>/offline_index/`` when the state database is known (the ``Enricher`` says so
through ``set_directory``), else ``$XDG_CACHE_HOME/tq_mw_thehive`` (``~/.cache/tq_mw_thehive``),
else ``<temp dir>/tq_mw_thehive-<uid>``: the first that can be created and written. Directories
are made 0700, index files 0600.

When: the file name carries the index's name, its format and the version of the data (the
version of the package that ships it), e.g. ``warninglists-f1-1.7.0.sqlite``; a process that
finds no such file builds it. Upgrading the package therefore means a new file on first use;
files of other versions of the same index are removed after a build.

How: the build writes ``.<name>-<pid>-<random>.tmp`` in the same directory and renames it into
place (``os.replace``, atomic), so a reader sees either no file or a complete one. Builders take
an exclusive ``flock`` on ``.<name>.lock`` first and look again once they hold it, so two gunicorn
workers starting together build once: the second waits and then opens what the first built.
Readers open the file read-only (``mode=ro``, ``immutable=1``: it never changes once in place).
"""
from __future__ import annotations

import fcntl
import logging
import os
import re
import sqlite3
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Dict, List, Optional, Union

log = logging.getLogger(__name__)

SUBDIR = "offline_index"
_lock = threading.Lock()
_configured: Optional[Path] = None       # set by the Enricher: <state dir>/offline_index
_chosen: Optional[Path] = None           # what directory() settled on
_SAFE = re.compile(r"[^A-Za-z0-9._+-]")


def set_directory(path: Union[str, Path, None]) -> None:
    """Where the indexes live from now on in this process (None: the fallbacks)."""
    global _configured, _chosen
    with _lock:
        new = Path(path).expanduser() if path is not None else None
        if new != _configured:
            _configured, _chosen = new, None


def for_local_dir(local_dir: Union[str, Path]) -> Path:
    """The index directory of this host (``Config.local_dir``: beside a SQLite state file)."""
    return Path(local_dir).expanduser().absolute() / SUBDIR


ENV_DIRECTORY = "TQ_MW_OFFLINE_INDEX_DIR"


def _candidates() -> List[Path]:
    out: List[Path] = []
    shared = os.environ.get(ENV_DIRECTORY)
    if shared:
        out.append(Path(shared).expanduser())
    if _configured is not None:
        out.append(_configured)
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        out.append(Path(xdg) / "tq_mw_thehive")
    try:
        out.append(Path.home() / ".cache" / "tq_mw_thehive")
    except RuntimeError:            # no home directory
        pass
    out.append(Path(tempfile.gettempdir()) / f"tq_mw_thehive-{os.getuid()}")
    return out


def _usable(path: Path) -> bool:
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError:
        return False
    if path.is_symlink() or not path.is_dir():
        return False
    return os.access(path, os.W_OK | os.X_OK)


def directory() -> Path:
    """The directory this process keeps its indexes in (created 0700 on first use)."""
    global _chosen
    with _lock:
        if _chosen is not None:
            return _chosen
        tried = []
        for candidate in _candidates():
            if _usable(candidate):
                if tried:
                    log.warning("offline index directory %s is not writable; using %s", tried[0], candidate)
                _chosen = candidate
                return candidate
            tried.append(candidate)
        raise OSError(f"no writable directory for the offline indexes (tried {', '.join(map(str, tried))})")


def _file_name(name: str, data_version: str) -> str:
    return f"{name}-{_SAFE.sub('_', data_version)}.sqlite"


def connect(path: Path) -> sqlite3.Connection:
    """A read-only connection to a built index (usable from any thread of this process)."""
    return sqlite3.connect(f"file:{path}?mode=ro&immutable=1", uri=True, check_same_thread=False)


def _complete(path: Path) -> bool:
    if not path.is_file():
        return False
    try:
        conn = connect(path)
        try:
            row = conn.execute("SELECT value FROM index_meta WHERE key = 'complete'").fetchone()
        finally:
            conn.close()
    except sqlite3.Error:
        return False
    return bool(row and row[0] == "1")


def fill(tmp: Path, name: str, data_version: str, build: Callable[[sqlite3.Connection], Dict[str, object]]
         ) -> Dict[str, object]:
    """Run ``build`` on the new database ``tmp``, mark it complete, commit and fsync it."""
    conn = sqlite3.connect(str(tmp))
    try:
        conn.execute("PRAGMA journal_mode = OFF")
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("CREATE TABLE index_meta (key TEXT PRIMARY KEY, value TEXT)")
        figures = build(conn) or {}
        conn.executemany("INSERT INTO index_meta VALUES (?, ?)",
                         [("name", name), ("data_version", data_version), ("complete", "1")])
        conn.commit()
    finally:
        conn.close()
    with open(tmp, "rb") as fh:
        os.fsync(fh.fileno())
    return figures


# A build named "module:function" runs in a child process: its peak (the whole data set in Python
# objects, 100-250 MB) and what the allocator keeps afterwards never stay in a gunicorn worker.
_CHILD = """\
import importlib, json, sys
from pathlib import Path
from tq_mw_thehive.enrichment.offline_index import fill
module, _, function = sys.argv[1].partition(":")
figures = fill(Path(sys.argv[2]), sys.argv[3], sys.argv[4], getattr(importlib.import_module(module), function))
sys.stdout.write(json.dumps(figures, default=str))
"""


def _fill_in_child(tmp: Path, name: str, data_version: str, build: str) -> Dict[str, object]:
    import json
    import subprocess
    import sys

    import tq_mw_thehive
    env = dict(os.environ)
    here = str(Path(tq_mw_thehive.__file__).resolve().parent.parent)   # this very package, wherever it is
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    done = subprocess.run([sys.executable, "-c", _CHILD, build, str(tmp), name, data_version],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, cwd=str(tmp.parent))
    if done.returncode != 0:
        lines = [line for line in done.stderr.strip().splitlines() if line.strip()]
        raise RuntimeError(lines[-1] if lines else f"the build exited with {done.returncode}")
    try:
        return json.loads(done.stdout or "{}")
    except ValueError:
        return {}


def ensure(name: str, data_version: str,
           build: Union[str, Callable[[sqlite3.Connection], Dict[str, object]]]) -> Path:
    """The path of index ``name`` for ``data_version``, built with ``build(connection)`` if missing.

    ``build`` fills a fresh database (it may return figures to log); given as ``"module:function"``
    it runs in a child process (the way the plugins use it), else in this one. The result is marked
    complete and moved into place. Safe against concurrent builders (processes or threads): one
    builds, the others wait for it.
    """
    folder = directory()
    path = folder / _file_name(name, data_version)
    if _complete(path):
        return path
    lock_fd = os.open(folder / f".{name}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        if path.exists() and not _complete(path):
            log.warning("offline index %s is unreadable or incomplete; rebuilding it", path)
        if _complete(path):
            return path
        for stale in folder.glob(f".{name}-*.tmp"):   # a builder killed midway (we hold the lock)
            stale.unlink()
        tmp = folder / f".{name}-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp"
        started = time.monotonic()
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            os.close(fd)
            figures = (_fill_in_child(tmp, name, data_version, build) if isinstance(build, str)
                       else fill(tmp, name, data_version, build))
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        log.info("offline index %s built in %.1f s: %s (%.1f MB) %s", name, time.monotonic() - started, path,
                 path.stat().st_size / 1e6, " ".join(f"{k}={v}" for k, v in figures.items()))
        for old in folder.glob(f"{name}-*.sqlite"):
            if old != path:
                try:
                    old.unlink()            # a process still reading it keeps its open file
                except OSError:
                    pass
        return path
    finally:
        fcntl.flock(lock_fd, fcntl.LOCK_UN)
        os.close(lock_fd)
