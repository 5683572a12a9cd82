"""`model.method: cafm` on the platform, started from a registered flow-matching model (issue 27, items 1-2).

- The run config's `cafm` section and `trainers.cafm.CAFMConfig` agree on fields and defaults, and the
  method's optimizer defaults are the official ones; config errors name the field.
- `model.init`: a local model folder (`model_format.write_model_data`) of an fm-kind generator loads
  (the classes' rows copied, the null row added), and a 1nfe generator, another size, another method
  or another number of classes is refused in one line naming model.init, by the workers' loader and
  by the driver's preflight alike.
- A metric window's rows hold only the keys their step recorded (CAFM's g_loss is on G steps only).
- Integration: 2 gloo workers at ZeRO 0 and 2 give the per-step losses of a hand-written single-process
  reference (plain AdamW on the global batch, the same streams and draws), and a run stopped at step 8
  resumes exactly (2 workers) and elastically (1 worker)."""

from __future__ import annotations

import dataclasses
import math
import shutil
from types import SimpleNamespace

import pytest
import torch

from advflow.platform.config import METHOD_DEFAULTS, ConfigError, RunSpec

STEPS, WORKERS, BATCH, RESUME_AT = 16, 2, 32, 8
CAFM = {"warmup": 4, "d_steps": 2, "class_drop": 0.1, "cp_scale": 0.01}  # G steps at k = 5, 8, 11, 14


def base(**model) -> dict:
    # train.steps beyond the official D-only warm-up (10000), which the config requires (a G update must happen)
    return {"data": {"prefix": "/x"}, "model": {"method": "cafm", "nfe": 2, "init": "models:/fm@champion", **model},
            "train": {"steps": 20000}}


# ----------------------------------------------------------------------------------------------- config


def test_the_config_section_and_the_pure_algorithm_agree_on_fields_and_defaults():
    from advflow.trainers.cafm import CAFMConfig

    spec = RunSpec.from_dict(base())
    assert spec.model.kind == "multistep" and spec.model.init == "models:/fm@champion"
    official = CAFMConfig()
    assert spec.cafm.model_dump() == {k: getattr(official, k) for k in spec.cafm.model_dump()}
    assert set(spec.cafm.model_dump()) | {"g_lr", "d_lr", "betas", "weight_decay", "ema_decay", "g_grad_clip",
                                          "d_grad_clip"} == {f.name for f in dataclasses.fields(CAFMConfig)}
    assert spec.cafm.loss_config() == official
    o = spec.optim  # the official optimizers (METHOD_DEFAULTS), for G and D alike
    assert (o.lr, o.lr, tuple(o.betas), o.weight_decay, o.ema_decay, o.grad_clip, o.grad_clip) == (
        official.g_lr, official.d_lr, official.betas, official.weight_decay, official.ema_decay,
        official.g_grad_clip, official.d_grad_clip)
    assert METHOD_DEFAULTS["cafm"]["model"] == {"kind": "multistep"}
    changed = RunSpec.from_dict({**base(), "cafm": {"warmup": 3, "d_steps": 2, "time_dist": "logit_normal_jit"}})
    assert changed.cafm.loss_config() == CAFMConfig(warmup=3, d_steps=2, time_dist="logit_normal_jit")


