"""Shared fixtures: a real S3 API endpoint (moto in server mode) on 127.0.0.1, and a storage root
parametrised over that endpoint and a local directory, so data tests run against both.

Platform code reaches the endpoint only through the standard AWS_ENDPOINT_URL override, exactly as
it would reach AWS S3 or MinIO.

Two tiers. A test that starts a server, a process or Ray (itself or through a fixture) carries
`@pytest.mark.integration` (`slow` and `multinode` tests get it automatically); the fast tier is
`pytest -m "not integration"`. The guard below keeps that tier honest: while an unmarked test runs
(its setup and call), opening an INET/INET6 socket (connect, connect_ex, bind through Python's
`socket` module) or starting a process (subprocess.Popen, multiprocessing/torch.multiprocessing
Process.start, os.fork/forkpty, os.posix_spawn[p], os.system, _posixsubprocess.fork_exec) fails the
test, naming it and the fix; so does requesting one of the service fixtures (SERVICE_FIXTURES).
Only the test's own thread and threads started during it are watched (an earlier test's leftover
server threads are not the current test's doing). What it cannot see: sockets and processes that
C/C++ code opens on its own, e.g. torch.distributed's TCPStore (gloo/DeepSpeed init_process_group
with world size 1), gRPC inside Ray, or a forkserver that is already running. Such single-process
tests may stay in the fast tier when they are fast; anything that spawns ranks is integration.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import sysconfig
import threading
import traceback
import uuid

import pytest

# As infra/test.sh sets it, for a plain `python -m pytest` too (before any test imports torch): tiny
# models, one intra-op thread; more only spin against each other and other processes on a small machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")

BUCKET = "advflow-test"
FAKE_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


# --- the fast-tier guard -------------------------------------------------------------------------

INTEGRATION = "integration"
# The fixtures here that start a service (or need one running): an unmarked test requesting any of
# them fails at once, whatever the order of the tests (a session-scoped server started by an earlier
# test would otherwise go unseen until the test talks to it).
SERVICE_FIXTURES = frozenset({"moto_endpoint", "s3_env", "s3_prefix", "mlflow_server", "mlflow_env", "postgres"})
FIX = "mark it @pytest.mark.integration (the fast tier, -m 'not integration', starts no server, process or Ray)"
TESTS = os.path.dirname(os.path.abspath(__file__))
STDLIB = sysconfig.get_paths()["stdlib"] + os.sep  # skipped when naming where it happened (socket.py, subprocess.py)
# Libraries' one-time probes that start a process once per process (their result is cached), not a
# service: the stdlib's platform.processor() (`uname -p`) and matplotlib's font list (`fc-list`).
PROBES = (STDLIB + "platform.py", os.path.join("matplotlib", "font_manager.py"))


class IntegrationOnly(RuntimeError):
    """Raised where an unmarked test opens a socket or starts a process."""


class _GuardState:
    """Shared by every copy of this conftest in the process (pytester's in-process runs load it
    again as a new module), so nested sessions see one stack of running phases."""

    def __init__(self):
        self.stack: list[dict] = []  # one frame per running setup/call phase, innermost last

    def check(self, what: str) -> None:
        if not self.stack:
            return
        frame = self.stack[-1]
        if frame["allowed"]:
            return
        thread = threading.current_thread()
        if thread is not frame["runner"] and thread in frame["before"]:
            return  # a thread that was already running before this test: not this test's doing
        stack = traceback.extract_stack()
        if any(f.filename.endswith(PROBES) for f in stack):
            return
        stack = [f for f in stack if f.filename != __file__ and not f.filename.startswith(STDLIB)]
        where = ""
        if stack:
            where = f" at {_short(stack[-1])}"
            ours = [f for f in stack if f.filename.startswith(TESTS) and f is not stack[-1]]
            if ours:
                where += f" (from {_short(ours[-1])})"
        message = f"{frame['nodeid']} {what}{where}, but it is not marked integration: {FIX}"
        frame["violations"].append(message)
        raise IntegrationOnly(message)


def _short(frame) -> str:
    name = frame.filename
    for root in (os.path.dirname(TESTS), *sys.path):
        if root and name.startswith(root + os.sep):
            name = name[len(root) + 1:]
            break
    return f"{name}:{frame.lineno}"


def _install_guard() -> _GuardState:
    existing = getattr(socket.socket.connect, "_advflow_guard", None)
    if existing is not None:
        return existing
    state = _GuardState()

    def wrap(owner, name, describe):
        original = getattr(owner, name, None)
        if original is None:
            return

        def guarded(*args, **kwargs):
            what = describe(*args, **kwargs)
            if what:
                state.check(what)
            return original(*args, **kwargs)

        guarded._advflow_guard = state
        guarded.__wrapped__ = original
        guarded.__name__ = getattr(original, "__name__", name)
        setattr(owner, name, guarded)

    def inet(verb):
        def describe(sock, address=None, *args, **kwargs):
            if sock.family in (socket.AF_INET, socket.AF_INET6):
                return f"opened an INET socket ({verb} {address!r})"
            return None
        return describe

    for verb in ("connect", "connect_ex", "bind"):
        wrap(socket.socket, verb, inet(verb))
    wrap(subprocess.Popen, "__init__",
         lambda self, *a, **k: f"started a process ({a[0] if a else k.get('args')!r})")
    import multiprocessing.process

    wrap(multiprocessing.process.BaseProcess, "start",
         lambda self: f"started a process (multiprocessing {type(self).__name__} {self.name})")
    for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system"):
        wrap(os, name, lambda *a, _n=name, **k: f"started a process (os.{_n})")
    try:
        import _posixsubprocess
    except ImportError:
        pass
    else:
        wrap(_posixsubprocess, "fork_exec", lambda *a, **k: "started a process (_posixsubprocess.fork_exec)")
    return state


_GUARD = _install_guard()


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items):
    """`slow` and `multinode` tests are integration tests too (before -m deselects anything)."""
    for item in items:
        if item.get_closest_marker("slow") or item.get_closest_marker("multinode"):
            if not item.get_closest_marker(INTEGRATION):
                item.add_marker(INTEGRATION)


_THREADS_BEFORE = pytest.StashKey[set]()  # the threads alive when the test's setup began


def _guarded(item):
    allowed = item.get_closest_marker(INTEGRATION) is not None
    before = item.stash.setdefault(_THREADS_BEFORE, set(threading.enumerate()))
    return {"nodeid": item.nodeid, "allowed": allowed, "runner": threading.current_thread(),
            "before": before, "violations": []}


def _run_guarded(item):
    frame = _guarded(item)
    _GUARD.stack.append(frame)
    result = None
    try:
        result = yield
    except BaseException as err:
        # IntegrationOnly by name: each conftest copy (pytester) has its own class. A higher-scoped
        # fixture that failed so re-raises its error in the later tests that use it.
        if not frame["violations"] and type(err).__name__ != IntegrationOnly.__name__:
            raise
        frame["violations"].append(str(err))
    finally:
        _GUARD.stack.remove(frame)
    if frame["violations"]:  # the guard's message, also where the code caught IntegrationOnly and went on
        pytest.fail(frame["violations"][0], pytrace=False)
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    if item.get_closest_marker(INTEGRATION) is None:
        used = sorted(SERVICE_FIXTURES.intersection(getattr(item, "fixturenames", ())))
        if used:
            pytest.fail(f"{item.nodeid} uses the service fixture(s) {', '.join(used)}, but it is not "
                        f"marked integration: {FIX}", pytrace=False)
    return (yield from _run_guarded(item))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    return (yield from _run_guarded(item))


@pytest.hookimpl(tryfirst=True)
def pytest_fixture_setup(fixturedef, request):
    """A service fixture reached through request.getfixturevalue (e.g. storage_root's s3 case)."""
    if fixturedef.argname in SERVICE_FIXTURES:
        frame = _GUARD.stack[-1] if _GUARD.stack else None
        if frame is not None and not frame["allowed"]:
            message = f"{frame['nodeid']} uses the service fixture {fixturedef.argname}, but it is not marked integration: {FIX}"
            frame["violations"].append(message)
            raise IntegrationOnly(message)


# --- fixtures ------------------------------------------------------------------------------------


def pytest_sessionstart(session):
    """moto's in-process mocks (mock_aws) reset moto's global backends when they exit, and the
    session's server below shares those backends: one such test would wipe the test bucket under
    every later S3 test. Tests reach moto through its server (the `s3_env` endpoint) instead."""
    try:
        import moto
    except ImportError:
        return

    def refuse(*args, **kwargs):
        raise RuntimeError("moto.mock_aws() would reset the shared moto server's state (the test "
                           "bucket included): use the s3_env fixture's endpoint_url instead")

    moto.mock_aws = refuse


@pytest.fixture(autouse=True)
def fresh_boto3_default_session(monkeypatch):
    """Each test starts without boto3's default session: `boto3.client(...)` keeps the credentials it
    first resolved in that process-wide session, so one test's (moto's fake keys) would otherwise be
    sent by every later test that relies on the environment (the stack's own keys)."""
    import boto3

    monkeypatch.setattr(boto3, "DEFAULT_SESSION", None)


@pytest.fixture(scope="session")
def moto_endpoint():
    """Start moto's S3-compatible server on a free loopback port; yield its URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    import boto3

    boto3.client("s3", endpoint_url=url, region_name="us-east-1", aws_access_key_id="testing",
                 aws_secret_access_key="testing").create_bucket(Bucket=BUCKET)
    yield url
    server.stop()


@pytest.fixture
def s3_env(moto_endpoint, monkeypatch):
    """Point the standard AWS variables at the test endpoint with fake credentials."""
    for key in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    for key, value in FAKE_ENV.items():
        monkeypatch.setenv(key, value)
    return moto_endpoint


@pytest.fixture
def s3_prefix(s3_env):
    """A fresh, empty s3:// prefix on the test endpoint."""
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.integration)])
def storage_root(request, tmp_path):
    """A fresh dataset prefix: a local directory, then an s3:// prefix on the test endpoint."""
    if request.param == "local":
        return str(tmp_path / "dataset")
    return request.getfixturevalue("s3_prefix")


