"""The Ray Tune side of a sweep: the function trainable `train_driver_fn` that runs the training
job's TorchTrainer, the Tuner (OptunaSearch with a seeded TPE sampler on an RDB study, ASHA), and
the wrap-up (MLflow parent/child runs, `candidate` alias, and `SweepReport`: what the HTML report
is rendered from; the sweep job renders it and `attach_report` logs it to the parent run; the
library renders nothing). The search space is `sweep.space`; the Optuna study (storage, recovery,
trial lookup) is `sweep.study`.

Ray Train V2 + Tune pattern: each Tune trial is a function that builds the same `TorchTrainer` as
jobs/train.py (`ray_launch.build_torch_trainer`) and calls `fit()` inside the same `tracked_run` as
the training job; `ray.tune.integration.ray_train.TuneReportCallback` forwards the workers' reports
(rank 0's metrics: losses and `eval/*`, sent with every checkpoint) to Tune, where ASHA reads them.
The trial function itself reserves `trial_cpus` (default 0); the Train workers reserve
`distributed.cpus_per_worker` each, so `max_concurrent_trials` x workers must fit the cluster.
One MLflow parent run per sweep (`tracking.runs.open_parent_run`); each trial's run is its child.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from advflow.platform.config import ConfigError, RunSpec
from advflow.platform.eval import COVERAGE_KEYS
from advflow.platform.log import get_logger
from advflow.platform.sweep.space import SweepSpace, apply_params
from advflow.platform.sweep.study import (TRIAL_KEY, RecordTrialNumber, absolute_storage, open_study, recover_study,
                                          set_trial_attrs, sweep_dir)
from advflow.platform.tracking import runs as tracking
from advflow.platform.tracking.logger import mlflow_metric_key
from advflow.platform.tracking.secrets import redact_url

log = get_logger(__name__)
SWEEP_KEY_TAG = "advflow.sweep_key"
# The trial attributes `train_driver_fn` records that the report shows as columns.
REPORT_COLUMNS = ("lr_g", "model.kind", "tune_trial_id")


@dataclass(frozen=True)
class SweepReport:
    """What the sweep's HTML report is rendered from (`run_sweep` returns it; jobs/sweep.py renders).

    annotations: per trial number, facts settled only after the trial finished (`steps`,
    `stopped_early`, and the mode coverage its run logged last: `coverage_notes`; Optuna refuses user
    attrs on finished trials). out: where the report goes by
    default (the space's `report`, else beside the study). parent_run_id: the sweep's MLflow parent
    run, which `attach_report` logs the page to."""

    storage: str
    study_name: str
    metric: str
    out: Path
    annotations: dict[int, dict] = field(default_factory=dict)
    extra_columns: tuple[str, ...] = REPORT_COLUMNS
    parent_run_id: str | None = None


@dataclass(frozen=True)
class SweepOutcome:
    """`run_sweep`'s result: the summary the job logs, and what its report is rendered from."""

    summary: dict[str, Any]
    report: SweepReport


# ----------------------------------------------------------------------------------------- trial


def train_driver_fn(config: dict, *, base: dict, space: dict, parent_run_id: str | None) -> None:
    """One Tune trial: the drawn params applied to the base config, trained by Ray Train."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from advflow.platform.data.shards import dataset_tags
    from advflow.platform.train import ray_launch

    sp = SweepSpace.from_dict(space)
    params = dict(config)
    number = params.pop(TRIAL_KEY, None)  # recorded by RecordTrialNumber; None outside OptunaSearch
    spec = apply_params(base, params, sp.overrides)
    trial_id = tune.get_context().get_trial_id()
    spec.run.name = f"{sp.study_name}-{trial_id}"
    spec.tracking.register_name = sp.register_name
    tags = {"sweep.study": sp.study_name, "sweep.tune_trial_id": trial_id,
            "sweep.params": json.dumps(params, sort_keys=True)}
    if number is not None:
        tags["sweep.optuna_trial"] = str(number)
    with tracking.tracked_run(spec, parent_run_id=parent_run_id, extra_tags=tags,
                              data_tags=dataset_tags(spec.data.prefix)) as run:
        if number is not None:
            attrs = {"tune_trial_id": trial_id, "mlflow_run_id": run.run_id or "",
                     "lr_g": spec.optim.lr / spec.model.repeats, "model.kind": spec.model.kind}
            if run.run_id:
                attrs["sample_grid"] = f"runs:/{run.run_id}/samples/samples.png"
            set_trial_attrs(sp.storage, sp.study_name, number, attrs)
        trainer = ray_launch.build_torch_trainer(spec, callbacks=[TuneReportCallback()], run_id=run.run_id,
                                                 progress=False)
        # Ray Train V2's fit() raises TrainingFailedError when the run fails (it never returns a
        # Result with an error), and the exception marks the trial and its MLflow run failed.
        trainer.fit()
        run.ok = True


# ----------------------------------------------------------------------------------------- driver


def prepare_base(spec: RunSpec) -> dict:
    """The base config for trials: needs a quality metric, evaluated at every checkpoint."""
    if spec.eval.kind == "none":
        raise ConfigError("eval.kind: a sweep needs a quality metric; set eval.kind=digits (digits data) or "
                          "eval.kind=fid with eval.inception_path and eval.reference_stats")
    base = spec.to_dict()
    base["eval"]["every"] = spec.train.checkpoint_every  # every report carries the metric ASHA reads
    return base


def open_parent_run(spec: RunSpec, space: SweepSpace, space_yaml: str) -> str | None:
    """The sweep's MLflow parent run (one per study, found again when the driver is restarted). Its
    key and params carry the storage URL without credentials (a PostgreSQL password stays out of
    MLflow; the masked URL is the same at every restart, so the run is still found)."""
    storage = redact_url(space.storage)
    params = {"metric": space.metric, "mode": space.mode, "seed": space.seed, "study": space.study_name,
              "storage": storage, "max_concurrent_trials": space.max_concurrent_trials}
    return tracking.open_parent_run(spec, key_tag=SWEEP_KEY_TAG, key=f"{storage}#{space.study_name}",
                                    run_name=f"sweep-{space.study_name}", kind="sweep", params=params,
                                    texts={"sweep/space.yaml": space_yaml})


def run_sweep(spec: RunSpec, space: SweepSpace, trials: int, *, space_yaml: str = "",
              ray_address: str | None = None) -> SweepOutcome:
    """Run (or resume) the sweep until the study holds `trials` finished trials; returns its summary
    and what its HTML report is rendered from (the caller renders it: jobs/sweep.py).
    ray_address: the cluster (default RAY_ADDRESS; unreachable: RayUnreachable, a ConfigError)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from advflow.platform.train.ray_launch import ensure_ray

    from advflow.platform.train.connect import check_configured

    t0 = time.time()
    space.storage = absolute_storage(space.storage)
    base = prepare_base(spec)
    space.check_against(base)  # before the study, the parent run or any trial exists
    check_configured(ray_address)  # likewise: an unreachable cluster leaves nothing behind
    study, storage, sampler = open_study(space)
    counts = recover_study(study, storage)
    finished = counts.get("COMPLETE", 0) + counts.get("PRUNED", 0)
    remaining = max(0, trials - finished)
    log.info(f"sweep {space.study_name}: {finished} finished trial(s) in {redact_url(space.storage)}, running {remaining} more")
    if remaining:
        ensure_ray(ray_address)
    parent = open_parent_run(spec, space, space_yaml)
    ok = True
    if remaining:
        # A new study starts with the base config itself (trial 0): the number the sweep must beat.
        points = [space.baseline_point(base)] if space.baseline and not study.trials else None
        searcher = OptunaSearch(space=RecordTrialNumber(space), metric=space.metric, mode=space.mode, sampler=sampler,
                                study_name=space.study_name, storage=storage, points_to_evaluate=points)
        tune_path, tune_fs = tune_storage(spec, space)
        log.info(f"sweep {space.study_name}: Tune's experiment state goes to {tune_path}")
        every = base["eval"]["every"]
        scheduler = ASHAScheduler(time_attr="step", max_t=spec.train.steps,
                                  grace_period=int(space.asha.get("grace_period", 1)) * every,
                                  reduction_factor=float(space.asha.get("reduction_factor", 2)))
        trainable = tune.with_resources(
            tune.with_parameters(train_driver_fn, base=base, space=_space_dict(space), parent_run_id=parent),
            # Tune needs a non-empty bundle; a memory request lets the driver function take no CPU.
            {"CPU": space.trial_cpus, "memory": 64 * 2**20})
        tuner = tune.Tuner(
            trainable,
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, metric=space.metric,
                                        mode=space.mode, num_samples=remaining,
                                        max_concurrent_trials=space.max_concurrent_trials),
            run_config=tune.RunConfig(name=f"{space.study_name}-{int(t0)}", storage_path=tune_path,
                                      storage_filesystem=tune_fs, verbose=1,
                                      callbacks=[live_sweep_callback(space, study)]),
        )
        results = tuner.fit()
        ok = not results.errors
    summary, report = finalize(spec, space, parent)
    summary["wall_s"] = time.time() - t0
    summary["ok"] = ok
    if parent:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking.tracking_uri(spec))
        client.log_metric(parent, "sweep_wall_s", summary["wall_s"])
        tracking.close_run(spec, parent, ok=ok)
    return SweepOutcome(summary, report)


