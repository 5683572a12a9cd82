"""Which failures stop a run at once, and the one line the user sees (issue 15, item 5)."""

from __future__ import annotations

import pytest

from advflow.platform.config import ConfigError
from advflow.platform.data.shards import ShardError
from advflow.platform.data.storage import StorageUnavailableError
from advflow.platform.train.checkpoint import ResumeError
from advflow.platform.train.failures import DeterministicFailure, is_deterministic, one_line
from advflow.platform.train.recovery import WatchdogError


@pytest.mark.parametrize("error", [
    ShardError("s3://b/d/shard-00003.bin: checksum mismatch in chunk 2"), ConfigError("train.steps: ..."),
    ResumeError("checkpoint_000010: unexpected file(s)"), WatchdogError("watchdog: nonfinite at step 44"),
    KeyError("g_loss"), AssertionError("shapes"), TypeError("bad call")])
def test_deterministic_errors_are_not_retried(error):
    assert is_deterministic(error)
    wrapped = RuntimeError("worker failed")
    wrapped.cause = error  # how Ray wraps a user exception
    assert is_deterministic(wrapped)


@pytest.mark.parametrize("error", [
    RuntimeError("[../third_party/gloo/...] Connection closed by peer"),  # a dead peer seen by the others
    StorageUnavailableError("s3://b/x: read failed after 5 attempts"), ConnectionResetError("reset"),
    TimeoutError("collective timed out"), MemoryError()])
def test_transient_errors_are_retried(error):
    assert not is_deterministic(error)


def test_one_line_names_the_culprit_from_an_exception_or_a_traceback_text():
    shard = ShardError("s3://b/d/shard-00003.bin: checksum mismatch in chunk 2 (bytes 0-10)\nmore")
    assert one_line(shard) == "ShardError: s3://b/d/shard-00003.bin: checksum mismatch in chunk 2 (bytes 0-10)"
    outer = RuntimeError("Training failed due to controller error:\nrank 1: ShardError: s3://b/shard")
    outer.__cause__ = DeterministicFailure("rank 1: ShardError: s3://b/shard")
    assert one_line(outer) == "rank 1: ShardError: s3://b/shard"
    text = ("\n\n-- Process 0 terminated with the following error:\nTraceback (most recent call last):\n"
            '  File "x.py", line 1, in f\nadvflow.platform.train.checkpoint.ResumeError: run/checkpoint_000002: '
            "unexpected file(s) ['evil.pkl']\n")
    assert one_line(RuntimeError(text)) == "ResumeError: run/checkpoint_000002: unexpected file(s) ['evil.pkl']"
    assert "\n" not in one_line(RuntimeError(text)) and len(one_line(ValueError("x" * 5000))) <= 600


def test_fail_fast_stops_at_a_deterministic_error_and_lets_transient_ones_restart():
    from advflow.platform.train.ray_launch import FailFast

    FailFast().after_exception(None, {0: RuntimeError("Connection closed by peer")})  # retried: no raise
    with pytest.raises(DeterministicFailure, match=r"rank 1: ShardError: s3://b/shard-00003.bin"):
        FailFast().after_exception(None, {0: RuntimeError("Connection closed by peer"),
                                          1: ShardError("s3://b/shard-00003.bin: checksum mismatch")})


def test_every_advflow_error_class_is_found_where_the_table_says():
    """A class moved to another module must not silently drop out of the deterministic set (the
    lookup skips what it cannot import)."""
    from advflow.platform.train.failures import _ADVFLOW, _advflow_classes

    found = {cls.__name__ for cls in _advflow_classes()}
    assert found == set(_ADVFLOW), f"not importable where failures._ADVFLOW says: {sorted(set(_ADVFLOW) - found)}"
