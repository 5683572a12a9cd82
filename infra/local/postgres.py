"""A throw-away PostgreSQL server on 127.0.0.1, for tests and local trials of the cluster's setup
(MLflow's backend store and Optuna's studies on one database server).

    from advflow.infra.local.postgres import start_postgres
    with start_postgres(tmp / "pg", databases=("mlflow", "optuna")) as pg:
        pg.url("mlflow")    # postgresql+psycopg2://advflow:<password>@127.0.0.1:<port>/mlflow

It uses Debian's server binaries (package `postgresql`): `initdb` into a fresh data directory with
a generated password (scram-sha-256, for TCP and the unix socket alike), then `postgres` listening
on 127.0.0.1 only, on a free port, with its unix socket inside the data directory. `stop()` shuts
the server down and deletes the data directory; the log (`<state_dir>/postgres.log`) stays.
The password is in the handle (and its URLs) only: never in argv, the log or any file that stays.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import signal
import subprocess
import tempfile
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

from advflow.infra.local.proc import (
    LOCALHOST,
    ServiceError,
    free_port,
    require_free_port,
    session_alive,
    spawn_detached,
    stop_session,
    wait_healthy,
)

BINDIR_ENV = "ADVFLOW_PG_BINDIR"
INSTALL_HINT = (f"install Debian's `postgresql` package (`apt-get install postgresql`; infra/test.sh does it "
                f"when it may), or set {BINDIR_ENV} to the folder holding initdb and postgres")
# Linux caps an AF_UNIX socket path at 107 bytes; PostgreSQL's socket is <dir>/.s.PGSQL.<port>.
_SOCKET_PATH_MAX = 107
_SOCKET_NAME_MAX = len("/.s.PGSQL.65535")


@dataclass
class PostgresServer:
    """A running throw-away server. ``url(db)`` and ``urls`` carry the password; ``redacted(db)``
    is the form to print."""

    port: int
    user: str
    password: str = field(repr=False)
    databases: tuple[str, ...]
    data_dir: Path
    log_path: Path
    pid: int  # the postmaster, leader of its own session
    run_as: str  # the OS user the server runs as
    host: str = LOCALHOST
    _root: Path | None = field(default=None, repr=False)  # removed by stop(): data dir and all
    _popen: subprocess.Popen | None = field(default=None, repr=False, compare=False)

    def url(self, database: str, driver: str | None = "psycopg2") -> str:
        """``postgresql+psycopg2://...``: the driver named, because a bare ``postgresql://`` means
        SQLAlchemy's default driver, psycopg (3) since SQLAlchemy 2.1, while the ``postgres`` extra
        installs psycopg2. ``driver=None`` gives the bare form."""
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return f"{scheme}://{self.user}:{self.password}@{self.host}:{self.port}/{database}"

    @property
    def urls(self) -> dict[str, str]:
        return {db: self.url(db) for db in self.databases}

    def redacted(self, database: str, driver: str | None = "psycopg2") -> str:
        return self.url(database, driver).replace(f":{self.password}@", ":***@", 1)

    def connect(self, database: str = "postgres"):
        """A psycopg2 connection (autocommit) as the server's user."""
        psycopg2 = _psycopg2()
        conn = psycopg2.connect(host=self.host, port=self.port, user=self.user, password=self.password,
                                dbname=database, connect_timeout=5)
        conn.autocommit = True
        return conn

    def alive(self) -> bool:
        return session_alive(self.pid)

    def stop(self, grace_s: float = 20.0) -> bool:
        """Fast shutdown (SIGINT: open sessions are ended, not waited for), then delete the data
        directory. True if the server was running."""
        was_running = self.alive()
        if was_running:
            try:
                os.kill(self.pid, signal.SIGINT)
            except ProcessLookupError:
                pass
            # stop_session only escalates (SIGTERM, SIGKILL) if the server is still up after grace_s.
            stop_session(self.pid, grace_s)
        if self._popen is not None:
            self._popen.wait(timeout=5)
        if self._root is not None:
            shutil.rmtree(self._root, ignore_errors=True)
        return was_running

    def __enter__(self) -> PostgresServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def find_bindir() -> Path:
    """The folder holding PostgreSQL's initdb and postgres: $ADVFLOW_PG_BINDIR, `pg_config --bindir`,
    the newest /usr/lib/postgresql/<version>/bin (Debian's layout), or PATH."""
    def usable(folder) -> bool:
        return all(os.access(Path(folder) / exe, os.X_OK) for exe in ("initdb", "postgres"))

    if os.environ.get(BINDIR_ENV):
        folder = Path(os.environ[BINDIR_ENV])
        if not usable(folder):
            raise ServiceError(f"{BINDIR_ENV}={folder}: no executable initdb and postgres there; point it at "
                               "PostgreSQL's server binaries (`pg_config --bindir`) or unset it")
        return folder
    candidates: list[str] = []
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True)
        candidates += [out.stdout.strip()] if out.returncode == 0 else []
    # Debian installs the server outside PATH (only its wrappers are in /usr/bin): newest version first.
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                         key=lambda p: [int(x) if x.isdigit() else 0 for x in Path(p).parent.name.split(".")],
                         reverse=True)
    if shutil.which("initdb"):
        candidates.append(str(Path(shutil.which("initdb")).parent))
    for folder in candidates:
        if folder and usable(folder):
            return Path(folder)
    raise ServiceError(f"PostgreSQL's server binaries (initdb, postgres) were not found (looked in "
                       f"{', '.join(candidates) or 'pg_config, /usr/lib/postgresql/*/bin and PATH'}): {INSTALL_HINT}")


