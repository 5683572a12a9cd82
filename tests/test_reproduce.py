"""jobs/reproduce.py (issue 12, item 2), on a tiny budget: runs nested under one parent MLflow run,
the same images per run (FM takes twice the iterations of one batch), eval/fd@K for FM, the report
logged to the parent, and a re-run that skips what finished."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # jobs/reproduce.py as a process

REPO = Path(__file__).resolve().parents[1]
STEPS = 6


def reproduce(digits: str, tmp_path: Path, only: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "jobs/reproduce.py", "--no-ray", "--steps", str(STEPS), "--name", "t",
           "--out", str(tmp_path / "out"), "--only", only,
           "--set", f"data.prefix={digits}", "--set", f"run.storage_path={tmp_path / 'runs'}",
           "--set", "train.global_batch=16", "--set", "eval.num_samples=100", "--set", "eval.batch_size=100",
           "--set", "tracking.system_metrics=false", "--set", "tracking.experiment=reproduce-test"]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)


@pytest.mark.timeout(1200)
def test_reproduce_nests_runs_reports_and_resumes(digits, tmp_path, mlflow_env):
    from mlflow.tracking import MlflowClient

    first = reproduce(digits, tmp_path, "afm_1nfe,fm")
    assert first.returncode == 0, first.stderr[-3000:]
    out = tmp_path / "out" / "t"
    results = json.loads((out / "results.json").read_text())
    assert {k: v["status"] for k, v in results["runs"].items()} == {"afm_1nfe": "FINISHED", "fm": "FINISHED"}

    client = MlflowClient()
    exp = client.get_experiment_by_name("reproduce-test")
    parent = client.search_runs([exp.experiment_id], filter_string="tags.`advflow.kind` = 'reproduce'")
    assert len(parent) == 1
    parent_id = parent[0].info.run_id
    children = client.search_runs([exp.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    by_name = {r.data.tags["advflow.reproduce.run"]: r for r in children}
    assert set(by_name) == {"afm_1nfe", "fm"}
    # The same images: FM takes one batch per iteration, AFM two (D and G).
    assert by_name["fm"].data.params["train.steps"] == str(2 * STEPS)
    assert by_name["afm_1nfe"].data.params["train.steps"] == str(STEPS)
    fm = by_name["fm"].data.metrics
    # MLflow refuses '@': eval/fd@K is logged as eval/fd_at_K.
    assert {f"eval/fd_at_{k}" for k in (1, 2, 4, 8, 16, 32)} <= set(fm)
    assert fm["eval/fd"] == fm["eval/fd_at_32"] and fm["eval/fd_at_1"] != fm["eval/fd_at_32"]
    fd_at = json.loads((out / "results.json").read_text())  # the report reads them back per K
    assert fd_at["runs"]["fm"]["status"] == "FINISHED"
    assert {a.path for a in client.list_artifacts(parent_id)} >= {"report.html", "results.json"}
    # The report holds every run of the set; those not trained yet make their claims "incomplete".
    html = (out / "report.html").read_text()
    assert 'data-run="afm_k4"' not in html or "MISSING" in html
    assert "incomplete" in html and "afm_1nfe" in html and 'data-k="32"' in html

    again = reproduce(digits, tmp_path, "afm_1nfe,fm")
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already finished (skipped): afm_1nfe, fm" in again.stdout + again.stderr
    children_after = client.search_runs([exp.experiment_id],
                                        filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    assert len(children_after) == 2  # nothing trained twice


def test_unknown_run_names_are_refused_before_anything_starts(digits, tmp_path):
    res = reproduce(digits, tmp_path, "afm_1nfe,gan")
    assert res.returncode == 2 and "unknown run(s) ['gan']" in res.stderr
    assert not (tmp_path / "out").exists()
