"""MLflow model registry for trained generators: log (safetensors pyfunc, no pickle), register, load.

- `log_generator(G, ...)` logs the (EMA) generator as an MLflow LoggedModel of the pyfunc flavour
  with `loader_module="advflow.platform.tracking.model_format"` (format and decoder rules: that module's
  docstring), a signature (DataFrame `label`, `seed` (int64) -> uint8 (-1, H, W, C)), an input
  example and explicit pip requirements; then, with `registered_name`, registers a version and tags
  it: the caller's tags plus `run_id`, `step`, `source` (train | import) and one
  `metric.<key>` tag per entry of `metrics` (the convention jobs/promote.py ranks versions by).
  The serving environment needs advflow installed (it is the loader module; not on PyPI, so it is
  not in the pip requirements) and, for sd-vae decoders, diffusers.
- `load_generator(uri)` resolves aliases to a fixed version, downloads the model, scans every file
  for pickle data before reading anything, and returns a GeneratorModel (.generate(labels, seeds),
  .images(...), .config, .source).
- `log_classifier(C, ...)` logs the (EMA) time-conditioned classifier the same way (same loader
  module, classifier.json instead of generator.json; signature: tensors `x` float32 (-1, C, H, W)
  and `t` float32 (-1,) -> float32 `logits` (-1, num_classes)), registers and tags it likewise.
- `load_classifier(ref, device)` returns the classifier module itself (eval mode, frozen) from a
  registry / run URI, a local registered-model folder or a classifier-job checkpoint, never
  unpickling anything: the AFM worker's entry point for classifier guidance.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch

from advflow.platform.tracking import model_format as fmt
from advflow.platform.tracking.artifact_scan import UnsafeArtifactError, scan_model_dir

LOADER_MODULE = fmt.__name__  # "advflow.platform.tracking.model_format"
REGISTRY_WAIT_S = 15  # OSS registries mark versions READY at once; do not block training for 5 min
METRIC_TAG_PREFIX = "metric."
SOURCES = ("train", "import")
_REQUIREMENTS = ("torch", "safetensors", "numpy", "pandas")
ARCH_TAG = "advflow.arch"
"""Version tag: the generator's architecture as JSON (size, kind, repeats, data_shape)."""


@dataclass(frozen=True)
class RegisteredGenerator:
    """Where a logged generator went. model_uri: models:/<model_id> (the LoggedModel); version and
    name: the registry version (str) and registered model name, None when not registered."""

    model_uri: str
    model_id: str
    version: str | None
    name: str | None

    @property
    def registry_uri(self) -> str | None:
        return f"models:/{self.name}/{self.version}" if self.version is not None else None


def metric_tag(key: str) -> str:
    """Version tag that carries metric `key` (e.g. "eval/fd" -> "metric.eval/fd"; "eval/fd@4" ->
    "metric.eval/fd_at_4": tag names follow MLflow's metric-name rules)."""
    from advflow.platform.tracking.logger import mlflow_metric_key

    return METRIC_TAG_PREFIX + mlflow_metric_key(key)


class _PyfuncWithoutServingCheck:
    """mlflow.pyfunc as a flavour for `Model.log`, minus the serving-input validation.

    That validation loads the logged model and runs predict on the input example: on rank 0 in the
    middle of training it would build a second copy of G (and load the VAE) every time a model is
    logged. The example is checked by the tests instead. pyfunc.save_model rejects unknown keyword
    arguments, hence this shim that takes the flag off before forwarding."""

    __name__ = "mlflow.pyfunc"

    @staticmethod
    def save_model(*, validate_serving_input: bool = False, **kwargs):
        import mlflow.pyfunc

        return mlflow.pyfunc.save_model(**kwargs)


def _pip_requirements(decoder: dict[str, Any]) -> list[str]:
    return _pinned(list(_REQUIREMENTS) + (["diffusers"] if decoder.get("name") == "sd-vae" else []))


