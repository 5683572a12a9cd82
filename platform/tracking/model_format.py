"""The advflow generator model format and its MLflow pyfunc loader module (no pickle anywhere).

A logged generator is a folder with two files, written by `write_model_data`:
- weights.safetensors: the generator's state dict (the EMA weights the trainer passes);
- generator.json: `GeneratorSpec` (builder config = G.config, sampler settings, decoder, data_shape,
  num_classes).
MLflow stores the folder under the model's data/ and names this module as the pyfunc loader
(`loader_module: advflow.platform.tracking.model_format`), so `mlflow.pyfunc.load_model` and
`mlflow models serve` call `_load_pyfunc`, which first scans the WHOLE model directory for pickle data
(artifact_scan) and only then reads the two files.

Prediction: a DataFrame with integer columns `label` and `seed`, one image per row; row i's noise is
`torch.randn(data_shape, generator=torch.Generator().manual_seed(seed_i))` drawn on the CPU, so an
image depends only on its (label, seed) (and the device), never on the rest of the batch. Output:
uint8 images (N, H, W, C).

Decoder: the dataset manifest's `encoder` entry. "pixel" is the identity. "sd-vae" loads a diffusers
AutoencoderKL from the LOCAL path recorded at logging time (`vae_path`); that path must exist on the
machine that loads the model, or be overridden: `load_generator(uri, vae_path=...)`,
`mlflow.pyfunc.load_model(uri, model_config={"vae_path": ...})` or the environment variable
ADVFLOW_VAE_PATH (argument > model_config > env var > recorded path). The device is chosen the same
way ("device" / ADVFLOW_DEVICE; default: cuda if available, else cpu).

Classifiers (format "advflow-classifier", written by `write_classifier_data`; the time-conditioned
classifier of classifier guidance, trained by jobs/train.py with model.method classifier): the same folder layout with
classifier.json (`ClassifierSpec`: builder config = C.config, data_shape, num_classes, the latents'
encoder record, the training time range) instead of generator.json, and the same loader module:
`_load_pyfunc` sees classifier.json and returns a `ClassifierModel`, whose `predict` takes a dict of
float32 arrays {"x": (N, C, H, W) latents, "t": (N,) flow times} and returns float32 logits
(N, num_classes). A classifier-job checkpoint holds the same classifier.json next to its EMA weights
(ema.safetensors, `CHECKPOINT_WEIGHTS_FILE`), so `load_classifier_data(dir, weights_file=...)` reads
either.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from advflow.platform.data.encoders import resolve_device
from advflow.platform.images import to_uint8
from advflow.platform.tracking.artifact_scan import scan_model_dir

WEIGHTS_FILE = "weights.safetensors"
SPEC_FILE = "generator.json"
FORMAT = "advflow-generator"
FORMAT_VERSION = 1
VAE_PATH_ENV = "ADVFLOW_VAE_PATH"
DEVICE_ENV = "ADVFLOW_DEVICE"
MAX_BATCH = 64  # rows generated together; bounds memory for large requests
DECODERS = ("pixel", "sd-vae")



def label_ranges(labels: Sequence[int]) -> str:
    """[10, 11, 12, 15, -1] -> '-1, 10-12, 15': each label once, runs folded into ranges."""
    runs: list[list[int]] = []
    for v in sorted(set(labels)):
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ", ".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in runs)


def labels_outside(labels: Sequence[int], num_classes: int) -> str | None:
    """The message naming each label outside [0, num_classes) once (a grid repeats a label per
    image, and a range such as 0-12 must not list 10, 10, 11, 11, 12), or None when all are in range."""
    bad = [v for v in labels if not 0 <= v < num_classes]
    if not bad:
        return None
    classes = f"0-{num_classes - 1}" if num_classes > 1 else "0"
    many = len(set(bad)) > 1
    return (f"label{'s' if many else ''} {label_ranges(bad)} {'are' if many else 'is'} outside the model's "
            f"classes {classes}; pass labels in {classes}")

class ModelFormatError(ValueError):
    """A model folder's generator.json / weights do not form a valid advflow generator."""


