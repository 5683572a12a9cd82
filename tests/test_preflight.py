"""Checks before launch (issue 24): mistakes found on the driver in one line, before any MLflow run is
opened and before any worker starts (platform/train/preflight.py). Unit tests on local folders and
fakes; the same through jobs/train.py with MLflow, S3 and Ray are in test_preflight_services.py."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from advflow.platform.config import RunSpec
from advflow.platform.train import preflight
from advflow.platform.train.preflight import Refused
from helpers_data import make_dataset


def spec_for(prefix: str, storage: str, **over) -> RunSpec:
    raw = {"run": {"name": "pf", "storage_path": storage}, "data": {"prefix": prefix},
           "model": {"size": "tiny"}, "train": {"steps": 4, "global_batch": 16}, "eval": {"kind": "none"},
           "distributed": {"workers": 2}}
    for key, value in over.items():
        section, name = key.split("__")
        raw.setdefault(section, {})[name] = value
    return RunSpec.from_dict(raw)


@pytest.fixture
def data(tmp_path) -> str:
    prefix = str(tmp_path / "data")
    make_dataset(prefix, 120, shard_records=40)
    return prefix


def plant_checkpoint(spec: RunSpec, step: int = 2, *, ray: bool = True, config: dict | None = None) -> Path:
    """A checkpoint as the launchers leave one: trainer.json + a part; Ray Train's snapshot naming it
    (ray) or local_launch's COMPLETE marker."""
    run = Path(preflight.run_root(spec))
    ckpt = run / f"checkpoint_{step:06d}"
    (ckpt / "d").mkdir(parents=True)
    (ckpt / "d" / "optim.safetensors").write_bytes(b"{}")
    (ckpt / "trainer.json").write_text(json.dumps({"format": 2, "step": step, "world_size": 2,
                                                   "config": config or spec.to_dict()}))
    if ray:
        (run / preflight.RAY_SNAPSHOT).write_text(json.dumps({"latest_checkpoint_result": {
            "checkpoint_dir_name": ckpt.name, "metrics": {}}}))
    else:
        (ckpt / "COMPLETE").write_text("{}")
    return ckpt


# ----------------------------------------------------------------------------------------- dataset


def test_a_complete_dataset_passes_and_gives_the_manifest_hash(data, tmp_path):
    findings = preflight.run_preflight(spec_for(data, str(tmp_path / "runs")), ray=False)
    assert findings.resume is None and len(findings.data_tags["data.manifest_sha256"]) == 64
    from advflow.platform.data.shards import dataset_tags

    assert findings.data_tags == dataset_tags(data)  # what the run was tagged with before


