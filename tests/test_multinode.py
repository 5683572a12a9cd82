"""Multi-node, simulated on one machine (issue "deploy to a real Ray cluster", item 5).

A Ray head with token auth and no CPUs, and two worker nodes with one CPU each (each its own
raylet, started by `services.start_ray_worker`), all on 127.0.0.1; S3 is a moto server. A job with
two 1-CPU training workers can only run with one worker on each node.

1. A 2-worker training job (`ray job submit`, shards and `run.storage_path` on S3) loses one node
   after its first registered checkpoint. The restarted worker group waits until a node is added
   back, resumes from the checkpoint, and its per-step losses equal an uninterrupted run's.
2. A sweep (Tune + Optuna on SQLite, Tune's state on S3) runs two 1-worker trials at a time, one per
   node; its driver is killed with SIGKILL and started again, and the sweep resumes and finishes.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUCKET = "advflow"
DATA = f"s3://{BUCKET}/datasets/digits"
CONFIG = "jobs/configs/digits_tiny.yaml"
STEPS, CHECKPOINT_EVERY = 64, 8  # ~0.1 s a step: the node goes while training still has seconds to run


@dataclass
class SimCluster:
    """The S3 endpoint, the head and the worker nodes started so far (removed ones included)."""

    s3: object
    head: object
    job_env: dict
    state_dir: Path
    nodes: list = field(default_factory=list)

    def add_node(self):
        from advflow.infra.local.services import start_ray_worker

        node = start_ray_worker(self.head, self.state_dir / f"node{len(self.nodes)}", num_cpus=1,
                                job_env=self.job_env)
        self.nodes.append(node)
        return node

    def node_ids(self) -> set[str]:
        return {n.info["node_id"] for n in self.nodes if n.alive()}


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    from advflow.infra.local.services import ensure_bucket, s3_client, start_moto, start_ray_head, worker_env

    state = tmp_path_factory.mktemp("multinode")
    with start_moto(state / "s3") as s3:
        ensure_bucket(s3, BUCKET)
        # Versions show when a metrics window was written again (by the resumed worker group).
        s3_client(s3).put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
        job_env = {**worker_env(s3), "OMP_NUM_THREADS": "1"}
        # num_cpus=0: no training worker may land on the head, only on the worker nodes.
        with start_ray_head(state / "head", num_cpus=0, job_env=job_env) as head:
            cluster = SimCluster(s3, head, job_env, state)
            try:
                cluster.add_node()
                cluster.add_node()
                env = {k: v for k, v in {**os.environ, **s3.env}.items() if k != "RAY_ADDRESS"}
                subprocess.run([sys.executable, "jobs/prepare_latents.py", "--source", "digits", "--encoder",
                                "pixel", "--out", DATA], cwd=REPO, env=env, check=True, timeout=300)
                yield cluster
            finally:
                for node in cluster.nodes:
                    node.stop()


def ray_state(head, kind: str, **equal) -> list[dict]:
    """Ray's state API on the head (token auth): `kind` (actors, nodes, placement_groups) with the
    given fields equal to the given values; dead actors are listed too."""
    from advflow.infra.local.proc import http_get

    token = Path(head.info["token_path"]).read_text().strip()
    query = "".join(f"&filter_keys={k}&filter_predicates=%3D&filter_values={v}" for k, v in equal.items())
    status, body = http_get(f"{head.url}/api/v0/{kind}?limit=10000&detail=true{query}",
                            {"Authorization": f"Bearer {token}"}, timeout=15)
    assert status == 200, f"state API {kind}: {status} {body[:500]}"
    return json.loads(body)["data"]["result"]["result"]


def train_workers(head, alive_only: bool = True) -> dict[str, str]:
    """actor id -> node id of Ray Train's worker actors."""
    actors = ray_state(head, "actors", class_name="RayTrainWorker")
    return {a["actor_id"]: a["node_id"] for a in actors if a["state"] == "ALIVE" or not alive_only}


