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
  .images(...), .config, .source). Versions whose MLmodel names the previous release's loader module
  (`advflow.platform.generator_pyfunc`, `LEGACY_LOADER_MODULES`) load too.
"""

from __future__ import annotations

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
# Loader modules recorded by earlier releases, still loadable (platform/generator_pyfunc.py re-exports
# the loader hook): versions registered before the module moved into tracking/.
LEGACY_LOADER_MODULES = ("advflow.platform.generator_pyfunc",)
REGISTRY_WAIT_S = 15  # OSS registries mark versions READY at once; do not block training for 5 min
METRIC_TAG_PREFIX = "metric."
SOURCES = ("train", "import")
_REQUIREMENTS = ("torch", "safetensors", "numpy", "pandas")


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
    """Version tag that carries metric `key` (e.g. "eval/fd" -> "metric.eval/fd")."""
    return METRIC_TAG_PREFIX + key


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
    names = list(_REQUIREMENTS) + (["diffusers"] if decoder.get("name") == "sd-vae" else [])
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
    import mlflow
    from mlflow.models import Model

    if source not in SOURCES:
        raise ValueError(f"source: {source!r} unknown; use one of {list(SOURCES)}")
    config = getattr(generator, "config", None)
    if not isinstance(config, dict) or "name" not in config:
        raise ValueError("generator: expected an advflow Generator (with .config from build_generator); "
                         "pass the plain (EMA) module, not a DeepSpeed/DDP wrapper")
    spec = fmt.GeneratorSpec(generator=dict(config), decoder=dict(decoder), data_shape=tuple(data_shape),
                             num_classes=int(num_classes))
    extra = _check_tags(tags, metrics)
    if run_id is None and mlflow.active_run() is not None:
        run_id = mlflow.active_run().info.run_id
    version_tags = {**extra, "run_id": run_id or "none", "step": "none" if step is None else str(int(step)),
                    "source": source}

    with tempfile.TemporaryDirectory(prefix="advflow-model-") as tmp:
        data_dir = fmt.write_model_data(generator, spec, Path(tmp) / "generator")
        info = Model.log(
            artifact_path=None,
            name=name,
            flavor=_PyfuncWithoutServingCheck,
            flavor_name="pyfunc",
            loader_module=LOADER_MODULE,
            data_path=str(data_dir),
            signature=_signature(spec),
            input_example=_input_example(spec.num_classes),
            pip_requirements=_pip_requirements(spec.decoder),
            metadata={"advflow_format": fmt.FORMAT, "advflow_format_version": fmt.FORMAT_VERSION},
            run_id=run_id,
            step=int(step or 0),
            tags=version_tags,
        )
    version = None
    if registered_name:
        mv = mlflow.register_model(info.model_uri, registered_name, await_registration_for=REGISTRY_WAIT_S,
                                   tags=version_tags)
        version = str(mv.version)
    return RegisteredGenerator(model_uri=info.model_uri, model_id=info.model_id, version=version,
                               name=registered_name)


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
    if loader not in (LOADER_MODULE, *LEGACY_LOADER_MODULES) or conf.get("code") or not conf.get("data"):
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