def _pinned(names: list[str]) -> list[str]:
    reqs = []
    for name in names:
        try:
            reqs.append(f"{name}=={importlib_metadata.version(name).split('+')[0]}")
        except importlib_metadata.PackageNotFoundError:
            reqs.append(name)
    return reqs


def _signature(spec: fmt.GeneratorSpec):
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    h, w, c = spec.image_shape()
    return ModelSignature(
        inputs=Schema([ColSpec("long", "label"), ColSpec("long", "seed")]),
        outputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, h, w, c), "images")]),
    )


def _input_example(num_classes: int):
    import pandas as pd

    return pd.DataFrame({"label": [0, min(1, num_classes - 1)], "seed": [0, 1]}, dtype="int64")


def _check_tags(tags: dict[str, str] | None, metrics: dict[str, float] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in (tags or {}).items():
        if not isinstance(k, str) or not k:
            raise ValueError(f"tags: key {k!r} must be a non-empty string")
        out[k] = str(v)
    for k, v in (metrics or {}).items():
        value = float(v)
        if not math.isfinite(value):
            raise ValueError(f"metrics: {k}={v!r} is not finite; log only finite evaluation results")
        out[metric_tag(k)] = repr(value)
    return out


def log_generator(
    generator: torch.nn.Module,
    *,
    decoder: dict,
    data_shape: tuple[int, int, int],
    num_classes: int,
    registered_name: str | None,
    tags: dict[str, str] | None = None,
    name: str = "generator",
    step: int | None = None,
    run_id: str | None = None,
    metrics: dict[str, float] | None = None,
    source: str = "train",
) -> RegisteredGenerator:
    """Log `generator` (pass the EMA module) as a pickle-free pyfunc model; optionally register it.

    decoder: the dataset manifest's `encoder` dict. data_shape: (C, H, W) of the generator's samples.
    run_id: the run to attach the model to (default: the active run, if any). metrics: evaluation
    results written as `metric.<key>` version tags (jobs/promote.py --best-metric reads them).
    source: "train" (the training loop) or "import" (jobs/register_checkpoint.py).
    """
    if source not in SOURCES:
        raise ValueError(f"source: {source!r} unknown; use one of {list(SOURCES)}")
    config = getattr(generator, "config", None)
    if not isinstance(config, dict) or "name" not in config:
        raise ValueError("generator: expected an advflow Generator (with .config from build_generator); "
                         "pass the plain (EMA) module, not a DeepSpeed/DDP wrapper")
    spec = fmt.GeneratorSpec(generator=dict(config), decoder=dict(decoder), data_shape=tuple(data_shape),
                             num_classes=int(num_classes))
    run_id, version_tags = _version_tags(tags, metrics, run_id, step, source)
    version_tags[ARCH_TAG] = json.dumps(architecture(spec))  # what architecture_change compares

    with tempfile.TemporaryDirectory(prefix="advflow-model-") as tmp:
        data_dir = fmt.write_model_data(generator, spec, Path(tmp) / "generator")
        return _log_and_register(
            data_dir, name=name, signature=_signature(spec), input_example=_input_example(spec.num_classes),
            pip_requirements=_pip_requirements(spec.decoder),
            metadata={"advflow_format": fmt.FORMAT, "advflow_format_version": fmt.FORMAT_VERSION},
            run_id=run_id, step=step, version_tags=version_tags, registered_name=registered_name)


def _log_and_register(data_dir: Path, *, name: str, signature, input_example, pip_requirements: list[str],
                      metadata: dict[str, Any], run_id: str | None, step: int | None, version_tags: dict[str, str],
                      registered_name: str | None, in_run_experiment: bool = False) -> RegisteredGenerator:
    """Log `data_dir` as a pyfunc model with advflow's loader module (no code paths); register it.

    in_run_experiment: file the LoggedModel under `run_id`'s experiment. Without an active run MLflow
    files it under the process's active experiment, which in a training worker is the Default one,
    so `runs:/RUN_ID/NAME` (resolved within the run's experiment) would not find it."""
    import mlflow
    from mlflow.models import Model

    model_id = None
    if in_run_experiment and run_id is not None and mlflow.active_run() is None:
        run = mlflow.MlflowClient().get_run(run_id)
        model_id = mlflow.initialize_logged_model(
            name=name, source_run_id=run_id, experiment_id=run.info.experiment_id, tags=version_tags,
            params={k: str(v) for k, v in run.data.params.items()}).model_id
    info = Model.log(
        artifact_path=None,
        name=name,
        flavor=_PyfuncWithoutServingCheck,
        flavor_name="pyfunc",
        loader_module=LOADER_MODULE,
        data_path=str(data_dir),
        signature=signature,
        input_example=input_example,
        pip_requirements=pip_requirements,
        metadata=metadata,
        run_id=run_id,
        step=int(step or 0),
        tags=version_tags,
        **({"model_id": model_id} if model_id else {}),
    )
    version = None
    if registered_name:
        mv = mlflow.register_model(info.model_uri, registered_name, await_registration_for=REGISTRY_WAIT_S,
                                   tags=version_tags)
        version = str(mv.version)
    return RegisteredGenerator(model_uri=info.model_uri, model_id=info.model_id, version=version,
                               name=registered_name)


def architecture(spec: fmt.GeneratorSpec) -> dict[str, Any]:
    """What must stay the same between versions of one registered model for them to be comparable
    and interchangeable behind an alias: network size, generator kind, depth repetition, data shape."""
    g = spec.generator
    return {"size": g.get("name"), "kind": g.get("kind"), "repeats": g.get("repeats"),
            "data_shape": list(spec.data_shape)}


def all_versions(client, name: str) -> list:
    """Every version of registered model `name` (MLflow pages its search results)."""
    versions, token = [], None
    while True:
        page = client.search_model_versions(f"name = '{name}'", page_token=token)
        versions.extend(page)
        token = page.token
        if not token:
            return versions


def architecture_change(name: str, spec: fmt.GeneratorSpec, client=None) -> str | None:
    """How `spec` differs from the latest version of registered model `name` ("size tiny -> S/2, ..."),
    or None: same architecture, no version yet, or a version registered before `advflow.arch`
    existed (nothing recorded to compare with)."""
    from mlflow import MlflowClient

    client = client or MlflowClient()
    versions = all_versions(client, name)
    if not versions:
        return None
    latest = max(versions, key=lambda mv: int(mv.version))
    try:
        old = json.loads((latest.tags or {})[ARCH_TAG])
    except (KeyError, ValueError):
        return None
    new = architecture(spec)
    diffs = [f"{k} {old.get(k)} -> {new[k]}" for k in new if old.get(k) != new[k]]
    return f"version {latest.version}: " + ", ".join(diffs) if diffs else None


# ----------------------------------------------------------------------------------------------------
# Classifiers (classifier guidance)
# ----------------------------------------------------------------------------------------------------

_CLASSIFIER_REQUIREMENTS = ("torch", "safetensors", "numpy")


def _classifier_signature(spec: fmt.ClassifierSpec):
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    f32 = np.dtype(np.float32)
    return ModelSignature(
        inputs=Schema([TensorSpec(f32, (-1, *spec.data_shape), "x"), TensorSpec(f32, (-1,), "t")]),
        outputs=Schema([TensorSpec(f32, (-1, spec.num_classes), "logits")]),
    )


def _classifier_input_example(spec: fmt.ClassifierSpec) -> dict:
    import numpy as np

    return {"x": np.zeros((2, *spec.data_shape), dtype=np.float32), "t": np.array([0.0, 0.5], dtype=np.float32)}


def log_classifier(
    classifier: torch.nn.Module,
    *,
    data_shape: tuple[int, int, int],
    num_classes: int,
    registered_name: str | None,
    encoder: dict | None = None,
    t_range: tuple[float, float] = (0.0, 1.0),
    tags: dict[str, str] | None = None,
    name: str = "classifier",
    step: int | None = None,
    run_id: str | None = None,
    metrics: dict[str, float] | None = None,
    source: str = "train",
) -> RegisteredGenerator:
    """Log `classifier` (pass the EMA module) as a pickle-free pyfunc model; optionally register it.

    data_shape: (C, H, W) of the latents it classifies. encoder: the dataset manifest's encoder record
    (the latent space of its inputs). t_range: the flow times it was trained on. run_id, step,
    metrics (`metric.<key>` version tags), tags, source: as for `log_generator`. Returns the same
    record as `log_generator` (model_uri, model_id, version, name)."""
    if source not in SOURCES:
        raise ValueError(f"source: {source!r} unknown; use one of {list(SOURCES)}")
    config = getattr(classifier, "config", None)
    if not isinstance(config, dict) or "name" not in config or "num_classes" not in config:
        raise ValueError("classifier: expected an advflow Classifier (with .config from build_classifier); "
                         "pass the plain (EMA) module, not a DeepSpeed/DDP wrapper")
    spec = fmt.ClassifierSpec(classifier=dict(config), data_shape=tuple(data_shape), num_classes=int(num_classes),
                              encoder=dict(encoder or {}), t_range=tuple(t_range))
    run_id, version_tags = _version_tags(tags, metrics, run_id, step, source)
    with tempfile.TemporaryDirectory(prefix="advflow-model-") as tmp:
        data_dir = fmt.write_classifier_data(classifier, spec, Path(tmp) / "classifier")
        return _log_and_register(
            data_dir, name=name, signature=_classifier_signature(spec), input_example=_classifier_input_example(spec),
            pip_requirements=_pinned(list(_CLASSIFIER_REQUIREMENTS)),
            metadata={"advflow_format": fmt.CLASSIFIER_FORMAT, "advflow_format_version": fmt.CLASSIFIER_FORMAT_VERSION},
            run_id=run_id, step=step, version_tags=version_tags, registered_name=registered_name,
            in_run_experiment=True)


def _version_tags(tags, metrics, run_id, step, source) -> tuple[str | None, dict[str, str]]:
    import mlflow

    extra = _check_tags(tags, metrics)
    if run_id is None and mlflow.active_run() is not None:
        run_id = mlflow.active_run().info.run_id
    return run_id, {**extra, "run_id": run_id or "none", "step": "none" if step is None else str(int(step)),
                    "source": source}


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------


def resolve_model_uri(model_uri: str, client=None) -> dict[str, Any]:
    """Pin models:/NAME@alias and models:/NAME/latest-style URIs to one version, so the files that are
    downloaded are the version that is reported. Returns {uri (to download), requested, name,
    version, run_id}; name/version/run_id are None for non-registry URIs."""
    from mlflow import MlflowClient

    info: dict[str, Any] = {"requested": model_uri, "uri": model_uri, "name": None, "version": None,
                            "run_id": None}
    if not model_uri.startswith("models:/"):
        return info
    rest = model_uri[len("models:/"):]
    if rest.startswith("m-") and "/" not in rest and "@" not in rest:
        return info  # a LoggedModel id
    client = client or MlflowClient()
    if "@" in rest:
        name, alias = rest.split("@", 1)
        mv = client.get_model_version_by_alias(name, alias)
    elif "/" in rest:
        name, version = rest.rsplit("/", 1)
        if not version.isdigit():
            return info  # stages and other forms: let MLflow resolve them
        mv = client.get_model_version(name, version)
    else:
        return info
    info.update(uri=f"models:/{mv.name}/{mv.version}", name=mv.name, version=str(mv.version),
                run_id=mv.run_id or (mv.tags or {}).get("run_id"))
    return info


def _check_mlmodel(model_dir: Path) -> Path:
    """The pyfunc data folder, after checking MLmodel names advflow's loader and ships no code."""
    import yaml

    path = model_dir / "MLmodel"
    if not path.is_file():
        raise UnsafeArtifactError(f"model {model_dir}: no MLmodel file; this is not an MLflow model")
    conf = (yaml.safe_load(path.read_text()) or {}).get("flavors", {}).get("python_function", {})
    loader = conf.get("loader_module")
    if loader != LOADER_MODULE or conf.get("code") or not conf.get("data"):
        raise UnsafeArtifactError(
            f"model {model_dir}: MLmodel's python_function flavour has loader_module="
            f"{conf.get('loader_module')!r}, code={conf.get('code')!r}; an advflow generator uses "
            f"{LOADER_MODULE!r} with no code paths. Not an advflow model (or tampered with); refusing it."
        )
    return model_dir / conf["data"]


def load_generator(model_uri: str, *, vae_path: str | None = None, device: str | None = None,
                   dst_path: str | os.PathLike | None = None) -> fmt.GeneratorModel:
    """Download a logged generator, refuse it if any file holds pickle data, and load it.

    model_uri: models:/NAME@alias, models:/NAME/VERSION, models:/<model_id>, runs:/..., or a local
    model folder. vae_path/device: overrides (see tracking.model_format). dst_path: keep the download
    there (default: a temporary folder, removed after loading).
    """
    import mlflow

    info = resolve_model_uri(model_uri)
    with tempfile.TemporaryDirectory(prefix="advflow-load-") as tmp:
        target = Path(dst_path) if dst_path is not None else Path(tmp)
        target.mkdir(parents=True, exist_ok=True)
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=info["uri"], dst_path=str(target)))
        scan_model_dir(local)  # before anything in it is parsed beyond raw bytes
        data_dir = _check_mlmodel(local)
        model = fmt.load_model_data(data_dir, vae_path=vae_path, device=device)
    model.source = info
    return model


