"""MLflow model registry for trained generators: log (safetensors pyfunc, no pickle), register, load.

- `log_generator(G, ...)` logs the (EMA) generator as an MLflow 3 LoggedModel of the pyfunc flavour
  with `loader_module="advflow.platform.tracking.model_format"` (format and decoder rules: that module's
  docstring), a signature (DataFrame `label`, `seed` (int64) -> uint8 (-1, H, W, C)), an input
  example and explicit pip requirements, under the run's experiment and as the run's output at
  `step`. Its evaluation results (`metrics`) become the LoggedModel's metrics, linked to the run and
  to the dataset the run's `data.*` tags name (`data_dataset`): what jobs/promote.py ranks versions
  by and the MLflow UI shows on the model's page. With `registered_name` it registers a version,
  tags it with what identifies the model (the caller's tags plus `run_id`, `step`, `source` (train |
  import), `advflow.arch`). The LoggedModel, the version and the registered model get a description
  (what it is, method, size, K, R, data, the command that samples from it: `generator_description`;
  the registered model's only while no person has written their own).
  The serving environment needs advflow installed (it is the loader module; not on PyPI, so it is
  not in the pip requirements) and, for sd-vae decoders, diffusers.
- `load_generator(uri)` resolves aliases to a fixed version, downloads the model, scans every file
  for pickle data before reading anything, and returns a GeneratorModel (.generate(labels, seeds),
  .images(...), .config, .source).
- `log_classifier(C, ...)` logs the (EMA) time-conditioned classifier the same way (same loader
  module, classifier.json instead of generator.json; signature: tensors `x` float32 (-1, C, H, W)
  and `t` float32 (-1,) -> float32 `logits` (-1, num_classes)), registers, tags and describes it likewise.
- `load_classifier(ref, device)` returns the classifier module itself (eval mode, frozen) from a
  registry / run URI, a local registered-model folder or a classifier-job checkpoint, never
  unpickling anything: the AFM worker's entry point for classifier guidance.
- `model_metrics(client, mv)`: the evaluation results of a registered version (its LoggedModel's
  metrics, latest value per name).

Metric names: MLflow refuses '@' in metric names, so a key such as `eval/fd@4` is stored as
`eval/fd_at_4` (`metric_name`, the same mapping as the run's metrics: tracking.logger.mlflow_metric_key).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch

from advflow.platform.tracking import model_format as fmt
from advflow.platform.tracking.artifact_scan import UnsafeArtifactError, scan_model_dir

LOADER_MODULE = fmt.__name__  # "advflow.platform.tracking.model_format"
REGISTRY_WAIT_S = 15  # OSS registries mark versions READY at once; do not block training for 5 min
SOURCES = ("train", "import")
_REQUIREMENTS = ("torch", "safetensors", "numpy", "pandas")
ARCH_TAG = "advflow.arch"
"""Version tag: the generator's architecture as JSON (size, kind, repeats, data_shape)."""
DATASET_DIGEST_CHARS = 16
"""The manifest sha256's first hex digits: an MLflow dataset digest holds at most 36 characters (the
version tag `data.manifest_sha256` keeps the whole hash)."""
AUTO_DESCRIPTION = "Written by advflow when version"
"""How a registered model's description written by `_describe` ends: advflow rewrites such a
description at each registration, and leaves any other (a person's) alone."""


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


def metric_name(key: str) -> str:
    """The LoggedModel (and run) metric name of evaluation result `key`: MLflow refuses '@', so
    "eval/fd@4" -> "eval/fd_at_4"; "eval/fd" stays as it is."""
    from advflow.platform.tracking.logger import mlflow_metric_key

    return mlflow_metric_key(key)


def data_dataset(tags: dict[str, str]):
    """The dataset a model was trained and evaluated on, as an MLflow dataset entity built from the
    run's data tags (`data.prefix` from the spec, `data.manifest_uri` / `data.manifest_sha256` from
    data.shards.dataset_tags): name = the data prefix, digest = the manifest's sha256 (first
    DATASET_DIGEST_CHARS hex digits), source = the manifest's URI. None when the tags hold no
    manifest digest (an imported checkpoint, or a manifest the driver could not read): the metrics
    are then linked to the run only."""
    from urllib.parse import urlparse

    from mlflow.entities import Dataset

    digest = tags.get("data.manifest_sha256")
    if not digest:
        return None
    uri = tags.get("data.manifest_uri") or tags.get("data.prefix") or ""
    scheme = urlparse(uri).scheme
    # source_type as MLflow's own file-system sources name theirs: the URI scheme, "local" for paths.
    return Dataset(name=tags.get("data.prefix") or uri or digest[:DATASET_DIGEST_CHARS],
                   digest=digest[:DATASET_DIGEST_CHARS], source_type=scheme if scheme not in ("", "file") else "local",
                   source=json.dumps({"uri": uri}))


