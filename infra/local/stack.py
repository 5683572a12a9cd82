"""The local stack behind ``advflow stack up | down | status | env``.

Four services, all bound to 127.0.0.1, started detached so they outlive the CLI:

- ``s3``: moto's S3 server with every bucket kept on disk in ``<state dir>/s3``
  (``advflow.infra.local.s3_store``; ``--s3-memory``: plain in-memory moto), or the S3/MinIO
  endpoint already named by AWS_ENDPOINT_URL (then it is only health-checked and the bucket created);
- ``prometheus``: Prometheus scraping every Ray node's metrics endpoint (found through Ray's
  service-discovery file), its series kept in ``<state dir>/prometheus`` across ``down``/``up``;
  skipped with a warning when Debian's ``prometheus`` is not installed;
- ``ray``: a single-node Ray head with token authentication (RAY_AUTH_MODE=token), its dashboard
  pointed at that Prometheus (RAY_PROMETHEUS_HOST) for the Metrics view;
- ``mlflow``: an MLflow tracking server, SQLite backend, artifacts proxied to ``s3://BUCKET/mlflow``,
  anonymous requests refused (MLflow's basic-auth app; ``advflow.infra.local.mlflow_auth``).

State (``stack.json`` with pids, ports and URLs, never a secret), logs, the Ray token, the S3 key
and the MLflow admin credential (each a 0600 file), the S3 store and the SQLite dbs live in one
project-local directory (``./.advflow/stack``, or ``--state-dir`` /
ADVFLOW_STACK_DIR). Every command is idempotent: ``up`` keeps healthy services and starts only the
missing ones, ``down`` on a stopped stack only says so.

MLflow's db is bound to the S3 store its artifacts are in (``mlflow_artifacts.json``): when that
store is gone (an in-memory S3 stopped, a deleted store folder, another endpoint or bucket), the db
is moved aside with a message, never served pointing at artifacts that no longer exist. The single services come from ``advflow.infra.local.services``;
``up`` and ``down`` report progress through ``echo`` (default: this module's ``advflow.platform.log``
logger, "[advflow] ..." on stdout).
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import secrets
import shlex
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from importlib.util import find_spec
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from advflow.infra.local import mlflow_auth, services
from advflow.infra.local.proc import LOCALHOST, ServiceError, require_free_port
from advflow.infra.local.services import ServiceHandle
from advflow.platform.atomic import write_text
from advflow.platform.log import get_logger

log = get_logger(__name__)

STATE_DIR_ENV = "ADVFLOW_STACK_DIR"
DEFAULT_STATE_DIR = Path(".advflow") / "stack"
STATE_FILE = "stack.json"
S3_DATA_DIR = "s3"  # the persistent S3 store, under the state dir
MLFLOW_DB = "mlflow.db"
MLFLOW_BINDING = "mlflow_artifacts.json"  # which S3 store and bucket mlflow.db's artifacts are in
MLFLOW_PREFIX = "mlflow"
_TRUE = ("1", "true", "yes", "on")
# Start order; stop runs in reverse. Prometheus starts before Ray: the head's dashboard is told
# its URL (RAY_PROMETHEUS_HOST) at start, and Prometheus only reads a file until Ray writes it.
SERVICE_ORDER = ("s3", "prometheus", "ray", "mlflow")
OPTIONAL = ("prometheus",)
"""Services `up` skips, with a warning, when their program is not installed (the stack still
trains and tracks without live metrics)."""


@dataclass(frozen=True)
class PortOption:
    """One port the stack binds: which config field, which service, how a user changes it."""

    field: str
    service: str
    flag: str
    env_var: str
    default: int


# Defaults are the usual ports + 20000 (the dashboard agent's 52365 - 20000), so a developer's own
# Ray (6379/8265/10001/52365), MinIO (9000) or MLflow (5000) keeps running beside the stack. All
# stay outside Ray's worker port range (10002-19999) and Linux's ephemeral range (32768+).
PORT_OPTIONS: tuple[PortOption, ...] = (
    PortOption("ray_gcs_port", "the Ray head (GCS)", "--ray-gcs-port", "ADVFLOW_RAY_GCS_PORT", 26379),
    PortOption(
        "ray_dashboard_port",
        "the Ray dashboard / job API",
        "--ray-dashboard-port",
        "ADVFLOW_RAY_DASHBOARD_PORT",
        28265,
    ),
    PortOption(
        "ray_client_port", "the Ray client server", "--ray-client-port", "ADVFLOW_RAY_CLIENT_PORT", 30001
    ),
    PortOption(
        "ray_agent_port", "the Ray dashboard agent", "--ray-agent-port", "ADVFLOW_RAY_AGENT_PORT", 32365
    ),
    PortOption("s3_port", "the S3 endpoint (moto)", "--s3-port", "ADVFLOW_S3_PORT", 29000),
    PortOption("mlflow_port", "the MLflow tracking server", "--mlflow-port", "ADVFLOW_MLFLOW_PORT", 25000),
    PortOption("prometheus_port", "Prometheus", "--prometheus-port", "ADVFLOW_PROMETHEUS_PORT", 29090),
)
_PORTS_OF = {
    "s3": ("s3_port",),
    "ray": ("ray_gcs_port", "ray_dashboard_port", "ray_client_port", "ray_agent_port"),
    "mlflow": ("mlflow_port",),
    "prometheus": ("prometheus_port",),
}
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")


@dataclass
class StackConfig:
    """Settings of one local stack. Build it with ``StackConfig.resolve`` (flags > env > defaults)."""

    state_dir: Path
    """Where state, logs, the Ray token and the MLflow SQLite db live (absolute after resolve)."""
    ray_gcs_port: int = 26379
    ray_dashboard_port: int = 28265
    """RAY_API_SERVER_ADDRESS (for `ray job submit`) is http://127.0.0.1:<this port>."""
    ray_client_port: int = 30001
    ray_agent_port: int = 32365
    s3_port: int = 29000
    """Port of the moto server; unused when ``s3_endpoint`` is set."""
    mlflow_port: int = 25000
    prometheus_port: int = 29090
    """Prometheus (scrapes Ray's metrics endpoints; Ray's dashboard reads it: RAY_PROMETHEUS_HOST)."""
    s3_endpoint: str | None = None
    """An existing S3/MinIO endpoint to use instead of moto (default: AWS_ENDPOINT_URL)."""
    s3_memory: bool = False
    """Plain in-memory moto instead of the on-disk store: ``down`` drops every bucket (and moves
    mlflow.db aside). For throw-away stacks (--s3-memory / ADVFLOW_S3_MEMORY=1)."""
    bucket: str = "advflow"
    """Bucket for data, checkpoints and MLflow artifacts (exported as ADVFLOW_BUCKET)."""
    num_cpus: int = 2
    """CPUs the Ray head advertises."""
    object_store_mb: int = 512
    """Ray object store size in MiB."""
    timeout_s: float = 240.0
    """Start-up health-check budget per `up`, seconds."""

    def validate(self) -> StackConfig:
        """Raise ValueError naming the field and the fix; return self."""
        for option in PORT_OPTIONS:
            port = getattr(self, option.field)
            if not isinstance(port, int) or not 1024 <= port <= 65535:
                raise ValueError(
                    f"{option.field}={port!r} is not a usable port; pass an integer in 1024-65535 "
                    f"with {option.flag} or {option.env_var}"
                )
        used: dict[int, str] = {}
        for option in PORT_OPTIONS:
            port = getattr(self, option.field)
            if option.field == "s3_port" and self.s3_endpoint:
                continue
            if port in used:
                raise ValueError(
                    f"{option.field} and {used[port]} are both {port}; give {option.flag} "
                    "a different port"
                )
            used[port] = option.field
        if not _BUCKET_RE.match(self.bucket):
            raise ValueError(
                f"bucket={self.bucket!r} is not a valid S3 bucket name; use 3-63 lowercase "
                "letters, digits, '.' or '-' (--bucket or ADVFLOW_BUCKET)"
            )
        if self.num_cpus < 1:
            raise ValueError(f"num_cpus={self.num_cpus} must be >= 1 (--num-cpus)")
        if self.object_store_mb < 80:
            raise ValueError(
                f"object_store_mb={self.object_store_mb} is below Ray's minimum; use >= 80 "
                "(--object-store-mb)"
            )
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s={self.timeout_s} must be > 0 (--timeout)")
        if self.s3_memory and self.s3_endpoint:
            raise ValueError(
                f"s3_memory (--s3-memory) applies to the stack's own moto server, but s3_endpoint="
                f"{self.s3_endpoint!r} (--s3-endpoint or AWS_ENDPOINT_URL) replaces it; drop one"
            )
        if not self.s3_endpoint and any(find_spec(m) is None for m in ("moto", "werkzeug")):
            raise ValueError(
                "the stack's S3 endpoint is moto's server, which is not installed: pip install "
                "'advflow[stack]' (infra/venv.sh does), or use an existing S3/MinIO endpoint with "
                "--s3-endpoint URL"
            )
        if self.s3_endpoint and not self.s3_endpoint.startswith(("http://", "https://")):
            raise ValueError(
                f"s3_endpoint={self.s3_endpoint!r} must be an http(s):// URL (--s3-endpoint or "
                "AWS_ENDPOINT_URL)"
            )
        return self

    @classmethod
    def resolve(
        cls, overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
    ) -> StackConfig:
        """Config from explicit ``overrides`` (CLI flags; None = unset), then env vars, then defaults.

        AWS_ENDPOINT_URL selects an external S3 endpoint unless it is this stack's own moto URL
        (left in the shell by an earlier ``eval "$(advflow stack env)"``).
        """
        overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {"state_dir": resolve_state_dir(overrides.get("state_dir"), environ)}
        for option in PORT_OPTIONS:
            if option.field in overrides:
                values[option.field] = overrides[option.field]
            elif environ.get(option.env_var):
                raw = environ[option.env_var]
                try:
                    values[option.field] = int(raw)
                except ValueError:
                    raise ValueError(
                        f"{option.env_var}={raw!r} is not a port number; set an integer"
                    ) from None
        if "bucket" in overrides or environ.get("ADVFLOW_BUCKET"):
            values["bucket"] = overrides.get("bucket") or environ["ADVFLOW_BUCKET"]
        for name in ("num_cpus", "object_store_mb", "timeout_s"):
            if name in overrides:
                values[name] = overrides[name]
        if "s3_memory" in overrides:
            values["s3_memory"] = bool(overrides["s3_memory"])
        elif environ.get("ADVFLOW_S3_MEMORY"):
            values["s3_memory"] = environ["ADVFLOW_S3_MEMORY"].strip().lower() in _TRUE
        endpoint = overrides.get("s3_endpoint") or environ.get("AWS_ENDPOINT_URL") or None
        own_moto = f"http://{LOCALHOST}:{values.get('s3_port', cls.s3_port)}"
        if endpoint and "s3_endpoint" not in overrides and endpoint.rstrip("/") == own_moto:
            endpoint = None
        values["s3_endpoint"] = endpoint.rstrip("/") if endpoint else None
        return cls(**values).validate()

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["state_dir"] = str(self.state_dir)
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> StackConfig:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        values["state_dir"] = Path(values["state_dir"])
        return cls(**values)

    @property
    def s3_data_dir(self) -> Path:
        return self.state_dir / S3_DATA_DIR


