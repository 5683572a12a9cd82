"""`phases: auto` (issue 12, item 3): the plateau rule, its config, and the loop's wiring.

Pure: when the rule advances, what it keeps, and that a controller restored from its checkpointed
state makes the same decisions as one that never stopped. The loop (fake data and engines, no
steps): transitions happen at the evaluation that decides them, change the hyperparameters from that
step on, are logged as a metric and a JSON tag, snapshot D at the best evaluation for
`d_reload_from: best`, and travel in the checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest

from advflow.platform.config import ConfigError, RunSpec
from advflow.trainers.schedules import AutoPhases
from fakes import FakeLogger, FakeMethod, FakeStream, OneRankContext

TEMPLATES = [{"name": "decay", "lr": 1e-3, "lambda_ot": 0.1},
             {"name": "ema", "lr": 8e-4, "lambda_ot": 0.01, "ema_reload_every": 5},
             {"name": "low_lr", "lr": 3e-4, "d_reload_from": "best"}]


def controller(**kw) -> AutoPhases:
    return AutoPhases(TEMPLATES, **{"patience": 2, "min_delta": 0.1, "min_phase_steps": 0, **kw})


def feed(ctrl: AutoPhases, values: list[float], every: int = 10, start: int = 1) -> list:
    out = []
    for i, v in enumerate(values, start):
        tr = ctrl.observe(i * every, v)
        if tr:
            out.append((tr.step, tr.from_name, tr.to_name))
    return out


def test_a_plateau_of_patience_evaluations_starts_the_next_phase_at_that_step():
    ctrl = controller()
    # 100 -> 80 improves; 75 and 78 are within 10 % of 80: the second of them ends phase 1.
    assert feed(ctrl, [100, 80, 75, 78]) == [(40, "decay", "ema")]
    assert ctrl.best == 75 and ctrl.best_step == 30  # a new best within min_delta still counts as best
    plan = ctrl.plan()
    assert [(p.name, p.start) for p in plan.phases] == [("decay", 0), ("ema", 40)]
    assert plan.at(39).lr == pytest.approx(1e-3) and plan.at(40).lr == pytest.approx(8e-4)
    # Then ema needs its own plateau (70, 66: neither beats 75 by 10 %); the last phase runs to the end.
    assert feed(ctrl, [70, 66], start=5) == [(60, "ema", "low_lr")]
    assert feed(ctrl, [66] * 6, start=7) == []
    assert ctrl.index == 2


def test_an_improvement_resets_the_count():
    # 95: stale 1; 80 improves by > 10 %: reset; 79, 78: stale 1, 2 -> the plateau is at step 50.
    assert feed(controller(), [100, 95, 80, 79, 78]) == [(50, "decay", "ema")]


def test_min_phase_steps_holds_a_phase_past_its_plateau():
    ctrl = controller(min_phase_steps=60)
    assert feed(ctrl, [100, 100, 100, 100, 100, 100]) == [(60, "decay", "ema")]


@pytest.mark.parametrize("cut", [1, 3, 5, 8])
def test_a_restored_controller_decides_exactly_as_one_that_never_stopped(cut):
    values = [100, 90, 89, 88, 70, 69, 69, 68, 67, 60, 59, 58]
    whole = controller()
    want = feed(whole, values)
    first = controller()
    got = feed(first, values[:cut])
    restored = controller()
    restored.load_state_dict(json.loads(json.dumps(first.state_dict())))  # through trainer.json
    got += feed(restored, values[cut:], start=cut + 1)
    assert got == want and len(want) == 2
    assert restored.state_dict() == whole.state_dict()


def test_templates_are_checked_when_the_controller_is_built():
    with pytest.raises(ValueError, match="sets `start`"):
        AutoPhases([{"name": "a", "start": 0, "lr": 1e-3, "lambda_ot": 0.1}], patience=1, min_delta=0,
                   min_phase_steps=0)
    with pytest.raises(ValueError, match="lr must be > 0"):
        AutoPhases([TEMPLATES[0], {"name": "b", "lr": -1.0}], patience=1, min_delta=0, min_phase_steps=0)


def base(**sections) -> dict:
    raw = {"data": {"prefix": "/x"}, "phases": "auto", "eval": {"kind": "digits", "every": 10},
           "optim": {"lr": 1e-3}, "adversarial": {"ot_scale": {"kind": "cosine", "start": 0.1, "end": 0.002,
                                                                "steps": 100}}}
    for k, v in sections.items():
        raw[k] = v if not isinstance(v, dict) else {**raw.get(k, {}), **v}
    return raw


def test_default_templates_follow_table_11_from_the_top_level_settings():
    spec = RunSpec.from_dict(base(auto_phases={"ema_reload_every": 7}))
    t = spec.auto_templates()
    assert [p["name"] for p in t] == ["decay", "ema", "low_lr"]
    assert t[1] == {"name": "ema", "lr": pytest.approx(8e-4), "lambda_ot": 0.002, "ema_reload_every": 7}
    assert t[2]["lr"] == pytest.approx(3e-4) and t[2]["d_reload_from"] == "best"
    guided = RunSpec.from_dict(base(guidance={"classifier": "models:/c/1"})).auto_templates()
    assert guided[-1]["name"] == "guided" and guided[-1]["guidance"] is True


@pytest.mark.parametrize("sections, field", [
    ({"eval": {"kind": "none"}}, "eval.kind is none"),
    ({"eval": {"every": 0}}, "eval.every"),
    ({"model": {"method": "fm", "kind": "multistep", "nfe": 4}}, "auto is for method afm"),
    ({"auto_phases": {"patience": 0}}, "auto_phases.patience"),
    ({"phases": "sometimes"}, "phases: 'sometimes' is not a phase list"),
])
def test_bad_auto_settings_name_the_field(sections, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.").replace("(", r"\(")):
        RunSpec.from_dict(base(**sections))


# ----------------------------------------------------------------------------- the loop's wiring


class Ctx(OneRankContext):
    """One rank, keeping each reported checkpoint's trainer.json."""

    def __init__(self):
        self.saved: dict[int, dict] = {}

    def report(self, metrics, checkpoint_dir, name=None):
        from advflow.platform.train.checkpoint import read_meta

        self.saved[metrics["step"]] = read_meta(checkpoint_dir)


