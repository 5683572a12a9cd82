"""The classifier job (jobs/train_classifier.py): the time-conditioned classifier of classifier
guidance, trained with the platform's loop (2 gloo workers via the local launcher, DeepSpeed ZeRO-2,
the digits shards), tracked on the session's real MLflow server and registered pickle-free.

One tracked job (`trained`, through the CLI with --no-ray) is shared: it must learn (EMA accuracy on
the held-out digits, measured here independently of what the job logged), its registered version and
its checkpoint must load to the same classifier, and an interrupted copy of it (SIGKILL after the
first checkpoint, then restarted) must reproduce its per-step losses exactly. Then: tampered model
folders and checkpoints are refused naming the file, bad config values give one-line errors, and
the Ray Train path runs the same entry.
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

from advflow.platform.config_classifier import ClassifierRunSpec, load_classifier_config
from advflow.platform.tracking import registry
from advflow.platform.tracking.artifact_scan import UnsafeArtifactError
from advflow.platform.train.classifier import ENTRY
from advflow.platform.train.local_launch import latest_checkpoint, run_local
from advflow.platform.train.metrics_log import MetricsLog

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "jobs" / "configs" / "digits_classifier.yaml"
STEPS, EVERY = 150, 50
MODEL = "clf-test-" + uuid.uuid4().hex[:6]


def _job():
    spec = importlib.util.spec_from_file_location("train_classifier_job", REPO / "jobs" / "train_classifier.py")
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
        for k, v in {**FAKE_ENV, "AWS_ENDPOINT_URL": moto_endpoint, "MLFLOW_TRACKING_URI": mlflow_server.url}.items():
            mp.setenv(k, v)
        mlflow.set_tracking_uri(mlflow_server.url)
        t0 = time.perf_counter()
        rc = _job().main(["--config", str(RECIPE), "--no-ray", *[a for s in sets for a in ("--set", s)]])
        wall = time.perf_counter() - t0
        assert rc == 0
        spec = load_classifier_config(RECIPE, sets)
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


@pytest.mark.timeout(300)
def test_classifier_learns_and_logs_to_mlflow(trained, mlflow_env):
    from mlflow.tracking import MlflowClient

    from advflow.platform.data.reader import LatentStream
    from advflow.platform.train.worker import step_seed
    from advflow.trainers.losses import classifier_loss
    from advflow.trainers.models import build_classifier

    spec, run_id, history, run_dir, _ = trained
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.source.name"] == "jobs/train_classifier.py"
    assert run.data.tags["advflow.model"] == "tiny" and run.data.params["classifier.size"] == "tiny"
    assert json.loads(run.data.params["optim.betas"]) == [0.9, 0.95]
    for key in ("loss", "acc", "lr", "grad_norm"):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == list(range(1, STEPS + 1)), key
    by_step = {m.step: m.value for m in client.get_metric_history(run_id, "loss")}
    assert [r["step"] for r in history] == list(range(1, STEPS + 1))
    for row in history:
        assert by_step[row["step"]] == pytest.approx(row["loss"], rel=1e-6)

    # Step 1 is the paper's loss, by hand: mean over both ranks of CE(C0(x_t, t), y) with t ~ U(0, 1)
    # and z ~ N(0, I) from the rank's step seed, on the rank's first batch of the "c" stream.
    torch.manual_seed(spec.train.seed)
    C0 = build_classifier("tiny", in_channels=1, input_size=8, num_classes=10)
    losses = []
    for rank in range(2):
        stream = LatentStream(spec.data.prefix, spec.micro_batch, rank=rank, world_size=2, seed=spec.train.seed,
                              stream="c", shuffle_buffer=spec.data.shuffle_buffer, prefetch=spec.data.prefetch)
        x, y = next(iter(stream))
        stream.close()
        gen = torch.Generator().manual_seed(step_seed(spec.train.seed, 0, 0, rank, 1))
        t = torch.rand(len(x), generator=gen)
        z = torch.randn(x.shape, generator=gen)
        with torch.no_grad():
            losses.append(float(classifier_loss(C0, x, y, t, z)))
    assert history[0]["loss"] == pytest.approx(sum(losses) / 2, rel=1e-5)
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


@pytest.mark.timeout(300)
def test_killed_run_resumes_with_identical_losses(trained, digits, tmp_path, mlflow_env):
    from mlflow.tracking import MlflowClient

    from advflow.platform.tracking.runs import tracked_run

    spec, _, reference, _, _ = trained
    resumed_spec = load_classifier_config(RECIPE, overrides(digits, str(tmp_path / "runs")))
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
            run_local(resumed_spec, run_dir, run_id=first.run_id, entry=ENTRY)
    thread.join(timeout=10)
    assert killed, "no worker was killed"
    assert "signal" in str(err.value).lower() or "exit" in str(err.value).lower(), err.value
    left = latest_checkpoint(run_dir)
    assert left is not None and int(left.name[-6:]) < STEPS, "the killed run finished anyway"

    with tracked_run(resumed_spec) as again:  # the same job again: its run, from the latest complete checkpoint
        history = run_local(resumed_spec, run_dir, run_id=again.run_id, entry=ENTRY)
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


# ----------------------------------------------------------------------------------------- registry


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
    assert float(version.tags["metric.eval/acc_t0.00"]) > 0.5
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


@pytest.mark.parametrize("setting, message", [
    ("classifier.size=Q/9", "classifier.size: 'Q/9' is not a known size; use one of"),
    ("classifier.t_range=[0.6, 0.2]", "classifier.t_range: [0.6, 0.2] is not an interval inside [0, 1]; use"),
    ("classifier.depth=3", "classifier: unknown key(s) ['depth']; valid keys are ['size', 't_range']"),
    ("optim.ema_decay=1.0", "optim.ema_decay: 1.0 is outside [0, 1); use e.g. 0.9995"),
    ("optim.betas=[0.9]", "optim.betas: expected a list of 2 numbers, got [0.9]"),
    ("train.global_batch=63", "train.global_batch: 63 is not divisible by workers x grad_accum = 2 x 1; pick"),
    ("train.steps=many", "train.steps: expected an integer, got 'many'"),
    ("distributed.zero_stage=3", "distributed.zero_stage: ZeRO-3 is refused"),
    ("distributed.zero_stage_d=1", "distributed.zero_stage_d: the classifier job has one DeepSpeed engine; set "
                                   "distributed.zero_stage instead"),
    ("eval.times=[0, 1.5]", "eval.times: [1.5] outside [0, 1]; use flow times in [0, 1]"),
    ("eval.split=val", "eval.split: 'val' is unknown; use auto, heldout or train"),
    ("tracking.image_every=10", "tracking.image_every: the classifier job logs no image grids; remove it"),
])
def test_bad_config_values_give_one_line_errors(setting, message, capsys):
    assert _job().main(["--config", str(RECIPE), "--set", setting]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"config error: {message}"), err


def test_recipes_and_official_defaults(capsys):
    job = _job()
    assert job.main(["--config", str(REPO / "jobs/configs/imagenet_classifier_b2.yaml"), "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["classifier"] == {"size": "B/2", "t_range": [0.0, 1.0]}
    assert cfg["optim"] == {"lr": 1e-4, "betas": [0.9, 0.95], "weight_decay": 0.01, "eps": 1e-8, "grad_clip": 50.0,
                            "ema_decay": 0.9995, "ema_warmup": False}
    assert cfg["train"]["global_batch"] == 256 and cfg["distributed"]["workers"] == 8
    assert cfg["distributed"]["use_gpu"] and "zero_stage_g" not in cfg["distributed"]
    assert cfg["data"]["prefix"] == "s3://advflow/datasets/imagenet256-sdvae"
    # The defaults without a recipe are the official classifier trainer's too.
    default = ClassifierRunSpec.from_dict({"data": {"prefix": "x"}})
    assert default.optim.model_dump() == cfg["optim"] | {"betas": (0.9, 0.95)}
    assert default.classifier.size == "B/2" and default.train.global_batch == 256
    assert default.run.name == "classifier"  # not the AFM job's default run key
    digits = load_classifier_config(RECIPE)
    assert digits.classifier.size == "tiny" and digits.distributed.workers == 2
    assert digits.tracking.register_name == "afm-digits-classifier" and digits.eval.split == "heldout"


# ----------------------------------------------------------------------------------------- Ray


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_ray_train_runs_the_classifier_entry(trained, digits, tmp_path):
    import ray

    from advflow.platform.train.classifier import ClassifierProgressMeter
    from advflow.platform.train.ray_launch import build_torch_trainer

    spec = load_classifier_config(RECIPE, overrides(digits, str(tmp_path / "ray")) + [
        "train.steps=20", "train.checkpoint_every=10", "tracking.enabled=false"])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    try:
        meter = ClassifierProgressMeter(spec.train.steps, spec.train.global_batch)
        result = build_torch_trainer(spec, entry=ENTRY, meter=meter).fit()
    finally:
        ray.shutdown()
    assert result.error is None, result.error
    ckpt = Path(result.checkpoint.path)
    meta = json.loads((ckpt / "trainer.json").read_text())
    rows = MetricsLog(str(ckpt.parent)).read()
    assert meta["step"] == 20 and [r["step"] for r in rows] == list(range(1, 21))
    assert {"reader-rank0.json", "reader-rank1.json", "classifier.json", "ema.safetensors"} <= {p.name for p in ckpt.iterdir()}
    assert result.metrics["step"] == 20 and "eval/acc_t0.00" in result.metrics
    C = registry.load_classifier(str(ckpt), device="cpu")
    assert C.spec.data_shape == (1, 8, 8)
    # The same numbers as the first 20 steps of the local launcher's run (same entry, same seeds).
    for got, want in zip(rows, trained[2][:20]):
        for key in ("loss", "acc"):
            assert math.isclose(got[key], want[key], rel_tol=1e-5, abs_tol=1e-7), (got["step"], key)
