"""MLflow run tracking (issue 5 §1 and §5) against a real tracking server (SQLite + S3 artifacts).

A tiny 2-worker job runs with the same loop as production (plain processes, no Ray: the Ray
restart path is covered in test_ray_train.py) and the run is then read back from the server.
"""

from __future__ import annotations

import json
import secrets

import pytest

from advflow.platform.config import RunSpec, flatten
from advflow.platform.data.shards import dataset_tags
from advflow.platform.train.local_launch import run_local
from advflow.platform.tracking import logger as run_logging, provenance, runs as tracking
from advflow.platform.tracking import secrets as tracking_secrets

STEPS = 12


def tiny_spec(prefix: str, storage: str, **tracking_kw) -> RunSpec:
    return RunSpec.from_dict({
        "run": {"name": "tracked", "storage_path": storage},
        "data": {"prefix": prefix, "shuffle_buffer": 64, "prefetch": 2},
        "model": {"size": "tiny"},
        "optim": {"lr": 1e-4, "grad_clip": 1.0, "ema_decay": 0.9},
        "train": {"steps": STEPS, "global_batch": 16, "log_every": 4, "checkpoint_every": 6},
        "distributed": {"workers": 2},
        "tracking": {"experiment": "test-tracking", "system_metrics_interval": 0.5, **tracking_kw},
    })


# ----------------------------------------------------------------------------------------- secrets


def test_scrub_masks_secret_env_values_and_url_credentials():
    secret = "s3cr3t-" + secrets.token_hex(8)
    env = {"AWS_SECRET_ACCESS_KEY": secret, "MY_API_TOKEN": "tok-" + secrets.token_hex(6), "HOME": "/root",
           "PATH": "/usr/bin"}
    found = tracking_secrets.secret_values(env)
    assert secret in found and env["MY_API_TOKEN"] in found
    assert "/root" not in found and "/usr/bin" not in found  # not secret-named
    value = {"a": f"prefix-{secret}-suffix", "b": [f"http://alice:{secret}@host:9000/x", 3],
             "c": "https://user:pw@mlflow.example/path", "d": "s3://bucket/plain"}
    out = tracking_secrets.scrub(value, found)
    text = json.dumps(out)
    assert secret not in text and "pw@" not in text and "alice" not in text
    assert out["d"] == "s3://bucket/plain" and out["b"][1] == 3
    assert out["a"] == "prefix-***-suffix"


def test_redact_url_masks_credentials_the_same_way_whatever_the_environment(monkeypatch):
    password = "pw-" + secrets.token_hex(6)
    text = (f"sweep s: 2 in postgresql+psycopg2://optuna:{password}@db.internal:5432/optuna and "
            "sqlite:////tmp/x.db")
    first = tracking_secrets.redact_url(text)
    assert password not in first and "optuna:" not in first
    assert "postgresql+psycopg2://***@db.internal:5432/optuna" in first and "sqlite:////tmp/x.db" in first
    monkeypatch.setenv("SOME_TOKEN", "db.internal")  # secret-named values do not change the mask
    assert tracking_secrets.redact_url(text) == first


def test_ray_token_file_content_is_a_secret(tmp_path):
    token = secrets.token_hex(32)
    (tmp_path / "token").write_text(token + "\n")
    assert token in tracking_secrets.secret_values({"RAY_AUTH_TOKEN_PATH": str(tmp_path / "token")})


# ----------------------------------------------------------------------------------------- a tracked job


SENTINELS = {"AWS_SECRET_ACCESS_KEY": "sentinel-aws-" + secrets.token_hex(8),
             "RAY_AUTH_TOKEN": "sentinel-ray-" + secrets.token_hex(8)}
MODEL = "afm-test-" + secrets.token_hex(3)