@pytest.fixture(scope="session")
def mlflow_server(moto_endpoint, tmp_path_factory):
    """A real MLflow tracking server on 127.0.0.1: SQLite backend, artifacts proxied to the moto
    endpoint under s3://advflow-test/mlflow (the same endpoint the data tests use). Started as the
    stack starts it, so anonymous requests get 401: `handle.env` holds the admin credential
    (`mlflow_env` exports it), `services.mlflow_worker_env(handle)` the path of its 0600 file for
    Ray nodes (`mlflow_ray_env`)."""
    import os

    from advflow.infra.local import services

    with environ_set(FAKE_ENV):  # the server process inherits the fake credentials
        s3 = services.external_s3(moto_endpoint)
        handle = services.start_mlflow(tmp_path_factory.mktemp("mlflow"), s3=s3, bucket=BUCKET)
    yield handle
    handle.stop()


@pytest.fixture
def mlflow_env(mlflow_server, s3_env):
    """MLFLOW_TRACKING_URI pointing at the test server with its admin credential, as `advflow stack
    env` exports them (and the S3 variables of `s3_env`)."""
    import mlflow

    # Its own MonkeyPatch: a test's `monkeypatch.undo()` (of its own patches) must not log it out,
    # as it did not unset the tracking URI either (mlflow.set_tracking_uri keeps that).
    with pytest.MonkeyPatch.context() as mp:
        for key, value in mlflow_server.env.items():  # MLFLOW_TRACKING_URI, _USERNAME, _PASSWORD
            mp.setenv(key, value)
        mlflow.set_tracking_uri(mlflow_server.url)
        yield mlflow_server.url
        if mlflow.active_run():
            mlflow.end_run()


