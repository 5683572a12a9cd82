"""The classifier (`model.method: classifier`, jobs/train.py with jobs/configs/digits_classifier.yaml):
the time-conditioned classifier of classifier guidance, trained on the platform's one loop (2 gloo
workers via the local launcher, DeepSpeed ZeRO-2, the digits shards), tracked on the session's real
MLflow server and registered pickle-free.

One tracked job (`trained`, through the CLI with --no-ray) is shared: it must learn (EMA accuracy on
the held-out digits, measured here independently of what the job logged), its registered version and
its checkpoint must load to the same classifier, and an interrupted copy of it (SIGKILL after the
first checkpoint, then restarted) must reproduce its per-step losses exactly. Then: tampered model
folders and checkpoints are refused naming the file, a run checkpointed by 2 workers resumes exactly
on 1, and the Ray Train path runs the same loop. (The config's errors are tested in test_config.py.)
"""

from __future__ import annotations

import importlib.util
import json
import math
import pickle
import shutil
import signal
import threading
import time
import uuid
from pathlib import Path

import pytest
import torch
import yaml

from advflow.platform.config import load_config
from advflow.platform.tracking import registry
from advflow.platform.tracking.artifact_scan import UnsafeArtifactError
from advflow.platform.train.local_launch import latest_checkpoint, run_local
from advflow.platform.train.metrics_log import MetricsLog

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "jobs" / "configs" / "digits_classifier.yaml"
STEPS, EVERY = 150, 50
MODEL = "clf-test-" + uuid.uuid4().hex[:6]