@pytest.mark.parametrize("raw, field", [
    ({"model": {"method": "cafm", "nfe": 2}}, "model.init: is not set for method cafm"),
    ({"model": {"method": "cafm", "nfe": 2, "init": ""}}, "model.init: is not set for method cafm"),
    (base(kind="anystep"), "model.kind: 'anystep' with method cafm"),
    (base(kind="1nfe", nfe=1), "model.kind: '1nfe' with method cafm"),
    (base(nfe=None), "model.nfe: is not set for method cafm"),
    (base(d_size="S/2"), "model.d_size"),
    ({**base(), "phases": "auto"}, "phases: auto is for method afm"),
    ({**base(), "phases": [{"name": "a", "start": 0, "d_reload_from": "x_end"}]}, "phases: phase"),
    ({**base(), "cafm": {"d_steps": 0}}, "cafm.d_steps"),
    ({**base(), "train": {"steps": 10016}}, "cafm.warmup: 10000 D-only iterations"),  # no G update would happen
    ({**base(), "cafm": {"class_drop": 1.5}}, "cafm.class_drop"),
    ({**base(), "cafm": {"time_dist": "logit_normal"}}, "cafm.time_dist"),
    ({"model": {"method": "fm", "nfe": 2, "init": "models:/fm@champion"}}, "model.init: is set with method fm"),
])
def test_cafm_config_errors_name_the_field(raw, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        RunSpec.from_dict({"data": {"prefix": "/x"}, **raw})


def test_the_missing_init_error_says_how_to_make_one():
    with pytest.raises(ConfigError) as err:
        RunSpec.from_dict({"data": {"prefix": "/x"}, "model": {"method": "cafm", "nfe": 2}})
    assert "register a flow-matching model first: python jobs/train.py" in str(err.value)
    assert "model.method=fm" in str(err.value) and "tracking.register_name" in str(err.value)


# ----------------------------------------------------------------------------------------------- model.init


def write_source(path, *, kind="multistep", size="tiny", num_classes=10, shape=(1, 8, 8), seed=0):
    """A local model folder (`write_model_data`) of a randomly perturbed generator; returns (path, G)."""
    from advflow.platform.tracking.model_format import GeneratorSpec, write_model_data
    from advflow.trainers.models import build_generator

    torch.manual_seed(seed)
    G = build_generator(size, kind=kind, nfe=2 if kind == "multistep" else None, in_channels=shape[0],
                        input_size=shape[1], num_classes=num_classes)
    with torch.no_grad():
        for p in G.parameters():
            p.add_(0.05 * torch.randn_like(p))
    spec = GeneratorSpec(generator=G.config, decoder={"name": "pixel"}, data_shape=shape, num_classes=num_classes)
    return str(write_model_data(G, spec, path)), G


def fake_env(init: str, *, size="tiny", class_drop=0.1, nfe=4):
    spec = RunSpec.from_dict({**base(size=size, nfe=nfe, init=init), "cafm": {"class_drop": class_drop}})
    return SimpleNamespace(spec=spec, data_shape=(1, 8, 8), num_classes=10, device=torch.device("cpu"))


def test_a_local_fm_folder_loads_with_a_null_row_added_and_d_built_from_its_trunk(tmp_path):
    from advflow.platform.train.methods.cafm import TABLE, load_init
    from advflow.trainers.cafm import build_cafm_discriminator

    path, source = write_source(tmp_path / "fm")
    G, tags = load_init(fake_env(path))
    assert tags == {"source_model": path}
    assert G.kind == "multistep" and G.nfe == 4 and G.null_label and G.label_rows == 11
    got, want = G.state_dict(), source.state_dict()
    for key, value in want.items():
        torch.testing.assert_close(got[key][:10] if key == TABLE else got[key], value, rtol=0, atol=0)
    null_row = got[TABLE][10]
    assert 0.005 < null_row.std().item() < 0.05  # DiT's table init, normal(std 0.02)
    again, _ = load_init(fake_env(path))  # every rank: the same null row (train.seed)
    torch.testing.assert_close(again.state_dict()[TABLE], got[TABLE], rtol=0, atol=0)
    D = build_cafm_discriminator(G)
    torch.testing.assert_close(D.state_dict()["y_embedder.embedding_table.weight"], got[TABLE])
    # Without label drop the table stays as loaded (10 rows).
    G0, _ = load_init(fake_env(path, class_drop=0.0))
    assert not G0.null_label and G0.label_rows == 10


@pytest.mark.parametrize("kw, env_kw, words", [
    ({"kind": "1nfe"}, {}, "is a 1nfe generator, not a flow-matching velocity model"),
    ({"size": "S/2"}, {}, "is DiT S/2, this run's model.size is tiny"),
    ({"num_classes": 7}, {}, "has 7 classes, this run's data has 10"),
    ({"shape": (3, 8, 8)}, {}, "was trained on (3, 8, 8) data"),
])
def test_a_wrong_local_source_is_refused_in_one_line_naming_model_init(tmp_path, kw, env_kw, words):
    from advflow.platform.train.methods.cafm import load_init

    path, _ = write_source(tmp_path / "src", **kw)
    with pytest.raises(ValueError) as err:
        load_init(fake_env(path, **env_kw))
    msg = str(err.value)
    assert msg.startswith(f"model.init={path}: ") and words in msg and "\n" not in msg


def test_a_registry_version_is_checked_by_its_tags(tmp_path):
    """models:/NAME@ALIAS: the version is pinned, its method and architecture tags are checked."""
    import json

    from advflow.platform.tracking.init_source import init_problem, inspect_init

    def version(method, size="tiny", kind="multistep"):
        arch = {"size": size, "kind": kind, "repeats": 1, "data_shape": [1, 8, 8]}
        mv = SimpleNamespace(name="fm", version=3, run_id="r1",
                             tags={"method": method, "advflow.arch": json.dumps(arch)})
        return SimpleNamespace(get_model_version_by_alias=lambda n, a: mv, get_model_version=lambda n, v: mv)

    want = dict(size="tiny", data_shape=(1, 8, 8), num_classes=10)
    src = inspect_init("models:/fm@champion", client=version("fm"))
    assert (src.resolved, src.run_id, src.method) == ("models:/fm/3", "r1", "fm")
    assert init_problem(src, **want) is None
    msg = init_problem(inspect_init("models:/fm@champion", client=version("afm")), **want)
    assert msg.startswith("model.init=models:/fm@champion (models:/fm/3): is a model of method afm")
    assert "register a flow-matching model first" in msg
    msg = init_problem(inspect_init("models:/fm/3", client=version("fm", size="B/2")), **want)
    assert "is DiT B/2, this run's model.size is tiny" in msg


def test_preflight_refuses_a_wrong_local_source_before_launch(tmp_path):
    from helpers_data import make_dataset

    from advflow.platform.train import preflight

    make_dataset(str(tmp_path / "data"), n=64, shape=(1, 8, 8), num_classes=10, shard_records=32)
    good, _ = write_source(tmp_path / "good")
    bad, _ = write_source(tmp_path / "bad", kind="1nfe")

    def spec(init):
        return RunSpec.from_dict({"data": {"prefix": str(tmp_path / "data")},
                                  "model": {"method": "cafm", "nfe": 2, "init": init}, "cafm": {"warmup": 10},
                                  "run": {"storage_path": str(tmp_path / "runs")}, "tracking": {"enabled": False}})

    preflight.check_init(spec(good))
    with pytest.raises(preflight.Refused, match=r"model\.init=.*bad: is a 1nfe generator"):
        preflight.check_init(spec(bad))
    with pytest.raises(preflight.Refused, match=r"model\.init=.*nowhere: no such directory"):
        preflight.check_init(spec(str(tmp_path / "nowhere")))


def test_a_row_holds_only_the_keys_its_step_recorded():
    """CAFM records g_loss on G steps only: absent from the D steps' rows (not NaN, which the
    watchdog's non-finite check would take for a divergence)."""
    from advflow.platform.train.metrics import MetricWindow
    from advflow.trainers.watchdog import Watchdog, WatchdogParams

    w = MetricWindow(torch.device("cpu"), world_size=1, global_batch=4)
    w.record({"d_loss": torch.tensor(1.0), "g_update": 0.0})
    w.record({"g_loss": torch.tensor(2.0), "g_update": 1.0})
    rows, _ = w.flush()
    assert rows == [{"step": 1, "d_loss": 1.0, "g_update": 0.0}, {"step": 2, "g_loss": 2.0, "g_update": 1.0}]
    assert Watchdog(WatchdogParams(loss_keys=("d_loss", "g_loss"))).check_rows(rows) is None


def test_the_registered_description_names_the_source():
    from advflow.platform.tracking.model_format import GeneratorSpec
    from advflow.platform.tracking.registry import generator_description
    from advflow.trainers.models import build_generator

    G = build_generator("tiny", kind="multistep", nfe=2, in_channels=1, input_size=8, num_classes=10, null_label=True)
    spec = GeneratorSpec(generator=G.config, decoder={"name": "pixel"}, data_shape=(1, 8, 8), num_classes=10)
    text = generator_description(spec, n_params=1, tags={"method": "cafm", "source_model": "models:/fm/3",
                                                         "source_run_id": "r1"}, uri="models:/c/1", model_id="m-1")
    assert "- **Post-trained from**: models:/fm/3 (run r1)" in text
    assert "Post-trained" not in generator_description(spec, n_params=1, tags={"method": "fm"}, uri="u", model_id="m")


# ----------------------------------------------------------------------------------------------- integration


def spec_for(prefix: str, init: str, stage: int, workers: int = WORKERS) -> RunSpec:
    return RunSpec.from_dict({
        "run": {"keep_checkpoints": 4},
        "data": {"prefix": prefix, "shuffle_buffer": 128, "prefetch": 2},
        "model": {"method": "cafm", "size": "tiny", "nfe": 2, "init": init},
        "cafm": CAFM,
        "optim": {"lr": 1e-3, "grad_clip": 1.0},
        "train": {"steps": STEPS, "global_batch": BATCH, "log_every": 4, "checkpoint_every": RESUME_AT},
        "distributed": {"workers": workers, "zero_stage_g": stage, "zero_stage_d": stage}})


def reference_losses(spec: RunSpec) -> list[dict[str, float]]:
    """The whole global batch in one process: the global "d" and "g" streams, each step's draws
    (noise, times, then the label drop inside the loss) for the whole batch, two plain AdamW."""
    from advflow.platform.data.reader import LatentStream
    from advflow.platform.tracking.model_format import load_model_data
    from advflow.platform.train.methods import step_seed
    from advflow.trainers import cafm
    from advflow.trainers.models import build_generator

    cfg, o, seed = spec.cafm.loss_config(), spec.optim, spec.train.seed
    streams = {name: LatentStream(spec.data.prefix, spec.train.global_batch, partitions=spec.partitions, seed=seed,
                                  stream=name, shuffle_buffer=spec.data.shuffle_buffer, prefetch=spec.data.prefetch)
               for name in ("d", "g")}
    its = {name: iter(s) for name, s in streams.items()}
    source = load_model_data(spec.model.init, device="cpu").generator
    options = dict(source.config)
    torch.manual_seed(seed)
    G = build_generator(options.pop("name"), **{**options, "nfe": spec.model.nfe, "null_label": True})
    with torch.no_grad():
        for key, value in G.state_dict().items():
            src = source.state_dict()[key]
            value[:len(src)].copy_(src)
    D = cafm.build_cafm_discriminator(G)
    opts = {name: torch.optim.AdamW(net.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay, eps=o.eps)
            for name, net in (("g", G), ("d", D))}
    out = []
    for k in range(STEPS):
        kind = cafm.step_kind(k, cfg)
        net = G if kind == "g" else D
        opts[kind].zero_grad(set_to_none=True)
        x, y = next(its[kind])
        gen = torch.Generator().manual_seed(step_seed(seed, k, 0, 2 if kind == "g" else 1))
        z = torch.randn(x.shape, generator=gen)
        t = cafm.sample_cafm_times(len(x), cfg, generator=gen)
        loss_fn = cafm.g_loss if kind == "g" else cafm.d_loss
        loss, _ = loss_fn(G, D, x, y, z, t, cfg, generator=gen)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), o.grad_clip)
        opts[kind].step()
        out.append({f"{kind}_loss": loss.item()})
    for s in streams.values():
        s.close()
    return out