def live_sweep_callback(space: SweepSpace, study):
    """A Tune callback exporting the sweep's trial counts by state and its best value so far
    (`advflow_sweep_*`, tracking/live.py) at every step of Tune's loop. The best starts from the
    study's (trials of earlier attempts of a resumed sweep count)."""
    from ray.tune import Callback

    from advflow.platform.tracking.live import SweepMetrics

    better = min if space.mode == "min" else max
    try:
        known = [t.value for t in study.trials if t.value is not None]
    except Exception:  # an empty or unreadable study: the trials of this attempt decide
        known = []
    prior = better(known) if known else None

    class LiveSweep(Callback):
        def __init__(self):
            self.metrics = SweepMetrics(space.study_name, space.metric)

        def on_step_end(self, iteration, trials, **info):
            values = [t.last_result.get(space.metric) for t in trials if t.last_result]
            values = [float(v) for v in values if isinstance(v, (int, float)) and v == v]
            if prior is not None:
                values.append(prior)
            self.metrics.update([t.status for t in trials], better(values) if values else None)

        def on_experiment_end(self, trials, **info):
            self.on_step_end(-1, trials)  # the final states
            self.metrics.flush()

    return LiveSweep()


def tune_storage(spec: RunSpec, space: SweepSpace) -> tuple[str, object | None]:
    """(storage_path, filesystem) for Tune's experiment state. With `run.storage_path` on S3 it goes
    beside the trials' checkpoints, `<run.storage_path>/sweeps/<study_name>/`, where every node of a
    cluster (and a driver resumed on another machine) reaches it; a local `run.storage_path` keeps it
    in the local sweep folder (one machine, or a folder every node mounts)."""
    from advflow.platform.train.ray_launch import storage

    if spec.run.storage_path.startswith("s3://"):
        path, fs = storage(spec)
        return f"{path.rstrip('/')}/sweeps/{space.study_name}", fs
    return str(sweep_dir(space) / "tune"), None