def train(monkeypatch, values: list[float], **sections):
    """`TrainLoop.train()` on `phases: auto` with a fake method whose evaluations return `values`
    in turn: the real schedule, the real phase controller and checkpointer."""
    from advflow.platform.train import loop as loop_module
    from advflow.platform.train.loop import TrainLoop

    raw = base(train={"steps": 30, "global_batch": 16, "checkpoint_every": 6, "log_every": 5},
               eval={"num_samples": 4, "batch_size": 4, "every": 6}, watchdog={"rise_patience": 0})
    for k, v in sections.items():
        raw[k] = {**raw.get(k, {}), **v}
    script = iter(values)

    class Scripted:
        def features(self, images):
            return np.zeros((len(images), 1))

        def metrics_from_features(self, rows, labels):
            return {"eval/fd": next(script)}

    logger = FakeLogger()
    monkeypatch.setattr(loop_module, "run_logger", lambda *a, **kw: logger)
    monkeypatch.setattr(FakeMethod, "evaluator", Scripted)
    lrs: list[float] = []
    monkeypatch.setattr(FakeMethod, "set_lr", lambda self, phase, factor: lrs.append(phase.lr) or {})
    loop = TrainLoop(RunSpec.from_dict(raw), Ctx(), stream_factory=FakeStream, method=FakeMethod)
    loop.train()
    return loop, logger, lrs


def test_the_loop_decides_logs_snapshots_and_checkpoints_the_transition(monkeypatch):
    # Evaluations 6:50, 12:40 (best), 18:39 (< 5 %), 24:39.5 -> plateau: phase ema from step 24.
    loop, logger, lrs = train(monkeypatch, [50.0, 40.0, 39.0, 39.5, 38.9],
                              auto_phases={"patience": 2, "min_delta": 0.05})
    plan = loop.phases.plan
    assert [p.start for p in plan.phases] == [0, 24]
    # Steps 0-23 ran with the first phase's lr, 24-29 with the ema phase's (0.8 lr).
    lr = loop.spec.optim.lr
    assert lrs[:24] == [pytest.approx(lr)] * 24 and lrs[24:] == [pytest.approx(0.8 * lr)] * 6
    (tags, metrics, step), = [e for e in logger.events if "phase/transition" in e[1]]
    assert step == 24 and metrics == {"phase/transition": 1.0}
    assert json.loads(tags["phase.transition.1"])["to"] == "ema"
    # D is snapshotted at each new best (6, 12, 18 (a best within min_delta), 30).
    assert loop.method.bests == [6, 12, 18, 30]
    # The decision is in the checkpoints from step 24 on.
    saved = loop.ctx.saved
    assert saved[18]["auto_phases"]["starts"] == [0] and saved[24]["auto_phases"]["starts"] == [0, 24]


def test_d_is_snapshotted_at_the_best_only_when_a_phase_reloads_from_it(monkeypatch):
    templates = [{"name": "decay"}, {"name": "ema", "lr": 5e-4}]  # no d_reload_from: best
    loop, _, _ = train(monkeypatch, [50.0, 40.0, 30.0, 20.0, 10.0], auto_phases={"templates": templates})
    assert loop.phases.decides and not loop.phases.snapshot_best and loop.method.bests == []
    # The defaults' low_lr phase reloads D from the best evaluation.
    loop, _, _ = train(monkeypatch, [50.0, 40.0, 30.0, 20.0, 10.0])
    assert loop.phases.snapshot_best and loop.method.bests == [6, 12, 18, 24, 30]
