"""Sample-quality evaluators, one table: `EVALUATORS[kind]` (as DiT's `DiT_models`).

`config.EvalConfig` reads the table to validate `eval.kind` and the fields a kind requires, and the
worker builds its evaluator from it, so a kind is declared once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class EvaluatorKind:
    """required: `eval.*` fields that must be set for this kind. build(eval_cfg, *, encoder,
    data_shape, num_classes) -> Evaluator (`encoder`: the dataset manifest's encoder record)."""

    required: tuple[str, ...]
    build: Callable[..., Any]
    doc: str = ""


def _build_digits(ev, *, encoder: dict, data_shape: tuple[int, ...], num_classes: int):
    from advflow.platform.eval.frechet import build_evaluator

    return build_evaluator("digits", manifest_encoder=encoder, data_shape=data_shape, num_classes=num_classes,
                           options={"batch_size": ev.batch_size})


def _build_fid(ev, *, encoder: dict, data_shape: tuple[int, ...], num_classes: int):
    from advflow.platform.eval.frechet import build_evaluator

    return build_evaluator("fid", manifest_encoder=encoder, data_shape=data_shape, num_classes=num_classes,
                           options={"inception_path": ev.inception_path, "reference_stats": ev.reference_stats,
                                    "batch_size": ev.batch_size})


EVALUATORS: dict[str, EvaluatorKind] = {
    "digits": EvaluatorKind(required=(), build=_build_digits),
    "fid": EvaluatorKind(required=("inception_path", "reference_stats"), build=_build_fid),
}