def _space_dict(space: SweepSpace) -> dict:
    import dataclasses

    raw = dataclasses.asdict(space)
    raw["params"] = {p.pop("name"): p for p in raw["params"]}
    return raw


def finalize(spec: RunSpec, space: SweepSpace, parent: str | None) -> tuple[dict[str, Any], SweepReport]:
    """Mark early-stopped trials, close their MLflow runs, alias the best generator `candidate`;
    returns the summary and what the HTML report is rendered from."""
    import optuna

    study, _, _ = open_study(space)
    uri = tracking.tracking_uri(spec)
    client = None
    if uri:
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
    TS = optuna.trial.TrialState
    stopped = 0
    notes: dict[int, dict] = {}  # Optuna refuses user attrs on finished trials: the report gets them
    for t in study.get_trials(deepcopy=False):
        run_id = t.user_attrs.get("mlflow_run_id")
        steps = None
        if client and run_id:
            run = client.get_run(run_id)
            hist = client.get_metric_history(run_id, space.metric)
            steps = max((m.step for m in hist), default=0)
            early = t.state == TS.COMPLETE and steps < spec.train.steps
            # Tune stops a trial's function at ASHA's max_t as well as at a lower rung, so the run's
            # status is settled here from the study: finished, stopped early, or failed.
            status = ("KILLED" if early else "FINISHED") if t.state == TS.COMPLETE else "FAILED"
            if run.info.status != status:
                client.set_terminated(run_id, status=status)
            client.set_tag(run_id, "sweep.stopped_early", str(early).lower())
            notes[t.number] = {"steps": steps, "stopped_early": early,
                               **coverage_notes(run.data.metrics, space.metric)}
            stopped += int(early)
    summary: dict[str, Any] = {"study": space.study_name, "trials": len(study.trials), "stopped_early": stopped}
    complete = [t for t in study.get_trials(deepcopy=False, states=(TS.COMPLETE,))]
    if complete:
        best = study.best_trial
        summary.update(best_value=best.value, best_params=best.params, best_trial=best.number)
        cand = _alias_candidate(client, space, complete, study.direction)
        if cand:
            summary["candidate"] = cand
    report = SweepReport(storage=space.storage, study_name=space.study_name, metric=space.metric,
                         out=Path(space.report or sweep_dir(space) / f"{space.study_name}.html"),
                         annotations=notes, parent_run_id=parent)
    if client and parent:
        for key, value in (("best_value", summary.get("best_value", float("nan"))),
                           ("trials", summary["trials"]), ("stopped_early", stopped)):
            client.log_metric(parent, key, float(value))
    return summary, report


