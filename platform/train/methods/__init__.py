"""The training methods on the loop, DiT-`DiT_models` style: `model.method` -> its step class.

Adding a method is one file here (its step class: see base.py) plus its pure loss in `trainers/`,
and a row in this table (and its name in config.py's `ModelConfig.method`). cafm starts from a
registered flow-matching model (`model.init`) and updates D or G at each iteration (`trainers.cafm.step_kind`).

| method       | streams  | engines | loss (trainers/)                     | samples with       | registered as        |
|--------------|----------|---------|--------------------------------------|--------------------|----------------------|
| `afm`        | d, g     | g, d    | afm.d_loss, afm.g_loss               | trainers.flow      | generator pyfunc     |
| `fm`         | g        | g       | fm.fm_loss                           | Euler (flow)       | generator pyfunc     |
| `meanflow`   | g        | g       | meanflow.meanflow_loss (JVP target)  | any-step (flow)    | generator pyfunc     |
| `cafm`       | d, g     | g, d    | cafm.d_loss, cafm.g_loss (JVP of D)  | Euler (flow)       | generator pyfunc (+ source_model) |
| `classifier` | c        | c       | losses.classifier_loss_and_logits    | (none)             | classifier pyfunc    |
"""

from __future__ import annotations

from advflow.platform.train.methods.afm import AFMStep
from advflow.platform.train.methods.cafm import CAFMStep
from advflow.platform.train.methods.base import Method, MetricNames, StepEnv, step_seed
from advflow.platform.train.methods.classifier import ClassifierStep
from advflow.platform.train.methods.fm import FMStep
from advflow.platform.train.methods.meanflow import MeanFlowStep

METHODS: dict[str, type] = {
    "afm": AFMStep,
    "fm": FMStep,
    "meanflow": MeanFlowStep,
    "cafm": CAFMStep,
    "classifier": ClassifierStep,
}

__all__ = ["METHODS", "Method", "MetricNames", "StepEnv", "step_seed", "AFMStep", "FMStep", "MeanFlowStep", "CAFMStep", "ClassifierStep"]