def start_postgres(
    state_dir: Path,
    port: int | None = None,
    *,
    databases: tuple[str, ...] = ("mlflow", "optuna"),
    user: str = "advflow",
    run_as: str | None = None,
    timeout_s: float = 60.0,
) -> PostgresServer:
    """Create a fresh cluster and start it on 127.0.0.1:``port`` (None: a free port); create
    ``databases`` owned by ``user``, whose password is generated.

    PostgreSQL refuses to run as root. Run by root, the server runs as ``run_as``: default the
    `postgres` user Debian's package creates, else `nobody`; its data directory is owned by that
    user. It is dropped to with `setpriv`, which execs the server itself (no PAM session, no `su`
    process in between), so the pid we hold is the postmaster's and our signals reach it.
    """
    state_dir = Path(state_dir).resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    bindir = find_bindir()
    _psycopg2()  # fail before anything starts when the client driver is missing
    if port is None:
        port = free_port()
    else:
        require_free_port(port, "PostgreSQL", "start_postgres(port=...)")
    drop, run_as, uid, gid = _privilege_drop(run_as)

    # The server's folder: <state_dir>/pg, unless the server's user cannot reach state_dir (root's
    # pytest folders are 0700); then a private folder under /tmp. Either is deleted by stop().
    if drop and subprocess.run([*drop, "test", "-x", str(state_dir)], cwd="/").returncode != 0:
        root = Path(tempfile.mkdtemp(prefix="advflow-pg-"))
    else:
        root = state_dir / "pg"
        if root.exists():
            raise ServiceError(f"{root} exists already: start_postgres makes a throw-away server in a fresh "
                               "folder; remove it or pass another state_dir")
        root.mkdir()
    os.chmod(root, 0o700)
    if drop:
        os.chown(root, uid, gid)
    data_dir = root / "data"
    log_path = state_dir / "postgres.log"
    password = secrets.token_hex(16)  # hex: nothing in it needs quoting in a URL
    try:
        _initdb(bindir, drop, root, data_dir, user, password, uid, gid)
        sockets = str(data_dir) if len(str(data_dir)) + _SOCKET_NAME_MAX <= _SOCKET_PATH_MAX else ""
        argv = [
            *drop, str(bindir / "postgres"), "-D", str(data_dir), "-p", str(port),
            "-c", f"listen_addresses={LOCALHOST}",
            # Inside the 0700 data dir, so only the server's user (and root) can reach it; "" (no
            # socket, TCP only) when the path would be too long for AF_UNIX.
            "-c", f"unix_socket_directories={sockets}",
            # A throw-away server: crash safety buys nothing here, and fsyncs are slow on busy CI disks.
            "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
            "-c", "shared_buffers=32MB",
        ]  # fmt: skip
        # A bare environment: the server needs none of the caller's variables (S3 keys among them).
        popen = spawn_detached(argv, log_path, _server_env(), Path("/"))
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    server = PostgresServer(port=port, user=user, password=password, databases=tuple(databases),
                            data_dir=data_dir, log_path=log_path, pid=popen.pid, run_as=run_as,
                            _root=root, _popen=popen)
    try:
        wait_healthy(f"PostgreSQL on {LOCALHOST}:{port}", lambda: _probe(server), timeout_s, log_path, popen.pid)
        psycopg2 = _psycopg2()
        # closing(), not `with conn`: psycopg2's connection context is a transaction even in
        # autocommit mode, and CREATE DATABASE refuses to run inside one.
        with closing(server.connect()) as conn, conn.cursor() as cur:
            for db in databases:
                cur.execute(psycopg2.sql.SQL("CREATE DATABASE {}").format(psycopg2.sql.Identifier(db)))
    except BaseException:
        server.stop(grace_s=5.0)
        raise
    return server