@pytest.mark.integration  # worker processes: 2 workers x 2 stages, two resumes
@pytest.mark.timeout(1200)
def test_cafm_on_two_workers_matches_a_reference_and_resumes_exactly_and_elastically(digits, tmp_path):
    from advflow.platform.data.shards import MANIFEST_NAME, Manifest
    from advflow.platform.data.storage import Storage
    from advflow.platform.train.checkpoint import read_meta
    from advflow.platform.train.local_launch import latest_checkpoint, run_local

    m = Manifest.from_json(Storage(digits).read(MANIFEST_NAME), digits)
    init, _ = write_source(tmp_path / "fm", shape=tuple(m.shape), num_classes=m.num_classes)
    ref = reference_losses(spec_for(digits, init, 2))
    kinds = ["g" if "g_loss" in r else "d" for r in ref]
    assert [k for k, v in enumerate(kinds) if v == "g"] == [5, 8, 11, 14]
    histories = {}
    for stage in (0, 2):
        history = histories[stage] = run_local(spec_for(digits, init, stage), tmp_path / f"zero{stage}")
        assert [r["step"] for r in history] == list(range(1, STEPS + 1))
        for step, (row, want) in enumerate(zip(history, ref), start=1):
            (key, value), = want.items()
            other = "d_loss" if key == "g_loss" else "g_loss"
            assert other not in row and row["g_update"] == float(key == "g_loss"), row
            assert math.isclose(row[key], value, rel_tol=1e-5, abs_tol=1e-7), (
                f"ZeRO-{stage} step {step}: {key} {row[key]:.8f} vs reference {value:.8f}")
        meta = read_meta(latest_checkpoint(tmp_path / f"zero{stage}"))
        assert meta["config"]["model"]["method"] == "cafm"

    # Stopped after step 8 (its last checkpoint removed), resumed on 2 workers and on 1.
    reference = histories[2]
    for workers in (2, 1):
        resumed = tmp_path / f"resumed{workers}"
        shutil.copytree(tmp_path / "zero2", resumed)
        shutil.rmtree(resumed / f"checkpoint_{STEPS:06d}")
        rows = run_local(spec_for(digits, init, 2, workers=workers), resumed)
        assert read_meta(resumed / f"checkpoint_{STEPS:06d}")["resumes"] == [RESUME_AT]
        assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
        for row, want in zip(rows[RESUME_AT:], reference[RESUME_AT:]):
            key = "g_loss" if want["g_update"] else "d_loss"
            # Exact on 2 workers; on 1 only the order of the gradients' reduction differs.
            assert math.isclose(row[key], want[key], rel_tol=1e-9 if workers == 2 else 1e-4), (
                f"resumed on {workers} worker(s), step {row['step']}: {key} {row[key]:.8f} vs {want[key]:.8f}")


