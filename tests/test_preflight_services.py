"""Checks before launch through jobs/train.py against real services (issue 24): a refused submission
exits 2 with one line, opens no MLflow run, starts no worker, and leaves an existing run's status as
it was (a FINISHED run stays FINISHED, the refusal recorded as an attempt); a resume says where from."""

from __future__ import annotations

import importlib.util
import json
import pickle
import uuid
from pathlib import Path

import pytest

from advflow.platform.config import RunSpec
from advflow.platform.tracking import runs as tracking
from advflow.platform.train import preflight
from advflow.platform.train.preflight import Refused
from helpers_data import make_dataset

pytestmark = pytest.mark.integration  # MLflow, S3 (moto), Ray, local worker processes

REPO = Path(__file__).resolve().parents[1]


def train_job():
    spec = importlib.util.spec_from_file_location("train_job_preflight", REPO / "jobs" / "train.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job


def args(prefix: str, storage: str, name: str, *more: str) -> list[str]:
    sets = [f"data.prefix={prefix}", f"run.storage_path={storage}", f"run.name={name}", "train.steps=2",
            "train.checkpoint_every=2", "train.log_every=1", "distributed.workers=1", "eval.kind=none",
            "tracking.register_name=null", "tracking.experiment=test-preflight", *more]
    return ["--config", str(REPO / "jobs/configs/digits_tiny.yaml"), *[a for s in sets for a in ("--set", s)]]


def runs_of(name: str, storage: str):
    spec = RunSpec.from_dict({"run": {"name": name, "storage_path": storage}, "data": {"prefix": "/x"},
                              "tracking": {"experiment": "test-preflight"}})
    return tracking.find_run(spec)


def refused_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("[advflow] refused: ")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


@pytest.mark.parametrize("case", ["missing bucket", "missing manifest", "missing shard"])
def test_bad_data_is_refused_before_any_run_or_worker(case, s3_prefix, mlflow_env, tmp_path, capsys):
    if case == "missing bucket":
        prefix = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/digits"
        want = f"data.prefix={prefix}: the bucket '{prefix[5:].split('/')[0]}' does not exist at "
    elif case == "missing manifest":
        prefix = s3_prefix
        want = f"data.prefix={prefix}: no manifest.json there"
    else:
        prefix = s3_prefix
        st, _ = make_dataset(prefix, 60, shard_records=20)
        st.remove("shard-00001.bin")
        want = f"data.prefix={prefix}: {prefix}/shard-00001.bin is listed in manifest.json but missing"
    name = f"pf-{uuid.uuid4().hex[:6]}"
    rc = train_job().main([*args(prefix, str(tmp_path / "runs"), name), "--no-ray"])
    out = capsys.readouterr()
    assert rc == 2
    assert refused_line(out.err).startswith(f"[advflow] refused: {want}"), out.err[-2000:]
    assert "Traceback" not in out.out + out.err
    assert runs_of(name, str(tmp_path / "runs")) is None  # no MLflow run opened
    assert not (tmp_path / "runs" / name).exists()  # no worker ran, no failures file


def test_a_planted_pickle_on_s3_is_refused_naming_its_s3_path(s3_prefix, tmp_path):
    from advflow.platform.data.storage import Storage

    data = f"{s3_prefix}/data"
    make_dataset(data, 60, shard_records=20)
    spec = RunSpec.from_dict({"run": {"name": "planted", "storage_path": f"{s3_prefix}/runs"}, "data": {"prefix": data},
                              "model": {"size": "tiny"}, "train": {"global_batch": 16}, "eval": {"kind": "none"}})
    run = Storage(preflight.run_root(spec))
    run.write_atomic("checkpoint_000400/trainer.json",
                     json.dumps({"format": 2, "step": 400, "world_size": 1, "config": spec.to_dict()}).encode())
    run.write_atomic("checkpoint_000400/g/weights.safetensors", b"{}")
    run.write_atomic("checkpoint_000400/d/optim.safetensors", pickle.dumps({"x": 1}, protocol=4))
    run.write_atomic(preflight.RAY_SNAPSHOT, json.dumps(
        {"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_000400", "metrics": {}}}).encode())
    with pytest.raises(Refused, match=rf"^{s3_prefix}/runs/planted/checkpoint_000400/d/optim\.safetensors: a pickle "
                                      "under a safe file name"):
        preflight.run_preflight(spec, ray=True)
    run.remove("checkpoint_000400/d/optim.safetensors")
    assert preflight.run_preflight(spec, ray=True).resume.uri == f"{s3_prefix}/runs/planted/checkpoint_000400"
    with pytest.raises(Refused, match=r"^run.storage_path=s3://no-such-bucket-x/runs: the bucket 'no-such-bucket-x' "
                                      "does not exist"):
        preflight.check_storage(RunSpec.from_dict({"run": {"storage_path": "s3://no-such-bucket-x/runs"},
                                                   "data": {"prefix": data}}))