@contextlib.contextmanager
def mlflow_ray_env(mlflow_server):
    """While a test starts a local Ray (`ray.init()`), name the server's credentials file in the
    environment its raylet and workers inherit: the way the stack's head passes it, never the
    password itself (a runtime_env would show it in Ray's state API)."""
    from advflow.infra.local import services

    with environ_set(services.mlflow_worker_env(mlflow_server)):
        yield


@contextlib.contextmanager
def environ_set(env: dict[str, str]):
    """os.environ with `env` on top for the block (processes started in it inherit it), then as it was."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """The digits train split as local pixel shards (read-only: tests train from it, never write)."""
    from advflow.platform.data.prepare import PrepareConfig, prepare

    out = tmp_path_factory.mktemp("digits")
    prepare(PrepareConfig(source="digits", out=str(out), encoder="pixel", shard_records=512))
    return str(out)


@pytest.fixture(scope="session")
def postgres(tmp_path_factory):
    """A throw-away PostgreSQL server on 127.0.0.1 with the databases `mlflow` and `optuna`
    (advflow.infra.local.postgres: Debian's `postgresql` package, which infra/test.sh installs when
    missing). Its URLs carry a generated password: `postgres.url("optuna")`."""
    from advflow.infra.local.postgres import start_postgres

    with start_postgres(tmp_path_factory.mktemp("postgres"), databases=("mlflow", "optuna")) as server:
        yield server
