"""CLI mistakes get one clear line (issue 15, finding 6): return code 2, exactly one `[advflow] ...`
line naming the culprit and the fix, no traceback, and nothing left behind (no ./mlflow.db, no
MLflow run, no Optuna study)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.integration  # every test runs a job script as a process (some against the MLflow server)

REPO = Path(__file__).resolve().parents[1]


def _cli(script: str, *args: str, cwd: Path, env: dict | None = None, unset=("MLFLOW_TRACKING_URI",)):
    """Run jobs/<script> as a user would; returns (rc, stdout + stderr lines)."""
    full = {**os.environ, **(env or {})}
    for var in unset:
        full.pop(var, None)
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / script), *args], cwd=cwd, env=full,
                          capture_output=True, text=True, timeout=300)
    assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
    return proc.returncode, (proc.stdout + proc.stderr).strip().splitlines()


def _one_line(lines: list[str], *needles: str) -> str:
    advflow = [line for line in lines if line.startswith("[advflow] ")]
    assert len(advflow) == 1, lines
    for needle in needles:
        assert needle in advflow[0], advflow[0]
    return advflow[0]


def _generator_file(path: Path, channels: int, size: str = "tiny", input_size: int = 8) -> Path:
    from safetensors.torch import save_file

    from advflow.trainers.models import build_generator

    torch.manual_seed(0)
    G = build_generator(size, in_channels=channels, input_size=input_size, num_classes=10)
    save_file({k: v.contiguous() for k, v in G.state_dict().items()}, str(path))
    return path


# ------------------------------------------------------------------------- no tracking URI


@pytest.mark.parametrize("script,args", [
    ("generate.py", ["--model", "models:/afm-digits@champion", "--out", "g.png"]),
    ("promote.py", ["--name", "afm-digits", "--alias", "champion", "--version", "1"]),
    ("register_checkpoint.py", ["--checkpoint", "{ckpt}", "--name", "afm-digits", "--decoder", "pixel"]),
])
def test_registry_commands_refuse_without_a_tracking_uri(tmp_path, script, args):
    ckpt = _generator_file(tmp_path / "g.safetensors", channels=1)
    rc, lines = _cli(script, *[a.format(ckpt=ckpt) for a in args], cwd=tmp_path)
    assert rc == 2
    _one_line(lines, "MLFLOW_TRACKING_URI is not set", "advflow stack env")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["g.safetensors"]  # no mlflow.db, no mlruns, no g.png


def test_generate_from_a_local_model_folder_needs_no_tracking_uri(tmp_path, mlflow_env):
    """A registered-model folder on disk is read directly: no URI asked for, and no ./mlflow.db."""
    import mlflow

    from advflow.platform.tracking import registry
    from advflow.trainers.models import build_generator

    G = build_generator("tiny", in_channels=1, input_size=8, num_classes=10).eval()
    mlflow.set_experiment("cli-errors")
    with mlflow.start_run():
        done = registry.log_generator(G, decoder={"name": "pixel", "scaling_factor": 1.0}, data_shape=(1, 8, 8),
                                      num_classes=10, registered_name=None)
    folder = Path(mlflow.artifacts.download_artifacts(done.model_uri, dst_path=str(tmp_path / "model")))
    work = tmp_path / "work"
    work.mkdir()
    rc, lines = _cli("generate.py", "--model", str(folder), "--labels", "0-1", "--per-label", "2",
                     "--out", "grid.png", cwd=work)
    assert rc == 0, lines
    assert sorted(p.name for p in work.iterdir()) == ["grid.png"]


# ------------------------------------------------------------------------- register_checkpoint


def test_register_checkpoint_refuses_a_decoder_channel_mismatch_before_any_run(tmp_path, mlflow_env):
    from mlflow.tracking import MlflowClient

    ckpt = _generator_file(tmp_path / "latent.safetensors", channels=4)
    experiment = "cli-" + uuid.uuid4().hex[:8]
    rc, lines = _cli("register_checkpoint.py", "--checkpoint", str(ckpt), "--name", "g-" + uuid.uuid4().hex[:6],
                     "--decoder", "pixel", "--experiment", experiment, cwd=tmp_path, unset=())
    assert rc == 2
    _one_line(lines, "--decoder pixel", "4-channel", "--decoder sd-vae")
    rc, lines = _cli("register_checkpoint.py", "--checkpoint", str(_generator_file(tmp_path / "px.safetensors", 1)),
                     "--name", "g-x", "--decoder", "sd-vae", "--vae-path", str(tmp_path), "--experiment", experiment,
                     cwd=tmp_path, unset=())
    assert rc == 2
    _one_line(lines, "--decoder sd-vae", "1-channel", "--decoder pixel")
    assert MlflowClient().get_experiment_by_name(experiment) is None  # no run, not even its experiment


def test_register_checkpoint_needs_allow_new_architecture_for_another_architecture(tmp_path, mlflow_env):
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    name = "g-" + uuid.uuid4().hex[:8]
    tiny = _generator_file(tmp_path / "tiny.safetensors", channels=1)
    other = _generator_file(tmp_path / "s2.safetensors", channels=1, size="S/2")
    assert _cli("register_checkpoint.py", "--checkpoint", str(tiny), "--name", name, "--decoder", "pixel",
                cwd=tmp_path, unset=())[0] == 0
    runs_before = len(client.search_runs([client.get_experiment_by_name("imports").experiment_id]))
    rc, lines = _cli("register_checkpoint.py", "--checkpoint", str(other), "--name", name, "--decoder", "pixel",
                     cwd=tmp_path, unset=())
    assert rc == 2
    _one_line(lines, f"--name {name}", "size tiny -> S/2", "--allow-new-architecture")
    assert [mv.version for mv in client.search_model_versions(f"name = '{name}'")] == ["1"]
    assert len(client.search_runs([client.get_experiment_by_name("imports").experiment_id])) == runs_before
    # The same architecture again is fine; another one with the flag too.
    assert _cli("register_checkpoint.py", "--checkpoint", str(tiny), "--name", name, "--decoder", "pixel",
                cwd=tmp_path, unset=())[0] == 0
    rc, lines = _cli("register_checkpoint.py", "--checkpoint", str(other), "--name", name, "--decoder", "pixel",
                     "--allow-new-architecture", cwd=tmp_path, unset=())
    assert rc == 0, lines
    assert sorted(mv.version for mv in client.search_model_versions(f"name = '{name}'")) == ["1", "2", "3"]


# ------------------------------------------------------------------------- sweep


def test_sweep_with_an_unknown_parameter_fails_before_launch(tmp_path, digits, mlflow_env):
    """A misspelt field fails at once, naming it: no Optuna study, no MLflow parent run, no Ray."""
    import yaml
    from mlflow.tracking import MlflowClient

    db = tmp_path / "sweeps" / "typo.db"
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({
        "study_name": "typo", "storage": f"sqlite:///{db}",
        "params": {"optim.lr": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True},
                   "adversarial.gp_scael": {"type": "float", "low": 0.1, "high": 1.0}}}))
    experiment = "cli-sweep-" + uuid.uuid4().hex[:8]
    rc, lines = _cli("sweep.py", "--config", str(REPO / "jobs/configs/digits_tiny.yaml"), "--space", str(space),
                     "--trials", "2", "--set", f"data.prefix={digits}", "--set", f"tracking.experiment={experiment}",
                     cwd=tmp_path, unset=("RAY_ADDRESS",))
    assert rc == 2
    _one_line(lines, "adversarial.gp_scael", "gp_scale", "fix or remove params.adversarial.gp_scael")
    assert not db.parent.exists()  # no study
    assert MlflowClient().get_experiment_by_name(experiment) is None  # no parent run


def test_sweep_on_a_missing_dataset_is_refused_before_any_trial(tmp_path, digits, mlflow_env):
    """The preflight's dataset check runs once on the sweep's driver, not once per trial on workers."""
    import yaml
    from mlflow.tracking import MlflowClient

    db = tmp_path / "sweeps" / "nodata.db"
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({
        "study_name": "nodata", "storage": f"sqlite:///{db}",
        "params": {"optim.lr": {"type": "float", "low": 1e-5, "high": 1e-3, "log": True}}}))
    experiment = "cli-sweep-" + uuid.uuid4().hex[:8]
    missing = str(tmp_path / "no-such-dataset")
    rc, lines = _cli("sweep.py", "--config", str(REPO / "jobs/configs/digits_tiny.yaml"), "--space", str(space),
                     "--trials", "2", "--set", f"data.prefix={missing}", "--set", f"tracking.experiment={experiment}",
                     "--set", f"run.storage_path={tmp_path / 'runs'}", cwd=tmp_path, unset=("RAY_ADDRESS",))
    assert rc == 2
    _one_line(lines, "refused", f"data.prefix={missing}", "manifest.json")
    assert not db.exists()  # no study
    assert MlflowClient().get_experiment_by_name(experiment) is None  # no parent run


# ------------------------------------------------------------------------- prepare_latents


def _image_folder(root: Path, corrupt: bool = False) -> Path:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (12, 12, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    (root / "cat" / "notes.txt").write_text("not an image")
    if corrupt:
        (root / "dog" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


def test_prepare_latents_warns_about_non_image_files_or_refuses_them_with_strict(tmp_path):
    src = _image_folder(tmp_path / "src")
    rc, lines = _cli("prepare_latents.py", "--source", str(src), "--out", str(tmp_path / "out"), "--resolution", "8",
                     "--no-progress", "--strict", cwd=tmp_path, unset=("RAY_ADDRESS",))
    assert rc == 2
    _one_line(lines, "1 entry", "cat/notes.txt", "--strict")
    assert not (tmp_path / "out" / "manifest.json").exists()
    rc, lines = _cli("prepare_latents.py", "--source", str(src), "--out", str(tmp_path / "out"), "--resolution", "8",
                     "--no-progress", cwd=tmp_path, unset=("RAY_ADDRESS",))
    assert rc == 0, lines
    _one_line(lines, "cat/notes.txt", "skipped", "--strict")
    assert (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize("where", ["in-process", "ray"])
def test_prepare_latents_names_a_corrupt_image_in_one_line(tmp_path, where):
    src = _image_folder(tmp_path / "src", corrupt=True)
    ray = ["--ray-address", "local"] if where == "ray" else []
    rc, lines = _cli("prepare_latents.py", "--source", str(src), "--out", str(tmp_path / "out"), "--resolution", "8",
                     "--no-progress", *ray, cwd=tmp_path, unset=("RAY_ADDRESS",))
    assert rc == 2
    errors = [line for line in lines if "broken.jpg" in line]
    assert len(errors) == 1 and errors[0].startswith("[advflow] prepare_latents: ") and "remove or replace" in errors[0], lines
    assert not (tmp_path / "out" / "manifest.json").exists()