def test_a_missing_manifest_is_refused_naming_the_prefix_and_the_fix(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(Refused) as err:
        preflight.check_dataset(str(tmp_path / "empty"))
    msg = str(err.value)
    assert msg.startswith(f"data.prefix={tmp_path / 'empty'}: no manifest.json there") and "prepare_latents.py" in msg
    assert "\n" not in msg


def test_a_missing_shard_is_refused_from_one_listing(data, monkeypatch):
    from advflow.platform.data.storage import Storage

    Path(data, "shard-00001.bin").unlink()
    calls = []
    monkeypatch.setattr(Storage, "size", lambda self, name: calls.append(name))  # no HEAD per shard
    with pytest.raises(Refused, match=r"shard-00001\.bin is listed in manifest\.json but missing: restore") as err:
        preflight.check_dataset(data)
    assert str(err.value).startswith(f"data.prefix={data}: ") and not calls


def test_a_shard_of_the_wrong_size_is_refused(data):
    shard = Path(data, "shard-00002.bin")
    shard.write_bytes(shard.read_bytes()[:-7])
    with pytest.raises(Refused, match=r"shard-00002\.bin is truncated: \d+ bytes, manifest\.json says \d+"):
        preflight.check_dataset(data)


def test_an_unwritable_storage_path_is_refused(data, tmp_path, monkeypatch):
    from advflow.platform.data.storage import Storage

    preflight.check_storage(spec_for(data, str(tmp_path / "runs")))
    assert list((tmp_path / "runs").iterdir()) == []  # the probe is deleted again

    def denied(self, name, data):
        raise PermissionError(13, "Permission denied", self.path(name))

    monkeypatch.setattr(Storage, "write_atomic", denied)  # (tests run as root: chmod would not stop them)
    with pytest.raises(Refused, match=rf"^run.storage_path={tmp_path / 'runs'}: checkpoints cannot be written there "
                                      r"\(\[Errno 13\] Permission denied"):
        preflight.check_storage(spec_for(data, str(tmp_path / "runs")))


# ----------------------------------------------------------------------------------------- resume


@pytest.mark.parametrize("ray", [True, False])
def test_a_resume_with_another_model_size_is_refused_naming_both_sizes(data, tmp_path, ray):
    old = spec_for(data, str(tmp_path / "runs"))
    ckpt = plant_checkpoint(old, 2, ray=ray)
    new = spec_for(data, str(tmp_path / "runs"), model__size="S/2")
    with pytest.raises(Refused) as err:
        preflight.run_preflight(new, ray=ray)
    msg = str(err.value)
    assert f"would resume {ckpt} (step 2), trained with model.size=tiny, model.d_size=tiny" in msg, msg
    assert "this submission has model.size=S/2, model.d_size=S/2" in msg
    assert "use a new run.name" in msg and "or set model.size=tiny" in msg and "\n" not in msg


def test_a_resume_with_another_global_batch_or_kind_is_refused(data, tmp_path):
    old = spec_for(data, str(tmp_path / "runs"))
    plant_checkpoint(old)
    with pytest.raises(Refused, match=r"train.global_batch=16, data.partitions=16; this "
                       r"submission has train.global_batch=32, data.partitions=32"):
        preflight.run_preflight(spec_for(data, str(tmp_path / "runs"), train__global_batch=32), ray=True)
    with pytest.raises(Refused, match=r"model.kind=1nfe; this submission has model.kind=anystep"):
        preflight.run_preflight(spec_for(data, str(tmp_path / "runs"), model__kind="anystep"), ray=True)


def test_settings_a_resume_may_change_are_allowed(data, tmp_path):
    old = spec_for(data, str(tmp_path / "runs"))
    plant_checkpoint(old, 2)
    new = spec_for(data, str(tmp_path / "runs"), train__steps=400, train__checkpoint_every=2, eval__every=2,
                   distributed__workers=1)
    findings = preflight.run_preflight(new, ray=True)
    assert findings.resume.name == "checkpoint_000002" and findings.resume.step == 2
    assert findings.resume_line(3).startswith("resuming from checkpoint_000002 (step 2, attempt 3)")


def test_a_resume_with_other_data_partitions_is_refused_and_auto_equal_to_the_value_is_not(data, tmp_path):
    """data.partitions defines the record order: a resume cannot change it. `auto` is compared by the
    number it resolves to (16 for a global batch of 16), so spelling it out is no change."""
    plant_checkpoint(spec_for(data, str(tmp_path / "runs")))
    with pytest.raises(Refused, match=r"data.partitions=16; this submission has data.partitions=8"):
        preflight.run_preflight(spec_for(data, str(tmp_path / "runs"), data__partitions=8), ray=True)
    findings = preflight.run_preflight(spec_for(data, str(tmp_path / "runs"), data__partitions=16), ray=True)
    assert findings.resume.step == 2


def test_a_checkpoint_of_the_removed_data_order_is_refused_before_launch(data, tmp_path):
    """A checkpoint written with data.order (before canonical partitions) cannot be replayed exactly:
    refused in one line naming the order, not left to fail in the workers."""
    spec = spec_for(data, str(tmp_path / "runs"))
    old = spec.to_dict()
    old["data"] = {**old["data"], "order": "global"}
    old["data"].pop("partitions")
    plant_checkpoint(spec, config=old)
    with pytest.raises(Refused, match=r"used data.order=global, an order this advflow no longer has.*new run.name"):
        preflight.run_preflight(spec, ray=True)


def test_nfe_is_locked_only_where_it_shapes_the_training():
    base = {"model.method": "afm", "model.size": "tiny", "model.d_size": None, "model.repeats": 1,
            "train.global_batch": 16}
    assert "model.nfe" not in preflight.locked_values({**base, "model.kind": "anystep", "model.nfe": 8})
    assert preflight.locked_values({**base, "model.kind": "multistep", "model.nfe": 4})["model.nfe"] == "4"


def test_another_dataset_is_refused_and_the_same_one_moved_is_accepted(data, tmp_path):
    old = spec_for(data, str(tmp_path / "runs"))
    plant_checkpoint(old)
    moved = str(tmp_path / "moved")
    shutil.copytree(data, moved)
    assert preflight.run_preflight(spec_for(moved, str(tmp_path / "runs")), ray=True).resume is not None
    other = str(tmp_path / "other")
    make_dataset(other, 120, shard_records=40, seed=1)
    with pytest.raises(Refused) as err:
        preflight.run_preflight(spec_for(other, str(tmp_path / "runs")), ray=True)
    msg = str(err.value)
    assert f"trained on data.prefix={data} (manifest sha256 " in msg and f"data.prefix={other} holds another dataset" in msg
    assert f"or set data.prefix={data}" in msg
    # The recorded hash of the run (MLflow tag) decides when the old prefix is gone.
    shutil.rmtree(data)
    with pytest.raises(Refused, match="can no longer be read"):
        preflight.run_preflight(spec_for(moved, str(tmp_path / "runs")), ray=True)
    run = SimpleNamespace(data=SimpleNamespace(params={}, tags={"data.manifest_sha256": preflight._manifest_sha(moved)}),
                          info=SimpleNamespace(run_id="r1"))
    preflight.run_preflight(spec_for(moved, str(tmp_path / "runs")), ray=True, previous_run=run)


def test_without_a_checkpoint_the_existing_mlflow_run_is_compared(data, tmp_path):
    run = SimpleNamespace(data=SimpleNamespace(params={"model.size": "tiny", "model.method": "afm", "data.prefix": data},
                                               tags={}), info=SimpleNamespace(run_id="abc123"))
    with pytest.raises(Refused, match=r"would resume MLflow run abc123 of run.name=pf, trained with model.size=tiny"):
        preflight.run_preflight(spec_for(data, str(tmp_path / "runs"), model__size="S/2"), ray=True, previous_run=run)
    preflight.run_preflight(spec_for(data, str(tmp_path / "runs")), ray=True, previous_run=run)


@pytest.mark.parametrize("where", ["d/optim.safetensors", "extra/evil.pkl"])
def test_a_planted_file_is_refused_naming_its_stored_path(data, tmp_path, where):
    old = spec_for(data, str(tmp_path / "runs"))
    ckpt = plant_checkpoint(old)
    target = ckpt / where
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(pickle.dumps({"x": 1}, protocol=4))
    with pytest.raises(Refused) as err:
        preflight.run_preflight(old, ray=True)
    msg = str(err.value)
    if where.endswith(".pkl"):
        assert msg.startswith(f"{ckpt}: unexpected file(s) ['extra/evil.pkl']"), msg
    else:
        assert msg.startswith(f"{ckpt}/d/optim.safetensors: a pickle under a safe file name"), msg


def test_a_snapshot_naming_a_checkpoint_without_trainer_json_is_refused(data, tmp_path):
    old = spec_for(data, str(tmp_path / "runs"))
    ckpt = plant_checkpoint(old)
    (ckpt / "trainer.json").unlink()
    with pytest.raises(Refused, match=rf"{ckpt}: the checkpoint this run would resume from has no trainer.json"):
        preflight.run_preflight(old, ray=True)


def test_the_worker_side_check_names_the_stored_checkpoint_not_its_temp_copy(tmp_path):
    from advflow.platform.train.checkpoint import ResumeError, check_files

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "optim.safetensors").write_bytes(pickle.dumps(1, protocol=4))
    with pytest.raises(ResumeError, match=r"^s3://b/runs/x/checkpoint_000400/d/optim\.safetensors: a pickle"):
        check_files(tmp_path, "s3://b/runs/x/checkpoint_000400")