def _job():
    spec = importlib.util.spec_from_file_location("train_job", REPO / "jobs" / "train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def overrides(prefix: str, storage: str) -> list[str]:
    """The digits recipe, shortened: 150 steps, checkpoints every 50, evaluation at the end."""
    return [f"data.prefix={prefix}", f"run.storage_path={storage}", "run.name=clf", "data.shuffle_buffer=256",
            f"train.steps={STEPS}", f"train.checkpoint_every={EVERY}", "train.log_every=10", "eval.every=0",
            "optim.lr=2e-3", "optim.ema_decay=0.98", "tracking.experiment=test-classifier",
            "tracking.system_metrics=false"]


class Evil:
    """Unpickling this creates `marker` (what an attacker's payload would do, harmlessly)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory, mlflow_server, moto_endpoint):
    """One tracked, registered classifier job through the CLI (--no-ray): (spec, run_id, history,
    run_dir, wall seconds)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from conftest import FAKE_ENV

    root = tmp_path_factory.mktemp("classifier")
    sets = overrides(digits, str(root / "runs")) + [f"tracking.register_name={MODEL}"]
    with pytest.MonkeyPatch.context() as mp:
        for k, v in {**FAKE_ENV, "AWS_ENDPOINT_URL": moto_endpoint, **mlflow_server.env}.items():
            mp.setenv(k, v)
        mlflow.set_tracking_uri(mlflow_server.url)
        t0 = time.perf_counter()
        rc = _job().main(["--config", str(RECIPE), "--no-ray", *[a for s in sets for a in ("--set", s)]])
        wall = time.perf_counter() - t0
        assert rc == 0
        spec = load_config(RECIPE, sets)
        exp = MlflowClient().get_experiment_by_name("test-classifier")
        runs = MlflowClient().search_runs([exp.experiment_id], filter_string=f"tags.`advflow.run_key` = "
                                          f"'{spec.run.storage_path}/{spec.run.name}'")
    run_dir = root / "runs" / "clf"
    history = MetricsLog(str(run_dir)).read()
    print(f"\ntrained: {STEPS} steps x 2 workers in {wall:.1f} s (CLI, incl. process start-up)")
    return spec, runs[0].info.run_id, history, run_dir, wall


def heldout_digits():
    from advflow.platform.data.digits import digits_pixels, digits_split

    return digits_pixels(digits_split(0, 0.2)[1])  # the manifest's hold-out (seed 0, fraction 0.2)


# ----------------------------------------------------------------------------------------- learning


@pytest.mark.integration  # MLflow server, worker processes
@pytest.mark.timeout(300)
def test_classifier_learns_and_logs_to_mlflow(trained, mlflow_env):
    from mlflow.tracking import MlflowClient

    from advflow.platform.data.reader import LatentStream
    from advflow.platform.train.methods import step_seed
    from advflow.platform.train.methods.classifier import DRAWS
    from advflow.trainers.losses import classifier_loss
    from advflow.trainers.models import build_classifier

    spec, run_id, history, run_dir, _ = trained
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.source.name"] == "jobs/train.py" and run.data.tags["advflow.method"] == "classifier"
    assert run.data.tags["advflow.model"] == "tiny" and run.data.params["model.size"] == "tiny"
    assert run.data.params["model.method"] == "classifier"
    assert json.loads(run.data.params["optim.betas"]) == [0.9, 0.95]
    for key in ("loss", "acc", "lr", "grad_norm"):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == list(range(1, STEPS + 1)), key
    by_step = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
    assert [r["step"] for r in history] == list(range(1, STEPS + 1))
    for row in history:
        assert by_step[row["step"]] == pytest.approx(row["loss"], rel=1e-6)

    # Step 1 is the paper's loss, by hand: CE(C0(x_t, t), y) over the first global batch of the "c"
    # stream (canonical partitions: the two ranks' halves), with t ~ U(0, 1) and z ~ N(0, I) drawn for
    # the whole batch from step 0's generator (each sample's draw keyed by its row, not the rank).
    torch.manual_seed(spec.train.seed)
    C0 = build_classifier("tiny", in_channels=1, input_size=8, num_classes=10)
    stream = LatentStream(spec.data.prefix, spec.train.global_batch, partitions=spec.partitions, seed=spec.train.seed, stream="c",
                          shuffle_buffer=spec.data.shuffle_buffer, prefetch=spec.data.prefetch)
    x, y = next(iter(stream))
    stream.close()
    gen = torch.Generator().manual_seed(step_seed(spec.train.seed, 0, 0, DRAWS))
    t = torch.rand(len(x), generator=gen)
    z = torch.randn(x.shape, generator=gen)
    with torch.no_grad():
        loss = float(classifier_loss(C0, x, y, t, z))
    assert history[0]["loss"] == pytest.approx(loss, rel=1e-5)
    first, last = (sum(r["loss"] for r in rows) / len(rows) for rows in (history[:10], history[-10:]))
    assert last < first - 0.3, (first, last)

    # The EMA classifier of the final checkpoint, on the 359 held-out digits (never in the shards).
    C = registry.load_classifier(str(latest_checkpoint(run_dir)), device="cpu")
    x, y = heldout_digits()
    gen = torch.Generator().manual_seed(7)
    acc = {}
    for t in (0.0, 0.25, 0.5, 0.75):
        tt = torch.full((len(y),), t)
        z = torch.randn(x.shape, generator=gen)
        with torch.no_grad():
            acc[t] = float((C((1 - t) * x + t * z, tt).argmax(1) == y).float().mean())
    print("held-out EMA accuracy by t:", {t: round(a, 3) for t, a in acc.items()})
    assert acc[0.0] > 0.5, acc  # chance is 0.1
    assert acc[0.0] > acc[0.75], acc  # noise destroys information
    logged = {t: client.get_metric_history(run_id, f"eval/acc_t{t:.2f}") for t in (0.0, 0.25, 0.5, 0.75)}
    assert all([m.step for m in ms] == [STEPS] for ms in logged.values()), logged
    assert logged[0.0][0].value == pytest.approx(acc[0.0], abs=1.01 / len(y))  # t = 0: no noise, at most a tie flips
    assert client.get_metric_history(run_id, "eval/heldout")[0].value == 1.0


# ----------------------------------------------------------------------------------------- resume


def _spawned_children() -> list:
    import psutil

    out = []
    for p in psutil.Process().children(recursive=True):
        try:
            if any("spawn_main" in part for part in p.cmdline()):
                out.append(p)
        except psutil.Error:
            continue
    return out


@pytest.mark.integration  # MLflow server, worker processes
@pytest.mark.timeout(300)
def test_killed_run_resumes_with_identical_losses(trained, digits, tmp_path, mlflow_env):
    from mlflow.tracking import MlflowClient

    from advflow.platform.tracking.runs import tracked_run

    spec, _, reference, _, _ = trained
    resumed_spec = load_config(RECIPE, overrides(digits, str(tmp_path / "runs")))
    assert {**resumed_spec.to_dict(), "run": None, "tracking": None} == {**spec.to_dict(), "run": None, "tracking": None}
    run_dir = tmp_path / "runs" / "clf"
    killed: list[int] = []

    def killer():  # SIGKILL a worker once the first checkpoint is complete and training went on
        deadline = time.time() + 240
        while time.time() < deadline:
            if (run_dir / f"checkpoint_{EVERY:06d}" / "COMPLETE").is_file():
                victims = _spawned_children()
                if victims:
                    victims[-1].send_signal(signal.SIGKILL)
                    killed.append(victims[-1].pid)
                return
            time.sleep(0.005)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    with pytest.raises(Exception) as err:  # torch.multiprocessing: a worker died
        with tracked_run(resumed_spec) as first:
            run_local(resumed_spec, run_dir, run_id=first.run_id)
    thread.join(timeout=10)
    assert killed, "no worker was killed"
    assert "signal" in str(err.value).lower() or "exit" in str(err.value).lower(), err.value
    left = latest_checkpoint(run_dir)
    assert left is not None and int(left.name[-6:]) < STEPS, "the killed run finished anyway"

    with tracked_run(resumed_spec) as again:  # the same job again: its run, from the latest complete checkpoint
        history = run_local(resumed_spec, run_dir, run_id=again.run_id)
        again.ok = True
    assert again.run_id == first.run_id
    meta = json.loads((latest_checkpoint(run_dir) / "trainer.json").read_text())
    assert meta["resumes"] and meta["resumes"][0] % EVERY == 0 and 0 < meta["resumes"][0] < STEPS
    assert [r["step"] for r in history] == [r["step"] for r in reference] == list(range(1, STEPS + 1))
    for got, want in zip(history, reference):
        for key in ("loss", "acc", "grad_norm"):
            assert math.isclose(got[key], want[key], rel_tol=1e-5, abs_tol=1e-7), (
                f"step {got['step']} {key}: {got[key]} after the restart vs {want[key]} uninterrupted")
    # The restarted job continued its MLflow run: every step logged once, with the uninterrupted values.
    logged = MlflowClient().get_metric_history(first.run_id, "loss")
    assert sorted(m.step for m in logged) == list(range(1, STEPS + 1))
    for m in logged:
        assert math.isclose(m.value, reference[m.step - 1]["loss"], rel_tol=1e-5, abs_tol=1e-7), m.step
    # ... and the resumed EMA is the uninterrupted one.
    a = registry.load_classifier(str(latest_checkpoint(run_dir)), device="cpu")
    b = registry.load_classifier(str(latest_checkpoint(trained[3])), device="cpu")
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-7), name