def _initdb(bindir: Path, drop: list[str], root: Path, data_dir: Path, user: str, password: str,
            uid: int, gid: int) -> None:
    """initdb with the password from a 0600 file that lives only for the call (initdb reads it by
    name; a pipe as /dev/stdin cannot be opened once setpriv has changed the user)."""
    pwfile = root / "pwfile"
    pwfile.touch(mode=0o600)
    try:
        if drop:
            os.chown(pwfile, uid, gid)
        pwfile.write_text(password + "\n")
        out = subprocess.run(
            [*drop, str(bindir / "initdb"), "-D", str(data_dir), "-U", user, f"--pwfile={pwfile}",
             "--auth=scram-sha-256", "--encoding=UTF8", "--locale=C", "--no-sync"],
            cwd="/", env=_server_env(), capture_output=True, text=True,
        )  # fmt: skip
    finally:
        pwfile.unlink(missing_ok=True)
    if out.returncode != 0:
        raise ServiceError(f"initdb into {data_dir} failed (exit {out.returncode}); its output:\n"
                           f"{(out.stdout + out.stderr)[-3000:]}\nCheck that the folder is writable by the "
                           f"server's user and that the disk has room; a broken install: {INSTALL_HINT}")


def _privilege_drop(run_as: str | None) -> tuple[list[str], str, int, int]:
    """(argv prefix, user name, uid, gid) the server runs as: no prefix unless we are root."""
    me = pwd.getpwuid(os.geteuid())
    if os.geteuid() != 0:
        if run_as and run_as != me.pw_name:
            raise ServiceError(f"run_as={run_as!r}: only root can start the server as another user; "
                               "leave run_as unset")
        return [], me.pw_name, me.pw_uid, me.pw_gid
    names = [run_as] if run_as else ["postgres", "nobody"]
    for name in names:
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            continue
        if entry.pw_uid == 0:
            raise ServiceError(f"run_as={name!r} is root; PostgreSQL refuses to run as root: name an unprivileged user")
        if not shutil.which("setpriv"):
            raise ServiceError("running as root, the server must drop to an unprivileged user, but `setpriv` "
                               "is missing: install Debian's util-linux package, or run as a non-root user")
        drop = ["setpriv", f"--reuid={entry.pw_uid}", f"--regid={entry.pw_gid}", "--clear-groups"]
        return drop, name, entry.pw_uid, entry.pw_gid
    raise ServiceError(f"no user {' or '.join(names)} on this machine to run PostgreSQL as (it refuses root): "
                       "pass run_as= an existing unprivileged user")


def _server_env() -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C"}


def _probe(server: PostgresServer) -> str | None:
    try:
        server.connect().close()
    except _psycopg2().OperationalError as exc:
        return str(exc).strip().splitlines()[0] if str(exc).strip() else "not accepting connections"
    return None


def _psycopg2():
    try:
        import psycopg2
        import psycopg2.sql
    except ImportError as exc:
        raise ServiceError("psycopg2 is missing (the PostgreSQL driver MLflow, Optuna and this module use): "
                           "pip install -e '.[postgres]'") from exc
    return psycopg2