def load_classifier(ref: str, device: str | torch.device | None = None) -> torch.nn.Module:
    """The EMA classifier at `ref`, in eval mode with requires_grad False, on `device` (default:
    ADVFLOW_DEVICE, else cuda if available, else cpu). Nothing is ever unpickled.

    ref: `models:/NAME/VERSION`, `models:/NAME@alias` (pinned to its version first), `models:/<model_id>`,
    `runs:/RUN_ID/PATH` (PATH: the name of a model the run logged, e.g. `classifier`, or a model folder
    logged as run artifacts) — MLflow downloads it, every file of the model is scanned for pickle data
    before anything is read, and MLmodel must name advflow's loader module with no code; a local folder of
    that format (the downloaded model, holding MLmodel, or its bare data folder: weights.safetensors +
    classifier.json; scanned whole); or a checkpoint directory written by the classifier job, local or
    `s3://...`, of which only classifier.json and the EMA weights (ema.safetensors) are checked and
    read (its DeepSpeed files are never opened).

    The returned `advflow.trainers.models.Classifier` has `.spec` (the ClassifierSpec: data shape,
    num_classes, encoder, t_range) and `.source` (what was loaded: uri, name, version, run_id)."""
    ref = os.fspath(ref)
    if ref.startswith("s3://"):
        with tempfile.TemporaryDirectory(prefix="advflow-classifier-") as tmp:
            local = _download_checkpoint_files(ref, Path(tmp))
            C = _load_checkpoint_classifier(local, device, where=ref)
        C.source = {"requested": ref, "uri": ref, "name": None, "version": None, "run_id": None, "kind": "checkpoint"}
        return C
    if ref.startswith("file://"):
        return _load_local_classifier(Path(ref[len("file://"):]), device)
    if not ref.startswith(("models:", "runs:")) and "://" not in ref:
        return _load_local_classifier(Path(ref), device)

    import mlflow

    info = resolve_model_uri(ref)
    with tempfile.TemporaryDirectory(prefix="advflow-load-") as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=info["uri"], dst_path=tmp))
        C = _load_model_folder(local, device)
    C.source = {**info, "kind": "model"}
    return C