def run_tracked_job(digits: str, root, tracking_url: str, moto_endpoint: str, env: dict | None = None,
                    experiment: str | None = None, model: str = MODEL):
    """One tiny tracked job (2 workers, 12 steps, eval + registration at steps 6 and 12) tracked by
    the server at `tracking_url`, with `env` set too; returns (spec, run id, history, run dir)."""
    import mlflow

    from conftest import FAKE_ENV

    with pytest.MonkeyPatch.context() as mp:
        for k, v in {**FAKE_ENV, **(env or {}), "AWS_ENDPOINT_URL": moto_endpoint,
                     "MLFLOW_TRACKING_URI": tracking_url}.items():
            mp.setenv(k, v)
        mlflow.set_tracking_uri(tracking_url)
        spec = tiny_spec(digits, str(root / "runs"), register_name=model, register_every=6)
        if experiment:
            spec.tracking.experiment = experiment
        spec.eval.kind, spec.eval.every, spec.eval.num_samples = "digits", 6, 200
        with tracking.tracked_run(spec, config_yaml="run:\n  name: tracked\n",
                                  data_tags=dataset_tags(spec.data.prefix)) as run:
            history = run_local(spec, root / "runs" / "tracked", run_id=run.run_id)
            run.ok = True
    return spec, run.run_id, history, root / "runs" / "tracked"


@pytest.fixture(scope="module")
def tracked_job(digits, tmp_path_factory, mlflow_server, moto_endpoint):
    """The tiny tracked job, shared by the tracking and the registry end-to-end tests. moto accepts
    any credentials: real-looking secret values (SENTINELS) that must never reach MLflow."""
    return run_tracked_job(digits, tmp_path_factory.mktemp("tracked"), mlflow_server.url, moto_endpoint,
                           env={**SENTINELS, **mlflow_server.env})


@pytest.mark.timeout(600)
@pytest.mark.integration
def test_tracked_job_logs_params_tags_metrics_images_artifacts(tracked_job, tmp_path, mlflow_env):
    from mlflow.tracking import MlflowClient

    spec, run_id, history, _ = tracked_job
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"

    # One run per job: no worker created its own.
    exp = client.get_experiment_by_name("test-tracking")
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`advflow.run_key` = '{tracking.run_key(spec)}'")
    assert [r.info.run_id for r in runs] == [run_id]

    # params: the flattened validated config
    want = {k: (json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v))
            for k, v in flatten(spec.to_dict()).items()}
    assert run.data.params == want

    tags = run.data.tags
    assert tags["git.commit"] and tags["git.commit"] != "unknown"
    assert tags["data.manifest_uri"].endswith("manifest.json")
    assert len(tags["data.manifest_sha256"]) == 64
    assert tags["advflow.version"] == provenance.advflow_version()

    # metrics every log_every steps, equal to the workers' history
    d_loss = client.get_metric_history(run_id, "d_loss")
    assert sorted(m.step for m in d_loss) == list(range(1, STEPS + 1))
    by_step = {m.step: m.value for m in d_loss}
    for row in history:
        assert by_step[row["step"]] == pytest.approx(row["d_loss"], rel=1e-6)
    for key in ("g_loss", "r1", "r2", "cp", "ot", "d_logit_real", "d_logit_fake", "gn_scale", "lambda_ot",
                "lambda_gp", "lr_g", "lr_d", "phase", "samples_per_s", "data_wait_frac",
                "d_grad_norm", "g_grad_norm"):
        assert client.get_metric_history(run_id, key), f"metric {key} was not logged"
    windows = sorted({s for s in range(1, STEPS + 1) if s % 4 == 0 or s % 6 == 0})  # log or checkpoint
    assert sorted(m.step for m in client.get_metric_history(run_id, "samples_per_s")) == windows
    system = [k for k in run.data.metrics if k.startswith("system/")]
    assert system, f"no MLflow system metrics in {sorted(run.data.metrics)}"

    # artifacts: config, final metrics, a sample grid image per checkpoint (steps 6 and 12)
    root = client.download_artifacts(run_id, "", str(tmp_path / "art"))
    from pathlib import Path

    files = sorted(str(p.relative_to(root)) for p in Path(root).rglob("*") if p.is_file())
    assert "config/config.yaml" in files and "final_metrics.json" in files, files
    assert "samples/samples.png" in files, files
    image_files = [f for f in files if f.startswith("images/") and f.endswith(".png")]
    assert {s for s in (6, 12) if any(f"+step+{s}+" in f for f in image_files)} == {6, 12}, image_files
    final = json.loads((Path(root) / "final_metrics.json").read_text())
    assert final["step"] == STEPS

    # secrets from the environment appear nowhere: params, tags, artifacts
    blob = json.dumps(run.data.params) + json.dumps(tags)
    for path in Path(root).rglob("*"):
        if path.is_file():
            blob += path.read_bytes().decode("latin-1")
    for value in SENTINELS.values():
        assert value not in blob
    # ... nor in the registered model's files
    import mlflow

    version = MlflowClient().get_model_version(MODEL, "1")
    local = mlflow.artifacts.download_artifacts(f"models:/{MODEL}/{version.version}", dst_path=str(tmp_path / "m"))
    for path in Path(local).rglob("*"):
        if path.is_file():
            text = path.read_bytes().decode("latin-1")
            for value in SENTINELS.values():
                assert value not in text, path


