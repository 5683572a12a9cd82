"""Generate the Kubernetes manifests of a run from its config.

    advflow cluster manifest --config jobs/configs/imagenet_xl2_1nfe.yaml --kind rayjob-train > rayjob.yaml
    advflow cluster manifest --config jobs/configs/imagenet_xl2_1nfe.yaml --kind all --out-dir infra/cluster/kuberay
    (also: python -m advflow.infra.cluster.manifest ...)

The config is loaded and validated like `jobs/train.py` does (`--set` overrides too, and they are
passed on to the job's command line, so the job trains the config the cluster was sized for). The
GPU worker group follows `distributed`: one pod per Ray Train worker, one GPU and
`cpus_per_worker` CPUs each (see kuberay.py for memory and /dev/shm). The sweep's cluster holds
max_concurrent_trials x the trial's workers. `podmonitors` are the Prometheus operator's scrape
configuration of the Ray pods (monitoring.py; `--prometheus-*`/`--grafana-*` flags). Each output starts with a comment naming the command
that regenerates it; tests/test_cluster_manifests.py checks the committed files against it.
"""

from __future__ import annotations

import argparse
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

import yaml

from advflow.infra.cluster import kuberay, monitoring, services
from advflow.infra.cluster import names as n

KINDS = ("config", "postgres", "mlflow", "raycluster", "rayjob-train", "rayjob-sweep", "podmonitors")
_MONITORING = monitoring.Monitoring()
DEFAULTS = {"space": "jobs/configs/sweeps/imagenet_space.yaml", "trials": 32, "image": n.DEFAULT_IMAGE,
            "namespace": "advflow", "region": "us-east-1", "prometheus_url": _MONITORING.prometheus_url,
            "grafana_url": _MONITORING.grafana_url, "grafana_iframe_url": _MONITORING.grafana_iframe_url,
            "prometheus_release": _MONITORING.release}
# Flags that go into a file's header command when they differ from DEFAULTS, by the kinds they change.
_FLAGS_OF = {"image": KINDS, "namespace": KINDS, "region": KINDS, "space": ("rayjob-sweep",),
             "trials": ("rayjob-sweep",), "prometheus_url": ("raycluster", "rayjob-train", "rayjob-sweep"),
             "grafana_url": ("raycluster", "rayjob-train", "rayjob-sweep"),
             "grafana_iframe_url": ("raycluster", "rayjob-train", "rayjob-sweep"), "prometheus_release": ("podmonitors",)}


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data) -> bool:  # shared env lists are written out in full, not as &id001
        return True


def _str(dumper: yaml.SafeDumper, text: str) -> yaml.Node:
    style = "|" if "\n" in text else None  # scripts stay readable as literal blocks
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_Dumper.add_representer(str, _str)


class ManifestError(ValueError):
    """A user-input error; the message names the flag or config field and the fix."""


def in_repo(path: str, flag: str) -> str:
    """`path` relative to the repo: the image holds the repo at WORKDIR, the job runs from there."""
    resolved = Path(path).resolve()
    if not resolved.is_file():
        raise ManifestError(f"{flag}: {path} does not exist; pass a file under jobs/configs/")
    try:
        return resolved.relative_to(n.REPO).as_posix()
    except ValueError:
        raise ManifestError(f"{flag}: {path} is outside the repo, so the image does not hold it; move it under "
                            "jobs/configs/ and rebuild the image") from None


def dns_name(text: str) -> str:
    """A Kubernetes object name (RFC 1123 label) from a run name."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:40].strip("-") or "run"


def load(args: argparse.Namespace):
    from advflow.platform.config import ConfigError, load_config

    try:
        return load_config(args.config, args.overrides)
    except ConfigError as err:
        raise ManifestError(f"--config {args.config}: {err}") from None


def gpu_workers(spec, where: str = "") -> kuberay.Workers:
    d = spec.distributed
    if not d.use_gpu:
        raise ManifestError(f"distributed.use_gpu{where} is false, but the Ray manifests run GPU workers; "
                            "use a GPU recipe (jobs/configs/imagenet_*) or pass --set distributed.use_gpu=true")
    return kuberay.Workers(replicas=d.workers, min_replicas=d.min_workers or d.workers, cpus=d.cpus_per_worker)


def _sets(args) -> str:
    return "".join(f" --set {shlex.quote(item)}" for item in args.overrides)


def entrypoint(command: str) -> str:
    """A RayJob entrypoint that runs `command` in the image's repo on the head. KubeRay pastes the
    entrypoint unquoted into the submitter's shell line (`ray job submit ... -- <entrypoint>`), so
    a bare `cd X && cmd` would run `cmd` in the submitter pod: the whole line goes through
    `bash -c '...'`, and its $VARS expand on the head, in the driver's environment."""
    return f"bash -c {shlex.quote(f'cd {n.WORKDIR} && exec {command}')}"