def _load_local_classifier(path: Path, device) -> torch.nn.Module:
    if not path.is_dir():
        raise FileNotFoundError(f"classifier {path}: no such directory; pass models:/NAME/VERSION, runs:/..., a "
                                "downloaded classifier model folder or a classifier-job checkpoint directory")
    info = {"requested": str(path), "uri": str(path.resolve()), "name": None, "version": None, "run_id": None}
    if (path / "MLmodel").is_file() or ((path / fmt.WEIGHTS_FILE).is_file() and not (path / "trainer.json").is_file()):
        C = _load_model_folder(path, device)
        C.source = {**info, "kind": "model"}
    elif (path / fmt.CHECKPOINT_WEIGHTS_FILE).is_file() or (path / "trainer.json").is_file():
        C = _load_checkpoint_classifier(path, device, where=str(path))
        C.source = {**info, "kind": "checkpoint"}
    else:
        inside = sorted(p.name for p in path.glob("checkpoint_*"))
        hint = f" It holds {inside[-3:]}: pass one of those checkpoint directories." if inside else ""
        raise fmt.ModelFormatError(
            f"classifier {path}: neither an MLflow model (MLmodel), a classifier model folder "
            f"({fmt.WEIGHTS_FILE} + {fmt.CLASSIFIER_SPEC_FILE}) nor a classifier-job checkpoint "
            f"({fmt.CHECKPOINT_WEIGHTS_FILE} + {fmt.CLASSIFIER_SPEC_FILE}).{hint}")
    return C