@dataclass(frozen=True)
class GeneratorSpec:
    """Everything besides the weights needed to rebuild and sample a generator (generator.json).

    generator: G.config; `build_generator(**generator)` rebuilds the network. Sampler settings
        (kind, nfe = K, repeats = R) are part of it and repeated under "sampler" for readers.
    decoder: the dataset manifest's encoder dict ({"name": "pixel"} or {"name": "sd-vae",
        "vae_path": ..., "scaling_factor": ...}).
    data_shape: (C, H, W) of the generator's samples (latents for sd-vae).
    num_classes: labels lie in [0, num_classes).
    """

    generator: dict[str, Any]
    decoder: dict[str, Any]
    data_shape: tuple[int, int, int]
    num_classes: int
    sampler: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.data_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ModelFormatError(f"data_shape: expected (C, H, W) of positive ints, got {self.data_shape!r}")
        object.__setattr__(self, "data_shape", shape)
        g = self.generator
        want = (g.get("in_channels"), g.get("input_size"), g.get("input_size"))
        if shape != want:
            raise ModelFormatError(
                f"data_shape: {shape} does not match the generator's (in_channels, input_size, input_size) = "
                f"{want}; pass the shape of the dataset's latents the generator was trained on"
            )
        if int(self.num_classes) != g.get("num_classes"):
            raise ModelFormatError(
                f"num_classes: {self.num_classes} but the generator has {g.get('num_classes')} classes; "
                "pass the generator's num_classes"
            )
        name = self.decoder.get("name") if isinstance(self.decoder, dict) else None
        if name not in DECODERS:
            raise ModelFormatError(f"decoder: name {name!r} unknown; pass the manifest's encoder dict "
                                   f"with name in {list(DECODERS)}")
        if name == "pixel" and shape[0] not in (1, 3):
            raise ModelFormatError(f"decoder: 'pixel' needs 1 or 3 channels, the data has {shape[0]}; "
                                   "pass the dataset's latent decoder (e.g. sd-vae)")
        sampler = {k: g.get(k) for k in ("kind", "nfe", "repeats")}
        object.__setattr__(self, "sampler", sampler)

    def image_shape(self) -> tuple[int, int, int]:
        """(H, W, C) of the decoded uint8 images."""
        c, h, w = self.data_shape
        if self.decoder["name"] == "pixel":
            return (h, w, c)
        f = int(self.decoder.get("downsample", 8))  # SD-VAE: 8x spatial, RGB out
        return (h * f, w * f, 3)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "format_version": FORMAT_VERSION, **dataclasses.asdict(self),
                "data_shape": list(self.data_shape)}

    @classmethod
    def from_json(cls, obj: Any, where: str) -> GeneratorSpec:
        if not isinstance(obj, dict) or obj.get("format") != FORMAT:
            raise ModelFormatError(f"{where}: not an advflow generator spec (format != {FORMAT!r})")
        if obj.get("format_version") != FORMAT_VERSION:
            raise ModelFormatError(f"{where}: format_version {obj.get('format_version')!r} is not supported "
                                   f"(this advflow reads {FORMAT_VERSION}); upgrade advflow")
        try:
            return cls(generator=dict(obj["generator"]), decoder=dict(obj["decoder"]),
                       data_shape=tuple(obj["data_shape"]), num_classes=int(obj["num_classes"]))
        except (KeyError, TypeError) as e:
            raise ModelFormatError(f"{where}: missing or malformed field ({e})") from e


