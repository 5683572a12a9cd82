"""The sweep job end to end (issue 6 §1, §3, §5): a 4-trial Ray Tune + Optuna sweep of the tiny digits
config, 2 trials at a time, on a real Ray head with token auth, MLflow server and S3 endpoint.

The driver is SIGKILLed once the study holds two finished trials and then started again with the
same command: the RDB study, on a real PostgreSQL server (the `postgres` fixture, as on a cluster),
resumes without rerunning the finished trials. (SQLite studies, the local default, are covered by
the faster tests below and in test_sweep_space.py.) The sweep ends with
nested MLflow runs, a `candidate` alias on the best trial's generator, and an HTML report that
renders in headless Chromium (screenshot in the test output folder).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from contextlib import closing
from pathlib import Path

import pytest

from advflow.platform.data.prepare import PrepareConfig, prepare
from advflow.platform.tracking.secrets import redact_url

REPO = Path(__file__).resolve().parents[1]
STEPS = 20


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory, mlflow_server, moto_endpoint):
    from advflow.infra.local.services import mlflow_worker_env, start_ray_head
    from conftest import FAKE_ENV

    # MLflow's credential as its file's path, as the stack's head gets it (never the password)
    job_env = {"OMP_NUM_THREADS": "1", "AWS_ENDPOINT_URL": moto_endpoint, **FAKE_ENV, **mlflow_worker_env(mlflow_server)}
    with start_ray_head(tmp_path_factory.mktemp("ray"), num_cpus=2, job_env=job_env) as head:
        yield head


def study_counts(storage, name: str) -> dict[str, int]:
    """Trial states of study `name` in `storage` (a URL or an optuna storage object)."""
    import optuna

    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return {}
    out: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


@pytest.mark.slow
@pytest.mark.timeout(1500)
def test_sweep_resumes_after_driver_death_nests_runs_registers_candidate_and_reports(
        tmp_path, ray_head, mlflow_env, s3_env, postgres):
    import optuna
    import yaml
    from mlflow.tracking import MlflowClient

    from chromium import run_headless

    data = tmp_path / "digits"
    prepare(PrepareConfig(source="digits", out=str(data), encoder="pixel", shard_records=512))
    name = f"sweep-{uuid.uuid4().hex[:6]}"
    storage = postgres.url("optuna")
    # One storage object for the test's own reads: the wait below polls every second, and a new
    # URL-opened storage each time would open a new connection pool on the server each time.
    rdb = optuna.storages.RDBStorage(storage)
    space = yaml.safe_load((REPO / "jobs/configs/sweeps/digits_space.yaml").read_text())
    space.update(storage=storage, study_name=name, register_name=f"afm-{name}", n_startup_trials=2)
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space, sort_keys=False))  # order matters
    cmd = [sys.executable, str(REPO / "jobs/sweep.py"), "--config", str(REPO / "jobs/configs/digits_tiny.yaml"),
           "--space", str(tmp_path / "space.yaml"), "--trials", "4", "--report", str(tmp_path / "report.html")]
    for kv in (f"data.prefix={data}", f"train.steps={STEPS}", "train.checkpoint_every=10", "train.log_every=10",
               "train.global_batch=32", f"adversarial.ot_scale.steps={STEPS}", "eval.kind=digits",
               "eval.num_samples=200", f"run.storage_path={tmp_path}/runs", "tracking.experiment=sweep-test",
               "tracking.system_metrics=false"):
        cmd += ["--set", kv]
    env = {**os.environ, **ray_head.env, "MLFLOW_TRACKING_URI": mlflow_env, "OMP_NUM_THREADS": "1"}
    # With the study on a database server, the sweep keeps Tune's local state in ./sweeps
    # (study.sweep_dir): the drivers run in tmp_path so that it stays there, not in the checkout.
    cwd = tmp_path

    # 1. first driver: killed with SIGKILL once two trials have finished
    t0 = time.time()
    with open(tmp_path / "driver1.log", "w") as log1:
        first = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log1, stderr=subprocess.STDOUT,
                                 start_new_session=True)
        try:
            while first.poll() is None and study_counts(rdb, name).get("COMPLETE", 0) < 2:
                assert time.time() - t0 < 900, "no two finished trials within 15 minutes"
                time.sleep(1.0)
        finally:
            if first.poll() is None:
                os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL, (tmp_path / "driver1.log").read_text()[-3000:]
    before = {t.number: t.params for t in optuna.load_study(study_name=name, storage=rdb).trials
              if t.state.name == "COMPLETE"}
    assert len(before) >= 2

    # 2. the same command again: resumes, runs only the missing trials
    second = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    log = second.stdout + second.stderr
    wall = time.time() - t0
    assert second.returncode == 0, log[-5000:]
    assert re.search(rf"sweep {name}: {len(before)} finished trial\(s\)", log), log[-3000:]
    study = optuna.load_study(study_name=name, storage=rdb)
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 4
    with closing(postgres.connect("optuna")) as conn, conn.cursor() as cur:  # read from PostgreSQL itself
        cur.execute("SELECT count(*) FROM trials JOIN studies USING (study_id) "
                    "WHERE study_name = %s AND state = 'COMPLETE'", (name,))
        assert cur.fetchone()[0] == 4
    for number, params in before.items():  # finished trials kept, not rerun
        assert study.trials[number].state.name == "COMPLETE" and study.trials[number].params == params
        assert sum(t.params == params for t in study.trials) == 1
    for t in complete:
        assert t.value is not None and t.value > 0 and "mlflow_run_id" in t.user_attrs

    # 3. MLflow: one parent run, children nested under it with the trial's params
    client = MlflowClient()
    exp = client.get_experiment_by_name("sweep-test")
    # The database password reaches neither the drivers' output nor MLflow: the parent run is keyed
    # by the URL without its credentials.
    for text in (log, (tmp_path / "driver1.log").read_text()):
        assert postgres.password not in text
    key = f"{redact_url(storage)}#{name}"
    assert postgres.password not in key and "***@" in key
    parents = client.search_runs([exp.experiment_id], filter_string=f"tags.`advflow.sweep_key` = '{key}'")
    assert len(parents) == 1
    for value in (*parents[0].data.params.values(), *parents[0].data.tags.values()):
        assert postgres.password not in value
    parent = parents[0].info.run_id
    children = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent}'")
    by_id = {r.info.run_id: r for r in children}
    for t in complete:
        child = by_id[t.user_attrs["mlflow_run_id"]]
        for key, value in t.params.items():
            assert float(child.data.params[key]) == pytest.approx(float(value))
        assert "eval/fd" in child.data.metrics and "eval/fd_floor" in child.data.metrics
        assert "eval/cls_acc" in child.data.metrics
        early = child.data.tags["sweep.stopped_early"] == "true"
        assert child.info.status == ("KILLED" if early else "FINISHED")

    # 4. the best trial's generator is the registry's candidate
    best = min(complete, key=lambda t: t.value)
    version = client.get_model_version_by_alias(f"afm-{name}", "candidate")
    finished_best = [t for t in sorted(complete, key=lambda t: t.value)
                     if client.search_model_versions(f"name = 'afm-{name}' and run_id = '{t.user_attrs['mlflow_run_id']}'")]
    assert version.run_id == finished_best[0].user_attrs["mlflow_run_id"]
    if finished_best[0].number != best.number:  # the best one was stopped early by ASHA
        assert by_id[best.user_attrs["mlflow_run_id"]].data.tags["sweep.stopped_early"] == "true"

    # 5. the report: logged to the parent run, renders in Chromium
    arts = [a.path for a in client.list_artifacts(parent, "report")]
    assert arts == ["report/report.html"], arts
    out_dir = Path(os.environ.get("ADVFLOW_TEST_OUTPUT", REPO / "test-output"))
    out_dir.mkdir(parents=True, exist_ok=True)
    dom = run_headless(tmp_path / "report.html", dump_dom=True)
    assert dom.count('class="main-svg"') >= 3
    run_headless(tmp_path / "report.html", screenshot=out_dir / "sweep_e2e_report.png", window=(1400, 3000))
    assert (out_dir / "sweep_e2e_report.png").stat().st_size > 10_000
    stopped = sum(by_id[t.user_attrs["mlflow_run_id"]].data.tags.get("sweep.stopped_early") == "true"
                  for t in complete)
    print(f"\nsweep wall {wall:.0f}s; best {best.value:.3f} (trial {best.number}); "
          f"ASHA stopped {stopped}/{len(complete)} early")


# ----------------------------------------------------------------------------------------- the trial function


@pytest.mark.integration
def test_train_driver_fn_trains_inside_one_tracked_child_run(tmp_path, digits, mlflow_env, monkeypatch):
    """The Tune trial function: the trial's TorchTrainer (from ray_launch.build_torch_trainer, faked
    here) runs inside `tracked_run`, nested under the sweep's parent run; the run is FINISHED when
    fit() returns, FAILED when fit() raises (Ray Train V2 raises TrainingFailedError; it never
    returns a failed Result), and the trial raises that same error."""
    from types import SimpleNamespace

    import yaml
    from mlflow.tracking import MlflowClient
    from ray import tune
    from ray.train import TrainingFailedError, WorkerGroupError

    from advflow.platform.config import RunSpec
    from advflow.platform.data.shards import dataset_tags
    from advflow.platform.sweep import tune as sweep_tune
    from advflow.platform.sweep.space import SweepSpace
    from advflow.platform.sweep.study import TRIAL_KEY, open_study
    from advflow.platform.train import ray_launch

    raw = {"params": {"optim.lr": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True}},
           "storage": f"sqlite:///{tmp_path}/study.db", "study_name": "unit", "register_name": None}
    sp = SweepSpace.from_dict(raw)
    spec = RunSpec.from_dict({"data": {"prefix": digits}, "eval": {"kind": "digits"},
                              "run": {"storage_path": str(tmp_path / "runs")},
                              "tracking": {"experiment": "sweep-unit", "system_metrics": False}})
    base = sweep_tune.prepare_base(spec)
    parent = sweep_tune.open_parent_run(spec, sp, yaml.safe_dump(raw))
    assert parent and parent == sweep_tune.open_parent_run(spec, sp, "")  # found again
    study, _, _ = open_study(sp)
    built: list[dict] = []

    def fit():
        if outcome is not None:
            raise outcome
        return SimpleNamespace(metrics={})  # a V2 Result: the trial reads nothing from it

    def fake_build(spec, callbacks=None, run_id=None, progress=True):
        built.append({"spec": spec, "callbacks": callbacks, "run_id": run_id, "progress": progress})
        return SimpleNamespace(fit=fit)

    monkeypatch.setattr(ray_launch, "build_torch_trainer", fake_build)
    import ray.tune.integration.ray_train as tune_train

    class TuneReportCallback:  # the real one needs a Tune session
        pass

    monkeypatch.setattr(tune_train, "TuneReportCallback", TuneReportCallback)
    client = MlflowClient()
    study.enqueue_trial({"optim.lr": 1e-4})
    same = study.ask()  # another RUNNING trial with the same value: only the recorded number tells them apart
    same.suggest_float("optim.lr", 1e-5, 1e-3, log=True)
    died = WorkerGroupError("rank 0: worker died", {0: RuntimeError("worker died")})
    for trial_id, outcome in (("t-ok", None), ("t-bad", died)):
        monkeypatch.setattr(tune, "get_context", lambda: SimpleNamespace(get_trial_id=lambda: trial_id))
        study.enqueue_trial({"optim.lr": 1e-4})
        trial = study.ask()
        trial.suggest_float("optim.lr", 1e-5, 1e-3, log=True)
        config = {**trial.params, TRIAL_KEY: trial.number}
        call = lambda: sweep_tune.train_driver_fn(config, base=base, space=sweep_tune._space_dict(sp),
                                                  parent_run_id=parent)
        if outcome is None:
            call()
        else:
            with pytest.raises(TrainingFailedError, match="rank 0: worker died") as raised:
                call()
            assert raised.value is died  # fit()'s own error reaches Tune, unwrapped
        b = built[-1]
        assert b["progress"] is False and b["run_id"] and [type(c) for c in b["callbacks"]] == [TuneReportCallback]
        assert b["spec"].run.name == f"unit-{trial_id}" and b["spec"].optim.lr == pytest.approx(trial.params["optim.lr"])
        run = client.get_run(b["run_id"])
        assert run.info.status == ("FINISHED" if outcome is None else "FAILED")
        tags = run.data.tags
        assert tags["mlflow.parentRunId"] == parent and tags["sweep.tune_trial_id"] == trial_id
        assert tags["sweep.optuna_trial"] == str(trial.number) and tags["sweep.study"] == "unit"
        assert {k: v for k, v in tags.items() if k.startswith("data.")} == dataset_tags(digits)
        attrs = study.trials[trial.number].user_attrs
        assert attrs["mlflow_run_id"] == b["run_id"] and attrs["tune_trial_id"] == trial_id
        assert attrs["sample_grid"] == f"runs:/{b['run_id']}/samples/samples.png"
        assert study.trials[same.number].user_attrs == {}
    assert client.get_run(parent).data.tags["advflow.kind"] == "sweep"
    assert [a.path for a in client.list_artifacts(parent, "sweep")] == ["sweep/space.yaml"]


# ----------------------------------------------------------------------------------------- the wrap-up and the report


@pytest.mark.integration
def test_finalize_returns_the_report_and_the_job_logs_it_to_the_parent_run(tmp_path, digits, mlflow_env):
    """The library settles the trials' runs and returns what the report is rendered from (the trials'
    annotations, the parent run, the default place beside the study), rendering nothing itself;
    jobs/sweep.py writes the page there and logs it to the parent run under report/."""
    import importlib.util

    import optuna
    from mlflow.tracking import MlflowClient

    from advflow.platform.config import RunSpec
    from advflow.platform.sweep import tune as sweep_tune
    from advflow.platform.sweep.space import SweepSpace
    from advflow.platform.sweep.study import open_study

    raw = {"params": {"optim.lr": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True}},
           "storage": f"sqlite:///{tmp_path}/study.db", "study_name": "wrap", "register_name": None}
    sp = SweepSpace.from_dict(raw)
    spec = RunSpec.from_dict({"data": {"prefix": digits}, "eval": {"kind": "digits"},
                              "run": {"storage_path": str(tmp_path / "runs")},
                              "tracking": {"experiment": "sweep-wrap", "system_metrics": False}})
    parent = sweep_tune.open_parent_run(spec, sp, "")
    client = MlflowClient()
    experiment = client.get_experiment_by_name("sweep-wrap").experiment_id
    study, _, _ = open_study(sp)
    lr = optuna.distributions.FloatDistribution(1e-5, 1e-3, log=True)
    full = spec.train.steps
    runs = []
    for n, (last, value) in enumerate(((full, 0.5), (full // 2, 0.3))):  # trial 1: stopped early by ASHA
        run_id = client.create_run(experiment).info.run_id
        client.log_metric(run_id, sp.metric, value, step=last)
        runs.append(run_id)
        study.add_trial(optuna.trial.create_trial(
            params={"optim.lr": 1e-4 * (n + 1)}, distributions={"optim.lr": lr}, value=value,
            user_attrs={"mlflow_run_id": run_id, "lr_g": 1e-4 * (n + 1), "model.kind": "1nfe", "tune_trial_id": f"t{n}"}))

    summary, report = sweep_tune.finalize(spec, sp, parent)
    assert summary == {"study": "wrap", "trials": 2, "stopped_early": 1, "best_value": 0.3,
                       "best_params": {"optim.lr": pytest.approx(2e-4)}, "best_trial": 1}
    assert report == sweep_tune.SweepReport(
        storage=sp.storage, study_name="wrap", metric=sp.metric, out=(tmp_path / "wrap.html").resolve(),
        annotations={0: {"steps": full, "stopped_early": False}, 1: {"steps": full // 2, "stopped_early": True}},
        extra_columns=("lr_g", "model.kind", "tune_trial_id"), parent_run_id=parent)
    assert [client.get_run(r).info.status for r in runs] == ["FINISHED", "KILLED"]
    assert not list(tmp_path.rglob("*.html")), "the library rendered a report"
    assert client.list_artifacts(parent, "report") == []

    loader = importlib.util.spec_from_file_location("sweep_job", REPO / "jobs" / "sweep.py")
    job = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(job)
    assert job.write_sweep_report(spec, report) == {"report": str(report.out)}
    page = report.out.read_text()
    assert "tune_trial_id" in page and "stopped_early" in page and "t1" in page
    assert [a.path for a in client.list_artifacts(parent, "report")] == ["report/wrap.html"]
