"""The loop's two controllers as components, without the loop: the phase controller (the plan's
events and parameters, `phases: auto`'s decisions) and recovery (the watchdog over a method's own
metric names, what a rollback changes)."""

from __future__ import annotations

import math

import pytest

from advflow.platform.config import RunSpec
from advflow.platform.train.methods.base import MetricNames
from advflow.platform.train.phases import PhaseController, plan_of
from advflow.platform.train.recovery import Recovery, WatchdogError, checkpoint_name

AFM = MetricNames(progress=(("D", "d_loss"),), losses=("d_loss", "g_loss"), grads=("d_grad_norm",),
                  logits=("d_logit_real",))
CLASSIFIER = MetricNames(progress=(("loss", "loss"),), losses=("loss",), grads=("grad_norm",))


def spec(**sections) -> RunSpec:
    raw = {"data": {"prefix": "/x"}, "train": {"steps": 100, "global_batch": 8}}
    raw.update(sections)
    return RunSpec.from_dict(raw)


class Logger:
    def __init__(self):
        self.events = []

    def log_event(self, tags, metrics, step):
        self.events.append((tags, metrics, step))


# ----------------------------------------------------------------------------------------- phases


def test_events_run_before_the_step_in_plan_order():
    s = spec(phases=[{"name": "a", "start": 0, "lr": 1e-3},
                     {"name": "b", "start": 10, "lr": 5e-4, "ema_reload_every": 4, "d_reload_from": "a_end"}])
    seen = []
    pc = PhaseController(s, seen.append, lambda: None)
    params = [pc.at(k) for k in range(20)]
    assert [(e.kind, k) for k in range(20) for e in plan_of(s).events(k)] == \
        [(e.kind, k) for e, k in zip(seen, [0, 10, 10, 10, 14, 18])]
    assert [e.kind for e in seen] == ["phase_enter", "save_tag", "phase_enter", "d_reload", "ema_reload", "ema_reload"]
    assert seen[1].tag == "a_end" and seen[3].source == "a_end"
    assert params[9].lr == pytest.approx(1e-3) and params[10].lr == pytest.approx(5e-4)
    assert params[10].phase_index == 1 and not pc.decides and pc.parts() == {}


def auto_spec(**kw) -> RunSpec:
    return spec(phases="auto", eval={"kind": "digits", "every": 10},
                auto_phases={"patience": 1, "min_delta": 0.1, **kw})


def test_auto_decides_on_a_plateau_and_snapshots_only_for_a_reload_from_best():
    best_calls, logger = [], Logger()
    pc = PhaseController(auto_spec(), lambda e: None, lambda: best_calls.append(1))
    assert pc.decides and pc.snapshot_best  # the default templates reload D from `best`
    pc.decide(10, 50.0, logger)              # first value: a new best
    pc.decide(20, float("nan"), logger)      # no evaluation at this checkpoint: nothing changes
    assert len(pc.plan.phases) == 1 and best_calls == [1]
    pc.decide(30, 49.0, logger)              # within min_delta: a plateau after patience 1
    assert [p.name for p in pc.plan.phases] == ["decay", "ema"] and pc.plan.phases[1].start == 30
    assert best_calls == [1, 1]              # 49 < 50 is still the new best value (kept for the reload)
    (tags, metrics, step), = logger.events
    assert step == 30 and metrics == {"phase/transition": 1.0} and "phase.transition.1" in tags
    # The decided phases survive a checkpoint: a new controller loaded with the state has them.
    state = pc.auto.state_dict()
    fresh = PhaseController(auto_spec(), lambda e: None, lambda: None)
    fresh.auto.load_state_dict(state)
    fresh.loaded()
    assert [p.start for p in fresh.plan.phases] == [0, 30]


def test_auto_without_a_reload_from_best_takes_no_snapshot():
    calls = []
    templates = [{"name": "a"}, {"name": "b", "lr": 1e-5}]
    pc = PhaseController(auto_spec(templates=templates), lambda e: None, lambda: calls.append(1))
    assert not pc.snapshot_best
    pc.decide(10, 5.0, Logger())
    assert calls == []


# ----------------------------------------------------------------------------------------- recovery


def test_the_watchdog_checks_the_methods_own_metric_names():
    afm, clf = Recovery(spec(), AFM), Recovery(spec(), CLASSIFIER)
    nan_loss = [{"step": 3, "loss": math.nan, "d_loss": 0.1}]
    assert afm.check_rows(nan_loss) is None, "AFM's watchdog must not read the classifier's names"
    trigger = clf.check_rows(nan_loss)
    assert trigger.kind == "nonfinite" and "loss = nan" in trigger.reason and trigger.step == 3
    assert clf.check_rows([{"step": 4, "d_logit_real": 1e9, "loss": 0.1}]) is None  # no logits declared
    assert afm.check_rows([{"step": 4, "d_logit_real": 1e9}]).kind == "logits"


def test_a_rollback_counts_renames_and_scales_the_lr():
    r = Recovery(spec(watchdog={"lr_factor": 0.5, "max_rollbacks": 1}), AFM)
    assert (r.rollbacks, r.lr_factor(), r.name(40)) == (0, 1.0, checkpoint_name(40))
    r.passed(40, r.name(40))
    trigger = r.check_rows([{"step": 45, "g_loss": math.inf}])
    assert trigger.good_step == 40 and trigger.good_name == "checkpoint_000040"
    kept = r.begin(trigger)
    r.watchdog.rollbacks = 0  # what loading the checkpoint of step 40 does
    r.finish(trigger, kept)
    assert (r.rollbacks, r.lr_factor(), r.name(50)) == (1, 0.5, "checkpoint_000050_r1")
    assert r.watchdog.events[-1]["kind"] == "nonfinite"
    with pytest.raises(WatchdogError, match="max_rollbacks is 1.*checkpoint of step 40"):
        r.begin(r.check_rows([{"step": 47, "g_loss": math.nan}]))


def test_a_disabled_watchdog_checks_nothing_and_keeps_no_state():
    r = Recovery(spec(watchdog={"enabled": False}), AFM)
    assert r.check_rows([{"step": 1, "d_loss": math.nan}]) is None and r.check_eval(1, 5.0) is None
    assert r.parts() == {} and r.rollbacks == 0 and not r.decides and r.name(7) == "checkpoint_000007"


def test_the_rise_check_needs_an_evaluation():
    assert Recovery(spec(watchdog={"rise_patience": 2}, eval={"kind": "digits"}), AFM).decides
    assert not Recovery(spec(watchdog={"rise_patience": 2}), AFM).decides  # eval.kind none