def write_model_data(generator: torch.nn.Module, spec: GeneratorSpec, out_dir: str | os.PathLike) -> Path:
    """Write weights.safetensors + generator.json into out_dir (created); returns it."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # clone: safetensors refuses tensors that share storage; contiguous + cpu for a plain dump.
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in generator.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": FORMAT})
    (out / SPEC_FILE).write_text(json.dumps(spec.to_json(), indent=2, sort_keys=True))
    return out


class GeneratorModel:
    """A loaded generator plus decoder. `.generate(labels, seeds)` -> uint8 (N, H, W, C);
    `.images(labels, seeds)` -> float (N, C, H, W) in [-1, 1]; `.predict(df)` is the pyfunc entry.
    `.config` is the GeneratorSpec as a dict; `.source` (set by registry.load_generator) says which
    registry version / run it came from."""

    def __init__(self, generator: torch.nn.Module, spec: GeneratorSpec, *, device: torch.device,
                 decoder: dict[str, Any]) -> None:
        self.generator = generator.to(device).eval().requires_grad_(False)
        self.spec = spec
        self.device = device
        self.decoder = decoder  # the spec's decoder with any vae_path override applied
        self.source: dict[str, Any] = {}

    @property
    def config(self) -> dict[str, Any]:
        return self.spec.to_json()

    def _check(self, labels: Sequence[int], seeds: Sequence[int]) -> tuple[list[int], list[int]]:
        labels, seeds = [int(v) for v in labels], [int(v) for v in seeds]
        if len(labels) != len(seeds):
            raise ValueError(f"labels/seeds: {len(labels)} labels but {len(seeds)} seeds; pass one seed per label")
        problem = labels_outside(labels, self.spec.num_classes)
        if problem:
            raise ValueError(problem)
        if any(s < 0 or s >= 2**63 for s in seeds):
            raise ValueError("seed: seeds must lie in [0, 2**63); pass non-negative integers")
        return labels, seeds

    def noise(self, seeds: Sequence[int]) -> torch.Tensor:
        """Per-row seeded noise, (N, C, H, W), drawn on the CPU so it is the same on every device."""
        rows = [torch.randn(self.spec.data_shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
        return torch.stack(rows) if rows else torch.empty(0, *self.spec.data_shape)

    @torch.no_grad()
    def images(self, labels: Sequence[int], seeds: Sequence[int]) -> torch.Tensor:
        from advflow.platform.data.encoders import decode_latents
        from advflow.trainers.flow import generate

        labels, seeds = self._check(labels, seeds)
        out = []
        for i in range(0, len(labels), MAX_BATCH):
            z = self.noise(seeds[i:i + MAX_BATCH]).to(self.device)  # (n, C, H, W)
            y = torch.tensor(labels[i:i + MAX_BATCH], dtype=torch.long, device=self.device)
            x = generate(self.generator, z, y)  # (n, C, H, W) latents
            out.append(decode_latents(x, self.decoder, device=str(self.device)).float().cpu())
        if not out:
            h, w, c = self.spec.image_shape()
            return torch.empty(0, c, h, w)
        return torch.cat(out)  # (N, C, H, W) in [-1, 1]

    def generate(self, labels: Sequence[int], seeds: Sequence[int]) -> np.ndarray:
        return to_uint8(self.images(labels, seeds))  # (N, H, W, C) uint8

    def predict(self, model_input, params: dict[str, Any] | None = None) -> np.ndarray:
        cols = getattr(model_input, "columns", None)
        if cols is None or "label" not in cols or "seed" not in cols:
            raise ValueError("model input: a DataFrame with integer columns 'label' and 'seed' "
                             "(one image per row) is required")
        return self.generate(model_input["label"].tolist(), model_input["seed"].tolist())


def _decoder_with_overrides(decoder: dict[str, Any], vae_path: str | None) -> dict[str, Any]:
    decoder = dict(decoder)
    if decoder["name"] != "sd-vae":
        return decoder
    # Manifests written by prepare (encoders.ENCODERS["sd-vae"].record) use "vae_path"; accept a bare "path" too.
    recorded = decoder.get("vae_path") or decoder.get("path")
    path = vae_path or os.environ.get(VAE_PATH_ENV) or recorded
    if not path or not os.path.exists(path):
        raise FileNotFoundError(
            f"decoder sd-vae: VAE weights not found at {path!r} (the path recorded when the model was logged "
            f"is {recorded!r}); put a local AutoencoderKL folder there, or pass vae_path=... "
            f"(model_config={{'vae_path': ...}} for mlflow.pyfunc.load_model) or set {VAE_PATH_ENV}"
        )
    decoder["vae_path"] = path
    return decoder


def load_model_data(data_dir: str | os.PathLike, *, vae_path: str | None = None,
                    device: str | None = None) -> GeneratorModel:
    """Build the generator in data_dir (weights.safetensors + generator.json). Callers scan the
    enclosing model directory first (`_load_pyfunc`, registry.load_generator)."""
    from safetensors.torch import load_file

    from advflow.trainers.models import build_generator

    data_dir = Path(data_dir)
    spec_path, weights_path = data_dir / SPEC_FILE, data_dir / WEIGHTS_FILE
    if not spec_path.is_file() and (data_dir / CLASSIFIER_SPEC_FILE).is_file():
        raise ModelFormatError(f"model data {data_dir}: holds an advflow classifier ({CLASSIFIER_SPEC_FILE}), not a "
                               "generator; load it with advflow.platform.tracking.registry.load_classifier")
    for p in (spec_path, weights_path):
        if not p.is_file():
            raise ModelFormatError(f"model data {data_dir}: {p.name} missing; this is not an advflow generator model")
    try:
        obj = json.loads(spec_path.read_text())
    except ValueError as e:
        raise ModelFormatError(f"{spec_path}: not valid JSON ({e})") from e
    spec = GeneratorSpec.from_json(obj, str(spec_path))
    cfg = dict(spec.generator)
    G = build_generator(cfg.pop("name"), **cfg)
    state = load_file(str(weights_path), device="cpu")
    try:
        G.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ModelFormatError(f"{weights_path}: weights do not fit the generator in {SPEC_FILE} ({e})") from e
    # argument > ADVFLOW_DEVICE > auto (cuda if available, else cpu)
    return GeneratorModel(G, spec, device=resolve_device(device or os.environ.get(DEVICE_ENV) or None),
                          decoder=_decoder_with_overrides(spec.decoder, vae_path))


def model_root(data_path: str | os.PathLike) -> Path:
    """The MLflow model directory (holding MLmodel) that contains data_path."""
    p = Path(data_path).resolve()
    for cand in (p, *p.parents[:3]):
        if (cand / "MLmodel").is_file():
            return cand
    return p  # a bare data folder: scan what there is


def _load_pyfunc(data_path: str, model_config: dict[str, Any] | None = None) -> GeneratorModel | ClassifierModel:
    """MLflow's loader-module hook. Scans the whole model directory before reading anything; a
    folder with classifier.json is a classifier, anything else is read as a generator."""
    scan_model_dir(model_root(data_path))
    cfg = dict(model_config or {})
    if (Path(data_path) / CLASSIFIER_SPEC_FILE).is_file():
        return ClassifierModel.load(data_path, device=cfg.get("device"))
    return load_model_data(data_path, vae_path=cfg.get("vae_path"), device=cfg.get("device"))


# ----------------------------------------------------------------------------------------------------
# Classifier (format "advflow-classifier")
# ----------------------------------------------------------------------------------------------------

CLASSIFIER_SPEC_FILE = "classifier.json"
CLASSIFIER_FORMAT = "advflow-classifier"
CLASSIFIER_FORMAT_VERSION = 1
CHECKPOINT_WEIGHTS_FILE = "ema.safetensors"
"""The EMA weights in a classifier-job checkpoint (train.checkpoint.EMAState's file), next to classifier.json."""


@dataclass(frozen=True)
class ClassifierSpec:
    """Everything besides the weights needed to rebuild a classifier (classifier.json).

    classifier: C.config; `build_classifier(**classifier)` rebuilds the network.
    data_shape: (C, H, W) of the latents it classifies. num_classes: logits per sample.
    encoder: the dataset manifest's encoder record (which latent space the inputs must be in).
    t_range: the flow times it was trained on (x_t = (1 - t) x + t z with t in t_range).
    """

    classifier: dict[str, Any]
    data_shape: tuple[int, int, int]
    num_classes: int
    encoder: dict[str, Any] = field(default_factory=dict)
    t_range: tuple[float, float] = (0.0, 1.0)

    def __post_init__(self) -> None:
        shape = tuple(int(s) for s in self.data_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise ModelFormatError(f"data_shape: expected (C, H, W) of positive ints, got {self.data_shape!r}")
        object.__setattr__(self, "data_shape", shape)
        c = self.classifier
        want = (c.get("in_channels"), c.get("input_size"), c.get("input_size"))
        if shape != want:
            raise ModelFormatError(
                f"data_shape: {shape} does not match the classifier's (in_channels, input_size, input_size) = "
                f"{want}; pass the shape of the latents the classifier was trained on")
        if int(self.num_classes) != c.get("num_classes"):
            raise ModelFormatError(f"num_classes: {self.num_classes} but the classifier has {c.get('num_classes')} "
                                   "classes; pass the classifier's num_classes")
        lo, hi = (float(v) for v in self.t_range)
        if not 0.0 <= lo <= hi <= 1.0:
            raise ModelFormatError(f"t_range: {list(self.t_range)} is not an interval inside [0, 1]")
        object.__setattr__(self, "t_range", (lo, hi))
        if not isinstance(self.encoder, dict):
            raise ModelFormatError(f"encoder: expected the manifest's encoder dict, got {self.encoder!r}")

    def to_json(self) -> dict[str, Any]:
        return {"format": CLASSIFIER_FORMAT, "format_version": CLASSIFIER_FORMAT_VERSION,
                "classifier": dict(self.classifier), "data_shape": list(self.data_shape),
                "num_classes": int(self.num_classes), "encoder": dict(self.encoder), "t_range": list(self.t_range)}

    @classmethod
    def from_json(cls, obj: Any, where: str) -> ClassifierSpec:
        if not isinstance(obj, dict) or obj.get("format") != CLASSIFIER_FORMAT:
            raise ModelFormatError(f"{where}: not an advflow classifier spec (format != {CLASSIFIER_FORMAT!r})")
        if obj.get("format_version") != CLASSIFIER_FORMAT_VERSION:
            raise ModelFormatError(f"{where}: format_version {obj.get('format_version')!r} is not supported "
                                   f"(this advflow reads {CLASSIFIER_FORMAT_VERSION}); upgrade advflow")
        try:
            return cls(classifier=dict(obj["classifier"]), data_shape=tuple(obj["data_shape"]),
                       num_classes=int(obj["num_classes"]), encoder=dict(obj.get("encoder") or {}),
                       t_range=tuple(obj.get("t_range", (0.0, 1.0))))
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, ModelFormatError):
                raise ModelFormatError(f"{where}: {e}") from e
            raise ModelFormatError(f"{where}: missing or malformed field ({e})") from e


def write_classifier_data(classifier: torch.nn.Module, spec: ClassifierSpec, out_dir: str | os.PathLike) -> Path:
    """Write weights.safetensors + classifier.json into out_dir (created); returns it."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in classifier.state_dict().items()}
    save_file(state, str(out / WEIGHTS_FILE), metadata={"format": CLASSIFIER_FORMAT})
    write_classifier_spec(spec, out)
    return out


def write_classifier_spec(spec: ClassifierSpec, out_dir: str | os.PathLike) -> Path:
    """classifier.json alone (a classifier-job checkpoint writes it next to its EMA weights)."""
    path = Path(out_dir) / CLASSIFIER_SPEC_FILE
    path.write_text(json.dumps(spec.to_json(), indent=2, sort_keys=True))
    return path


def read_classifier_spec(data_dir: str | os.PathLike) -> ClassifierSpec:
    path = Path(data_dir) / CLASSIFIER_SPEC_FILE
    if not path.is_file():
        raise ModelFormatError(f"{data_dir}: no {CLASSIFIER_SPEC_FILE}; this is not an advflow classifier")
    try:
        obj = json.loads(path.read_text())
    except ValueError as e:
        raise ModelFormatError(f"{path}: not valid JSON ({e})") from e
    return ClassifierSpec.from_json(obj, str(path))


def load_classifier_data(data_dir: str | os.PathLike, *, device: str | torch.device | None = None,
                         weights_file: str = WEIGHTS_FILE):
    """The classifier in data_dir (classifier.json + `weights_file`, safetensors), in eval mode with
    requires_grad False, on `device` (argument > ADVFLOW_DEVICE > cuda if available, else cpu).
    Reads only those two files; callers check them for pickle data first (registry.load_classifier,
    `_load_pyfunc`)."""
    from safetensors.torch import load_file

    from advflow.trainers.models import build_classifier

    data_dir = Path(data_dir)
    spec = read_classifier_spec(data_dir)
    weights_path = data_dir / weights_file
    if not weights_path.is_file():
        raise ModelFormatError(f"model data {data_dir}: {weights_file} missing; this is not a complete advflow "
                               "classifier")
    cfg = dict(spec.classifier)
    try:
        C = build_classifier(cfg.pop("name"), **cfg)
    except (KeyError, ValueError) as e:
        raise ModelFormatError(f"{data_dir / CLASSIFIER_SPEC_FILE}: classifier config does not build ({e})") from e
    try:
        C.load_state_dict(load_file(str(weights_path), device="cpu"), strict=True)
    except RuntimeError as e:
        raise ModelFormatError(f"{weights_path}: weights do not fit the classifier in {CLASSIFIER_SPEC_FILE} ({e})") from e
    dev = device if isinstance(device, torch.device) else resolve_device(device or os.environ.get(DEVICE_ENV) or None)
    C = C.to(dev).eval().requires_grad_(False)
    C.spec = spec  # the ClassifierSpec it was loaded with (plain attribute, not a parameter)
    return C


class ClassifierModel:
    """A loaded classifier as an MLflow pyfunc model: `.predict({"x": (N, C, H, W), "t": (N,)})` ->
    float32 logits (N, num_classes). `.classifier` is the torch module, `.config` the spec dict."""

    def __init__(self, classifier: torch.nn.Module, spec: ClassifierSpec) -> None:
        self.classifier, self.spec = classifier, spec
        self.device = next(classifier.parameters()).device

    @classmethod
    def load(cls, data_dir: str | os.PathLike, device: str | None = None) -> ClassifierModel:
        C = load_classifier_data(data_dir, device=device)
        return cls(C, C.spec)

    @property
    def config(self) -> dict[str, Any]:
        return self.spec.to_json()

    @torch.no_grad()
    def logits(self, x: np.ndarray | torch.Tensor, t: np.ndarray | torch.Tensor) -> np.ndarray:
        x = torch.as_tensor(np.asarray(x, dtype=np.float32))
        t = torch.as_tensor(np.asarray(t, dtype=np.float32)).reshape(-1)
        if x.ndim != 4 or tuple(x.shape[1:]) != self.spec.data_shape:
            raise ValueError(f"x: expected float32 latents of shape (N, {', '.join(map(str, self.spec.data_shape))}), "
                             f"got {tuple(x.shape)}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"t: expected one flow time per row, shape ({x.shape[0]},), got {tuple(t.shape)}")
        out = [self.classifier(x[i:i + MAX_BATCH].to(self.device), t[i:i + MAX_BATCH].to(self.device)).float().cpu()
               for i in range(0, len(x), MAX_BATCH)]
        return (torch.cat(out) if out else torch.empty(0, self.spec.num_classes)).numpy()

    def predict(self, model_input, params: dict[str, Any] | None = None) -> np.ndarray:
        if not isinstance(model_input, dict) or "x" not in model_input or "t" not in model_input:
            raise ValueError("model input: a dict of arrays {'x': float32 (N, C, H, W) latents, 't': float32 (N,) "
                             "flow times} is required (JSON: {\"inputs\": {\"x\": [...], \"t\": [...]}})")
        return self.logits(model_input["x"], model_input["t"])