def _load_model_folder(path: Path, device) -> torch.nn.Module:
    """A registered-model folder (MLmodel + data/...) or its bare data folder: scanned whole first."""
    scan_model_dir(path)  # before anything in it is parsed beyond raw bytes
    data_dir = _check_mlmodel(path) if (path / "MLmodel").is_file() else path
    if not (data_dir / fmt.CLASSIFIER_SPEC_FILE).is_file():
        what = "an advflow generator" if (data_dir / fmt.SPEC_FILE).is_file() else "not an advflow classifier"
        raise fmt.ModelFormatError(f"model {path}: {what} (no {fmt.CLASSIFIER_SPEC_FILE} in {data_dir}); "
                                   "pass a model logged by registry.log_classifier (jobs/train.py, model.method classifier)")
    return fmt.load_classifier_data(data_dir, device=device)


def _load_checkpoint_classifier(path: Path, device, where: str) -> torch.nn.Module:
    """A classifier-job checkpoint: only classifier.json and ema.safetensors are checked and read."""
    from advflow.platform.tracking.artifact_scan import file_problem

    for name in (fmt.CLASSIFIER_SPEC_FILE, fmt.CHECKPOINT_WEIGHTS_FILE):
        p = path / name
        if not p.exists() and not p.is_symlink():
            raise fmt.ModelFormatError(
                f"checkpoint {where}: {name} missing; a classifier-job checkpoint holds {fmt.CLASSIFIER_SPEC_FILE} "
                f"and {fmt.CHECKPOINT_WEIGHTS_FILE} (is this an AFM checkpoint, or an incomplete one?)")
        why = file_problem(p)
        if why is not None:
            raise UnsafeArtifactError(
                f"refusing to load classifier checkpoint {where}: file {name} {why}. A classifier checkpoint's "
                "classifier.json and ema.safetensors are JSON and safetensors, never pickle, so this checkpoint "
                "was tampered with or is not a classifier checkpoint; nothing in it was loaded.")
    return fmt.load_classifier_data(path, device=device, weights_file=fmt.CHECKPOINT_WEIGHTS_FILE)


def _download_checkpoint_files(uri: str, dst: Path) -> Path:
    """classifier.json and ema.safetensors of an s3:// checkpoint, as raw bytes into dst."""
    from advflow.platform.data.storage import Storage

    storage = Storage(uri.rstrip("/"))
    for name in (fmt.CLASSIFIER_SPEC_FILE, fmt.CHECKPOINT_WEIGHTS_FILE):
        if not storage.exists(name):
            raise fmt.ModelFormatError(f"checkpoint {uri}: {name} missing; a classifier-job checkpoint holds "
                                       f"{fmt.CLASSIFIER_SPEC_FILE} and {fmt.CHECKPOINT_WEIGHTS_FILE}")
        (dst / name).write_bytes(storage.read(name))
    return dst
