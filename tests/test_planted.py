"""Nothing pickled is ever loaded from a checkpoint (issue 15, item 1).

A real run's checkpoint with a pickle planted in it: wherever it is (DeepSpeed's old file name, a
new name, or under a safe name in place of a real file), the resume stops before loading anything,
naming the file, and the pickle's payload never runs (its marker file is never created). The same
checkpoint without the plant resumes (tests/test_ray_train.py and test_elastic.py check exactness)."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest

from advflow.platform.config import RunSpec
from advflow.platform.train.local_launch import run_local

pytestmark = pytest.mark.integration  # local_launch worker processes


class Payload:
    """Creates a marker file when unpickled: the proof that a loader executed the pickle."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def spec_for(prefix: str, steps: int) -> RunSpec:
    return RunSpec.from_dict({
        "run": {"keep_checkpoints": 3},
        "data": {"prefix": prefix, "shuffle_buffer": 128, "prefetch": 2},
        "model": {"size": "tiny"},
        "train": {"steps": steps, "global_batch": 16, "log_every": 2, "checkpoint_every": 2},
        "eval": {"kind": "none"},
        "distributed": {"workers": 1},
    })


@pytest.fixture(scope="module")
def trained(digits, tmp_path_factory):
    run = tmp_path_factory.mktemp("planted") / "run"
    run_local(spec_for(digits, 2), run)
    return run


@pytest.mark.timeout(600)
@pytest.mark.parametrize("where", ["g/ds/mp_rank_00_model_states.pt", "d/optim.safetensors", "readers.json",
                                   "extra/evil.pkl"])
def test_a_planted_pickle_is_never_executed_and_the_resume_names_it(digits, trained, tmp_path, where):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    marker = tmp_path / "pwned"
    target = run / "checkpoint_000002" / where
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(pickle.dumps(Payload(str(marker)), protocol=4))
    with pytest.raises(Exception, match=rf"(?s)(?=.*{Path(where).name})(?=.*(unexpected file|pickle under a safe file name))"):
        run_local(spec_for(digits, 4), run)
    assert not marker.exists(), "the planted pickle was executed"
    pickle.loads(target.read_bytes())  # the payload is live: unpickling it does create the marker
    assert marker.exists()
