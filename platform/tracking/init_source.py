"""`model.init`: the registered flow-matching model a method's generator starts from (method cafm).

Torch-free, so the driver's preflight (`train/preflight.py`) checks the source before launch with the
same words as the workers' check when they load it (`methods/cafm.py`):
- `inspect_init(ref)` learns what can be known cheaply: for `models:/NAME@ALIAS` and
  `models:/NAME/VERSION` the version it pins and the version's tags (`method`, `run_id`, the
  architecture tag `advflow.arch`: size, kind, data shape); for a local folder (a downloaded model
  holding MLmodel, or the bare data folder `model_format.write_model_data` writes) its generator.json.
  A `runs:/` URI (or a LoggedModel id) is not inspected: the workers check it when they load it.
- `init_problem(source, ...)` is None, or one line `model.init=REF: <problem>; <fix>` when the source
  is not a flow-matching model (method tag `fm`, generator kind `multistep`) of the run's size, data
  shape (in_channels, input_size) and classes. What is not known is not checked (a local folder
  carries no method tag: only its kind is).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SPEC_FILE = "generator.json"  # model_format.SPEC_FILE (not imported: model_format imports torch)
ARCH_TAG = "advflow.arch"  # registry.ARCH_TAG
INIT_FIX = ("register a flow-matching model first: python jobs/train.py --config ... --set model.method=fm ... "
            "with tracking.register_name, and set model.init to it")


@dataclass
class InitSource:
    """What is known of a `model.init` reference before its weights are read."""

    ref: str
    """As the config gives it."""
    resolved: str
    """What is loaded: models:/NAME/VERSION for a registry alias or version (pinned), else `ref`."""
    name: str | None = None
    version: str | None = None
    run_id: str | None = None
    method: str | None = None
    """The version's `method` tag (None: not recorded, e.g. a local folder)."""
    generator: dict[str, Any] | None = None
    """generator.json's `generator` (G.config: name, kind, in_channels, input_size, num_classes, ...)."""
    num_classes: int | None = None
    arch: dict[str, Any] = field(default_factory=dict)
    """The version's `advflow.arch` tag: size, kind, repeats, data_shape."""

    @property
    def shown(self) -> str:
        return self.ref if self.resolved == self.ref else f"{self.ref} ({self.resolved})"


def is_local(ref: str) -> bool:
    return "://" not in ref and not ref.startswith(("models:/", "runs:/"))


def read_local(ref: str) -> InitSource:
    """A local model folder: MLmodel + its data folder, or the bare data folder (generator.json)."""
    path = Path(ref)
    if not path.is_dir():
        raise ValueError(f"model.init={ref}: no such directory; pass models:/NAME@ALIAS, models:/NAME/VERSION, "
                         "runs:/RUN_ID/generator or a local model folder")
    data = path
    if not (path / SPEC_FILE).is_file() and (path / "MLmodel").is_file():
        import yaml

        conf = (yaml.safe_load((path / "MLmodel").read_text()) or {}).get("flavors", {}).get("python_function", {})
        data = path / str(conf.get("data") or "")
    spec_path = data / SPEC_FILE
    if not spec_path.is_file():
        raise ValueError(f"model.init={ref}: no {SPEC_FILE} there; this is not an advflow generator model folder "
                         f"(a registered model's download, or model_format.write_model_data's output); {INIT_FIX}")
    try:
        obj = json.loads(spec_path.read_text())
    except ValueError as err:
        raise ValueError(f"model.init={ref}: {spec_path} is not valid JSON ({err})") from None
    gen = obj.get("generator") if isinstance(obj, dict) else None
    if not isinstance(gen, dict):
        raise ValueError(f"model.init={ref}: {spec_path} holds no generator record; {INIT_FIX}")
    return InitSource(ref=ref, resolved=ref, generator=gen, num_classes=obj.get("num_classes"))


def inspect_init(ref: str, client=None) -> InitSource:
    """What is known of `ref` without its weights (see the module docstring). Raises MLflow's errors
    when the registry cannot be asked (the caller decides), ValueError for a local folder that is no
    generator model."""
    ref = os.fspath(ref)
    if is_local(ref):
        return read_local(ref)
    if not ref.startswith("models:/"):
        return InitSource(ref=ref, resolved=ref)
    rest = ref[len("models:/"):]
    if "@" in rest:
        name, alias = rest.split("@", 1)
        get = lambda c: c.get_model_version_by_alias(name, alias)  # noqa: E731
    elif "/" in rest and rest.rsplit("/", 1)[1].isdigit():
        name, version = rest.rsplit("/", 1)
        get = lambda c: c.get_model_version(name, version)  # noqa: E731
    else:
        return InitSource(ref=ref, resolved=ref)  # a LoggedModel id, a stage: MLflow resolves it at load
    if client is None:
        from mlflow import MlflowClient

        client = MlflowClient()
    mv = get(client)
    tags = dict(mv.tags or {})
    try:
        arch = json.loads(tags.get(ARCH_TAG, "{}"))
    except ValueError:
        arch = {}
    return InitSource(ref=ref, resolved=f"models:/{mv.name}/{mv.version}", name=mv.name, version=str(mv.version),
                      run_id=mv.run_id or tags.get("run_id"), method=tags.get("method"),
                      arch=arch if isinstance(arch, dict) else {})


def init_problem(src: InitSource, *, size: str, data_shape: tuple[int, int, int], num_classes: int) -> str | None:
    """None, or the one line that refuses `src` as the start of a run of model `size` on data of
    `data_shape` (C, H, W) with `num_classes` classes."""
    g = src.generator or {}
    where = f"model.init={src.shown}"
    if src.method is not None and src.method != "fm":
        return (f"{where}: is a model of method {src.method}, not a flow-matching one (method fm); CAFM post-trains "
                f"a flow-matching velocity model: {INIT_FIX}")
    kind = g.get("kind", src.arch.get("kind"))
    if kind is not None and kind != "multistep":
        return (f"{where}: is a {kind} generator, not a flow-matching velocity model (kind multistep); {INIT_FIX}")
    got_size = g.get("name", src.arch.get("size"))
    if got_size is not None and got_size != size:
        return (f"{where}: is DiT {got_size}, this run's model.size is {size}; set model.size={got_size}, or "
                "start from a model of this size")
    shape = src.arch.get("data_shape")
    if g.get("in_channels") is not None:
        shape = [g["in_channels"], g["input_size"], g["input_size"]]
    if shape is not None and tuple(int(s) for s in shape) != tuple(data_shape):
        return (f"{where}: was trained on {tuple(shape)} data (in_channels, input_size), this run's data is "
                f"{tuple(data_shape)}; start from a model trained on this dataset (data.prefix)")
    classes = g.get("num_classes", src.num_classes)
    if classes is not None and int(classes) != int(num_classes):
        return (f"{where}: has {classes} classes, this run's data has {num_classes}; start from a model trained "
                "on this dataset (data.prefix)")
    return None