def wait_for(what: str, check, job: subprocess.Popen, log: Path, timeout_s: float = 300):
    """Poll `check` until it returns something truthy; fail when the job ended first or time ran out."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = check()
        if got:
            return got
        assert job.poll() is None, f"the job ended (rc {job.returncode}) before {what}:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"no {what} within {timeout_s:.0f} s:\n{log.read_text()[-4000:]}"
        time.sleep(0.2)


def registered_checkpoints(client, run: str) -> int:
    """Checkpoints Ray Train has registered (a checkpoint folder alone is not yet restorable)."""
    try:
        body = client.get_object(Bucket=BUCKET, Key=f"{run}/checkpoint_manager_snapshot.json")["Body"].read()
    except client.exceptions.NoSuchKey:
        return 0
    state = json.loads(body)
    if isinstance(state, str):  # pydantic .json() output stored as a JSON string
        state = json.loads(state)
    return len(state.get("checkpoint_results") or [])


def window_key(run: str, step: int) -> str:
    from advflow.platform.train.metrics_log import window_name

    return f"{run}/{window_name(step, step)}"  # train.log_every=1: one window per step


@pytest.mark.slow
@pytest.mark.multinode
@pytest.mark.timeout(900)
def test_training_job_loses_a_node_and_resumes_exactly_when_one_is_added(sim, tmp_path, monkeypatch):
    from advflow.infra.local.services import s3_client
    from advflow.platform.config import load_config
    from advflow.platform.data.storage import Storage
    from advflow.platform.train.local_launch import run_local
    from advflow.platform.train.metrics_log import MetricsLog

    s3, head = sim.s3, sim.head
    client = s3_client(s3)
    run = "runs/multinode"
    sets = [f"data.prefix={DATA}", f"train.steps={STEPS}", f"train.checkpoint_every={CHECKPOINT_EVERY}",
            "train.log_every=1", "distributed.precision=fp32", "distributed.workers=2", "distributed.cpus_per_worker=1",
            "run.max_failures=2", "eval.kind=none", "tracking.enabled=false"]
    cmd = [str(Path(sys.executable).parent / "ray"), "job", "submit", "--working-dir", str(REPO), "--",
           "python", "jobs/train.py", "--config", CONFIG, "--set", f"run.storage_path=s3://{BUCKET}/runs",
           "--set", "run.name=multinode"]
    for kv in sets:
        cmd += ["--set", kv]

    # Every version of every metrics window, with the time this test first saw it.
    seen: dict[tuple[str, str], float] = {}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            listed = client.list_object_versions(Bucket=BUCKET, Prefix=f"{run}/metrics/")
            now = time.monotonic()
            for v in listed.get("Versions", []):
                seen.setdefault((v["Key"], v["VersionId"]), now)
            time.sleep(0.2)

    log = tmp_path / "job.log"
    with open(log, "w") as out:
        job = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **s3.env, **head.env}, stdout=out,
                               stderr=subprocess.STDOUT, start_new_session=True)
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        try:
            # 1. Both workers run, one per node, and Ray Train registered a checkpoint.
            first = wait_for("a registered checkpoint with both workers alive",
                             lambda: registered_checkpoints(client, run) >= 1 and train_workers(head), job, log)
            assert len(first) == 2 and set(first.values()) == sim.node_ids(), (first, sim.node_ids())
            victim = next(n for n in sim.nodes if n.info["node_id"] == next(iter(first.values())))

            # 2. Remove a node. The restarted group cannot be placed on the one CPU left: it waits.
            removed = time.monotonic()
            victim.stop()
            wait_for("the restarted worker group waiting for capacity",
                     lambda: ray_state(head, "placement_groups", state="PENDING"), job, log, 120)
            pending = time.monotonic()

            # 3. Capacity returns: a new node joins, the group starts there and resumes.
            new_node = sim.add_node()
            added = time.monotonic()
            job.wait(timeout=600)
        finally:
            done.set()
            watcher.join(timeout=10)
            if job.poll() is None:
                os.killpg(job.pid, 9)
                job.wait(timeout=30)
    text = log.read_text()
    assert job.returncode == 0, text[-4000:]
    assert "[advflow] done" in text, text[-4000:]

    # The final checkpoint is on S3 and records the resume from a checkpoint taken before the removal.
    finals = sorted({o["Key"].split("/")[2] for o in client.list_objects_v2(Bucket=BUCKET, Prefix=f"{run}/checkpoint_")
                     .get("Contents", []) if o["Key"].endswith("/trainer.json")})
    meta = json.loads(client.get_object(Bucket=BUCKET, Key=f"{run}/{finals[-1]}/trainer.json")["Body"].read())
    assert meta["step"] == STEPS and meta["world_size"] == 2
    assert len(meta["resumes"]) == 1, meta["resumes"]
    resume = meta["resumes"][0]
    assert resume % CHECKPOINT_EVERY == 0 and 0 < resume < STEPS, resume

    # The resumed group: two new workers, on the surviving node and the added one.
    every = train_workers(head, alive_only=False)
    resumed = {a: n for a, n in every.items() if a not in first}
    assert sorted(resumed.values()) == sorted(sim.node_ids()), (resumed, sim.node_ids())
    assert new_node.info["node_id"] in resumed.values() and victim.info["node_id"] not in resumed.values()

    # Recovery: until the first step after the resume was stored (the final version of its window;
    # the dead group may have written that window before, the resumed one rewrote it).
    key = window_key(run, resume + 1)
    current = client.head_object(Bucket=BUCKET, Key=key)["VersionId"]
    stepped = seen[(key, current)]
    assert stepped > added
    print(f"\nrecovery: node removed -> restarted group pending {pending - removed:.1f} s; "
          f"node added -> first step after the resume (step {resume + 1}) {stepped - added:.1f} s; "
          f"node removed -> that step {stepped - removed:.1f} s")

    # The losses: every step, those after the resume included, equal an uninterrupted run's.
    for k, v in s3.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    rows = MetricsLog(Storage(f"s3://{BUCKET}/{run}")).read()
    spec = load_config(REPO / CONFIG, [*sets, f"run.storage_path={tmp_path / 'plain'}", "run.name=plain"])
    reference = run_local(spec, tmp_path / "plain" / "plain")
    assert [r["step"] for r in rows] == [r["step"] for r in reference] == list(range(1, STEPS + 1))
    for got, want in zip(rows, reference):
        for name in ("d_loss", "g_loss"):
            assert math.isclose(got[name], want[name], rel_tol=1e-5, abs_tol=1e-7), (
                f"step {got['step']} {name}: {got[name]} on the cluster vs {want[name]} uninterrupted")


@pytest.mark.slow
@pytest.mark.multinode
@pytest.mark.timeout(900)
def test_sweep_spreads_trials_over_nodes_and_resumes_after_its_driver_is_killed(sim, tmp_path):
    import optuna
    import yaml

    from advflow.infra.local.services import s3_client

    head, trials = sim.head, 3
    name = "multinode-sweep"
    storage = f"sqlite:///{tmp_path}/study.db"
    space = yaml.safe_load((REPO / "jobs/configs/sweeps/digits_space.yaml").read_text())
    # Two trials at a time, one 1-CPU worker each: on two 1-CPU nodes they must run on different nodes.
    space.update(storage=storage, study_name=name, register_name=None, n_startup_trials=2, max_concurrent_trials=2,
                 overrides={"distributed.workers": 1, "distributed.cpus_per_worker": 1})
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space, sort_keys=False))  # order matters
    cmd = [sys.executable, "jobs/sweep.py", "--config", CONFIG, "--space", str(tmp_path / "space.yaml"),
           "--trials", str(trials), "--report", str(tmp_path / "report.html")]
    for kv in (f"data.prefix={DATA}", "train.steps=16", "train.checkpoint_every=8", "train.log_every=8",
               "train.global_batch=32", "adversarial.ot_scale.steps=16", "eval.kind=digits", "eval.num_samples=200",
               f"run.storage_path=s3://{BUCKET}/sweep-runs", "tracking.enabled=false"):
        cmd += ["--set", kv]
    env = {**os.environ, **sim.s3.env, **head.env, "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)

    def finished() -> list:
        try:
            study = optuna.load_study(study_name=name, storage=storage)
        except KeyError:
            return []
        return [t for t in study.get_trials(deepcopy=False) if t.state.name in ("COMPLETE", "PRUNED")]

    # The Train workers' nodes, seen while the sweep runs: which ran at the same time, where.
    earlier = set(train_workers(head, alive_only=False))  # the training test's workers
    together: list[set[str]] = []
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            alive = train_workers(head)
            if len(alive) > 1:
                together.append(set(alive.values()))
            time.sleep(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        # 1. The first driver is killed with SIGKILL once a trial has finished.
        log1 = tmp_path / "driver1.log"
        with open(log1, "w") as out:
            first = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
            try:
                wait_for("a finished trial", finished, first, log1, 600)
            finally:
                if first.poll() is None:
                    os.killpg(first.pid, 9)
                first.wait(timeout=60)
        assert first.returncode == -9, log1.read_text()[-3000:]
        kept = {t.number: t.params for t in finished()}
        assert 1 <= len(kept) < trials

        # 2. The same command again resumes: the finished trials are kept, only the missing ones run.
        second = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    finally:
        done.set()
        watcher.join(timeout=10)
    log = second.stdout + second.stderr
    assert second.returncode == 0, log[-5000:]
    assert f"sweep {name}: {len(kept)} finished trial(s)" in log, log[-3000:]
    study = optuna.load_study(study_name=name, storage=storage)
    done_now = finished()
    assert len(done_now) == trials
    for number, params in kept.items():
        assert study.trials[number].state.name in ("COMPLETE", "PRUNED") and study.trials[number].params == params

    # Trials ran side by side on the two worker nodes, and no Train worker ever ran on the head.
    assert any(len(nodes) == 2 for nodes in together), f"never saw two trials' workers on two nodes: {together}"
    workers = {a: n for a, n in train_workers(head, alive_only=False).items() if a not in earlier}
    assert len(workers) >= trials and set(workers.values()) <= sim.node_ids(), (workers, sim.node_ids())

    # Tune's experiment state is on S3, beside the trials' checkpoints, for both drivers.
    keys = [o["Key"] for o in s3_client(sim.s3).list_objects_v2(Bucket=BUCKET, Prefix="sweep-runs/")
            .get("Contents", [])]
    experiments = {k.split("/")[3] for k in keys if k.startswith(f"sweep-runs/sweeps/{name}/")
                   and "/experiment_state-" in k}
    assert len(experiments) == 2, sorted(keys)[:40]
    assert any("/checkpoint_" in k for k in keys), sorted(keys)[:40]
    print(f"\nsweep: {len(workers)} Train workers over {len(set(workers.values()))} nodes; "
          f"{len(kept)} trial(s) kept after the driver was killed")