def logged_model_id(mv) -> str | None:
    """The LoggedModel behind registered version `mv`: its source models:/<model_id> (the REST
    client leaves ModelVersion.model_id empty in MLflow 3.x); None for a version registered from
    something else (runs:/..., a path)."""
    source = mv.source or ""
    if source.startswith("models:/m-") and "/" not in source[len("models:/"):]:
        return source[len("models:/"):]
    return getattr(mv, "model_id", None)


def model_metrics(client, mv) -> dict[str, float]:
    """Registered version `mv`'s evaluation results: its LoggedModel's metrics, the latest (step,
    timestamp) value per metric name (NaN where none is stored); {} when it has no LoggedModel (or
    that was deleted) or no metrics."""
    from mlflow.exceptions import MlflowException

    model_id = logged_model_id(mv)
    if model_id is None:
        return {}
    try:
        model = client.get_logged_model(model_id)
    except MlflowException as e:
        if e.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        return {}
    latest: dict[str, Any] = {}
    for m in model.metrics or []:
        if m.key not in latest or (m.step, m.timestamp) >= (latest[m.key].step, latest[m.key].timestamp):
            latest[m.key] = m
    return {k: math.nan if m.value is None else float(m.value) for k, m in latest.items()}


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


def _check_tags(tags: dict[str, str] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in (tags or {}).items():
        if not isinstance(k, str) or not k:
            raise ValueError(f"tags: key {k!r} must be a non-empty string")
        out[k] = str(v)
    return out


def _check_metrics(metrics: dict[str, float] | None) -> dict[str, float]:
    """`metrics` under their MLflow names (metric_name), all finite."""
    out: dict[str, float] = {}
    for k, v in (metrics or {}).items():
        value = float(v)
        if not math.isfinite(value):
            raise ValueError(f"metrics: {k}={v!r} is not finite; log only finite evaluation results")
        name = metric_name(k)
        if name in out:
            raise ValueError(f"metrics: two keys become the MLflow metric name {name!r} ('@' is logged as "
                             f"'_at_'); rename {k!r}")
        out[name] = value
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
    results, logged as the LoggedModel's metrics (names: `metric_name`) at `step`, linked to the run
    and to the dataset of the `data.*` tags (`data_dataset`); jobs/promote.py --best-metric reads
    them. They need a run. tags: version and LoggedModel tags (Registration passes the run's data
    tags and `method`). source: "train" (the training loop) or "import" (jobs/register_checkpoint.py).
    """
    if source not in SOURCES:
        raise ValueError(f"source: {source!r} unknown; use one of {list(SOURCES)}")
    config = getattr(generator, "config", None)
    if not isinstance(config, dict) or "name" not in config:
        raise ValueError("generator: expected an advflow Generator (with .config from build_generator); "
                         "pass the plain (EMA) module, not a DeepSpeed/DDP wrapper")
    spec = fmt.GeneratorSpec(generator=dict(config), decoder=dict(decoder), data_shape=tuple(data_shape),
                             num_classes=int(num_classes))
    run_id, version_tags = _version_tags(tags, run_id, step, source)
    values = _metrics_for_run(metrics, run_id)
    version_tags[ARCH_TAG] = json.dumps(architecture(spec))  # what architecture_change compares
    n_params = sum(p.numel() for p in generator.parameters())

    with tempfile.TemporaryDirectory(prefix="advflow-model-") as tmp:
        data_dir = fmt.write_model_data(generator, spec, Path(tmp) / "generator")
        model_id = _log_model(
            data_dir, name=name, signature=_signature(spec), input_example=_input_example(spec.num_classes),
            pip_requirements=_pip_requirements(spec.decoder),
            metadata={"advflow_format": fmt.FORMAT, "advflow_format_version": fmt.FORMAT_VERSION},
            run_id=run_id, step=step, tags=version_tags)
    dataset = data_dataset(version_tags)
    _log_model_metrics(model_id, values, run_id=run_id, step=step, dataset=dataset)
    return _register(model_id, registered_name, version_tags, lambda uri: generator_description(
        spec, n_params=n_params, tags=version_tags, uri=uri, model_id=model_id, dataset=dataset, metrics=values))


def _log_model(data_dir: Path, *, name: str, signature, input_example, pip_requirements: list[str],
               metadata: dict[str, Any], run_id: str | None, step: int | None, tags: dict[str, str]) -> str:
    """Log `data_dir` as a pyfunc LoggedModel with advflow's loader module (no code paths); its model_id.

    MLflow's Model.log, step by step (initialize_logged_model, pyfunc.save_model, log_model_artifacts,
    log_outputs, finalize_logged_model), for what Model.log would do otherwise:
    - it files the LoggedModel under the process's active experiment, in a training worker the
      Default one, where `runs:/RUN_ID/NAME` (resolved within the run's experiment) does not look;
      here it goes under the run's experiment;
    - it validates the serving input by loading the model and predicting the input example: on rank 0
      in the middle of training, a second copy of G (and the VAE) at every registration (the tests
      check the example instead);
    - it copies every run metric logged at `step` onto the model, with the run's timestamps and no
      dataset; `_log_model_metrics` logs the evaluation results with their dataset instead, and MLflow
      refuses a second LoggedModel metric of the same name, step and timestamp."""
    import mlflow
    import mlflow.pyfunc
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus
    from mlflow.models import Model

    client = mlflow.MlflowClient()
    run = client.get_run(run_id) if run_id is not None else None
    model = mlflow.initialize_logged_model(
        name=name, source_run_id=run_id, tags=tags, experiment_id=run.info.experiment_id if run else None,
        params={k: str(v) for k, v in run.data.params.items()} if run else None)  # as Model.log: the run's params
    try:
        with tempfile.TemporaryDirectory(prefix="advflow-mlmodel-") as tmp:
            local = Path(tmp) / "model"
            mlflow_model = Model(artifact_path=model.artifact_location, model_uuid=model.model_id, run_id=run_id,
                                 metadata=metadata, model_id=model.model_id)
            mlflow.pyfunc.save_model(path=str(local), loader_module=LOADER_MODULE, data_path=str(data_dir),
                                     mlflow_model=mlflow_model, signature=signature, input_example=input_example,
                                     pip_requirements=pip_requirements)
            client.log_model_artifacts(model.model_id, str(local))
        if run_id is not None:
            client.log_outputs(run_id, models=[LoggedModelOutput(model.model_id, step=int(step or 0))])
    except BaseException:
        client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    return model.model_id


def _metrics_for_run(metrics: dict[str, float] | None, run_id: str | None) -> dict[str, float]:
    """`metrics` checked (finite, MLflow names), before anything is logged."""
    values = _check_metrics(metrics)
    if values and run_id is None:
        raise ValueError(f"metrics: {sorted(values)} need a run (MLflow logs a LoggedModel's metrics within "
                         "one); pass run_id or call inside mlflow.start_run()")
    return values


def _log_model_metrics(model_id: str, metrics: dict[str, float], *, run_id: str | None, step: int | None,
                       dataset) -> None:
    """Log `metrics` as metrics of LoggedModel `model_id` at `step`, linked to `run_id` and `dataset`
    (mlflow.log_metrics with model_id, run_id and dataset; the dataset also becomes a run input).

    MLflow writes a LoggedModel's metric into its run's history too. The run mostly holds the number
    at this step already (the Evaluation callback logged it before registration): logging it with
    that entry's timestamp lets MLflow skip the copy as a duplicate, so the run's history (the
    curves of reports) shows each evaluation once."""
    if not metrics:
        return
    import mlflow

    client = mlflow.MlflowClient()
    step = int(step or 0)
    now = int(time.time() * 1000)
    by_time: dict[int, dict[str, float]] = {}
    for key, value in metrics.items():
        ts = next((m.timestamp for m in client.get_metric_history(run_id, key) if m.step == step and m.value == value),
                  now)
        by_time.setdefault(ts, {})[key] = value
    for ts, group in sorted(by_time.items()):
        mlflow.log_metrics(group, step=step, run_id=run_id, timestamp=ts, model_id=model_id, dataset=dataset,
                           synchronous=True)


def _register(model_id: str, registered_name: str | None, version_tags: dict[str, str],
              description: Callable[[str], str]) -> RegisteredGenerator:
    """Register LoggedModel `model_id` as a version of `registered_name` (None: do not) with the
    version tags, then describe the LoggedModel, the version and the registered model:
    `description(uri)`, uri = models:/NAME/VERSION (models:/<model_id> when not registered)."""
    import mlflow
    from mlflow.utils.mlflow_tags import MLFLOW_RUN_NOTE

    client = mlflow.MlflowClient()
    uri = f"models:/{model_id}"
    version = None
    if registered_name:
        mv = mlflow.register_model(uri, registered_name, await_registration_for=REGISTRY_WAIT_S, tags=version_tags)
        version = str(mv.version)
    text = description(f"models:/{registered_name}/{version}" if version else uri)
    # The LoggedModel's page is the one that shows its metrics; MLflow's UI shows this tag there as its
    # description.
    client.set_logged_model_tags(model_id, {MLFLOW_RUN_NOTE: text})
    if version:
        _describe(client, registered_name, version, text)
    return RegisteredGenerator(model_uri=uri, model_id=model_id, version=version, name=registered_name)


def _describe(client, name: str, version: str, text: str) -> None:
    """`text` as the version's description, and as the registered model's unless a person wrote that
    one (advflow's own ends with AUTO_DESCRIPTION, and follows the latest version)."""
    client.update_model_version(name, version, description=text)
    current = client.get_registered_model(name).description or ""
    if not current.strip() or AUTO_DESCRIPTION in current:
        client.update_registered_model(name, description=f"{text}\n\n*{AUTO_DESCRIPTION} {version} was registered; "
                                       "it follows the latest version until someone writes their own here.*")


# ----------------------------------------------------------------------------------------------------
# Descriptions
# ----------------------------------------------------------------------------------------------------

_KIND_WORDS = {"1nfe": "one-step", "multistep": "{nfe}-step", "anystep": "any-step"}


def generator_description(spec: fmt.GeneratorSpec, *, n_params: int, tags: dict[str, str], uri: str,
                          model_id: str, dataset=None, metrics: dict[str, float] | None = None) -> str:
    """Markdown for a registered generator version: what it is, its method, size, K, R, data, run and
    evaluation, and the jobs/generate.py command that samples from `uri` (models:/NAME/VERSION)."""
    g = spec.generator
    kind, nfe, repeats = g.get("kind", "1nfe"), g.get("nfe", 1), g.get("repeats", 1)
    method = tags.get("method")
    what = (f"{method.upper() + ' ' if method else ''}{_KIND_WORDS.get(kind, kind).format(nfe=nfe)} generator "
            f"(DiT {g.get('name')}, K={nfe}, R={repeats}) {_origin(tags)}")
    c, h, w = spec.data_shape
    lines = [
        f"{what[0].upper()}{what[1:]}.",  # "One-step generator ..." when no method is recorded (imports)
        "",
        f"- **Method**: {method or 'not recorded'} (generator kind {kind})",
        f"- **Size**: {g.get('name')}, {n_params:,} parameters",
        f"- **K** (sampling steps, nfe): {nfe}",
        f"- **R** (depth repetition): {repeats}",
        f"- **Data**: {_data_line(tags)}; {spec.num_classes} classes; samples {c}x{h}x{w}, "
        f"decoder {spec.decoder.get('name')}",
        *_run_lines(tags, model_id, dataset, metrics),
        *_source_lines(tags),
        "",
        "Sample from it:",
        "",
        "```",
        f"python jobs/generate.py --model {uri} --labels 0-{min(spec.num_classes, 10) - 1} --per-label 8 "
        "--out grid.png",
        "```",
    ]
    return "\n".join(lines)


def classifier_description(spec: fmt.ClassifierSpec, *, n_params: int, tags: dict[str, str], uri: str,
                           model_id: str, dataset=None, metrics: dict[str, float] | None = None) -> str:
    """Markdown for a registered classifier version: what it is, size, data, run, evaluation, and how
    classifier guidance loads it from `uri`."""
    size = spec.classifier.get("name")
    lo, hi = spec.t_range
    c, h, w = spec.data_shape
    return "\n".join([
        f"Time-conditioned classifier for classifier guidance (DiT {size}, {spec.num_classes} classes, "
        f"t in [{lo:g}, {hi:g}]) {_origin(tags)}.",
        "",
        f"- **Size**: {size}, {n_params:,} parameters",
        f"- **Data**: {_data_line(tags)}; inputs {c}x{h}x{w} latents (encoder {spec.encoder.get('name', 'pixel')})",
        *_run_lines(tags, model_id, dataset, metrics),
        "",
        f"Guide a generator's training with it: `guidance.classifier: {uri}` in the run config.",
    ])


def _source_lines(tags: dict[str, str]) -> list[str]:
    """The model a post-trained version started from (`model.init`; tags source_model, source_run_id)."""
    if not tags.get("source_model"):
        return []
    run = f" (run {tags['source_run_id']})" if tags.get("source_run_id") else ""
    return [f"- **Post-trained from**: {tags['source_model']}{run}"]


def _origin(tags: dict[str, str]) -> str:
    if tags.get("data.prefix"):
        return f"trained on {tags['data.prefix']}"
    if tags.get("source") == "import":
        return f"imported from {tags.get('source_path', 'a checkpoint')}"
    return "(data not recorded)"


def _data_line(tags: dict[str, str]) -> str:
    if tags.get("data.manifest_sha256"):
        return (f"{tags.get('data.prefix', '-')} (manifest {tags.get('data.manifest_uri', '-')}, "
                f"sha256 {tags['data.manifest_sha256'][:DATASET_DIGEST_CHARS]}...)")
    return tags.get("data.prefix") or "not recorded"


def _run_lines(tags: dict[str, str], model_id: str, dataset, metrics: dict[str, float] | None) -> list[str]:
    lines = [f"- **Run**: {tags.get('run_id', 'none')}, step {tags.get('step', 'none')} ({tags.get('source')})"]
    if metrics:
        on = f", dataset {dataset.name} (digest {dataset.digest})" if dataset is not None else ""
        lines.append(f"- **Evaluation**: the metrics of LoggedModel {model_id}{on}: "
                     + ", ".join(f"{k} = {v:.6g}" for k, v in sorted(metrics.items())))
    return lines


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
    metrics (LoggedModel metrics linked to the run and the data), tags, source: as for `log_generator`.
    Returns the same record as `log_generator` (model_uri, model_id, version, name)."""
    if source not in SOURCES:
        raise ValueError(f"source: {source!r} unknown; use one of {list(SOURCES)}")
    config = getattr(classifier, "config", None)
    if not isinstance(config, dict) or "name" not in config or "num_classes" not in config:
        raise ValueError("classifier: expected an advflow Classifier (with .config from build_classifier); "
                         "pass the plain (EMA) module, not a DeepSpeed/DDP wrapper")
    spec = fmt.ClassifierSpec(classifier=dict(config), data_shape=tuple(data_shape), num_classes=int(num_classes),
                              encoder=dict(encoder or {}), t_range=tuple(t_range))
    run_id, version_tags = _version_tags(tags, run_id, step, source)
    values = _metrics_for_run(metrics, run_id)
    n_params = sum(p.numel() for p in classifier.parameters())
    with tempfile.TemporaryDirectory(prefix="advflow-model-") as tmp:
        data_dir = fmt.write_classifier_data(classifier, spec, Path(tmp) / "classifier")
        model_id = _log_model(
            data_dir, name=name, signature=_classifier_signature(spec), input_example=_classifier_input_example(spec),
            pip_requirements=_pinned(list(_CLASSIFIER_REQUIREMENTS)),
            metadata={"advflow_format": fmt.CLASSIFIER_FORMAT, "advflow_format_version": fmt.CLASSIFIER_FORMAT_VERSION},
            run_id=run_id, step=step, tags=version_tags)
    dataset = data_dataset(version_tags)
    _log_model_metrics(model_id, values, run_id=run_id, step=step, dataset=dataset)
    return _register(model_id, registered_name, version_tags, lambda uri: classifier_description(
        spec, n_params=n_params, tags=version_tags, uri=uri, model_id=model_id, dataset=dataset, metrics=values))


def _version_tags(tags, run_id, step, source) -> tuple[str | None, dict[str, str]]:
    """(run_id, default: the active run's; the tags that identify the model: the caller's plus
    run_id, step and source)."""
    import mlflow

    extra = _check_tags(tags)
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
    model folder (a downloaded model holding MLmodel, or the bare data folder of
    `model_format.write_model_data`: scanned whole, then loaded in place). vae_path/device: overrides
    (see tracking.model_format). dst_path: keep the download there (default: a temporary folder,
    removed after loading).
    """
    import mlflow

    local = Path(os.fspath(model_uri))
    if "://" not in str(model_uri) and not str(model_uri).startswith(("models:/", "runs:/")) \
            and (local / fmt.SPEC_FILE).is_file() and not (local / "MLmodel").is_file():
        scan_model_dir(local)  # before anything in it is parsed beyond raw bytes
        model = fmt.load_model_data(local, vae_path=vae_path, device=device)
        model.source = {"requested": str(model_uri), "uri": str(local.resolve()), "name": None, "version": None,
                        "run_id": None}
        return model
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
