"""The one cadence rule (platform/train/cadence.py) and the cadences the worker builds from it."""

from __future__ import annotations

import pytest

from advflow.platform.train.cadence import Cadence


def reference_due(step: int, every: int, last: int, since: int) -> bool:
    """Written out by enumeration: the last step, or some multiple of `every` in (since, step]."""
    return step == last or (every > 0 and any(k % every == 0 for k in range(since + 1, step + 1)))


@pytest.mark.parametrize("every", [0, 1, 3, 4, 7, 10])
def test_per_step_rule_matches_enumeration(every):
    c = Cadence(every, 23)
    assert [s for s in range(1, 24) if c.due(s)] == [s for s in range(1, 24) if reference_due(s, every, 23, s - 1)]


@pytest.mark.parametrize("checkpoint_every, every, want", [
    (6, 6, [6, 12, 18, 24, 30]),  # the same cadence
    (6, 10, [12, 24, 30]),        # first checkpoint at or after 10, 20, 30
    (10, 4, [10, 20, 30]),        # faster than checkpoints: every checkpoint
    (6, 0, [30]),                 # 0: only at the end
])
def test_checkpoint_bound_cadence_lands_on_the_first_checkpoint_after_each_multiple(checkpoint_every, every, want):
    """Evaluation, registration and samples.png are checked only at checkpoints, against the previous one."""
    c = Cadence(every, 30)
    checkpoints = sorted(set(range(checkpoint_every, 31, checkpoint_every)) | {30})
    got = [s for prev, s in zip([0] + checkpoints, checkpoints) if c.due(s, since=prev)]
    assert got == want


def test_image_every_not_a_multiple_of_log_every():
    """image_every=10 with log_every=25: grids every 10 steps, not every 50 (the old rule checked the
    image cadence only at log steps)."""
    image, log = Cadence(10, 100), Cadence(25, 100)
    grids = [s for s in range(1, 101) if image.due(s)]
    assert grids == list(range(10, 101, 10))
    assert [s for s in range(1, 101) if log.due(s)] == [25, 50, 75, 100]