@pytest.mark.integration  # MLflow server, worker processes
@pytest.mark.timeout(900)
def test_cafm_from_a_champion_fm_model_registers_a_version_that_names_its_source(digits, tmp_path, mlflow_env):
    """The registry round trip of issue 27: an FM model registered by the platform and promoted to
    @champion is post-trained by CAFM (`model.init: models:/NAME@champion`), which registers a new model
    whose version names the source version (tag and description) and whose samples load and generate."""
    import secrets

    from mlflow.tracking import MlflowClient

    from advflow.platform.tracking.registry import load_generator
    from advflow.platform.tracking.runs import tracked_run
    from advflow.platform.train.local_launch import run_local

    fm_name, cafm_name = "fm-" + secrets.token_hex(3), "cafm-" + secrets.token_hex(3)
    fm_spec = RunSpec.from_dict({
        "data": {"prefix": digits, "shuffle_buffer": 128, "prefetch": 2},
        "model": {"method": "fm", "size": "tiny", "nfe": 2},
        "optim": {"lr": 1e-3, "grad_clip": 1.0, "ema_decay": 0.9},
        "train": {"steps": 6, "global_batch": 16, "log_every": 3, "checkpoint_every": 6},
        "distributed": {"workers": 1},
        "tracking": {"register_name": fm_name, "system_metrics": False}})
    with tracked_run(fm_spec) as run:
        run_local(fm_spec, tmp_path / "fm", run_id=run.run_id)
        run.ok = True
    client = MlflowClient()
    fm_version = client.get_model_version(fm_name, "1")
    client.set_registered_model_alias(fm_name, "champion", "1")

    spec = RunSpec.from_dict({
        "data": {"prefix": digits, "shuffle_buffer": 128, "prefetch": 2},
        "model": {"method": "cafm", "size": "tiny", "nfe": 2, "init": f"models:/{fm_name}@champion"},
        "cafm": {"warmup": 2, "d_steps": 2},
        "train": {"steps": 8, "global_batch": 16, "log_every": 4, "checkpoint_every": 8},
        "distributed": {"workers": 1},
        "tracking": {"register_name": cafm_name, "system_metrics": False}})
    with tracked_run(spec) as run:
        rows = run_local(spec, tmp_path / "cafm", run_id=run.run_id)
        run.ok = True
    assert any("g_loss" in r for r in rows) and any("d_loss" in r for r in rows)  # G was post-trained
    version = client.get_model_version(cafm_name, "1")
    assert version.tags["method"] == "cafm"
    assert version.tags["source_model"] == f"models:/{fm_name}/1"  # the alias, pinned to the version it named
    assert version.tags["source_run_id"] == fm_version.run_id
    assert f"Post-trained from**: models:/{fm_name}/1" in version.description
    model = load_generator(f"models:/{cafm_name}/1")
    assert (model.generator.kind, model.generator.nfe) == ("multistep", 2)
    images = model.generate([0, 7], [0, 1])
    assert images.shape == (2, 8, 8, 1) and images.dtype.name == "uint8"
    # The post-trained weights, not the source's (at lr 1e-5 and a few G updates the uint8 images may
    # not move yet; the velocity does), and the source's class table plus CAFM's null-label row.
    source = load_generator(f"models:/{fm_name}/1").generator
    assert model.generator.null_label and model.generator.y_embedder.embedding_table.num_embeddings == 11
    x, y, t = torch.randn(2, 1, 8, 8), torch.tensor([0, 7]), torch.full((2,), 0.5)
    with torch.no_grad():
        assert not torch.allclose(model.generator.velocity(x, y, t), source.velocity(x, y, t))
