"""A real, throwaway PostgreSQL server for tests and benchmarks.

Why: the state database is getting a PostgreSQL backend, and the state suites run against a real
server, not a mock: the SQL, the transactions and the connection failures are PostgreSQL's own.
CI (``.ci/run``) installs Debian's ``postgresql`` package, whose server binaries live in
``/usr/lib/postgresql/<major>/bin`` (not on PATH); :func:`find_bin_dir` finds them.

``with PostgresServer(tmp_path) as pg: pg.url`` runs ``initdb`` into ``tmp_path/data`` (trust
authentication, no fsync: nothing here is worth keeping) and starts the server on 127.0.0.1 only,
on a free port, with its Unix socket in ``tmp_path/sock`` and its log in ``tmp_path/postgres.log``.
:meth:`PostgresServer.schema_url` gives each test its own schema in one server, cheaper than a
database per test; :meth:`PostgresServer.kill` and :meth:`PostgresServer.start` make PostgreSQL
unreachable and bring it back (same port, same data) for fault tests.

Root: ``initdb`` and ``postgres`` refuse to run as root. When the process runs as root (CI
containers), every command runs as the ``postgres`` system user (``runuser -u postgres --``, or
``su postgres -s /bin/sh -c`` where runuser is missing), ``base_dir`` and its ``data``/``sock``
directories are chowned to that user, and each ancestor of ``base_dir`` that others cannot traverse
gets ``o+x`` (traverse, not list): pytest's ``/tmp/pytest-of-root`` and ``pytest-<n>`` are
created 0700, and the postgres user must reach ``base_dir``. pytest sets its own root dir back to
0700 at the next session; other ancestors keep the added bit, so as root give a ``base_dir`` under
a temporary directory.
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import socket
import stat
import subprocess
from pathlib import Path
from typing import List, Optional
from urllib.parse import quote

PG_USER = "postgres"            # both the system user (as root) and the database superuser
SYSTEM_USER = "postgres"
_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}\Z")
_INITDB_TIMEOUT = 180
_PG_CTL_WAIT = 60               # pg_ctl -t: how long pg_ctl waits for the server
_PG_CTL_TIMEOUT = _PG_CTL_WAIT + 30
_CONNECT_TIMEOUT = 10
_UNIX_SOCKET_MAX = 100          # sun_path is 108 bytes on Linux, with "/.s.PGSQL.<port>" on the end


class PostgresUnavailable(RuntimeError):
    """initdb or the server's start failed; the message ends with the tail of the log."""


def _has_initdb(directory: Path) -> bool:
    return (directory / "initdb").is_file() and (directory / "pg_ctl").is_file()


def find_bin_dir() -> Optional[Path]:
    """The directory with ``initdb`` and ``pg_ctl``: ``$TQ_PG_BIN``; else ``pg_config --bindir``
    when it holds initdb; else the highest ``/usr/lib/postgresql/<major>/bin`` (Debian); else the
    directory of ``initdb`` on PATH. None when there is none."""
    explicit = os.environ.get("TQ_PG_BIN")
    if explicit:
        return Path(explicit)
    pg_config = shutil.which("pg_config")
    if pg_config:
        try:
            out = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, timeout=10,
                                 check=False)
        except (OSError, subprocess.SubprocessError):
            out = None
        if out is not None and out.returncode == 0 and out.stdout.strip():
            candidate = Path(out.stdout.strip())
            if _has_initdb(candidate):
                return candidate
    versions = []
    for candidate in Path("/usr/lib/postgresql").glob("*/bin"):
        if _has_initdb(candidate):
            key = tuple(int(part) if part.isdigit() else -1 for part in candidate.parent.name.split("."))
            versions.append((key, candidate))
    if versions:
        return max(versions)[1]
    initdb = shutil.which("initdb")
    if initdb:
        found = Path(initdb).parent
        # a symlink alone on PATH (/usr/local/bin/initdb -> .../bin/initdb): the directory with pg_ctl too
        return found if _has_initdb(found) else Path(initdb).resolve().parent
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text.splitlines()[-lines:])