@pytest.mark.timeout(900)
def test_a_size_change_on_resume_is_refused_and_the_finished_run_stays_finished(digits, mlflow_env, tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    job, storage, name = train_job(), str(tmp_path / "runs"), "resized"
    assert job.main([*args(digits, storage, name), "--no-ray"]) == 0
    capsys.readouterr()
    before = runs_of(name, storage)
    assert before.info.status == "FINISHED"

    rc = job.main([*args(digits, storage, name, "model.size=S/2"), "--no-ray"])
    out = capsys.readouterr()
    assert rc == 2
    line = refused_line(out.err)
    assert "trained with model.size=tiny" in line and "this submission has model.size=S/2" in line, line
    assert "use a new run.name" in line and "Traceback" not in out.err
    run = MlflowClient().get_run(before.info.run_id)
    assert run.info.status == "FINISHED" and run.info.end_time == before.info.end_time
    assert run.data.params == before.data.params
    tags = run.data.tags
    assert tags["advflow.attempt"] == "2" and tags["advflow.attempt.1.ended"].startswith("FINISHED at ")
    assert tags["advflow.attempt.2.ended"].startswith("REFUSED at 20") and "model.size=S/2" in tags["advflow.attempt.2.ended"]

    # Another dataset under the same run.name: refused, not merged into the run.
    other = str(tmp_path / "other")
    make_dataset(other, 60, shape=(1, 8, 8), num_classes=10, shard_records=20)
    rc = job.main([*args(other, storage, name), "--no-ray"])
    assert rc == 2 and "holds another dataset" in refused_line(capsys.readouterr().err)
    assert MlflowClient().get_run(before.info.run_id).info.status == "FINISHED"

    # The same settings continue (more steps), and the driver says where from.
    assert job.main([*args(digits, storage, name, "train.steps=4"), "--no-ray"]) == 0
    out = capsys.readouterr()
    assert "resuming from checkpoint_000002 (step 2, attempt 4)" in out.out + out.err, (out.out + out.err)[-3000:]
    assert MlflowClient().get_run(before.info.run_id).data.tags["advflow.attempt.3.ended"].startswith("REFUSED")


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield
    ray.shutdown()


def _train_workers_started() -> int:
    from ray._private import state

    return sum(1 for a in state.actors().values() if a.get("ActorClassName") == "RayTrainWorker")


def _controllers_started() -> int:
    from ray._private import state

    return sum(1 for a in state.actors().values() if "Controller" in str(a.get("ActorClassName")))


@pytest.mark.timeout(300)
def test_a_worker_group_the_cluster_can_never_hold_is_refused_at_once(digits, local_ray, mlflow_env, tmp_path, capsys,
                                                                       monkeypatch):
    import time

    monkeypatch.delenv(preflight.AUTOSCALER_ENV, raising=False)
    assert not preflight.cluster_can_grow()  # ray.init's cluster: no autoscaler
    before = (_train_workers_started(), _controllers_started())
    t0 = time.monotonic()
    rc = train_job().main(args(digits, str(tmp_path / "runs"), "wide", "distributed.workers=64",
                               "train.global_batch=64"))
    took = time.monotonic() - t0
    out = capsys.readouterr()
    assert rc == 2
    assert refused_line(out.err) == (
        "[advflow] refused: distributed.workers=64 asks for 64 worker(s) x {CPU: 1} = {CPU: 64}, but the Ray cluster "
        "has {CPU: 2} in all on 1 node(s), room for 2, and no autoscaler to add nodes: lower distributed.workers (or "
        "distributed.cpus_per_worker), set distributed.min_workers for an elastic range, or add nodes to the cluster")
    assert (_train_workers_started(), _controllers_started()) == before  # nothing started on Ray
    assert runs_of("wide", str(tmp_path / "runs")) is None and took < 30


def test_a_resume_the_workers_refuse_leaves_a_finished_run_finished(tmp_path, mlflow_env):
    """The workers' ResumeError (the last line of defence behind preflight) trained nothing: the
    attempt is recorded REFUSED and the run keeps the status and end time it had."""
    from mlflow.tracking import MlflowClient

    spec = RunSpec.from_dict({"run": {"name": "worker-refusal", "storage_path": str(tmp_path)}, "data": {"prefix": "/x"},
                              "tracking": {"experiment": "test-preflight"}})
    with tracking.tracked_run(spec) as first:
        first.ok = True
    done = MlflowClient().get_run(first.run_id)
    assert done.info.status == "FINISHED" and first.attempt == 1
    with tracking.tracked_run(spec) as second:
        assert second.attempt == 2
        second.refused = "rank 0: ResumeError: s3://b/runs/x/checkpoint_000400: incomplete checkpoint"
    run = MlflowClient().get_run(first.run_id)
    assert run.info.status == "FINISHED" and run.info.end_time == done.info.end_time
    assert run.data.tags["advflow.attempt.2.ended"].startswith("REFUSED at ")
    assert "checkpoint_000400: incomplete checkpoint" in run.data.tags["advflow.attempt.2.ended"]
    with tracking.tracked_run(spec) as third:  # a real failure still fails the run
        assert third.attempt == 3
    assert MlflowClient().get_run(first.run_id).info.status == "FAILED"
