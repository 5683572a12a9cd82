"""Model registry: pickle-free pyfunc logging, registration, promote, generate, serve, imports.

Runs against the session MLflow server of conftest (SQLite + artifacts proxied to moto S3). Every
expected image is computed here from the original module: per-row seeded CPU noise through
flow.generate, mapped to uint8 by hand.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
import uuid
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from advflow.platform.tracking import model_format, registry
from advflow.platform.tracking.artifact_scan import UnsafeArtifactError, file_problem, scan_model_dir
from advflow.trainers.flow import generate
from advflow.trainers.models import build_generator

REPO = Path(__file__).resolve().parents[1]
PIXEL = {"name": "pixel", "scaling_factor": 1.0}
SHAPE = (1, 8, 8)
PICKLE_NAMES = (".pkl", ".pickle", ".pt", ".pth", ".bin", ".ckpt", ".joblib")


def _job(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_job", REPO / "jobs" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up while the class is created
    spec.loader.exec_module(mod)
    return mod


def _tiny(seed: int = 0, **opts) -> torch.nn.Module:
    """Tiny generator with random (not zero-initialised) weights, so outputs depend on noise and label."""
    torch.manual_seed(seed)
    G = build_generator("tiny", in_channels=1, input_size=8, num_classes=10, **opts)
    with torch.no_grad():
        for p in G.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return G.eval()


def _reference(G, labels, seeds) -> np.ndarray:
    """Independent expected images: noise row i from torch.Generator().manual_seed(seeds[i])."""
    z = torch.stack([torch.randn(SHAPE, generator=torch.Generator().manual_seed(s)) for s in seeds])
    x = generate(G, z, torch.tensor(labels))  # (N, 1, 8, 8)
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _name() -> str:
    return f"g-{uuid.uuid4().hex[:8]}"


def _log(G, name: str | None, **kw) -> registry.RegisteredGenerator:
    import mlflow

    mlflow.set_experiment("registry-tests")
    with mlflow.start_run():
        return registry.log_generator(G, decoder=PIXEL, data_shape=SHAPE, num_classes=10, registered_name=name, **kw)


def _looks_pickled(path: Path) -> bool:
    """Hand-written check, independent of artifact_scan: names, protocol 2-5 header, zip with .pkl."""
    data = path.read_bytes()
    if path.name.lower().endswith(PICKLE_NAMES) or (data[:1] == b"\x80" and data[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
        return True
    if data[:4] == b"PK\x03\x04":
        with zipfile.ZipFile(path) as zf:
            return any(n.endswith(".pkl") for n in zf.namelist())
    return False


class Evil:
    """Unpickling this creates `marker` (what an attacker's payload would do, harmlessly)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


# ----------------------------------------------------------------------------------------------------
# Scanner (no server)
# ----------------------------------------------------------------------------------------------------


def test_scanner_flags_pickles_and_passes_model_files(tmp_path):
    from safetensors.torch import save_file

    marker = tmp_path / "pwned"
    ok = tmp_path / "ok"
    ok.mkdir()
    (ok / "MLmodel").write_text("flavors:\n  python_function:\n    loader_module: x\n")
    (ok / "conda.yaml").write_text("channels:\n- conda-forge\ndependencies:\n- python=3.11\n")
    (ok / "generator.json").write_text(json.dumps({"a": [1, 2]}))
    save_file({"w": torch.zeros(3)}, str(ok / "weights.safetensors"))
    # A valid safetensors file whose header length (640 = 0x0280) makes its first bytes 80 02, exactly
    # a protocol-2 pickle header: the scanner must parse it as safetensors, not flag it.
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode().ljust(640)
    (ok / "tricky.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + b"\0\0\0\0")
    assert (ok / "tricky.safetensors").read_bytes()[:2] == b"\x80\x02"
    assert scan_model_dir(ok) == 5

    bad = {
        "notes.json": pickle.dumps(Evil(marker), protocol=4),  # magic bytes, innocent name
        "extra.pkl": b"not even a pickle",  # name alone
        "old.txt": pickle.dumps(Evil(marker), protocol=0),  # text protocol, no header byte
        "blob.dat": None,  # torch.save zip archive (data.pkl inside)
        "broken.safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ",
    }
    for fname, payload in bad.items():
        d = tmp_path / fname.replace(".", "_")
        shutil.copytree(ok, d)
        if payload is None:
            torch.save({"w": torch.zeros(2)}, d / fname)
        else:
            (d / fname).write_bytes(payload)
        with pytest.raises(UnsafeArtifactError, match=fname.replace(".", r"\.")) as err:
            scan_model_dir(d)
        assert "never pickle" in str(err.value) and "tampered" in str(err.value)
    link = tmp_path / "link"
    shutil.copytree(ok, link)
    (link / "ln.json").symlink_to(ok / "generator.json")
    assert "symbolic link" in file_problem(link / "ln.json")
    assert not marker.exists()
    # The payload is live: unpickling it (which the scanner must never do) creates the marker.
    pickle.loads(bad["notes.json"])
    assert marker.exists()


# ----------------------------------------------------------------------------------------------------
# Logging and registration
# ----------------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_log_register_artifacts_signature_tags(mlflow_env, tmp_path, monkeypatch):
    import mlflow

    def no_load(*a, **k):
        raise AssertionError("log_generator must not load the model (no serving-input validation)")

    monkeypatch.setattr(model_format, "_load_pyfunc", no_load)
    name = _name()
    sha = hashlib.sha256(b"a manifest").hexdigest()
    data = {"data.prefix": "s3://b/d", "data.manifest_uri": "s3://b/d/manifest.json", "data.manifest_sha256": sha}
    done = _log(_tiny(), name, step=120, tags={**data, "method": "afm"}, metrics={"eval/fd": 3.25, "eval/fd@4": 2.5})
    run_id = mlflow.last_active_run().info.run_id
    assert done.version == "1" and done.name == name and done.model_uri == f"models:/{done.model_id}"
    assert done.registry_uri == f"models:/{name}/1"

    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/1", dst_path=str(tmp_path)))
    files = [p for p in local.rglob("*") if p.is_file()]
    assert {"MLmodel", "weights.safetensors", "generator.json", "input_example.json"} <= {p.name for p in files}
    assert [p for p in files if _looks_pickled(p)] == []
    monkeypatch.undo()
    assert scan_model_dir(local) == len(files)

    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    pyfunc = mlmodel["flavors"]["python_function"]
    assert pyfunc["loader_module"] == "advflow.platform.tracking.model_format"
    assert not pyfunc.get("code")  # no Python shipped with the model
    inputs = json.loads(mlmodel["signature"]["inputs"])
    assert [(c["name"], c["type"]) for c in inputs] == [("label", "long"), ("seed", "long")]
    outputs = json.loads(mlmodel["signature"]["outputs"])
    assert outputs[0]["tensor-spec"] == {"dtype": "uint8", "shape": [-1, 8, 8, 1]}
    assert mlmodel["saved_input_example_info"]["artifact_path"] == "input_example.json"
    example = json.loads((local / "input_example.json").read_text())
    assert example["columns"] == ["label", "seed"]
    reqs = (local / "requirements.txt").read_text()
    assert "torch==" in reqs and "safetensors==" in reqs

    spec = json.loads((local / pyfunc["data"] / "generator.json").read_text())
    assert spec["sampler"] == {"kind": "1nfe", "nfe": 1, "repeats": 1} and spec["data_shape"] == [1, 8, 8]
    assert spec["decoder"]["name"] == "pixel" and spec["generator"]["name"] == "tiny"

    client = mlflow.MlflowClient()
    mv = client.get_model_version(name, "1")
    # Tags identify the model; the evaluation results are no tags (no `metric.*`), but LoggedModel metrics.
    assert mv.tags == {**data, "method": "afm", "run_id": run_id, "step": "120", "source": "train",
                       "advflow.arch": json.dumps({"size": "tiny", "kind": "1nfe", "repeats": 1,
                                                   "data_shape": [1, 8, 8]})}
    model = mlflow.get_logged_model(done.model_id)
    assert model.source_run_id == run_id and registry.logged_model_id(mv) == done.model_id
    assert model.experiment_id == client.get_run(run_id).info.experiment_id
    got = {m.key: (m.value, m.step, m.run_id, m.dataset_name, m.dataset_digest) for m in model.metrics}
    linked = (120, run_id, "s3://b/d", sha[:16])  # step, run, dataset name and digest
    assert got == {"eval/fd": (3.25, *linked), "eval/fd_at_4": (2.5, *linked)}
    assert registry.model_metrics(client, mv) == {"eval/fd": 3.25, "eval/fd_at_4": 2.5}
    run = client.get_run(run_id)
    assert [(o.model_id, o.step) for o in run.outputs.model_outputs] == [(done.model_id, 120)]
    (dataset,) = [i.dataset for i in run.inputs.dataset_inputs]  # the metrics' dataset is the run's input
    assert (dataset.name, dataset.digest, dataset.source_type) == ("s3://b/d", sha[:16], "s3")
    assert json.loads(dataset.source) == {"uri": "s3://b/d/manifest.json"}
    assert [m.value for m in client.get_metric_history(run_id, "eval/fd")] == [3.25]  # the run holds it too

    text = mv.description
    for part in ("AFM one-step generator (DiT tiny, K=1, R=1) trained on s3://b/d", "**Method**: afm",
                 f"{sum(p.numel() for p in _tiny().parameters()):,} parameters", "**K** (sampling steps, nfe): 1",
                 "**R** (depth repetition): 1", f"sha256 {sha[:16]}", "10 classes", f"{run_id}, step 120",
                 f"LoggedModel {done.model_id}", "eval/fd = 3.25", "eval/fd_at_4 = 2.5",
                 f"python jobs/generate.py --model models:/{name}/1 --labels 0-9 --per-label 8 --out grid.png"):
        assert part in text, part
    assert model.tags["mlflow.note.content"] == text  # the LoggedModel page's description
    described = client.get_registered_model(name).description
    assert described.startswith(text) and registry.AUTO_DESCRIPTION + " 1" in described
    # The command the description gives samples from this version, as written.
    (command,) = [line for line in text.splitlines() if line.startswith("python jobs/generate.py")]
    argv = command.split()[2:]
    argv[argv.index("--out") + 1] = str(tmp_path / "grid.png")
    assert _job("generate").main(argv) == 0 and (tmp_path / "grid.png").is_file()
    # advflow's registered-model description follows the latest version; a person's is kept.
    _log(_tiny(), name, step=130, tags=data)
    assert f"models:/{name}/2 --labels" in client.get_registered_model(name).description
    client.update_registered_model(name, description="Our digits generator.")
    _log(_tiny(), name, step=140, tags=data)
    assert client.get_registered_model(name).description == "Our digits generator."
    assert f"models:/{name}/3 --labels" in client.get_model_version(name, "3").description


@pytest.mark.integration
def test_log_generator_rejects_bad_input(mlflow_env):
    G = _tiny()
    with pytest.raises(ValueError, match="data_shape"):
        registry.log_generator(G, decoder=PIXEL, data_shape=(1, 16, 16), num_classes=10, registered_name=None)
    with pytest.raises(ValueError, match="num_classes"):
        registry.log_generator(G, decoder=PIXEL, data_shape=SHAPE, num_classes=7, registered_name=None)
    with pytest.raises(ValueError, match="decoder"):
        registry.log_generator(G, decoder={"name": "jpeg"}, data_shape=SHAPE, num_classes=10, registered_name=None)
    with pytest.raises(ValueError, match="source"):
        registry.log_generator(G, decoder=PIXEL, data_shape=SHAPE, num_classes=10, registered_name=None,
                               source="web")
    with pytest.raises(ValueError, match=r"metrics: \['eval/fd'\] need a run.*run_id"):
        registry.log_generator(G, decoder=PIXEL, data_shape=SHAPE, num_classes=10, registered_name=None,
                               metrics={"eval/fd": 1.0})
    with pytest.raises(ValueError, match="metrics: two keys become the MLflow metric name 'eval/fd_at_4'"):
        _log(G, None, metrics={"eval/fd@4": 1.0, "eval/fd_at_4": 2.0})


@pytest.mark.integration
@pytest.mark.parametrize("opts", [{}, {"kind": "multistep", "nfe": 2}], ids=["1nfe", "multistep2"])
def test_pyfunc_predict_matches_direct_generation(mlflow_env, opts):
    import mlflow

    G = _tiny(1, **opts)
    name = _name()
    _log(G, name)
    labels, seeds = [3, 0, 9, 3], [0, 5, 123456789, 1]
    want = _reference(G, labels, seeds)
    model = mlflow.pyfunc.load_model(f"models:/{name}/1")
    df = pd.DataFrame({"label": labels, "seed": seeds})
    got = model.predict(df)
    assert got.dtype == np.uint8 and got.shape == (4, 8, 8, 1)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(model.predict(df), got)  # deterministic
    assert len({got[i].tobytes() for i in range(4)}) == 4  # labels and seeds matter
    # A row's image does not depend on the rows around it (noise is seeded per row).
    np.testing.assert_array_equal(model.predict(df.iloc[[2]]), want[[2]])
    loaded = registry.load_generator(f"models:/{name}/1")
    np.testing.assert_array_equal(loaded.generate(labels, seeds), want)
    assert loaded.config["generator"] == G.config and loaded.source["version"] == "1"
    with pytest.raises(ValueError, match="label"):
        loaded.generate([10], [0])


@pytest.mark.integration  # end-to-end: builds an SD-VAE decoder (diffusers) in the real layout (seconds)
def test_sd_vae_decoder_path_override(tmp_path, monkeypatch):
    """sd-vae models decode with the VAE at the recorded path, or at ADVFLOW_VAE_PATH / vae_path."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=8, sample_size=16).eval()
    vae.save_pretrained(tmp_path / "vae")
    G = build_generator("tiny", in_channels=4, input_size=8, num_classes=10)
    with torch.no_grad():
        for p in G.parameters():
            p.add_(0.2 * torch.randn_like(p))
    decoder = {"name": "sd-vae", "vae_path": str(tmp_path / "gone"), "scaling_factor": 0.18215, "downsample": 2}
    spec = model_format.GeneratorSpec(generator=G.config, decoder=decoder, data_shape=(4, 8, 8), num_classes=10)
    assert spec.image_shape() == (16, 16, 3)
    data = model_format.write_model_data(G, spec, tmp_path / "model")
    monkeypatch.delenv(model_format.VAE_PATH_ENV, raising=False)
    with pytest.raises(FileNotFoundError, match="ADVFLOW_VAE_PATH"):
        model_format.load_model_data(data, device="cpu")
    monkeypatch.setenv(model_format.VAE_PATH_ENV, str(tmp_path / "vae"))
    got = model_format.load_model_data(data, device="cpu").generate([1, 5], [7, 8])
    z = torch.stack([torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(s)) for s in (7, 8)])
    with torch.no_grad():
        pix = vae.decode(generate(G.eval(), z, torch.tensor([1, 5])) / 0.18215).sample  # (2, 3, 16, 16)
    want = ((pix.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert got.shape == (2, 16, 16, 3)
    np.testing.assert_array_equal(got, want)


# ----------------------------------------------------------------------------------------------------
# Promote
# ----------------------------------------------------------------------------------------------------


def test_device_is_the_argument_else_the_env_var_else_auto(tmp_path, monkeypatch):
    G = _tiny()
    spec = model_format.GeneratorSpec(generator=G.config, decoder=PIXEL, data_shape=SHAPE, num_classes=10)
    data = model_format.write_model_data(G, spec, tmp_path / "model")
    monkeypatch.setenv(model_format.DEVICE_ENV, "meta")
    assert model_format.load_model_data(data).device == torch.device("meta")
    assert model_format.load_model_data(data, device="cpu").device == torch.device("cpu")
    monkeypatch.delenv(model_format.DEVICE_ENV)
    auto = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    assert model_format.load_model_data(data).device == auto
    assert model_format.load_model_data(data, device="auto").device == auto
    monkeypatch.setenv(model_format.DEVICE_ENV, "")  # empty: not set
    assert model_format.load_model_data(data).device == auto


@pytest.mark.integration
def test_promote_explicit_and_by_metric(mlflow_env, capsys):
    import mlflow

    promote = _job("promote")
    name = _name()
    G = _tiny()
    # Versions 1-3: one LoggedModel each (same weights, other scores); version 4: no metrics, skipped.
    for fd, acc in [(5.0, 0.1), (2.0, 0.7), (9.0, 0.3)]:
        _log(G, name, step=10, metrics={"eval/fd": fd, "eval/acc": acc, "eval/fd@4": 10 - fd})
    _log(G, name)
    client = mlflow.MlflowClient()
    client.set_model_version_tag(name, "4", "metric.eval/fd", "0.5")  # the old convention: no longer read

    assert promote.main(["--name", name, "--alias", "champion", "--version", "3"]) == 0
    assert f"{name}@champion: (unset) -> 3" in capsys.readouterr().out
    assert client.get_model_version_by_alias(name, "champion").version == "3"
    assert promote.main(["--name", name, "--alias", "champion", "--best-metric", "eval/fd", "--mode", "min"]) == 0
    assert f"{name}@champion: 3 -> 2" in capsys.readouterr().out
    assert client.get_model_version_by_alias(name, "champion").version == "2"
    got = promote.promote(name, "candidate", best_metric="eval/fd", mode="max")
    assert (got.old, got.new, got.value) == (None, "3", 9.0)
    got = promote.promote(name, "candidate", best_metric="eval/acc", mode="max")
    assert (got.old, got.new, got.value) == ("3", "2", 0.7)
    assert client.get_model_version_by_alias(name, "candidate").version == "2"
    got = promote.promote(name, "candidate", best_metric="eval/fd@4", mode="min")  # read as eval/fd_at_4
    assert (got.old, got.new, got.value) == ("2", "3", 1.0)

    with pytest.raises(promote.PromoteError, match=r"no version 7; existing versions: \[1, 2, 3, 4\]"):
        promote.promote(name, "champion", version=7)
    with pytest.raises(promote.PromoteError, match=r"--best-metric eval/is: no version's LoggedModel has a numeric "
                       r"metric 'eval/is'; metrics present on versions: \['eval/acc', 'eval/fd', 'eval/fd_at_4'\]"):
        promote.promote(name, "champion", best_metric="eval/is")
    with pytest.raises(promote.PromoteError, match="not found"):
        promote.promote(name + "-nope", "champion", version=1)
    assert promote.main(["--name", name, "--alias", "champion", "--version", "9"]) == 2
    assert "no version 9" in capsys.readouterr().err
    assert client.get_model_version_by_alias(name, "champion").version == "2"  # untouched by failures
    # A metric logged onto a version's LoggedModel the MLflow way (a later evaluation, say) counts too.
    model_id = registry.logged_model_id(client.get_model_version(name, "4"))
    mlflow.log_metrics({"eval/fd": 1.5}, model_id=model_id, run_id=client.get_logged_model(model_id).source_run_id)
    assert promote.promote(name, "champion", best_metric="eval/fd").describe() == f"{name}@champion: 2 -> 4 (1.5)"
    # A version whose LoggedModel was deleted has no metrics left: skipped (version 1 has the lowest eval/acc).
    client.delete_logged_model(registry.logged_model_id(client.get_model_version(name, "1")))
    assert promote.promote(name, "candidate", best_metric="eval/acc", mode="min").new == "3"


# ----------------------------------------------------------------------------------------------------
# Generate job
# ----------------------------------------------------------------------------------------------------


def test_generate_labels_parsing():
    gen = _job("generate")
    assert gen.parse_labels("0-3") == [0, 1, 2, 3]
    assert gen.parse_labels("1,3,5") == [1, 3, 5]
    assert gen.parse_labels("7, 0-2,9") == [7, 0, 1, 2, 9]
    for bad in ("3-1", "a", "1,,2"):
        with pytest.raises(ValueError, match="--labels"):
            gen.parse_labels(bad)


@pytest.mark.integration
def test_generate_job_from_alias_is_deterministic(mlflow_env, tmp_path, capsys):
    import mlflow
    from PIL import Image

    G = _tiny(2)
    name = _name()
    _log(G, name)
    mlflow.MlflowClient().set_registered_model_alias(name, "champion", "1")
    args = ["--model", f"models:/{name}@champion", "--labels", "1-2,7", "--per-label", "3", "--seed", "10"]
    # First run as a real CLI process (also checks the script imports stand-alone), second in-process.
    proc = subprocess.run([sys.executable, str(REPO / "jobs" / "generate.py"), *args, "--out", str(tmp_path / "a.png"),
                           "--npz", str(tmp_path / "a.npz")], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert f"{name} version 1" in proc.stdout
    gen = _job("generate")
    assert gen.main([*args, "--out", str(tmp_path / "b.png"), "--npz", str(tmp_path / "b.npz")]) == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    np.testing.assert_array_equal(a["images"], b["images"])
    labels = [1, 1, 1, 2, 2, 2, 7, 7, 7]
    np.testing.assert_array_equal(a["labels"], labels)
    np.testing.assert_array_equal(a["images"], _reference(G, labels, list(range(10, 19))))
    grid = np.asarray(Image.open(tmp_path / "a.png"))
    assert grid.shape[:2] == (3 * (64 + 1) + 1, 3 * (64 + 1) + 1)  # 8x8 upscaled to 64, 1px padding
    assert not list(tmp_path.glob("*.tmp*"))  # atomic writes leave no temporaries

    assert gen.main([*args[:-1], "11", "--out", str(tmp_path / "c.png"), "--npz", str(tmp_path / "c.npz")]) == 0
    c = np.load(tmp_path / "c.npz")
    assert not np.array_equal(c["images"], a["images"])
    # Image i of the seed-11 run has seed 11 + i, like image i + 1 of the seed-10 run: where the labels
    # agree too, the images must be identical (an image depends only on its label and seed).
    same = [i for i in range(8) if labels[i] == labels[i + 1]]
    np.testing.assert_array_equal(c["images"][same], a["images"][[i + 1 for i in same]])
    assert gen.main([*args[:2], "--labels", "3-1", "--out", str(tmp_path / "d.png")]) == 2
    assert "--labels" in capsys.readouterr().err
    assert gen.main(["--model", f"models:/{name}@nope", "--out", str(tmp_path / "d.png")]) == 2
    assert "nope" in capsys.readouterr().err and not (tmp_path / "d.png").exists()


# ----------------------------------------------------------------------------------------------------
# Security: tampered artifacts
# ----------------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_tampered_models_are_refused_and_never_unpickled(mlflow_env, tmp_path):
    import mlflow

    marker = tmp_path / "pwned"
    payload = pickle.dumps(Evil(marker), protocol=4)
    name = _name()
    _log(_tiny(), name)
    clean = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/1", dst_path=str(tmp_path / "dl")))
    data_dir = clean / yaml.safe_load((clean / "MLmodel").read_text())["flavors"]["python_function"]["data"]

    for fname in ("extra.pkl", "generator_notes.json"):  # by name; by magic bytes under an innocent name
        copy = tmp_path / f"copy-{fname}"
        shutil.copytree(clean, copy)
        (copy / data_dir.relative_to(clean) / fname).write_bytes(payload)
        for load in (registry.load_generator, mlflow.pyfunc.load_model):
            with pytest.raises(UnsafeArtifactError, match=rf"{fname}.*never pickle.*tampered"):
                load(str(copy))
    # The same tampered folder registered as version 2 of the model.
    client = mlflow.MlflowClient()
    exp = mlflow.get_experiment_by_name("registry-tests").experiment_id
    evil = client.create_logged_model(exp, name="generator")
    client.log_model_artifacts(evil.model_id, str(tmp_path / "copy-generator_notes.json"))
    client.finalize_logged_model(evil.model_id, "READY")
    assert mlflow.register_model(f"models:/{evil.model_id}", name).version == "2"
    client.set_registered_model_alias(name, "champion", "2")
    for uri in (f"models:/{name}/2", f"models:/{name}@champion"):
        for load in (registry.load_generator, mlflow.pyfunc.load_model):
            with pytest.raises(UnsafeArtifactError, match="generator_notes.json"):
                load(uri)
    assert not marker.exists()
    registry.load_generator(f"models:/{name}/1")  # the untampered version still loads
    # The payload is live: unpickling it creates the marker, so the checks above are meaningful.
    pickle.loads(payload)
    assert marker.exists()


@pytest.mark.integration
def test_load_generator_refuses_foreign_loader(mlflow_env, tmp_path):
    import mlflow

    name = _name()
    _log(_tiny(), name)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/1", dst_path=str(tmp_path)))
    original = (local / "MLmodel").read_text()
    # advflow.platform.generator_pyfunc: a shim for a release that never shipped, removed; only the
    # current loader module is advflow's.
    for foreign in ("mlflow.sklearn", "advflow.platform.generator_pyfunc"):
        (local / "MLmodel").write_text(original.replace("advflow.platform.tracking.model_format", foreign))
        with pytest.raises(UnsafeArtifactError, match=f"loader_module='{foreign}'"):
            registry.load_generator(str(local))


# ----------------------------------------------------------------------------------------------------
# Classifiers (classifier guidance): log_classifier / load_classifier
# ----------------------------------------------------------------------------------------------------


def _tiny_classifier(seed: int = 0) -> torch.nn.Module:
    """Tiny classifier with random (not initial) weights, so logits depend on x and t."""
    from advflow.trainers.models import build_classifier

    torch.manual_seed(seed)
    C = build_classifier("tiny", in_channels=1, input_size=8, num_classes=10)
    with torch.no_grad():
        for p in C.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return C.eval()


def _log_classifier(C, name: str | None, **kw) -> registry.RegisteredGenerator:
    import mlflow

    mlflow.set_experiment("registry-tests")
    with mlflow.start_run():
        return registry.log_classifier(C, data_shape=SHAPE, num_classes=10, registered_name=name, encoder=PIXEL, **kw)


def _xt(n: int = 12, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *SHAPE, generator=g), torch.rand(n, generator=g)


@pytest.mark.integration
def test_log_classifier_registers_a_pickle_free_model_that_loads_everywhere(mlflow_env, tmp_path, monkeypatch):
    import mlflow

    from advflow.trainers.models import Classifier

    def no_load(*a, **k):
        raise AssertionError("log_classifier must not load the model (no serving-input validation)")

    monkeypatch.setattr(model_format, "_load_pyfunc", no_load)
    name, C = _name(), _tiny_classifier(1)
    done = _log_classifier(C, name, step=40, tags={"data.prefix": "s3://b/d"}, metrics={"eval/acc_t0.00": 0.75},
                           t_range=(0.0, 0.9))
    run_id = mlflow.last_active_run().info.run_id
    monkeypatch.undo()
    assert done.version == "1" and done.registry_uri == f"models:/{name}/1"
    client = mlflow.MlflowClient()
    mv = client.get_model_version(name, "1")
    assert mv.tags == {"data.prefix": "s3://b/d", "run_id": run_id, "step": "40", "source": "train"}
    # No manifest digest in the tags: the metric is linked to the run, to no dataset.
    metrics = mlflow.get_logged_model(done.model_id).metrics
    assert [(m.key, m.value, m.step, m.run_id, m.dataset_name) for m in metrics] == [
        ("eval/acc_t0.00", 0.75, 40, run_id, None)]
    assert "classifier guidance (DiT tiny, 10 classes, t in [0, 0.9]) trained on s3://b/d" in mv.description
    assert f"`guidance.classifier: models:/{name}/1`" in mv.description
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/1", dst_path=str(tmp_path / "dl")))
    files = [p for p in local.rglob("*") if p.is_file()]
    assert {"MLmodel", "weights.safetensors", "classifier.json", "input_example.json"} <= {p.name for p in files}
    assert [p for p in files if _looks_pickled(p)] == [] and scan_model_dir(local) == len(files)
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    assert mlmodel["flavors"]["python_function"]["loader_module"] == registry.LOADER_MODULE
    assert mlmodel["metadata"] == {"advflow_format": "advflow-classifier", "advflow_format_version": 1}
    assert [(i["name"], i["tensor-spec"]["shape"]) for i in json.loads(mlmodel["signature"]["inputs"])] == [
        ("x", [-1, 1, 8, 8]), ("t", [-1])]
    reqs = (local / "requirements.txt").read_text().split()
    assert all("==" in r for r in reqs) and {r.split("==")[0] for r in reqs} >= {"torch", "safetensors", "numpy"}
    data_dir = local / mlmodel["flavors"]["python_function"]["data"]
    meta = json.loads((data_dir / "classifier.json").read_text())
    assert meta["t_range"] == [0.0, 0.9] and meta["encoder"] == PIXEL and meta["classifier"] == C.config

    x, t = _xt()
    with torch.no_grad():
        want = C(x, t)
    mlflow.MlflowClient().set_registered_model_alias(name, "champion", "1")
    for ref in (f"models:/{name}/1", f"models:/{name}@champion", f"models:/{done.model_id}",
                f"runs:/{run_id}/classifier", str(local), str(data_dir), f"file://{local}"):
        got = registry.load_classifier(ref, device="cpu")
        assert isinstance(got, Classifier) and not got.training, ref
        assert not any(p.requires_grad for p in got.parameters()), ref
        assert got.spec.t_range == (0.0, 0.9) and got.spec.data_shape == SHAPE, ref
        with torch.no_grad():
            assert torch.equal(got(x, t), want), ref
    assert registry.load_classifier(f"models:/{name}@champion").source["version"] == "1"
    pyfunc = mlflow.pyfunc.load_model(f"models:/{name}/1", model_config={"device": "cpu"})
    out = pyfunc.predict({"x": x.numpy(), "t": t.numpy()})
    assert out.dtype == np.float32 and np.allclose(out, want.numpy(), atol=1e-6)
    with pytest.raises(ValueError, match=r"dict of arrays \{'x'"):
        model_format._load_pyfunc(str(data_dir)).predict(pd.DataFrame({"t": [0.5]}))
    # A classifier is not a generator, and the other way round: each loader says so.
    with pytest.raises(model_format.ModelFormatError, match="load_classifier"):
        registry.load_generator(f"models:/{name}/1")
    gname = _name()
    _log(_tiny(), gname)
    with pytest.raises(model_format.ModelFormatError, match="an advflow generator"):
        registry.load_classifier(f"models:/{gname}/1")


@pytest.mark.integration
def test_log_classifier_rejects_bad_input(mlflow_env):
    C = _tiny_classifier()
    with pytest.raises(ValueError, match="expected an advflow Classifier"):
        _log_classifier(torch.nn.Linear(2, 2), None)
    with pytest.raises(model_format.ModelFormatError, match="data_shape"):
        registry.log_classifier(C, data_shape=(3, 8, 8), num_classes=10, registered_name=None)
    with pytest.raises(model_format.ModelFormatError, match="num_classes"):
        registry.log_classifier(C, data_shape=SHAPE, num_classes=7, registered_name=None)
    with pytest.raises(ValueError, match="metrics"):
        registry.log_classifier(C, data_shape=SHAPE, num_classes=10, registered_name=None,
                                metrics={"eval/acc_t0.00": float("nan")})


@pytest.mark.integration
def test_tampered_classifier_versions_are_refused_and_never_unpickled(mlflow_env, tmp_path):
    import mlflow

    marker = tmp_path / "pwned"
    payload = pickle.dumps(Evil(marker), protocol=4)
    name = _name()
    _log_classifier(_tiny_classifier(), name)
    clean = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/1", dst_path=str(tmp_path / "dl")))
    data_rel = yaml.safe_load((clean / "MLmodel").read_text())["flavors"]["python_function"]["data"]
    copy = tmp_path / "copy"
    shutil.copytree(clean, copy)
    (copy / data_rel / "classifier_notes.json").write_bytes(payload)
    client = mlflow.MlflowClient()
    exp = mlflow.get_experiment_by_name("registry-tests").experiment_id
    evil = client.create_logged_model(exp, name="classifier")
    client.log_model_artifacts(evil.model_id, str(copy))
    client.finalize_logged_model(evil.model_id, "READY")
    assert mlflow.register_model(f"models:/{evil.model_id}", name).version == "2"
    for ref in (str(copy), str(copy / data_rel), f"models:/{name}/2"):
        with pytest.raises(UnsafeArtifactError, match=r"classifier_notes.json.*never pickle"):
            registry.load_classifier(ref)
    with pytest.raises(UnsafeArtifactError, match="classifier_notes.json"):
        mlflow.pyfunc.load_model(f"models:/{name}/2")
    text = (clean / "MLmodel").read_text().replace(registry.LOADER_MODULE, "mlflow.sklearn")
    (clean / "MLmodel").write_text(text)
    with pytest.raises(UnsafeArtifactError, match="loader_module='mlflow.sklearn'"):
        registry.load_classifier(str(clean))
    assert not marker.exists()
    registry.load_classifier(f"models:/{name}/1")  # the untampered version still loads
    pickle.loads(payload)
    assert marker.exists()


def _checkpoint_like(root: Path, C, marker: Path) -> Path:
    """The classifier files of a classifier-job checkpoint, next to a pickle where DeepSpeed's files go."""
    from safetensors.torch import save_file

    spec = model_format.ClassifierSpec(classifier=C.config, data_shape=SHAPE, num_classes=10, encoder=PIXEL)
    root.mkdir(parents=True, exist_ok=True)
    model_format.write_classifier_spec(spec, root)
    save_file({k: v.contiguous() for k, v in C.state_dict().items()}, str(root / model_format.CHECKPOINT_WEIGHTS_FILE))
    (root / "c" / "ds").mkdir(parents=True)
    (root / "c" / "ds" / "mp_rank_00_model_states.pt").write_bytes(pickle.dumps(Evil(marker), protocol=4))
    (root / "trainer.json").write_text(json.dumps({"format": 1, "step": 10}))
    return root


@pytest.mark.integration
def test_load_classifier_from_local_and_s3_checkpoints_reads_only_its_two_files(tmp_path, s3_prefix):
    from advflow.platform.data.storage import Storage

    marker = tmp_path / "pwned"
    C = _tiny_classifier(2)
    ckpt = _checkpoint_like(tmp_path / "checkpoint_000010", C, marker)
    storage = Storage(s3_prefix)
    for p in ckpt.rglob("*"):
        if p.is_file():
            storage.write_atomic(str(p.relative_to(ckpt)), p.read_bytes())
    x, t = _xt(seed=1)
    with torch.no_grad():
        want = C(x, t)
    for ref in (str(ckpt), s3_prefix, s3_prefix + "/"):
        got = registry.load_classifier(ref, device="cpu")
        assert got.source["kind"] == "checkpoint" and not got.training, ref
        with torch.no_grad():
            assert torch.equal(got(x, t), want), ref
    assert not marker.exists()  # the DeepSpeed-place pickle was never opened
    with pytest.raises(model_format.ModelFormatError, match="checkpoint_000010"):
        registry.load_classifier(str(tmp_path))  # a run folder: names the checkpoints to pass instead
    (ckpt / "classifier.json").unlink()
    with pytest.raises(model_format.ModelFormatError, match="classifier.json missing"):
        registry.load_classifier(str(ckpt))  # e.g. an AFM checkpoint (ema.safetensors, no classifier.json)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        registry.load_classifier(str(tmp_path / "nowhere"))


# ----------------------------------------------------------------------------------------------------
# Import of external checkpoints
# ----------------------------------------------------------------------------------------------------


@pytest.mark.integration
def test_register_checkpoint_pt_and_safetensors(mlflow_env, tmp_path, capsys):
    import mlflow
    from safetensors.torch import save_file

    job = _job("register_checkpoint")
    G = _tiny(3)
    sd = G.state_dict()
    pt = tmp_path / "afm_tiny.pt"
    torch.save({"ema": {f"module.{k}": v for k, v in sd.items()}, "step": 7}, pt)  # wrapped, DDP prefixes
    st = tmp_path / "afm_tiny.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(st))
    name = _name()
    labels, seeds = [0, 4, 8], [3, 2, 1]
    want = _reference(G, labels, seeds)
    client = mlflow.MlflowClient()
    for version, path in (("1", pt), ("2", st)):
        assert job.main(["--checkpoint", str(path), "--name", name, "--decoder", "pixel"]) == 0
        assert f"models:/{name}/{version}" in capsys.readouterr().out
        mv = client.get_model_version(name, version)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        assert mv.tags["source"] == "import" and mv.tags["source_sha256"] == digest
        assert mv.tags["source_path"] == str(path)
        assert mv.description.startswith(f"One-step generator (DiT tiny, K=1, R=1) imported from {path}.")
        run = client.get_run(mv.run_id)
        assert run.data.tags["source_sha256"] == digest
        assert client.get_experiment(run.info.experiment_id).name == "imports"
        loaded = registry.load_generator(f"models:/{name}/{version}")
        np.testing.assert_array_equal(loaded.generate(labels, seeds), want)
        files = [p.name for p in Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version}",
                                                                          dst_path=str(tmp_path / version))).rglob("*")]
        assert path.name not in files  # the checkpoint itself is never uploaded
    assert job.main(["--checkpoint", str(st), "--name", name, "--decoder", "sd-vae"]) == 2
    assert "--vae-path" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# Serving