# ----------------------------------------------------------------------------------------- cluster


NODE = {"Alive": True, "Resources": {"CPU": 2.0, "memory": 1e9}}


def test_a_worker_group_the_cluster_can_never_hold_is_refused_naming_ask_and_total(data, tmp_path):
    spec = spec_for(data, str(tmp_path), distributed__workers=64, train__global_batch=64)
    with pytest.raises(Refused) as err:
        preflight.check_cluster(spec, [NODE], can_grow=False)
    assert str(err.value).startswith("distributed.workers=64 asks for 64 worker(s) x {CPU: 1} = {CPU: 64}, but the Ray "
                                     "cluster has {CPU: 2} in all on 1 node(s), room for 2, and no autoscaler"), err.value
    preflight.check_cluster(spec, [NODE], can_grow=True)  # an autoscaler can add nodes: it waits
    preflight.check_cluster(spec_for(data, str(tmp_path)), [NODE], can_grow=False)  # 2 workers fit


def test_an_elastic_range_is_refused_only_when_its_minimum_cannot_fit(data, tmp_path):
    spec = spec_for(data, str(tmp_path), distributed__workers=4, distributed__min_workers=2, train__global_batch=48)
    preflight.check_cluster(spec, [NODE], can_grow=False)
    with pytest.raises(Refused, match=r"^distributed.min_workers=2 asks for 2 worker\(s\) x \{CPU: 1\}"):
        preflight.check_cluster(spec, [{**NODE, "Resources": {"CPU": 1.0}}], can_grow=False)


def test_a_worker_must_fit_on_one_node(data, tmp_path):
    spec = spec_for(data, str(tmp_path), distributed__workers=1, distributed__cpus_per_worker=2)
    small = {"Alive": True, "Resources": {"CPU": 1.0}}
    with pytest.raises(Refused, match=r"has \{CPU: 2\} in all on 2 node\(s\) \(a worker must fit on one node\), room for 0"):
        preflight.check_cluster(spec, [small, small], can_grow=False)


def test_the_autoscaler_override(monkeypatch):
    monkeypatch.setenv(preflight.AUTOSCALER_ENV, "1")
    assert preflight.cluster_can_grow()
    monkeypatch.setenv(preflight.AUTOSCALER_ENV, "0")
    assert not preflight.cluster_can_grow()