def resolve_state_dir(
    explicit: str | os.PathLike | None = None, environ: Mapping[str, str] | None = None
) -> Path:
    """--state-dir, else ADVFLOW_STACK_DIR, else ./.advflow/stack; always absolute."""
    environ = os.environ if environ is None else environ
    chosen = explicit or environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR
    return Path(chosen).expanduser().resolve()


# ------------------------------------------------------------------------------------ state


@dataclass
class StackState:
    """What ``stack.json`` holds: the config the stack was started with and its services."""

    config: StackConfig
    services: dict[str, ServiceHandle] = field(default_factory=dict)
    earlier_boot: dict[str, ServiceHandle] = field(default_factory=dict)
    """Services recorded before the machine restarted: none of them runs, and their pids may now
    belong to unrelated processes, so they are never signalled."""


def boot_id() -> str | None:
    """This boot's id (Linux); pids recorded under another one mean nothing any more."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def load_state(state_dir: Path) -> StackState | None:
    path = Path(state_dir) / STATE_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except json.JSONDecodeError as exc:
        raise ServiceError(
            f"{path} is not valid JSON ({exc}); stop leftover services by hand and delete it"
        ) from exc
    handles = {name: ServiceHandle.from_record(rec) for name, rec in data["services"].items()}
    state = StackState(config=StackConfig.from_json(data["config"]))
    recorded_boot, current_boot = data.get("boot_id"), boot_id()
    if recorded_boot and current_boot and recorded_boot != current_boot:
        state.earlier_boot = handles
    else:
        state.services = handles
    return state


def save_state(state: StackState) -> None:
    """Write stack.json atomically (temp file + os.replace)."""
    path = state.config.state_dir / STATE_FILE
    payload = {
        "version": 1,
        "boot_id": boot_id(),
        "config": state.config.to_json(),
        "services": {name: handle.to_record() for name, handle in state.services.items()},
    }
    write_text(path, json.dumps(payload, indent=2) + "\n")


@contextmanager
def _locked(state_dir: Path) -> Iterator[None]:
    """Serialise up/down on one state dir, so two shells cannot start the stack twice."""
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------- up / down


def _job_env(config: StackConfig) -> dict[str, str]:
    """What every Ray job inherits through the head's environment (S3, MLflow, bucket).

    The S3 key and the MLflow password go as the paths of their credentials files, never as values:
    Ray's state API shows a job's runtime_env, and a value in the head's environment would reach
    every process it starts. (MLflow's file is written when MLflow starts, after the head: no job
    runs before `up` returns.)"""
    if config.s3_endpoint:
        s3_env = {"AWS_ENDPOINT_URL": config.s3_endpoint, "MLFLOW_S3_ENDPOINT_URL": config.s3_endpoint}
    else:
        from advflow.infra.local.s3_auth import profile_env

        url = f"http://{LOCALHOST}:{config.s3_port}"
        s3_env = {
            "AWS_ENDPOINT_URL": url,
            "MLFLOW_S3_ENDPOINT_URL": url,
            **profile_env(config.state_dir / services.S3_CREDENTIALS_FILE),
        }
    # Ray's dashboard (the head) reads these for its Metrics view; a Grafana the user runs is
    # passed on (RAY_GRAFANA_HOST), and `up` loads advflow's dashboards into it.
    # A finishing worker outlives three scrapes, so its last values reach Prometheus even when a
    # busy 2-core machine makes a scrape time out (tracking/live.py flush).
    monitoring = {"RAY_PROMETHEUS_HOST": f"http://{LOCALHOST}:{config.prometheus_port}",
                  "ADVFLOW_LIVE_LINGER_S": str(3 * services.SCRAPE_INTERVAL_S)}
    for name in ("RAY_GRAFANA_HOST", "RAY_GRAFANA_IFRAME_HOST"):
        if os.environ.get(name):
            monitoring[name] = os.environ[name]
    return {
        **s3_env,
        **monitoring,
        "MLFLOW_TRACKING_URI": f"http://{LOCALHOST}:{config.mlflow_port}",
        services.CREDENTIALS_FILE_ENV: str(config.state_dir / mlflow_auth.CREDENTIALS_FILE),
        "ADVFLOW_BUCKET": config.bucket,
    }


def _how_to_change(option: PortOption) -> str:
    return f"`advflow stack up {option.flag} PORT` (or {option.env_var})"


def _check_ports(config: StackConfig, names: list[str]) -> None:
    """Fail before anything starts when a port of a service about to start is taken."""
    by_field = {option.field: option for option in PORT_OPTIONS}
    for name in names:
        if name == "s3" and config.s3_endpoint:
            continue
        for port_field in _PORTS_OF[name]:
            option = by_field[port_field]
            require_free_port(getattr(config, port_field), option.service, _how_to_change(option))


def _spawn(
    name: str, config: StackConfig, s3: ServiceHandle | None, store: str
) -> ServiceHandle:
    state_dir = config.state_dir
    if name == "s3":
        if config.s3_endpoint:
            return services.external_s3(config.s3_endpoint, timeout_s=min(config.timeout_s, 30.0))
        if config.s3_memory:
            return services.start_moto(state_dir, config.s3_port, wait=False, store_id=store)
        return services.start_persistent_s3(
            state_dir, config.s3_data_dir, config.s3_port, wait=False
        )
    if name == "prometheus":
        sd_file = services.ray_service_discovery_file(services.ray_temp_dir(state_dir))
        return services.start_prometheus(state_dir, config.prometheus_port, sd_files=[sd_file], wait=False)
    if name == "ray":
        return services.start_ray_head(
            state_dir,
            config.ray_gcs_port,
            config.ray_dashboard_port,
            config.ray_client_port,
            config.ray_agent_port,
            num_cpus=config.num_cpus,
            object_store_mb=config.object_store_mb,
            job_env=_job_env(config),
            wait=False,
        )
    assert name == "mlflow" and s3 is not None, name
    # From here on the db may hold runs whose artifacts are in this store: record which one.
    _write_binding(config, store)
    return services.start_mlflow(
        state_dir, config.mlflow_port, s3=s3, bucket=config.bucket, prefix=MLFLOW_PREFIX, wait=False
    )


# ------------------------------------------------------------- MLflow's db and its artifacts


def _store_of(config: StackConfig, healthy: Mapping[str, ServiceHandle]) -> str:
    """Id of the S3 store MLflow's artifacts go to under this config: the running one's, else the
    one `up` is about to start (creating the on-disk store if there is none yet)."""
    if "s3" in healthy:
        handle = healthy["s3"]
        # A stack started before stores had ids ran plain moto in memory.
        return str(handle.info.get("store") or f"memory:legacy-{handle.pid}")
    if config.s3_endpoint:
        return f"external:{config.s3_endpoint}"
    if config.s3_memory:
        return f"memory:{secrets.token_hex(8)}"
    from advflow.infra.local.s3_store import ensure_store

    return f"disk:{ensure_store(config.s3_data_dir)}"


def _binding(config: StackConfig, store: str) -> dict[str, str]:
    return {"store": store, "artifacts": f"s3://{config.bucket}/{MLFLOW_PREFIX}"}


def _write_binding(config: StackConfig, store: str) -> None:
    write_text(config.state_dir / MLFLOW_BINDING, json.dumps(_binding(config, store), indent=2) + "\n")


def _read_binding(state_dir: Path) -> dict[str, str] | None:
    try:
        return dict(json.loads((state_dir / MLFLOW_BINDING).read_text()))
    except (OSError, ValueError):
        return None


def _db_verdict(
    config: StackConfig, recorded: dict[str, str] | None, wanted: dict[str, str]
) -> tuple[str, str]:
    """What to do with mlflow.db before MLflow starts against ``wanted``: ("keep", ""), ("move",
    why its artifacts are gone) or ("refuse", why they still exist elsewhere and how to reach them).

    A db whose artifacts are gone for good is moved aside; one whose artifacts still exist in
    another store or bucket is never hidden: `up` refuses and says which settings reach them.
    """
    if recorded == wanted:
        return "keep", ""
    if recorded is None:
        return "move", "it has no record of where its artifacts are (made before the stack kept them)"
    old, new = str(recorded.get("store")), wanted["store"]
    if old.startswith("memory:"):
        return "move", "its artifacts were in an in-memory S3 server (--s3-memory) that has stopped"
    if old.startswith("disk:"):
        from advflow.infra.local.s3_store import store_id

        if store_id(config.s3_data_dir) != old.split(":", 1)[1]:
            return "move", f"its S3 store in {config.s3_data_dir} ({old}) is gone"
        how = "start without --s3-memory and --s3-endpoint (and unset AWS_ENDPOINT_URL)"
    else:
        how = f"start with --s3-endpoint {old.split(':', 1)[1]}"
    if recorded.get("artifacts") != wanted["artifacts"]:
        bucket = str(recorded.get("artifacts", "")).removeprefix("s3://").split("/", 1)[0]
        how = f"{how}, --bucket {bucket}" if old != new else f"start with --bucket {bucket}"
    return "refuse", (
        f"{config.state_dir / MLFLOW_DB} holds runs and models whose artifacts are under "
        f"{recorded.get('artifacts')} in {old}, but this stack would use {wanted['artifacts']} in "
        f"{new}. To reach them, {how}; for a separate stack, pass another --state-dir."
    )


def move_db_aside(state_dir: Path, why: str, echo: Callable[[str], None]) -> Path | None:
    """Rename mlflow.db to mlflow.db.orphaned-<time> (kept, not deleted) and drop its binding."""
    db = Path(state_dir) / MLFLOW_DB
    if not db.exists():
        (Path(state_dir) / MLFLOW_BINDING).unlink(missing_ok=True)
        return None
    target = db.with_name(f"{MLFLOW_DB}.orphaned-{time.strftime('%Y%m%d-%H%M%S')}")
    echo(
        f"{db} lists runs and models whose artifacts no longer exist: {why}. Moving it to "
        f"{target.name}; MLflow starts with an empty database. (Move it back only together "
        "with the S3 data it was made with.)"
    )
    os.replace(db, target)
    (Path(state_dir) / MLFLOW_BINDING).unlink(missing_ok=True)
    return target


def _check_db_binding(
    config: StackConfig,
    store: str,
    healthy: dict[str, ServiceHandle],
    echo: Callable[[str], None],
) -> None:
    """Before MLflow (re)starts: keep mlflow.db when its artifacts are in ``store``, move it aside
    when they are gone, refuse (ServiceError) when they are in a store this config does not use."""
    if not (config.state_dir / MLFLOW_DB).exists():
        return
    verdict, why = _db_verdict(config, _read_binding(config.state_dir), _binding(config, store))
    if verdict == "keep":
        return
    if verdict == "refuse":
        raise ServiceError(why)
    if "mlflow" in healthy:
        echo("mlflow is serving a database whose artifacts are gone; stopping it")
        healthy.pop("mlflow").stop()
    move_db_aside(config.state_dir, why, echo)


def _differences(requested: StackConfig, running: StackConfig) -> list[str]:
    keys = [o.field for o in PORT_OPTIONS] + ["bucket", "s3_endpoint", "s3_memory", "num_cpus"]
    return [
        f"{k}={getattr(running, k)!r} (asked {getattr(requested, k)!r})"
        for k in keys
        if getattr(requested, k) != getattr(running, k)
    ]


def grafana_host(environ: Mapping[str, str] | None = None) -> str | None:
    """The Grafana the user runs (RAY_GRAFANA_HOST), if any."""
    return (os.environ if environ is None else environ).get("RAY_GRAFANA_HOST") or None


def wanted_services(echo: Callable[[str], None] | None = None) -> tuple[str, ...]:
    """The services `up` runs: all of SERVICE_ORDER, less an optional one whose program is missing
    (said through `echo`)."""
    names = []
    for name in SERVICE_ORDER:
        if name == "prometheus" and services.prometheus_binary() is None:
            if echo is not None:
                echo(f"WARNING: prometheus is not installed, so live metrics are not scraped (Ray's Metrics "
                     f"view and the Grafana dashboards stay empty); {services.PROMETHEUS_INSTALL_HINT}")
            continue
        names.append(name)
    return tuple(names)


def up(config: StackConfig, echo: Callable[[str], None] = log.info) -> StackState:
    """Start whatever part of the stack is not running and healthy; no-op when all of it is."""
    config.validate()
    wanted = wanted_services(echo)
    started_at = time.monotonic()
    with _locked(config.state_dir):
        state = load_state(config.state_dir)
        healthy: dict[str, ServiceHandle] = {}
        if state is not None and state.earlier_boot:
            echo(
                f"{STATE_FILE} was written before the machine restarted: none of its services "
                "runs any more; starting them afresh"
            )
        if state is not None:
            for name, handle in state.services.items():
                reason = handle.health()
                if reason is None:
                    healthy[name] = handle
                elif handle.alive():
                    echo(f"{name} is running but unhealthy ({reason}); restarting it")
                    handle.stop()
            _restart_outdated_ray(healthy, state.config, echo)
            if healthy:
                # Live services keep their ports; the config they were started with stays in force.
                diff = _differences(config, state.config)
                if diff:
                    echo(
                        "note: the stack is already running with "
                        + ", ".join(diff)
                        + "; run `advflow stack down` first to change them"
                    )
                config = state.config
        if all(name in healthy for name in wanted):
            echo(f"advflow stack is already running (state: {config.state_dir})")
            return StackState(config, healthy)

        store = _store_of(config, healthy)
        _check_db_binding(config, store, healthy, echo)
        missing = [name for name in wanted if name not in healthy]
        _check_ports(config, missing)
        if "s3" in missing and store.startswith("disk:"):
            _, objects, size = _store_stats(config.s3_data_dir)
            if objects:
                echo(f"s3     restoring {objects} objects ({size / 1e6:.1f} MB) from {config.s3_data_dir}")
        state = StackState(config, dict(healthy))
        started: list[ServiceHandle] = []
        deadline = started_at + config.timeout_s
        try:
            for name in missing:
                handle = _spawn(name, config, state.services.get("s3"), store)
                echo(f"starting {name:<6} {handle.url}")
                state.services[name] = handle
                if not handle.external:
                    started.append(handle)
                save_state(state)  # record pids at once, so `down` can clean up a failed `up`
            for name in missing:
                handle = state.services[name]
                handle.wait_healthy(max(5.0, deadline - time.monotonic()))
                if name == "s3":
                    services.ensure_bucket(handle, config.bucket)
                echo(f"{name:<6} healthy after {time.monotonic() - started_at:.1f}s")
        except BaseException:
            for handle in reversed(started):
                handle.stop(grace_s=5.0)
                state.services.pop(handle.name, None)
            save_state(state)
            raise
        save_state(state)
    elapsed = time.monotonic() - started_at
    echo(f"advflow stack is up ({elapsed:.1f}s); state and logs in {config.state_dir}")
    _load_grafana(echo)
    return state


def _load_grafana(echo: Callable[[str], None]) -> None:
    """Where the user runs a Grafana (RAY_GRAFANA_HOST), load advflow's dashboards into it; a Grafana
    that refuses them is reported, never a reason to fail `up`."""
    host = grafana_host()
    if not host:
        return
    from advflow.infra.local.grafana import load_dashboards

    try:
        for url in load_dashboards(host):
            echo(f"grafana dashboard {url}")
    except ServiceError as exc:
        echo(f"WARNING: could not load the dashboards into Grafana: {exc}")


def _restart_outdated_ray(healthy: dict[str, ServiceHandle], config: StackConfig,
                          echo: Callable[[str], None]) -> None:
    """Stop a healthy Ray head whose jobs would miss a variable the stack gives them now (after an
    upgrade: a head started before MLflow had authentication has no credentials file to hand its
    jobs, which would then get 401 from MLflow). `up` starts it again with the current job env."""
    head = healthy.get("ray")
    if head is None:
        return
    missing = sorted(set(_job_env(config)) - set(head.info.get("job_env") or []))
    if missing:
        echo(f"ray is running, but its jobs lack {', '.join(missing)} (it was started by an older advflow); "
             "restarting it")
        head.stop()
        healthy.pop("ray")


def down(state_dir: Path, echo: Callable[[str], None] = log.info) -> bool:
    """Stop every service of the stack in ``state_dir``; False when nothing was recorded.

    What stopping drops is said before it goes: an in-memory S3 server's buckets (and then
    mlflow.db, whose runs would point at them, is moved aside). The on-disk store and mlflow.db
    are kept, and the last lines say where.
    """
    state_dir = Path(state_dir)
    with _locked(state_dir):
        state = load_state(state_dir)
        if state is None:
            echo(f"advflow stack is not running (no {STATE_FILE} in {state_dir})")
            return False
        if state.earlier_boot:
            echo(f"{STATE_FILE} was written before the machine restarted: nothing of it runs")
        s3 = state.services.get("s3") or state.earlier_boot.get("s3")
        drops_artifacts = s3 is not None and s3.kind == "moto"
        if drops_artifacts and "s3" in state.services and s3.alive():
            _warn_memory_drop(s3, echo)
        for name in reversed(SERVICE_ORDER):
            handle = state.services.get(name)
            if handle is None or handle.external:
                continue
            was_running = handle.stop()
            echo(f"{name:<6} {'stopped' if was_running else 'was not running'}")
        if drops_artifacts:
            move_db_aside(
                state_dir, "its artifacts were in the in-memory S3 server (--s3-memory) that stopped", echo
            )
        (state_dir / STATE_FILE).unlink(missing_ok=True)
        # The token, the S3 key and MLflow's admin password only guard services that just stopped;
        # the next `up` writes new ones (a shell's old exports stop working, as they should).
        (state_dir / "ray_auth_token").unlink(missing_ok=True)
        (state_dir / services.S3_CREDENTIALS_FILE).unlink(missing_ok=True)
        (state_dir / mlflow_auth.CREDENTIALS_FILE).unlink(missing_ok=True)
        if s3 is not None and s3.kind == "moto-disk":
            _, objects, size = _store_stats(Path(s3.info["data_dir"]))
            echo(
                f"kept: {objects} S3 objects ({size / 1e6:.1f} MB) in {s3.info['data_dir']} and "
                f"{MLFLOW_DB} (runs, models, aliases); `advflow stack up` serves them again"
            )
        if "ray" in state.services:
            echo("not kept: Ray's job list (each job's driver log stays in "
                 f"{state.services['ray'].info.get('temp_dir', 'ray')}/session_*/logs)")  # fmt: skip
    echo("advflow stack is down")
    return True


def _store_stats(data_dir: Path) -> tuple[int, int, int]:
    from advflow.infra.local.s3_store import store_stats

    return store_stats(data_dir)


def _warn_memory_drop(s3: ServiceHandle, echo: Callable[[str], None]) -> None:
    """Say what stopping an in-memory S3 server loses, before it is stopped."""
    buckets = objects = size = 0
    try:
        client = services.s3_client(s3)
        for bucket in client.list_buckets()["Buckets"]:
            buckets += 1
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket["Name"]):
                for obj in page.get("Contents", []):
                    objects += 1
                    size += obj["Size"]
        what = f"{objects} objects ({size / 1e6:.1f} MB) in {buckets} buckets"
    except Exception as exc:  # noqa: BLE001 - the warning must come even when counting fails
        what = f"every bucket (could not count them: {exc})"
    echo(
        f"WARNING: s3 keeps its buckets in memory (started with --s3-memory): stopping it drops "
        f"{what}, MLflow's artifacts among them. Start the stack without --s3-memory to keep data."
    )


# ---------------------------------------------------------------------------- status / env


@dataclass
class ServiceStatus:
    name: str
    healthy: bool
    url: str
    detail: str
    required: bool = True
    """False for an optional service that is not installed (its being down fails nothing)."""


def status(state_dir: Path) -> list[ServiceStatus]:
    """Health of each service; all "down" when the stack has no state."""
    state = load_state(Path(state_dir))
    if state is None:
        return [ServiceStatus(name, False, "-", "not running") for name in SERVICE_ORDER]
    rows = []
    for name in SERVICE_ORDER:
        handle = state.services.get(name)
        if handle is None and name == "prometheus" and services.prometheus_binary() is None:
            rows.append(ServiceStatus(name, False, "-", f"not installed: {services.PROMETHEUS_INSTALL_HINT}",
                                      required=False))
            continue
        if handle is None:
            rows.append(ServiceStatus(name, False, "-", "not running"))
            continue
        reason = handle.health()
        rows.append(ServiceStatus(name, reason is None, handle.url, reason or _detail(handle)))
        if reason and handle.log_path:
            rows[-1].detail += f" (log: {handle.log_path})"
    return rows


def _detail(handle: ServiceHandle) -> str:
    if handle.kind == "moto":
        return "moto in memory (--s3-memory): `down` drops its buckets"
    if handle.kind == "moto-disk":
        return f"moto, buckets kept in {handle.info['data_dir']}"
    if handle.kind == "external-s3":
        return "external endpoint (AWS_ENDPOINT_URL)"
    if handle.kind == "prometheus":
        return f"scrapes Ray every {services.SCRAPE_INTERVAL_S}s, series kept in {handle.info['data_dir']}"
    if handle.kind == "mlflow":
        auth = "basic auth on" if handle.info.get("credentials_file") else "NO authentication"
        return f"artifacts {handle.info['artifacts']}, {auth}"
    return f"GCS {LOCALHOST}:{handle.info['gcs_port']}, token auth on"


def env_exports(state_dir: Path) -> dict[str, str]:
    """Variables a shell needs to use the running stack (for ``eval "$(advflow stack env)"``)."""
    state = load_state(Path(state_dir))
    if state is None:
        raise ServiceError(
            f"the stack is not running (no {STATE_FILE} in {state_dir}); start it with "
            "`advflow stack up`"
        )
    exports: dict[str, str] = {}
    for name in SERVICE_ORDER:
        handle = state.services.get(name)
        if handle is None and name in OPTIONAL:
            continue  # not installed when the stack started (`up` warned)
        if handle is None or not handle.alive():
            raise ServiceError(
                f"{name} of the stack in {state_dir} is not running; `advflow stack status` "
                "shows why, `advflow stack up` restarts it"
            )
        exports.update(handle.env)
    exports["ADVFLOW_BUCKET"] = state.config.bucket
    exports[STATE_DIR_ENV] = str(state.config.state_dir)
    return exports


def format_exports(exports: Mapping[str, str]) -> str:
    """``export K=V`` lines, values shell-quoted."""
    return "".join(f"export {key}={shlex.quote(value)}\n" for key, value in exports.items())