def coverage_notes(logged: dict[str, float], metric: str) -> dict[str, float]:
    """The mode-coverage metrics (`eval.COVERAGE_KEYS`) among a run's last logged values `logged` (MLflow
    names), at the K of the sweep's `metric` (`eval/fd@4` -> `eval/precision@4`, ...), keyed by their
    advflow names; absent ones are left out (an evaluator that could not compute them, an older run)."""
    suffix = "@" + metric.split("@", 1)[1] if "@" in metric else ""
    keys = [base + suffix for base in COVERAGE_KEYS]
    return {key: float(logged[mlflow_metric_key(key)]) for key in keys if mlflow_metric_key(key) in logged}


def attach_report(spec: RunSpec, report: SweepReport, path: str | Path) -> None:
    """Log the rendered report at `path` to the sweep's parent run (under `report/`); nothing to do
    without a parent run (tracking off)."""
    if not report.parent_run_id:
        return
    uri = tracking.tracking_uri(spec)
    if not uri:
        return
    from mlflow.tracking import MlflowClient

    MlflowClient(uri).log_artifact(report.parent_run_id, str(path), artifact_path="report")


def _alias_candidate(client, space: SweepSpace, complete: list, direction) -> dict | None:
    """Alias `candidate` to the final registered version of the best trial that has one (a trial
    stopped early by ASHA never reached its end-of-training registration)."""
    if client is None or not space.register_name:
        return None
    sign = 1 if direction.name.lower() == "minimize" else -1
    for t in sorted(complete, key=lambda t: sign * t.value):
        run_id = t.user_attrs.get("mlflow_run_id")
        if not run_id:
            continue
        versions = client.search_model_versions(f"name = '{space.register_name}' and run_id = '{run_id}'")
        if not versions:
            continue
        v = max(versions, key=lambda v: int(v.version))
        client.set_registered_model_alias(space.register_name, "candidate", v.version)
        log.info(f"{space.register_name}@candidate -> version {v.version} (trial {t.number}, "
                 f"{space.metric}={t.value:.4g})")
        return {"name": space.register_name, "version": v.version, "trial": t.number, "value": t.value}
    return None