ELASTIC_STEPS, ELASTIC_AT = 40, 20


@pytest.mark.integration  # worker processes
@pytest.mark.timeout(600)
def test_a_run_checkpointed_by_2_workers_resumes_exactly_on_1(digits, tmp_path):
    """Elastic exact resume (as tests/test_elastic.py for AFM): the digits recipe, shortened and
    untracked, trained by 2 workers to the end; a copy of it cut back to its checkpoint at step 20 (as
    if it died there) continues on 1 worker. Its per-step rows after the resume are the uninterrupted
    run's: the classifier's draws are keyed by the sample's row in the global batch and its stream
    "c" has one order for every worker count (canonical partitions), so only the order of the gradient reduction differs."""
    from advflow.platform.train.checkpoint import read_meta

    sets = overrides(digits, str(tmp_path / "runs")) + [
        f"train.steps={ELASTIC_STEPS}", f"train.checkpoint_every={ELASTIC_AT}", "tracking.enabled=false"]
    two = load_config(RECIPE, sets)
    assert two.distributed.workers == 2 and two.partitions % 2 == 0
    t0 = time.perf_counter()
    reference = run_local(two, tmp_path / "whole")
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "whole", resumed)
    shutil.rmtree(resumed / f"checkpoint_{ELASTIC_STEPS:06d}")  # as if the run died after step ELASTIC_AT
    assert read_meta(resumed / f"checkpoint_{ELASTIC_AT:06d}")["world_size"] == 2

    rows = run_local(load_config(RECIPE, sets + ["distributed.workers=1"]), resumed)
    print(f"\nelastic classifier: {ELASTIC_STEPS} steps on 2 workers + {ELASTIC_STEPS - ELASTIC_AT} resumed on 1 "
          f"in {time.perf_counter() - t0:.1f} s")
    end = read_meta(resumed / f"checkpoint_{ELASTIC_STEPS:06d}")
    assert end["world_size"] == 1 and end["resumes"] == [ELASTIC_AT]
    assert [r["step"] for r in rows] == [r["step"] for r in reference] == list(range(1, ELASTIC_STEPS + 1))

    def numbers(row: dict) -> dict:  # what was trained, not how fast
        return {k: v for k, v in row.items() if not k.startswith("time/") and k != "samples_per_s"}

    after = [(numbers(got), numbers(want)) for got, want in zip(rows, reference) if got["step"] > ELASTIC_AT]
    assert len(after) == ELASTIC_STEPS - ELASTIC_AT
    assert {"loss", "acc", "grad_norm", "lr"} <= set(after[0][1])
    gaps: dict[str, float] = {}
    for got, want in after:
        assert got.keys() == want.keys(), (got["step"], sorted(got.keys() ^ want.keys()))
        for key, value in want.items():
            assert math.isfinite(got[key]), (got["step"], key)
            gaps[key] = max(gaps.get(key, 0.0), abs(got[key] - value) / max(abs(value), 1e-6))
    print("worst relative gap per metric after the resume: " + ", ".join(f"{k} {v:.1e}" for k, v in gaps.items()))
    for got, want in after:
        for key, value in want.items():
            assert math.isclose(got[key], value, rel_tol=1e-5, abs_tol=1e-7), (
                f"step {got['step']} {key}: {got[key]} resumed on 1 worker vs {value} uninterrupted on 2")
    assert len({round(want["loss"], 4) for _, want in after}) > len(after) // 2  # the loss does move
    # ... and the resumed EMA classifier is the uninterrupted one: the same logits on the held-out
    # digits. (Compared through its outputs: the attention's key bias has no gradient but rounding,
    # which Adam scales up to lr-sized steps, so those weights alone differ by ~1e-4 and change nothing.)
    a, b = (registry.load_classifier(str(run / f"checkpoint_{ELASTIC_STEPS:06d}"), device="cpu")
            for run in (resumed, tmp_path / "whole"))
    x, _ = heldout_digits()
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    t = torch.linspace(0, 1, len(x))
    xt = (1 - t[:, None, None, None]) * x + t[:, None, None, None] * z
    with torch.no_grad():
        torch.testing.assert_close(a(xt, t), b(xt, t), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------- registry


@pytest.mark.integration  # MLflow server, worker processes
@pytest.mark.timeout(300)
def test_registered_classifier_is_pickle_free_and_loads_like_the_checkpoint(trained, tmp_path, mlflow_env):
    import mlflow
    from mlflow.tracking import MlflowClient

    from advflow.trainers.models import Classifier

    spec, run_id, _, run_dir, _ = trained
    client = MlflowClient()
    (version,) = client.search_model_versions(f"name = '{MODEL}'")
    assert version.version == "1" and version.run_id == run_id
    assert version.tags["step"] == str(STEPS) and version.tags["run_id"] == run_id
    assert version.tags["advflow.kind"] == "classifier" and len(version.tags["data.manifest_sha256"]) == 64
    assert registry.model_metrics(client, version)["eval/acc_t0.00"] > 0.5  # its LoggedModel's metric
    model = mlflow.get_logged_model(version.source.removeprefix("models:/"))
    assert model.source_run_id == run_id and model.experiment_id == client.get_run(run_id).info.experiment_id

    local = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL}/1", dst_path=str(tmp_path / "dl")))
    files = sorted(p for p in local.rglob("*") if p.is_file())
    for p in files:  # a hand-written check, independent of artifact_scan
        data = p.read_bytes()
        assert not p.name.endswith((".pkl", ".pt", ".pth", ".bin", ".ckpt")), p
        assert not (data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")), p
        assert data[:4] != b"PK\x03\x04", p
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    pyfunc = mlmodel["flavors"]["python_function"]
    assert pyfunc["loader_module"] == "advflow.platform.tracking.model_format" and not pyfunc.get("code")
    inputs = json.loads(mlmodel["signature"]["inputs"])
    assert [(i["name"], i["tensor-spec"]) for i in inputs] == [
        ("x", {"dtype": "float32", "shape": [-1, 1, 8, 8]}), ("t", {"dtype": "float32", "shape": [-1]})]
    assert json.loads(mlmodel["signature"]["outputs"])[0]["tensor-spec"] == {"dtype": "float32", "shape": [-1, 10]}
    reqs = (local / "requirements.txt").read_text()
    assert "torch==" in reqs and "safetensors==" in reqs
    meta = json.loads((local / pyfunc["data"] / "classifier.json").read_text())
    assert meta["format"] == "advflow-classifier" and meta["format_version"] == 1
    assert meta["classifier"] == {"name": "tiny", "in_channels": 1, "input_size": 8, "num_classes": 10}
    assert meta["data_shape"] == [1, 8, 8] and meta["num_classes"] == 10 and meta["t_range"] == [0.0, 1.0]

    client.set_registered_model_alias(MODEL, "champion", "1")
    from_registry = registry.load_classifier(f"models:/{MODEL}/1")
    by_alias = registry.load_classifier(f"models:/{MODEL}@champion", device="cpu")
    from_folder = registry.load_classifier(str(local), device=torch.device("cpu"))
    from_run = registry.load_classifier(f"runs:/{run_id}/classifier", device="cpu")  # the run's logged model
    from_checkpoint = registry.load_classifier(str(latest_checkpoint(run_dir)), device="cpu")
    assert by_alias.source["version"] == "1" and from_checkpoint.source["kind"] == "checkpoint"
    x, _ = heldout_digits()
    z = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    t = torch.linspace(0, 1, len(x))
    want = from_checkpoint((1 - t[:, None, None, None]) * x + t[:, None, None, None] * z, t)
    for C in (from_registry, by_alias, from_folder, from_run):
        assert isinstance(C, Classifier) and not C.training
        assert not any(p.requires_grad for p in C.parameters())
        assert torch.equal(C((1 - t[:, None, None, None]) * x + t[:, None, None, None] * z, t), want)

    # The pyfunc flavour (what `mlflow models serve` runs): the same logits.
    served = mlflow.pyfunc.load_model(f"models:/{MODEL}/1")
    xt = ((1 - t[:, None, None, None]) * x + t[:, None, None, None] * z).numpy()
    out = served.predict({"x": xt[:5], "t": t[:5].numpy()})
    assert out.shape == (5, 10) and torch.allclose(torch.from_numpy(out), want[:5].detach(), atol=1e-5)
    with pytest.raises(Exception, match="classifier"):  # a classifier is not a generator
        registry.load_generator(f"models:/{MODEL}/1")


@pytest.mark.integration  # MLflow server, worker processes
@pytest.mark.timeout(300)
def test_planted_pickles_are_refused_naming_the_file(trained, tmp_path, mlflow_env):
    import mlflow

    _, _, _, run_dir, _ = trained
    marker = tmp_path / "pwned"
    payload = pickle.dumps(Evil(marker), protocol=4)
    clean = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL}/1", dst_path=str(tmp_path / "dl")))
    data = yaml.safe_load((clean / "MLmodel").read_text())["flavors"]["python_function"]["data"]
    for rel in (f"{data}/extra.pkl", f"{data}/notes.json", f"{data}/weights.safetensors"):
        copy = tmp_path / ("model-" + rel.replace("/", "_"))
        shutil.copytree(clean, copy)
        (copy / rel).write_bytes(payload)
        with pytest.raises(UnsafeArtifactError, match=rf"{Path(rel).name}.*never pickle"):
            registry.load_classifier(str(copy))
    # The same through the tracking server: a tampered folder logged to a run, loaded by runs:/ URI.
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(tmp_path / f"model-{data.replace('/', '_')}_notes.json"), "tampered")
    with pytest.raises(UnsafeArtifactError, match="notes.json"):
        registry.load_classifier(f"runs:/{run.info.run_id}/tampered")
    # A checkpoint: its two classifier files are checked (its DeepSpeed files are never opened).
    for name in ("ema.safetensors", "classifier.json"):
        copy = tmp_path / f"ckpt-{name}"
        shutil.copytree(latest_checkpoint(run_dir), copy)
        (copy / name).write_bytes(payload if name.endswith("safetensors") else pickle.dumps(Evil(marker), protocol=0))
        with pytest.raises(UnsafeArtifactError, match=rf"{name}.*never pickle"):
            registry.load_classifier(str(copy))
    assert not marker.exists()
    registry.load_classifier(str(clean))  # the untampered folder still loads
    pickle.loads(payload)  # the payload is live: the checks above are meaningful
    assert marker.exists()


