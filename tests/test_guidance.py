"""Classifier guidance end to end on digits: a small classifier trained by jobs/train.py (the
digits_classifier recipe, `model.method: classifier`), then an AFM run whose second phase turns
guidance (and the paired augmentation) on.

Checked against the same run without the guided phase: identical up to the phase start (the
classifier is loaded but unused), different after it, with the guidance term live only there.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from advflow.platform.config import RunSpec
from advflow.platform.train.local_launch import latest_checkpoint, run_local

REPO = Path(__file__).resolve().parents[1]
GUIDED_FROM, STEPS = 6, 12


@pytest.fixture(scope="module")
def classifier_dir(digits, tmp_path_factory):
    spec = importlib.util.spec_from_file_location("train_job", REPO / "jobs" / "train.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    root = tmp_path_factory.mktemp("guidance-classifier")
    sets = [f"data.prefix={digits}", f"run.storage_path={root}", "run.name=clf", "data.shuffle_buffer=256",
            "train.steps=60", "train.checkpoint_every=60", "train.log_every=20", "eval.every=0",
            "optim.lr=2e-3", "tracking.enabled=false", "tracking.register_name=null"]
    assert job.main(["--config", str(REPO / "jobs" / "configs" / "digits_classifier.yaml"), "--no-ray",
                     *[a for s in sets for a in ("--set", s)]]) == 0
    return str(latest_checkpoint(root / "clf"))


def _spec(prefix: str, classifier: str | None, guided: bool) -> RunSpec:
    phases = [{"name": "main", "start": 0}]
    if guided:
        phases.append({"name": "guided", "start": GUIDED_FROM, "guidance": True, "lambda_cg": 0.5,
                       "cg_t_range": [0.0, 0.1], "augment_p": 0.4})
    else:
        phases.append({"name": "guided", "start": GUIDED_FROM})
    return RunSpec.from_dict({
        "data": {"prefix": prefix, "shuffle_buffer": 128, "prefetch": 2},
        "model": {"size": "tiny"},
        "optim": {"lr": 1e-3, "ema_decay": 0.9},
        "adversarial": {"ot_scale": 0.05},
        "guidance": {"classifier": classifier},
        "train": {"steps": STEPS, "global_batch": 16, "log_every": 1, "checkpoint_every": GUIDED_FROM},
        "distributed": {"workers": 2},
        "run": {"keep_checkpoints": 2},
        "phases": phases,
    })


def _g(checkpoint: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(checkpoint / "g" / "weights.safetensors"))


@pytest.mark.integration  # trains the classifier and two AFM runs in worker processes
@pytest.mark.timeout(600)
def test_guided_phase_trains_with_the_classifier(digits, classifier_dir, tmp_path):
    guided = run_local(_spec(digits, classifier_dir, True), tmp_path / "guided")
    plain = run_local(_spec(digits, None, False), tmp_path / "plain")
    before = [r for r in guided if r["step"] <= GUIDED_FROM]
    after = [r for r in guided if r["step"] > GUIDED_FROM]
    assert all(r["cg"] == 0 and r["lambda_cg"] == 0 and r["augment_p"] == 0 for r in before)
    assert all(r["cg"] > 0 and r["lambda_cg"] == pytest.approx(0.5) and r["augment_p"] == pytest.approx(0.4)
               for r in after)
    # Up to the phase start the two runs are the same run; after it guidance changes G.
    for a, b in zip(guided[:GUIDED_FROM], plain[:GUIDED_FROM]):
        assert a["g_loss"] == pytest.approx(b["g_loss"], rel=1e-6)
    g6 = (_g(tmp_path / "guided" / "checkpoint_000006"), _g(tmp_path / "plain" / "checkpoint_000006"))
    assert all(torch.equal(g6[0][k], g6[1][k]) for k in g6[0])
    g12 = (_g(tmp_path / "guided" / "checkpoint_000012"), _g(tmp_path / "plain" / "checkpoint_000012"))
    assert any(not torch.allclose(g12[0][k], g12[1][k]) for k in g12[0])


@pytest.mark.integration  # the classifier_dir fixture trains in worker processes
def test_a_classifier_for_other_data_is_refused(digits, classifier_dir, tmp_path):
    """Building the AFM step (which loads the guidance classifier, before any engine) refuses a
    classifier of another label space."""
    import dataclasses

    from advflow.platform.data.reader import LatentStream
    from advflow.platform.train.loop import TrainLoop
    from fakes import OneRankContext


    def seven_classes(*args, **kwargs):  # as if the run's data had 7 classes
        stream = LatentStream(*args, **kwargs)
        stream.manifest = dataclasses.replace(stream.manifest, num_classes=7)
        return stream

    w = TrainLoop(_spec(digits, classifier_dir, True), OneRankContext(), stream_factory=seven_classes)
    try:
        with pytest.raises(ValueError, match=r"guidance\.classifier=.*10 classes.*7 classes"):
            w.build()
    finally:
        if getattr(w, "streams", None) is not None:
            w.streams.close()