def metrics_settings(args) -> monitoring.Monitoring:
    """Where the head's dashboard finds Prometheus and Grafana, and the PodMonitors' release label."""
    for flag in ("prometheus_url", "grafana_url", "grafana_iframe_url"):
        if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", getattr(args, flag)):
            raise ManifestError(f"--{flag.replace('_', '-')}: {getattr(args, flag)!r} is not an http(s) URL; "
                                "give scheme, host and port, e.g. http://prometheus.monitoring.svc:9090")
    if not re.fullmatch(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?", args.prometheus_release):
        raise ManifestError(f"--prometheus-release: {args.prometheus_release!r} is not a Kubernetes label value; "
                            "use your kube-prometheus-stack Helm release's name")
    return monitoring.Monitoring(prometheus_url=args.prometheus_url, grafana_url=args.grafana_url,
                                 grafana_iframe_url=args.grafana_iframe_url, release=args.prometheus_release)


def build_train(args, spec) -> list[dict]:
    workers = gpu_workers(spec)
    command = f"python jobs/train.py --config {shlex.quote(in_repo(args.config, '--config'))}{_sets(args)}"
    cluster = kuberay.cluster_spec(workers, args.image, monitoring=metrics_settings(args))
    return [kuberay.rayjob(f"train-{dns_name(spec.run.name)}", args.namespace, entrypoint(command), cluster, args.image)]


def build_sweep(args, spec) -> list[dict]:
    from advflow.platform.config import ConfigError
    from advflow.platform.sweep.space import SweepSpace, apply_params

    if args.trials < 1:
        raise ManifestError(f"--trials: {args.trials} must be >= 1")
    space_path = in_repo(args.space, "--space")
    try:
        space = SweepSpace.load(args.space)
        space.check_against(spec.to_dict())
        trial = apply_params(spec.to_dict(), {}, space.overrides)
    except ConfigError as err:
        raise ManifestError(f"--space {args.space}: {err}") from None
    if trial.eval.kind == "none":
        raise ManifestError(f"eval.kind (config and --space {args.space} overrides) is none, but a sweep needs a "
                            "quality metric; set eval.kind: fid with eval.inception_path/reference_stats in the space's overrides")
    one = gpu_workers(trial, " (in a trial)")
    workers = kuberay.Workers(replicas=one.replicas * space.max_concurrent_trials,
                              min_replicas=one.replicas * space.max_concurrent_trials, cpus=one.cpus)
    uses_fid = trial.eval.kind == "fid"
    fid_paths = [trial.eval.inception_path or "", trial.eval.reference_stats or ""]
    if uses_fid and not all(p.startswith(kuberay.FID_DIR + "/") for p in fid_paths):
        raise ManifestError(f"eval.inception_path/reference_stats {fid_paths}: the sweep's workers copy the FID files "
                            f"from s3://BUCKET/fid to {kuberay.FID_DIR}/; point both at files under {kuberay.FID_DIR}/")
    fid_prefix = f"s3://{services.s3_bucket(spec.run.storage_path)}/fid" if uses_fid else None
    # $OPTUNA_STORAGE_URL: the ConfigMap's, expanded on the head; it holds no password (PGPASSWORD does).
    command = (f"python jobs/sweep.py --config {shlex.quote(in_repo(args.config, '--config'))}{_sets(args)}"
               f' --space {shlex.quote(space_path)} --trials {args.trials} --storage "$OPTUNA_STORAGE_URL"')
    cluster = kuberay.cluster_spec(workers, args.image, fid_prefix=fid_prefix, monitoring=metrics_settings(args))
    return [kuberay.rayjob(f"sweep-{dns_name(space.study_name)}", args.namespace, entrypoint(command), cluster,
                           args.image)]


BUILDERS: dict[str, Callable[[argparse.Namespace, object], list[dict]]] = {
    "config": lambda args, spec: [services.configmap(args.namespace, args.region)],
    "postgres": lambda args, spec: services.postgres(args.namespace),
    "mlflow": lambda args, spec: services.mlflow(args.namespace, args.image, services.s3_bucket(spec.run.storage_path)),
    "raycluster": lambda args, spec: [kuberay.raycluster(
        f"advflow-{dns_name(spec.run.name)}", args.namespace,
        kuberay.cluster_spec(gpu_workers(spec), args.image, monitoring=metrics_settings(args)))],
    "rayjob-train": build_train,
    "rayjob-sweep": build_sweep,
    "podmonitors": lambda args, spec: monitoring.pod_monitors(args.namespace, metrics_settings(args)),
}


def command_line(args: argparse.Namespace, kind: str) -> str:
    """The command that regenerates `kind` with these arguments (defaults left out)."""
    parts = ["advflow cluster manifest", f"--config {shlex.quote(args.config)}"]
    parts += [f"--set {shlex.quote(item)}" for item in args.overrides]
    for flag, kinds in _FLAGS_OF.items():
        value = getattr(args, flag)
        if kind in kinds and value != DEFAULTS[flag]:
            parts.append(f"--{flag.replace('_', '-')} {shlex.quote(str(value))}")
    return " ".join(parts + [f"--kind {kind}"])


def render(args: argparse.Namespace, kind: str, spec) -> str:
    try:
        objects = BUILDERS[kind](args, spec)
    except ValueError as err:  # e.g. run.storage_path not on S3
        raise ManifestError(str(err)) from None
    head = (f"# Generated by: {command_line(args, kind)}\n"
            "# Do not edit: change the config or infra/cluster/*.py and regenerate (infra/cluster/README.md);\n"
            "# tests/test_cluster_manifests.py fails when this file and the generator disagree.\n")
    body = "---\n".join(yaml.dump(obj, Dumper=_Dumper, sort_keys=False, width=120) for obj in objects)
    return head + body


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="run config (jobs/configs/...): sizes the GPU worker group")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, also passed to the job's command (repeatable)")
    p.add_argument("--kind", required=True, help=f"what to generate: {', '.join(KINDS)} or all")
    p.add_argument("--image", default=DEFAULTS["image"], help="the advflow image, as pushed (default %(default)s)")
    p.add_argument("--namespace", default=DEFAULTS["namespace"], help="Kubernetes namespace (default %(default)s)")
    p.add_argument("--region", default=DEFAULTS["region"], help="AWS region of the bucket (default %(default)s)")
    p.add_argument("--space", default=DEFAULTS["space"], help="sweep space, rayjob-sweep only (default %(default)s)")
    p.add_argument("--trials", type=int, default=DEFAULTS["trials"], help="sweep trials (default %(default)s)")
    p.add_argument("--prometheus-url", default=DEFAULTS["prometheus_url"],
                   help="Prometheus as the Ray head reaches it: RAY_PROMETHEUS_HOST (default %(default)s)")
    p.add_argument("--grafana-url", default=DEFAULTS["grafana_url"],
                   help="Grafana as the Ray head reaches it: RAY_GRAFANA_HOST (default %(default)s)")
    p.add_argument("--grafana-iframe-url", default=DEFAULTS["grafana_iframe_url"],
                   help="Grafana as your browser reaches it: RAY_GRAFANA_IFRAME_HOST (default %(default)s)")
    p.add_argument("--prometheus-release", default=DEFAULTS["prometheus_release"],
                   help="the kube-prometheus-stack Helm release whose Prometheus picks up the PodMonitors "
                        "(their `release` label; default %(default)s)")
    p.add_argument("--out-dir", default=None, help="write <kind>.yaml files there instead of to stdout")


def run(args: argparse.Namespace) -> int:
    """Handler of `advflow cluster manifest` (errors: ManifestError, a ValueError)."""
    kinds = KINDS if args.kind == "all" else (args.kind,)
    if args.kind != "all" and args.kind not in KINDS:
        raise ManifestError(f"--kind: {args.kind!r} is unknown; use {', '.join(KINDS)} or all")
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", args.namespace):
        raise ManifestError(f"--namespace: {args.namespace!r} is not a Kubernetes name; use lower-case letters, "
                            "digits and '-'")
    metrics_settings(args)  # a bad URL or release fails whatever the kind
    spec = load(args)
    texts = {kind: render(args, kind, spec) for kind in kinds}
    if args.out_dir is None:
        sys.stdout.write("---\n".join(texts.values()))
        return 0
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for kind, text in texts.items():
        (out / f"{kind}.yaml").write_text(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m advflow.infra.cluster.manifest", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    try:
        return run(parser.parse_args(argv))
    except ManifestError as err:
        print(f"advflow: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