@pytest.mark.timeout(600)
@pytest.mark.integration
def test_end_to_end_registered_promoted_and_generated_from_the_registry(tracked_job, tmp_path, mlflow_env):
    """Issue 5 §6: tiny job -> run with metrics and image -> registered versions -> champion ->
    jobs/generate.py from models:/NAME@champion, equal to the checkpoint's EMA generator."""
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np
    import torch
    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    from advflow.platform.tracking import registry
    from advflow.trainers.flow import generate
    from advflow.trainers.models import build_generator

    spec, run_id, _, run_dir = tracked_job
    client = MlflowClient()
    assert client.get_metric_history(run_id, "eval/fd") and client.list_artifacts(run_id, "images")
    versions = sorted(client.search_model_versions(f"name = '{MODEL}'"), key=lambda v: int(v.version))
    assert [v.tags["step"] for v in versions] == ["6", "12"]
    run_tags = client.get_run(run_id).data.tags
    fd = {}  # version -> its LoggedModel's eval/fd (the evaluation results are no version tags)
    for v in versions:
        assert v.run_id == run_id and v.tags["run_id"] == run_id
        assert not [t for t in v.tags if t.startswith("metric.")]
        (m,) = [m for m in client.get_logged_model(registry.logged_model_id(v)).metrics if m.key == "eval/fd"]
        history = client.get_metric_history(run_id, "eval/fd")
        # The run's number at that step, linked to the run and to the run's dataset; logged once on the run.
        assert [h.value for h in history if h.step == int(v.tags["step"])] == [m.value]
        digest = run_tags["data.manifest_sha256"][:registry.DATASET_DIGEST_CHARS]
        assert (m.step, m.run_id, m.dataset_digest) == (int(v.tags["step"]), run_id, digest)
        assert v.tags["data.manifest_sha256"] == run_tags["data.manifest_sha256"]
        fd[v.version] = m.value
    best = min(versions, key=lambda v: fd[v.version])

    repo = Path(__file__).resolve().parents[1]
    env = {**__import__("os").environ}
    promote = subprocess.run([sys.executable, "jobs/promote.py", "--name", MODEL, "--alias", "champion",
                              "--best-metric", "eval/fd", "--mode", "min"], cwd=repo, env=env,
                             capture_output=True, text=True, timeout=300)
    assert promote.returncode == 0, promote.stderr[-2000:]
    assert client.get_model_version_by_alias(MODEL, "champion").version == best.version

    outs = []
    for name in ("a", "b"):
        gen = subprocess.run([sys.executable, "jobs/generate.py", "--model", f"models:/{MODEL}@champion",
                              "--labels", "0-9", "--per-label", "2", "--seed", "0", "--out", str(tmp_path / f"{name}.png"),
                              "--npz", str(tmp_path / f"{name}.npz")], cwd=repo, env=env,
                             capture_output=True, text=True, timeout=300)
        assert gen.returncode == 0, gen.stderr[-2000:]
        outs.append(np.load(tmp_path / f"{name}.npz"))
    assert np.array_equal(outs[0]["images"], outs[1]["images"])  # same seed, same images
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()

    # Independent reference: the EMA weights of the checkpoint at the champion's step.
    ckpt = run_dir / f"checkpoint_{int(best.tags['step']):06d}"
    ema = load_file(str(ckpt / "ema.safetensors"))
    g = build_generator("tiny", in_channels=1, input_size=8, num_classes=10)
    missing, unexpected = g.load_state_dict(ema, strict=False)
    assert not unexpected and not set(missing) & {n for n, _ in g.named_parameters()}
    g.eval()
    labels, seeds = outs[0]["labels"], outs[0]["seeds"]
    z = torch.stack([torch.randn((1, 8, 8), generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    with torch.no_grad():
        x = generate(g, z, torch.as_tensor(labels, dtype=torch.long))
    want = ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.abs(want.astype(int) - outs[0]["images"].astype(int)).max() <= 1


@pytest.mark.integration
def test_resubmitted_job_continues_the_same_run(digits, tmp_path, mlflow_env):
    spec = tiny_spec(digits, str(tmp_path / "runs"))
    first = tracking.open_run(spec)
    again = tracking.open_run(tiny_spec(digits, str(tmp_path / "runs")))
    assert first == again
    from mlflow.tracking import MlflowClient

    assert MlflowClient().get_run(first).data.tags["advflow.resubmissions"] == "1"
    other = tracking.open_run(tiny_spec(digits, str(tmp_path / "elsewhere")))
    assert other != first


@pytest.mark.integration
def test_restarted_logger_skips_what_the_previous_attempt_logged(digits, tmp_path, mlflow_env):
    """A worker group restarted from the step-6 checkpoint replays steps 1-8: rows, grids and eval
    metrics the first attempt logged (through step 8) appear once; later ones are logged."""
    import numpy as np
    from mlflow.tracking import MlflowClient
    from PIL import Image

    spec = tiny_spec(digits, str(tmp_path / "runs"), system_metrics=False)
    run_id = tracking.open_run(spec)
    png = tmp_path / "grid.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(png)

    first = run_logging.RunLogger(spec, run_id)
    first.log_rows([{"step": s, "d_loss": float(s)} for s in range(1, 9)])
    first.log_grid(png, 6)
    first.log_metrics({"eval/fd": 6.0}, 6)
    first.close()

    again = run_logging.RunLogger(spec, run_id)  # the restarted rank 0
    assert again.resumed_through == 8
    again.log_rows([{"step": s, "d_loss": float(s)} for s in range(7, 13)])
    for step in (6, 12):
        again.log_grid(png, step)
        again.log_metrics({"eval/fd": float(step)}, step)
    again.close()

    client = MlflowClient()
    assert sorted(m.step for m in client.get_metric_history(run_id, "d_loss")) == list(range(1, 13))
    assert sorted((m.step, m.value) for m in client.get_metric_history(run_id, "eval/fd")) == [(6, 6.0), (12, 12.0)]
    images = [a.path for a in client.list_artifacts(run_id, "images") if a.path.endswith(".png")]
    assert sorted(int(p.split("+step+")[1].split("+")[0]) for p in images) == [6, 12], images


def test_untracked_without_uri(digits, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert tracking.open_run(tiny_spec(digits, str(tmp_path))) is None
    assert "NOT tracked" in capsys.readouterr().err


def test_untracked_tracked_run_has_no_run_and_still_raises(digits, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    spec = tiny_spec(digits, str(tmp_path))
    with tracking.tracked_run(spec, data_tags=dataset_tags(digits)) as run:
        assert (run.run_id, run.url, run.ok) == (None, None, False)
        run.ok = True
    assert "[advflow] MLflow: MLFLOW_TRACKING_URI is not set" in capsys.readouterr().err
    with pytest.raises(KeyError, match="boom"):
        with tracking.tracked_run(spec):
            raise KeyError("boom")


# ----------------------------------------------------------------------------------------- seams


@pytest.mark.integration
def test_tracked_run_closes_finished_failed_or_failed_on_exception(digits, tmp_path, mlflow_env):
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    ids = {}
    for case in ("ok", "not-ok", "raises"):
        spec = tiny_spec(digits, str(tmp_path / case))
        try:
            with tracking.tracked_run(spec, config_yaml="a: 1\n", extra_tags={"case": case},
                                      data_tags=dataset_tags(digits)) as run:
                assert run.run_id and client.get_run(run.run_id).info.status == "RUNNING"
                assert run.url and run.url.endswith(f"/runs/{run.run_id}") and run.url.startswith(mlflow_env)
                ids[case] = run.run_id
                if case == "raises":
                    raise RuntimeError("trial failed")
                run.ok = case == "ok"
        except RuntimeError as err:
            assert case == "raises" and str(err) == "trial failed"
        else:
            assert case != "raises", "tracked_run swallowed the exception"
    status = {case: client.get_run(run_id).info.status for case, run_id in ids.items()}
    assert status == {"ok": "FINISHED", "not-ok": "FAILED", "raises": "FAILED"}
    tags = client.get_run(ids["ok"]).data.tags
    assert tags["case"] == "ok"
    assert {k: v for k, v in tags.items() if k.startswith("data.")} == dataset_tags(digits)


@pytest.mark.integration
def test_open_run_tags_the_callers_data_tags_and_reads_no_manifest(digits, tmp_path, mlflow_env):
    from mlflow.tracking import MlflowClient

    assert not hasattr(tracking, "manifest_facts")
    client = MlflowClient()
    # The same tags as before the move: manifest URI + hash, or the reason the manifest is unreadable.
    good = client.get_run(tracking.open_run(tiny_spec(digits, str(tmp_path / "a")),
                                            data_tags=dataset_tags(digits))).data.tags
    assert good["data.manifest_uri"].endswith("manifest.json") and len(good["data.manifest_sha256"]) == 64
    missing = str(tmp_path / "no-such-dataset")
    bad = client.get_run(tracking.open_run(tiny_spec(missing, str(tmp_path / "b")),
                                           data_tags=dataset_tags(missing))).data.tags
    assert bad["data.manifest_error"] and "data.manifest_uri" not in bad
    bare = client.get_run(tracking.open_run(tiny_spec(digits, str(tmp_path / "c")))).data.tags
    assert not [k for k in bare if k.startswith("data.")]


@pytest.mark.integration
def test_run_logger_is_null_without_a_run(digits, tmp_path, mlflow_env):
    spec = tiny_spec(digits, str(tmp_path), system_metrics=False)
    null = run_logging.run_logger(spec, None)
    assert isinstance(null, run_logging.NullRunLogger)
    assert (null.run_id, null.data_tags) == (None, {})
    null.log_rows([{"step": 1, "d_loss": 1.0}], {"x": 1.0})
    null.log_metrics({"eval/fd": 1.0}, 1)
    null.log_grid(tmp_path / "missing.png", 1)
    null.log_final({"step": 1})
    null.close()
    public = {n for n in dir(run_logging.RunLogger) if not n.startswith("_")}
    assert public <= {n for n in dir(run_logging.NullRunLogger) if not n.startswith("_")}
    for attr in ("run_id", "data_tags", "last_logged_step", "resumed_through"):
        assert hasattr(null, attr)

    run_id = tracking.open_run(spec, data_tags=dataset_tags(digits))
    real = run_logging.run_logger(spec, run_id)
    assert isinstance(real, run_logging.RunLogger) and real.run_id == run_id
    assert real.data_tags == dataset_tags(digits)
    real.close()


@pytest.mark.integration
def test_open_parent_run_is_found_again_and_scrubbed(tmp_path, mlflow_env):
    from mlflow.tracking import MlflowClient

    spec = RunSpec.from_dict({"data": {"prefix": "/x"}, "tracking": {"experiment": "test-parent"}})
    key = f"{tmp_path}#study"
    kw = dict(key_tag="test.parent_key", key=key, run_name="parent", kind="test-group",
              params={"storage": "postgresql://alice:pw@db/x", "n": 3}, texts={"group/notes.txt": "hello"})
    first = tracking.open_parent_run(spec, **kw)
    again = tracking.open_parent_run(spec, **kw)
    assert first and first == again
    client = MlflowClient()
    run = client.get_run(first)
    assert run.data.tags["advflow.kind"] == "test-group" and run.data.tags["test.parent_key"] == key
    assert run.data.tags["git.commit"] == provenance.git_commit()
    assert run.data.params == {"storage": "postgresql://***@db/x", "n": "3"}
    assert [a.path for a in client.list_artifacts(first, "group")] == ["group/notes.txt"]
    tracking.close_run(spec, first, ok=True)
    assert client.get_run(first).info.status == "FINISHED"


@pytest.mark.integration
def test_git_commit_is_the_head_of_this_checkout():
    import subprocess
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    assert provenance.REPO_ROOT == repo
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    got = provenance.git_commit()
    assert got in (head, head + "-dirty")
