"""Sample-quality evaluators, one table: `EVALUATORS[kind]` (as DiT's `DiT_models`).

`config.EvalConfig` reads the table to validate `eval.kind` (its Literal, built from the table's keys
when the config is imported) and the fields a kind requires, and the worker builds its evaluator from
it, so a kind is declared once. (The classifier's `eval.kind: accuracy` is not a sample-quality
evaluator and is not in this table.)

A trial generates images (decoded to pixels in [-1, 1]) with the labels they were conditioned on and
hands them to an `Evaluator`; it returns `eval/...` metrics, one of which (`evaluator.primary`, lower
is better) is what a sweep optimises. During training every rank computes `features` of its share of
the samples and rank 0 computes `metrics_from_features` over all of them (`train/callbacks.Evaluation`).
Two kinds:

- "digits": Fréchet distance in the feature space of a small classifier trained on the train split of
  scikit-learn's digits, against the held-out split (`eval/digits.py`). Cheap (CPU, < 1 s per call).
- "fid": FID as ADM's evaluation suite computes it (uint8 samples, the FID Inception-v3 network with
  the TF graph's resize) against reference statistics from an .npz, ADM's batches included
  (`eval/fid.py`; `jobs/fid_reference.py` makes them).

Both also report mode coverage in their feature space (`eval/coverage.py`, higher is better):
eval/precision and eval/recall (Kynkäänniemi et al. 2019, k = 3 nearest neighbours) against their
reference's features, and eval/diversity / eval/diversity_min, the generated images' within-class
spread over the reference's (mean over classes / worst class; ~0 = one image per class), from the
labels the samples were generated with. Like every sample-dependent key they are also logged per K
(`eval/precision@K`, ...).

The shared Fréchet maths and .npz stats I/O are `eval/frechet.py`. The builders import their
evaluator module when called, so reading the table (config validation) loads no model code: this
module imports nothing but the standard library (tests/test_config.py checks that importing the
config loads no evaluator, torch or data reader).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol, runtime_checkable

if TYPE_CHECKING:
    import numpy as np
    import torch


COVERAGE_KEYS = ("eval/precision", "eval/recall", "eval/diversity", "eval/diversity_min")
"""The mode-coverage keys both evaluators report when they can (`eval/coverage.py`): what the sweep
and reproduction reports show beside eval/fd / eval/fid."""


@runtime_checkable
class Evaluator(Protocol):
    """What the training loop calls. `primary` is the key sweeps optimise (lower is better);
    `required_samples` is the recommended number of generated images per call."""

    primary: str
    required_samples: int

    def evaluate(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """images: generated, decoded pixels (N, C, H, W) in [-1, 1]; labels: (N,) the classes
        they were conditioned on. Returns metrics keyed `eval/...`. The same as
        `metrics_from_features(features(images), labels)`."""
        ...

    def features(self, images: torch.Tensor) -> np.ndarray:
        """Per-sample rows (N, F) float64 of some of the images; what a rank of a distributed
        evaluation computes for its share. Rows of one image do not depend on the others in the call."""
        ...

    def metrics_from_features(self, features: np.ndarray, labels: torch.Tensor) -> dict[str, float]:
        """Every image's rows (N, F), in the order of `labels` (N,) (the class each image was generated
        with: eval/cls_acc and eval/diversity read them) -> metrics keyed `eval/...`."""
        ...


@dataclass(frozen=True)
class EvaluatorKind:
    """required: `eval.*` fields that must be set for this kind. build(eval_cfg, *, encoder,
    data_shape, num_classes) -> Evaluator (`encoder`: the dataset manifest's encoder record;
    eval_cfg: the run's `eval` section, attributes kind, every, num_samples, batch_size,
    inception_path, reference_stats)."""

    required: tuple[str, ...]
    build: Callable[..., Any]
    doc: str = ""
    primary: str = "eval/fd"
    """The key the built evaluator's `primary` names (known before building it: config checks)."""


def _build_digits(ev, *, encoder: dict, data_shape: tuple[int, ...], num_classes: int) -> Evaluator:
    """The split (seed, fraction) is the one the dataset was prepared with (the manifest's
    encoder["holdout"]); data_shape is the latent (C, H, W), the decoded side is H (pixel) or 8 H
    (sd-vae)."""
    from advflow.platform.eval.digits import DigitsEvalConfig, DigitsEvaluator

    if num_classes != 10:
        raise ValueError(f"eval.kind 'digits' needs the 10-class digits dataset, the data has {num_classes} "
                         "classes; use eval.kind 'fid' for other data")
    if len(data_shape) != 3:
        raise ValueError(f"data_shape must be (C, H, W), got {tuple(data_shape)}")
    holdout = (encoder or {}).get("holdout")
    if holdout:
        seed, fraction = int(holdout["seed"]), float(holdout["fraction"])
    else:
        warnings.warn("the dataset's manifest records no digits hold-out (prepared before hold-outs existed, "
                      "or with digits_holdout=0): the held-out reference digits were probably trained on, so "
                      "eval/fd is optimistic; re-run prepare_latents.py --source digits", stacklevel=2)
        seed, fraction = 0, 0.2
    cfg = DigitsEvalConfig(split_seed=seed, holdout_fraction=fraction)
    if data_shape[-1] != data_shape[-2]:
        raise ValueError(f"digits data must be square, data_shape is {tuple(data_shape)}")
    # data_shape is the latent shape; SD-VAE latents are 8x smaller than the decoded images.
    side = int(data_shape[-1]) * (8 if (encoder or {}).get("name") == "sd-vae" else 1)
    return DigitsEvaluator(cfg, data_side=side, device="cpu", batch_size=int(ev.batch_size), pr_k=int(ev.pr_k))


_FID_REQUIRED = {"inception_path": "pt_inception-2015-12-05-*.pth", "reference_stats": ".npz with mu/sigma"}


def _build_fid(ev, *, encoder: dict, data_shape: tuple[int, ...], num_classes: int) -> Evaluator:
    """FID against `eval.reference_stats` with the weights at `eval.inception_path` (CUDA when
    available). Labels are ignored."""
    from advflow.platform.eval.fid import FIDEvaluator

    for key, what in _FID_REQUIRED.items():  # config validation checks this first; a direct caller may not
        if not getattr(ev, key):
            raise ValueError(f"eval.{key} is required for eval.kind 'fid' (a local {what} path)")
    return FIDEvaluator(ev.inception_path, ev.reference_stats, int(ev.batch_size), device=None, pr_k=int(ev.pr_k))


EVALUATORS: dict[str, EvaluatorKind] = {
    "digits": EvaluatorKind(
        required=(), build=_build_digits,
        doc="Fréchet distance in a digit classifier's feature space against the held-out digits, its floor and "
            "class accuracy. Recommended samples: `evaluator.required_samples` (the train split, ~1438), so "
            "eval/fd is comparable to eval/fd_floor."),
    "fid": EvaluatorKind(
        required=tuple(_FID_REQUIRED), build=_build_fid, primary="eval/fid",
        doc="FID with user-provided Inception weights and reference stats. Recommended samples: 50_000 for "
            "numbers comparable with papers; >= 5_000 for a sweep signal (FID is biased upwards at small N, so "
            "only compare runs evaluated with the same N)."),
}