# ----------------------------------------------------------------------------------------------------


def _kill_tree(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)
    except ProcessLookupError:
        return
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=15)


@pytest.mark.slow
def test_mlflow_models_serve(mlflow_env, tmp_path):
    import mlflow

    from advflow.infra.local.proc import free_port

    G = _tiny(4)
    name = _name()
    _log(G, name)
    mlflow.MlflowClient().set_registered_model_alias(name, "champion", "1")
    port = free_port()
    log = open(tmp_path / "serve.log", "wb")
    argv = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{name}@champion",
            "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    # os.environ carries MLFLOW_TRACKING_URI and the S3 variables (mlflow_env / s3_env); the server
    # execs `uvicorn` from PATH, so put this interpreter's bin/ (the venv) first, as activation would.
    env = {**os.environ, "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])}
    # start_new_session: the server and its uvicorn workers form one process group, killed as a whole.
    proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 150
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"{url}/ping", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "no /ping answer:\n" + (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.5)
        body = json.dumps({"dataframe_split": {"columns": ["label", "seed"], "data": [[3, 0]]}}).encode()
        req = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            got = np.asarray(json.loads(r.read())["predictions"], dtype=np.uint8)
    finally:
        _kill_tree(proc)
        log.close()
    np.testing.assert_array_equal(got, _reference(G, [3], [0]))
    local = mlflow.pyfunc.load_model(f"models:/{name}@champion").predict(pd.DataFrame({"label": [3], "seed": [0]}))
    np.testing.assert_array_equal(got, local)
