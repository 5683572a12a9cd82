"""jobs/reproduce.py: the run set and its specs for every seed (MeanFlow at equal size and one size
up, FM and MeanFlow at twice the iterations, the OT-free run), results keyed by run and seed and
resumed, and (integration, on a tiny budget) runs nested under one parent MLflow run, eval/fd@K and
coverage per K read back into the report's input, the report logged, a re-run that skips what finished."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "jobs"))

import reproduce  # noqa: E402

STEPS = 6
CONFIG = str(REPO / "jobs" / "configs" / "digits_tiny.yaml")


@pytest.fixture(scope="module")
def base():
    from advflow.platform.config import load_config

    return load_config(CONFIG, [])


def test_every_run_and_seed_gives_a_valid_spec(base):
    args = reproduce.parse(["--steps", "100", "--seeds", "0", "1", "2"])
    runs = reproduce.runs_for(100, base.model.size)
    names = [r["name"] for r in runs]
    assert names == ["afm_1nfe", "meanflow", "meanflow_up", "fm", "cafm", "afm_k2", "afm_r2", "afm_ot0",
                     "phases_manual", "phases_auto"]
    from advflow.dashboards.reproduce_report import EXPECTED_RUNS

    assert tuple(names) == EXPECTED_RUNS  # the report waits for exactly these
    specs = {(r["name"], s): reproduce.spec_for(r, args, base, s) for r in runs for s in args.seeds}
    for (name, seed), spec in specs.items():
        assert spec.train.seed == seed and spec.run.name == f"{args.name}_{name}_s{seed}"
        assert spec.tracking.register_name == (f"{args.name}-fm" if name == "fm" else None)
        assert spec.eval.every == max(1, spec.train.steps // reproduce.EVALS)
    s = {name: specs[(name, 1)] for name in names}
    afm = s["afm_1nfe"]
    assert (afm.model.method, afm.model.kind, afm.model.nfe, afm.train.steps) == ("afm", "1nfe", 1, 100)
    for name in ("meanflow", "meanflow_up"):
        mf = s[name]
        assert (mf.model.method, mf.model.kind, mf.model.nfe) == ("meanflow", "anystep", 1)
        assert mf.train.steps == 2 * afm.train.steps and list(mf.eval.nfe) == [1, 2, 4]
    assert s["meanflow"].model.size == base.model.size == "tiny"
    assert s["meanflow_up"].model.size == "XXS/2"  # one rung up the ladder
    fm = s["fm"]
    assert (fm.model.method, fm.model.kind, fm.model.nfe) == ("fm", "multistep", 4)
    assert fm.train.steps == 2 * afm.train.steps and list(fm.eval.nfe) == [1, 2, 4, 8]
    assert (s["afm_k2"].model.kind, s["afm_k2"].model.nfe) == ("multistep", 2)
    assert s["afm_r2"].model.repeats == 2 and s["afm_r2"].model.nfe == 1
    assert s["afm_ot0"].adversarial.ot_scale == 0.0 and afm.adversarial.ot_scale != 0.0
    assert s["phases_auto"].phases == "auto"
    manual = s["phases_manual"].phases
    assert [p["name"] for p in manual] == ["decay", "ema", "low_lr"] and [p["start"] for p in manual] == [0, 50, 75]
    assert manual[2]["lr"] == pytest.approx(base.optim.lr * 0.3)


def test_size_up_follows_the_ladder():
    ladder = reproduce.LADDER
    for small, big in zip(ladder, ladder[1:]):
        assert reproduce.size_up(small) == big
    with pytest.raises(ValueError, match="largest"):
        reproduce.size_up(ladder[-1])
    with pytest.raises(ValueError, match="not on the ladder"):
        reproduce.size_up("huge")
    runs = {r["name"]: r for r in reproduce.runs_for(10, "XS/2")}
    assert runs["meanflow_up"]["set"]["model.size"] == "S/2" and "XS/2" not in runs["meanflow"]["set"].values()


def test_results_are_keyed_by_run_and_seed_and_resume():
    runs = reproduce.runs_for(10)
    done = {"runs": {"afm_1nfe/s0": {"status": "FINISHED"}, "afm_1nfe/s1": {"status": "FAILED"},
                     "fm/s2": {"status": "FINISHED"}, "afm_1nfe": {"status": "FINISHED"}}}  # an old-style key
    todo, skipped = reproduce.plan(runs, [0, 1, 2], done, None)
    assert skipped == ["afm_1nfe/s0", "fm/s2"]
    keys = [reproduce.seed_key(r["name"], s) for r, s in todo]
    assert len(keys) == len(runs) * 3 - 2 and "afm_1nfe/s1" in keys and "afm_1nfe/s0" not in keys
    todo, skipped = reproduce.plan(runs, [0, 1], done, {"afm_1nfe", "fm"})
    assert [reproduce.seed_key(r["name"], s) for r, s in todo] == ["afm_1nfe/s1", "fm/s0", "fm/s1"]
    assert skipped == ["afm_1nfe/s0"]


class FakeVersion:
    def __init__(self, name, version):
        self.name, self.version = name, version


class FakeClient:
    """MlflowClient.search_model_versions for `run_id='...'` filters only."""

    def __init__(self, by_run):
        self.by_run, self.queries = by_run, []

    def search_model_versions(self, filter_string):
        self.queries.append(filter_string)
        run_id = filter_string.split("'")[1]
        return [FakeVersion(n, v) for n, v in self.by_run.get(run_id, [])]


def test_cafm_budget_scales_with_steps():
    b = reproduce.cafm_budget(1000)
    assert (b["steps"], b["warmup"], b["d_steps"], b["lr"]) == (1200, 200, 4, 1e-4)
    # D-only through iteration 200, then G at k % 5 == 4: k = 204, 209, ..., 1199.
    assert b["g_updates"] == len(range(204, 1200, 5)) == 200 and b["d_updates"] == 1000
    small = reproduce.cafm_budget(100)
    assert (small["steps"], small["warmup"]) == (120, 20)
    assert reproduce.cafm_budget(2)["warmup"] == 1  # at least 1


def test_cafm_spec_from_the_recorded_fm_run(base):
    args = reproduce.parse(["--steps", "100", "--name", "rep"])
    cafm = next(r for r in reproduce.runs_for(100, base.model.size) if r["name"] == "cafm")
    done = {"runs": {"fm/s1": {"status": "FINISHED", "run_id": "run-fm-1", "seed": 1},
                     "fm/s0": {"status": "FINISHED", "run_id": "run-fm-0", "seed": 0}}}
    client = FakeClient({"run-fm-1": [("rep-fm", "3"), ("rep-fm", "5"), ("other", "9")],
                         "run-fm-0": [("rep-fm", "1")]})
    init, why = reproduce.init_for(cafm, 1, done, args, client)
    assert (init, why) == ("models:/rep-fm/5", "") and client.queries == ["run_id='run-fm-1'"]
    spec = reproduce.spec_for(cafm, args, base, 1, init=init)
    assert (spec.model.method, spec.model.kind, spec.model.nfe, spec.model.init) == ("cafm", "multistep", 4,
                                                                                    "models:/rep-fm/5")
    assert (spec.train.steps, spec.cafm.warmup, spec.cafm.d_steps) == (120, 20, 4)
    assert spec.optim.lr == pytest.approx(1e-4) and list(spec.eval.nfe) == [1, 2, 4, 8]
    assert spec.train.seed == 1 and spec.tracking.register_name is None and spec.run.name == "rep_cafm_s1"
    assert spec.eval.every == 120 // reproduce.EVALS
    # Without an init (planning before fm ran) the spec still validates, from a placeholder.
    assert reproduce.spec_for(cafm, args, base, 0).model.init == "models:/rep-fm/1"


@pytest.mark.parametrize("fm_record, versions, must_say", [
    ({"status": "FAILED", "run_id": "r"}, {"r": [("rep-fm", "1")]}, "fm/s0 is FAILED"),
    (None, {}, "fm/s0 is MISSING"),
    ({"status": "FINISHED", "run_id": "r"}, {}, "registered no version of rep-fm"),
])
def test_cafm_is_skipped_without_a_finished_registered_fm_run(base, fm_record, versions, must_say):
    args = reproduce.parse(["--name", "rep"])
    cafm = next(r for r in reproduce.runs_for(100) if r["name"] == "cafm")
    done = {"runs": {"fm/s0": fm_record} if fm_record else {}}
    init, why = reproduce.init_for(cafm, 0, done, args, FakeClient(versions))
    assert init is None and must_say in why


def test_only_cafm_plans_after_fm_seeds_are_recorded():
    runs = reproduce.runs_for(10)
    done = {"runs": {"fm/s0": {"status": "FINISHED"}, "fm/s1": {"status": "FINISHED"},
                     "cafm/s0": {"status": "SKIPPED"}}}
    todo, skipped = reproduce.plan(runs, [0, 1], done, {"cafm"})
    assert [reproduce.seed_key(r["name"], s) for r, s in todo] == ["cafm/s0", "cafm/s1"] and skipped == []
    order = [r["name"] for r in runs]
    assert order.index("fm") < order.index("cafm")  # every fm seed trains before any cafm seed


def test_cli_refuses_repeated_seeds():
    with pytest.raises(SystemExit):
        reproduce.parse(["--seeds", "0", "0"])
    assert reproduce.parse([]).seeds == [0, 1, 2]


# -- integration: jobs/reproduce.py as a process -----------------------------------------------------
def run_job(digits: str, tmp_path: Path, only: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "jobs/reproduce.py", "--no-ray", "--steps", str(STEPS), "--seeds", "0", "--name", "t",
           "--out", str(tmp_path / "out"), "--only", only,
           "--set", f"data.prefix={digits}", "--set", f"run.storage_path={tmp_path / 'runs'}",
           "--set", "train.global_batch=16", "--set", "eval.num_samples=100", "--set", "eval.batch_size=100",
           "--set", "tracking.system_metrics=false", "--set", "tracking.experiment=reproduce-test"]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)


@pytest.mark.integration
@pytest.mark.timeout(1200)
def test_reproduce_nests_runs_reports_and_resumes(digits, tmp_path, mlflow_env):
    from mlflow.tracking import MlflowClient

    first = run_job(digits, tmp_path, "afm_1nfe,fm")
    assert first.returncode == 0, first.stderr[-3000:]
    out = tmp_path / "out" / "t"
    results = json.loads((out / "results.json").read_text())
    assert {k: v["status"] for k, v in results["runs"].items()} == {"afm_1nfe/s0": "FINISHED", "fm/s0": "FINISHED"}

    client = MlflowClient()
    exp = client.get_experiment_by_name("reproduce-test")
    parent = client.search_runs([exp.experiment_id], filter_string="tags.`advflow.kind` = 'reproduce'")
    assert len(parent) == 1
    parent_id = parent[0].info.run_id
    children = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    by_name = {r.data.tags["advflow.reproduce.run"]: r for r in children}
    assert set(by_name) == {"afm_1nfe", "fm"}
    assert {r.data.tags["advflow.reproduce.seed"] for r in children} == {"0"}
    assert by_name["fm"].data.params["train.steps"] == str(2 * STEPS)  # the same images
    assert by_name["afm_1nfe"].data.params["train.steps"] == str(STEPS)
    fm = by_name["fm"].data.metrics
    assert {f"eval/fd_at_{k}" for k in (1, 2, 4)} <= set(fm)  # MLflow refuses '@'
    assert fm["eval/fd"] == fm["eval/fd_at_4"]
    assert {a.path for a in client.list_artifacts(parent_id)} >= {"report.html", "results.json"}
    # The report's input holds the per-K metrics read back, and every run of the set.
    report_input = json.loads((out / "report_input.json").read_text())
    fm_row = next(r for r in report_input["runs"] if r["name"] == "fm")
    assert {f"eval/fd@{k}" for k in (1, 2, 4)} <= set(fm_row["seeds"][0]["metrics"])
    assert fm_row["seeds"][0]["metrics"]["eval/fd@4"] == pytest.approx(fm["eval/fd_at_4"])
    assert len(report_input["runs"]) == 10 and report_input["seeds"] == [0]
    html = (out / "report.html").read_text()
    assert "incomplete" in html and "needs ImageNet scale" in html and "eval/fd@4" in html

    again = run_job(digits, tmp_path, "afm_1nfe,fm")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already finished (skipped): afm_1nfe/s0, fm/s0" in again.stdout + again.stderr
    children_after = client.search_runs([exp.experiment_id],
                                        filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    assert len(children_after) == 2  # nothing trained twice

    # CAFM post-trains the model this seed's fm run registered (found by its run id).
    post = run_job(digits, tmp_path, "cafm")
    assert post.returncode == 0, post.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["runs"]["cafm/s0"]["status"] == "FINISHED"
    cafm_run = next(r for r in client.search_runs([exp.experiment_id],
                                                  filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
                    if r.data.tags["advflow.reproduce.run"] == "cafm")
    version = client.search_model_versions(f"run_id='{by_name['fm'].info.run_id}'")[0]
    assert cafm_run.data.params["model.init"] == f"models:/t-fm/{version.version}"
    assert {f"eval/fd_at_{k}" for k in (1, 2, 4, 8)} <= set(cafm_run.data.metrics)


@pytest.mark.integration
def test_unknown_run_names_are_refused_before_anything_starts(digits, tmp_path):
    res = run_job(digits, tmp_path, "afm_1nfe,gan")
    assert res.returncode == 2 and "unknown run(s) ['gan']" in res.stderr
    assert not (tmp_path / "out").exists()