# ----------------------------------------------------------------------------------------- config


# (The config tests moved to tests/test_config.py: the classifier's config is RunSpec's.)


# ----------------------------------------------------------------------------------------- Ray


@pytest.mark.slow
@pytest.mark.integration  # Ray
@pytest.mark.timeout(400)
def test_ray_train_runs_the_classifier_on_the_same_loop(trained, digits, tmp_path):
    import ray

    from advflow.platform.train.ray_launch import build_torch_trainer

    spec = load_config(RECIPE, overrides(digits, str(tmp_path / "ray")) + [
        "train.steps=20", "train.checkpoint_every=10", "tracking.enabled=false"])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        result = build_torch_trainer(spec).fit()
    finally:
        ray.shutdown()
    assert result.error is None, result.error
    ckpt = Path(result.checkpoint.path)
    meta = json.loads((ckpt / "trainer.json").read_text())
    rows = MetricsLog(str(ckpt.parent)).read()
    assert meta["step"] == 20 and [r["step"] for r in rows] == list(range(1, 21))
    # one readers.json for every rank (elastic); the engine under c/.
    assert {"readers.json", "classifier.json", "ema.safetensors", "c"} <= {p.name for p in ckpt.iterdir()}
    assert result.metrics["step"] == 20 and "eval/acc_t0.00" in result.metrics
    C = registry.load_classifier(str(ckpt), device="cpu")
    assert C.spec.data_shape == (1, 8, 8)
    # The same numbers as the first 20 steps of the local launcher's run (same loop, same seeds).
    for got, want in zip(rows, trained[2][:20]):
        for key in ("loss", "acc"):
            assert math.isclose(got[key], want[key], rel_tol=1e-5, abs_tol=1e-7), (got["step"], key)
