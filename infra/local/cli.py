"""The ``advflow`` command: ``advflow <group> <command> [options]``.

``advflow.infra.local.cli:main`` is the console script (pyproject ``[project.scripts]``);
``python -m advflow.infra.local.cli`` runs the same. Progress lines of ``stack up``/``stack down``
go through ``advflow.platform.log`` ("[advflow] ..." on stdout); what a command answers (the status
table, the ``stack env`` exports) is printed plainly, so shells and tests can read it.

Command groups register themselves in ``COMMAND_GROUPS``: each entry adds one sub-parser and sets
``handler`` (a function ``args -> exit code``) on the parsed namespace. A new issue adds a group by
writing one ``_add_<group>`` function and appending it there; ``main`` stays as it is.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from advflow.infra.local.proc import ServiceError

# ------------------------------------------------------------------------------ advflow stack


def _stack_up(args: argparse.Namespace) -> int:
    from advflow.infra.local import stack

    overrides = {option.field: getattr(args, option.field) for option in stack.PORT_OPTIONS}
    overrides.update(
        state_dir=args.state_dir,
        s3_endpoint=args.s3_endpoint,
        s3_memory=args.s3_memory,
        bucket=args.bucket,
        num_cpus=args.num_cpus,
        object_store_mb=args.object_store_mb,
        timeout_s=args.timeout,
    )
    config = stack.StackConfig.resolve(overrides)
    stack.up(config)  # progress lines: stack's logger
    _print_status(config.state_dir)
    hint = "" if args.state_dir is None else f" --state-dir {config.state_dir}"
    print(f'\nUse it from this shell:  eval "$(advflow stack env{hint})"')
    return 0


def _stack_down(args: argparse.Namespace) -> int:
    from advflow.infra.local import stack

    stack.down(stack.resolve_state_dir(args.state_dir))
    return 0


def _print_status(state_dir) -> bool:
    from advflow.infra.local import stack

    rows = stack.status(state_dir)
    print(f"advflow stack in {state_dir}")
    for row in rows:
        state = "healthy" if row.healthy else "down"
        print(f"  {row.name:<11}{state:<9}{row.url:<28}{row.detail}")
    return all(row.healthy or not row.required for row in rows)


def _stack_status(args: argparse.Namespace) -> int:
    from advflow.infra.local import stack

    return 0 if _print_status(stack.resolve_state_dir(args.state_dir)) else 1


def _stack_env(args: argparse.Namespace) -> int:
    from advflow.infra.local import stack

    exports = stack.env_exports(stack.resolve_state_dir(args.state_dir))
    sys.stdout.write(stack.format_exports(exports))
    return 0


def _stack_dashboards(args: argparse.Namespace) -> int:
    from advflow.infra.local.grafana import load_dashboards
    from advflow.infra.local.stack import grafana_host

    host = args.grafana or grafana_host()
    if not host:
        raise ValueError("no Grafana named: pass --grafana URL or export RAY_GRAFANA_HOST (the stack runs none)")
    for url in load_dashboards(host):
        print(url)
    return 0


def _add_stack(groups: argparse._SubParsersAction) -> None:
    from advflow.infra.local.stack import PORT_OPTIONS, StackConfig

    parser = groups.add_parser(
        "stack",
        help="local Ray head (token auth) + S3 (moto, kept on disk) + MLflow + Prometheus, all on 127.0.0.1",
        description="Start, check and stop the local stack. State and logs live in "
        "--state-dir (default $ADVFLOW_STACK_DIR or ./.advflow/stack).",
    )
    commands = parser.add_subparsers(dest="stack_command", metavar="{up,down,status,env,dashboards}")
    commands.required = True

    def add(name: str, handler: Callable[[argparse.Namespace], int], help_text: str):
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument(
            "--state-dir",
            default=None,
            help="state/log directory (default: $ADVFLOW_STACK_DIR or ./.advflow/stack)",
        )
        sub.set_defaults(handler=handler)
        return sub

    up = add("up", _stack_up, "start the stack (no-op for services already running and healthy)")
    for option in PORT_OPTIONS:
        up.add_argument(
            option.flag,
            dest=option.field,
            type=int,
            default=None,
            metavar="PORT",
            help=f"port of {option.service} (default: ${option.env_var} or {option.default})",
        )
    up.add_argument(
        "--s3-endpoint",
        default=None,
        metavar="URL",
        help="use this S3/MinIO endpoint instead of starting moto (default: $AWS_ENDPOINT_URL; "
        "credentials come from the environment)",
    )
    up.add_argument(
        "--s3-memory",
        action="store_const",
        const=True,
        default=None,
        help="run moto in memory instead of keeping buckets on disk in STATE_DIR/s3: `down` then "
        "drops every bucket and moves mlflow.db aside (default: $ADVFLOW_S3_MEMORY or off)",
    )
    up.add_argument(
        "--bucket", default=None, help=f"bucket to create (default: $ADVFLOW_BUCKET or {StackConfig.bucket})"
    )
    up.add_argument(
        "--num-cpus", type=int, default=None, help=f"CPUs of the Ray head (default {StackConfig.num_cpus})"
    )
    up.add_argument(
        "--object-store-mb",
        type=int,
        default=None,
        help=f"Ray object store MiB (default {StackConfig.object_store_mb})",
    )
    up.add_argument(
        "--timeout",
        type=float,
        default=None,
        help=f"seconds to wait for all services to become healthy (default {StackConfig.timeout_s:.0f})",
    )
    add("down", _stack_down, "stop every service of the stack")
    add("status", _stack_status, "show each service as healthy/down (exit 1 unless all healthy)")
    add("env", _stack_env, 'print shell exports; use as eval "$(advflow stack env)"')
    dashboards = add("dashboards", _stack_dashboards,
                     "load dashboards/grafana/*.json into a Grafana you run (RAY_GRAFANA_HOST or --grafana)")
    dashboards.add_argument("--grafana", default=None, metavar="URL",
                            help="Grafana's URL (default: $RAY_GRAFANA_HOST)")


# ---------------------------------------------------------------------------- advflow cluster


def _add_cluster(groups: argparse._SubParsersAction) -> None:
    from advflow.infra.cluster.manifest import add_arguments, run

    parser = groups.add_parser("cluster", help="Kubernetes manifests of a run (KubeRay, MLflow, PostgreSQL)")
    commands = parser.add_subparsers(dest="cluster_command", metavar="{manifest}")
    commands.required = True
    manifest = commands.add_parser("manifest", help="generate manifests from a run config (infra/cluster/README.md)")
    add_arguments(manifest)
    manifest.set_defaults(handler=run)


# ------------------------------------------------------------------------------------ main

COMMAND_GROUPS: list[Callable[[argparse._SubParsersAction], None]] = [_add_stack, _add_cluster]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="advflow", description="Adversarial Flow Models on Ray: command line."
    )
    groups = parser.add_subparsers(dest="group", metavar="COMMAND")
    for add_group in COMMAND_GROUPS:
        add_group(groups)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "handler"):
        parser.print_help()
        return 2
    try:
        return int(args.handler(args) or 0)
    except (ServiceError, ValueError) as exc:
        print(f"advflow: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("advflow: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