class PostgresServer:
    """``with PostgresServer(base_dir) as pg:`` a PostgreSQL server on 127.0.0.1, ``pg.url``."""

    def __init__(self, base_dir: Path, bin_dir: Optional[Path] = None) -> None:
        self.base_dir = Path(base_dir).absolute()
        self.data_dir = self.base_dir / "data"
        self.sock_dir = self.base_dir / "sock"
        self.log_path = self.base_dir / "postgres.log"
        self.bin_dir = Path(bin_dir) if bin_dir is not None else None
        self.port: Optional[int] = None     # chosen at the first start, kept across restarts
        self._as_root = os.geteuid() == 0

    # -- commands ------------------------------------------------------------------------------

    def _bin(self, name: str) -> str:
        if self.bin_dir is None:
            self.bin_dir = find_bin_dir()
        if self.bin_dir is None:
            raise PostgresUnavailable("PostgreSQL server binaries not found (apt-get install postgresql, "
                                      "or set TQ_PG_BIN to the directory holding initdb and pg_ctl)")
        path = self.bin_dir / name
        if not path.is_file():
            raise PostgresUnavailable(f"{path} not found (TQ_PG_BIN or the PostgreSQL install is wrong)")
        return str(path)

    def _command(self, argv: List[str]) -> List[str]:
        """``argv`` as the postgres system user when running as root, else as is."""
        if not self._as_root:
            return argv
        runuser = shutil.which("runuser")
        if runuser:
            return [runuser, "-u", SYSTEM_USER, "--", *argv]
        return ["su", SYSTEM_USER, "-s", "/bin/sh", "-c", shlex.join(argv)]

    def _run(self, argv: List[str], timeout: float) -> subprocess.CompletedProcess:
        # cwd: base_dir, which the postgres user can enter (the caller's cwd may be root's own)
        return subprocess.run(self._command(argv), cwd=str(self.base_dir), capture_output=True, text=True,
                              timeout=timeout, check=False, stdin=subprocess.DEVNULL)

    # -- directories and ownership ----------------------------------------------------------------

    def _prepare_dirs(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        for directory in (self.data_dir, self.sock_dir):
            directory.mkdir(mode=0o700, exist_ok=True)
        if not self._as_root:
            return
        import pwd
        try:
            entry = pwd.getpwnam(SYSTEM_USER)
        except KeyError:
            raise PostgresUnavailable(f"running as root and there is no {SYSTEM_USER!r} system user to run "
                                      "PostgreSQL as (initdb refuses root)") from None
        for path in (self.base_dir, self.data_dir, self.sock_dir):
            os.chown(path, entry.pw_uid, entry.pw_gid)
        if self.log_path.exists():
            os.chown(self.log_path, entry.pw_uid, entry.pw_gid)
        # The postgres user must traverse every ancestor: add o+x (not o+r) where it is missing.
        for ancestor in self.base_dir.parents:
            mode = ancestor.stat().st_mode
            if not mode & stat.S_IXOTH:
                os.chmod(ancestor, stat.S_IMODE(mode) | stat.S_IXOTH)

    # -- life cycle --------------------------------------------------------------------------

    @property
    def _initialised(self) -> bool:
        return (self.data_dir / "PG_VERSION").is_file()

    def _initdb(self) -> None:
        argv = [self._bin("initdb"), "-D", str(self.data_dir), "-U", PG_USER, "--auth-local=trust",
                "--auth-host=trust", "--no-sync", "-E", "UTF8", "--locale=C"]
        try:
            done = self._run(argv, _INITDB_TIMEOUT)
        except subprocess.TimeoutExpired as exc:
            raise PostgresUnavailable(f"initdb timed out after {_INITDB_TIMEOUT}s") from exc
        if done.returncode != 0:
            output = "\n".join((done.stdout + done.stderr).splitlines()[-30:])
            raise PostgresUnavailable(f"initdb failed (exit {done.returncode}):\n{output}")
        # Trust local connections and 127.0.0.1 only (initdb's --auth-host also trusts ::1).
        hba = self.data_dir / "pg_hba.conf"
        hba.write_text("# tq_mw_thehive.testing.postgres: a throwaway test server\n"
                       "local all all trust\n"
                       "host  all all 127.0.0.1/32 trust\n", encoding="utf-8")
        if self._as_root:
            stat_data = self.data_dir.stat()
            os.chown(hba, stat_data.st_uid, stat_data.st_gid)

    def _server_options(self) -> str:
        sock = str(self.sock_dir)
        if len(f"{sock}/.s.PGSQL.{self.port}") > _UNIX_SOCKET_MAX:
            sock = ""                   # too long for a Unix socket: TCP only (the URL uses TCP anyway)
        settings = [("listen_addresses", "127.0.0.1"), ("port", str(self.port)),
                    ("unix_socket_directories", sock), ("fsync", "off"), ("synchronous_commit", "on"),
                    ("full_page_writes", "off"), ("max_connections", "200"), ("shared_buffers", "64MB")]
        # pg_ctl runs postgres through /bin/sh: quote each value for the shell
        return " ".join(f"-c {name}={shlex.quote(value)}" for name, value in settings)

    def start(self) -> "PostgresServer":
        """initdb (unless the data directory is already there), then start and wait for the server."""
        self._prepare_dirs()
        if not self._initialised:
            self._initdb()
        if self.port is None:
            self.port = _free_port()
        argv = [self._bin("pg_ctl"), "start", "-w", "-t", str(_PG_CTL_WAIT), "-D", str(self.data_dir),
                "-l", str(self.log_path), "-o", self._server_options()]
        try:
            done = self._run(argv, _PG_CTL_TIMEOUT)
        except subprocess.TimeoutExpired as exc:
            raise PostgresUnavailable(f"pg_ctl start timed out after {_PG_CTL_TIMEOUT}s; "
                                      f"{self.log_path}:\n{_tail(self.log_path)}") from exc
        if done.returncode != 0:
            raise PostgresUnavailable(f"pg_ctl start failed (exit {done.returncode}): "
                                      f"{(done.stdout + done.stderr).strip()}\n"
                                      f"{self.log_path}:\n{_tail(self.log_path)}")
        return self

    @property
    def running(self) -> bool:
        """pg_ctl status: whether a server runs on the data directory."""
        if not self._initialised:
            return False
        try:
            done = self._run([self._bin("pg_ctl"), "status", "-D", str(self.data_dir)], 30)
        except subprocess.TimeoutExpired:
            return False
        return done.returncode == 0

    def stop(self, mode: str = "fast") -> None:
        """``pg_ctl stop -m <mode> -w`` (smart, fast or immediate); nothing when it is not running."""
        if not self.running:
            return
        argv = [self._bin("pg_ctl"), "stop", "-m", mode, "-w", "-t", str(_PG_CTL_WAIT), "-D", str(self.data_dir)]
        done = self._run(argv, _PG_CTL_TIMEOUT)
        if done.returncode != 0 and self.running:
            raise PostgresUnavailable(f"pg_ctl stop -m {mode} failed (exit {done.returncode}): "
                                      f"{(done.stdout + done.stderr).strip()}")

    def kill(self) -> None:
        """Stop at once, as a crash would (``-m immediate``): PostgreSQL unreachable, for fault
        tests. :meth:`start` brings it back on the same port with the committed data."""
        self.stop("immediate")

    def __enter__(self) -> "PostgresServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        try:
            self.stop("immediate")
        except Exception:                   # already stopped, or gone: never hide the test's outcome
            pass

    # -- URLs, databases, schemas ----------------------------------------------------------------

    def _url(self, database: str) -> str:
        if self.port is None:
            raise RuntimeError("PostgresServer: not started")
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/{quote(database, safe='')}"

    @property
    def url(self) -> str:
        """``postgresql://postgres@127.0.0.1:<port>/postgres``."""
        return self._url("postgres")

    def _execute(self, statement) -> None:
        import psycopg
        with psycopg.connect(self.url, autocommit=True, connect_timeout=_CONNECT_TIMEOUT) as conn:
            conn.execute(statement)

    def create_database(self, name: str) -> str:
        """CREATE DATABASE ``name``; its URL."""
        from psycopg import sql
        self._execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self._url(name)

    def drop_database(self, name: str) -> None:
        from psycopg import sql
        self._execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))

    def schema_url(self, name: str) -> str:
        """Create schema ``name`` (lowercase letters, digits, _) in the ``postgres`` database; a URL
        whose connections have it as their ``search_path``: isolation without a database each."""
        from psycopg import sql
        if not _SCHEMA_NAME.match(name):
            raise ValueError(f"schema name {name!r}: lowercase letters, digits and _, at most 63, "
                             "not starting with a digit")
        self._execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(name)))
        return f"{self.url}?options={quote(f'-csearch_path={name}', safe='')}"

    def drop_schema(self, name: str) -> None:
        from psycopg import sql
        self._execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))
