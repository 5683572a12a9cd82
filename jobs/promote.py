"""Point a registry alias (candidate, champion, any name) at a version of a registered generator.

  python jobs/promote.py --name NAME --alias champion --version 3
  python jobs/promote.py --name NAME --alias champion --best-metric eval/fd --mode min

Metric convention: a version's evaluation results are the metrics of its MLflow 3 LoggedModel (the
model the version was registered from, `models:/<model_id>`), linked to the training run and its
dataset; `advflow.platform.tracking.registry.log_generator(..., metrics={"eval/fd": 12.5}, run_id=...)`
logs them (training does at each registration). MLflow refuses '@' in metric names, so KEY
`eval/fd@4` is read as the metric `eval/fd_at_4` (`registry.metric_name`). `--best-metric KEY --mode
min|max` picks the version with the lowest / highest value of that metric (the latest one its
LoggedModel holds); versions whose LoggedModel lacks it (or holds NaN) are skipped, and ties go to
the newest version. Prints `alias: old -> new`.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass

from advflow.platform.tracking.registry import all_versions, metric_name, model_metrics


class PromoteError(ValueError):
    """The model, version or metric asked for does not exist; the message says what does."""


@dataclass(frozen=True)
class Promotion:
    """What promote did: alias on model `name` moved from `old` (None: unset) to `new`."""

    name: str
    alias: str
    old: str | None
    new: str
    value: float | None = None  # the metric value of `new` when chosen by rule

    def describe(self) -> str:
        why = f" ({self.value!r})" if self.value is not None else ""
        return f"{self.name}@{self.alias}: {self.old or '(unset)'} -> {self.new}{why}"


def _is_missing(exc: Exception) -> bool:
    return getattr(exc, "error_code", "") == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(exc).lower()


def best_version(versions: list, key: str, mode: str, client) -> tuple[str, float]:
    """(version, value) with the best finite LoggedModel metric `key`; ties -> newest version."""
    if mode not in ("min", "max"):
        raise PromoteError(f"--mode: {mode!r} unknown; use min or max")
    name = metric_name(key)
    scored, have = [], set()
    for mv in versions:
        metrics = model_metrics(client, mv)
        have.update(metrics)
        value = metrics.get(name, math.nan)
        if not math.isnan(value):
            scored.append((value if mode == "max" else -value, int(mv.version), value))
    if not scored:
        raise PromoteError(
            f"--best-metric {key}: no version's LoggedModel has a numeric metric {name!r}; metrics present on "
            f"versions: {sorted(have) or 'none'} (registration logs them: log_generator(..., metrics={{...}}, "
            "run_id=...), as training does)"
        )
    _, version, value = max(scored)
    return str(version), value


def promote(name: str, alias: str, *, version: str | int | None = None, best_metric: str | None = None,
            mode: str = "min", client=None) -> Promotion:
    """Set `alias` on registered model `name` to `version`, or to the best version by `best_metric`."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    if (version is None) == (best_metric is None):
        raise PromoteError("pass exactly one of --version N or --best-metric KEY")
    if not alias or alias.isdigit():
        raise PromoteError(f"--alias: {alias!r} is not a valid alias; use a name such as champion")
    client = client or MlflowClient()
    try:
        client.get_registered_model(name)
    except MlflowException as e:
        if _is_missing(e):
            raise PromoteError(f"--name: registered model {name!r} not found; check the name "
                               "(jobs/register_checkpoint.py or training with a registered name creates it)") from e
        raise
    versions = all_versions(client, name)
    value = None
    if best_metric is not None:
        new, value = best_version(versions, best_metric, mode, client)
    else:
        new = str(version)
        if new not in {str(mv.version) for mv in versions}:
            known = sorted(int(mv.version) for mv in versions)
            raise PromoteError(f"--version: {name!r} has no version {new}; existing versions: {known or 'none'}")
    try:
        old = str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as e:
        if not _is_missing(e):
            raise
        old = None
    client.set_registered_model_alias(name, alias, new)
    return Promotion(name=name, alias=alias, old=old, new=new, value=value)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", required=True, help="registered model name")
    p.add_argument("--alias", required=True, help="alias to set, e.g. candidate or champion")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--version", help="explicit version number")
    how.add_argument("--best-metric", help="metric key, read from each version's LoggedModel metrics")
    p.add_argument("--mode", choices=["min", "max"], default="min", help="with --best-metric: lower or higher is better")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    from advflow.platform.log import get_logger
    from advflow.platform.tracking.runs import TrackingURIMissing, require_tracking_uri

    log = get_logger("jobs.promote")
    try:
        # Aliases live on the server: without a URI MLflow would create ./mlflow.db and say
        # "not found" about a model that exists.
        require_tracking_uri("promote")
        done = promote(a.name, a.alias, version=a.version, best_metric=a.best_metric, mode=a.mode)
    except (PromoteError, TrackingURIMissing) as e:
        log.error("promote: %s", e)
        return 2
    print(done.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
