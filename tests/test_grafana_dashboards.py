"""The Grafana dashboards (dashboards/grafana/*.json): the committed files are the generator's
output, they load through the Grafana Foundation SDK's types unchanged, every query selects only
series of the metric catalogue (platform/tracking/live.py) or Ray's own node metrics with labels
those series have, every variable a query uses is defined, and `queries`/`instantiate` give PromQL
a real Prometheus accepts (promtool, integration tier). Mutated dashboards are shown to fail."""

from __future__ import annotations

import copy
import json
import re
import shutil
import subprocess

import pytest
import yaml
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.cog.plugins import register_default_plugins
from grafana_foundation_sdk.models.dashboard import Dashboard

from advflow.dashboards.grafana import build, defined_variables, instantiate, metric_names, queries, variables_used
from advflow.dashboards.grafana.promql import VARIABLE, variable_query
from advflow.platform.tracking.live import CATALOGUE

NAMES = tuple(build.DASHBOARDS)
SERIES = {f.series: f for f in CATALOGUE.values()}
# Labels Prometheus and Ray add to every series (the scrape target; Ray's node tags).
RAY_NODE_LABELS = {"instance", "job", "ip", "SessionName", "IsHeadNode", "RayNodeType", "GpuIndex", "GpuDeviceName",
                   "GpuUuid", "Version"}


@pytest.fixture(scope="module")
def committed() -> dict[str, dict]:
    return {name: json.loads((build.FOLDER / name).read_text(encoding="utf-8")) for name in NAMES}


def panels(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard.get("panels", []):
        out.append(panel)
        out += panel.get("panels", [])
    return out


# ------------------------------------------------------------------------- no drift


@pytest.mark.parametrize("name", NAMES)
def test_committed_json_is_the_generators_output(name):
    from importlib.metadata import version

    text = (build.FOLDER / name).read_text(encoding="utf-8")
    assert text == build.render(name), (f"dashboards/grafana/{name} is stale; regenerate it: {build.COMMAND} "
                                        f"(with grafana-foundation-sdk {version('grafana-foundation-sdk')}: the "
                                        "pyproject's `grafana` extra pins the build the files come from)")
    assert text.endswith("}\n") and build.render(name) == build.render(name)  # deterministic


def test_check_names_the_stale_file_and_the_fix(tmp_path, capsys):
    for name in NAMES:
        shutil.copy(build.FOLDER / name, tmp_path / name)
    assert build.main(["--check", "--out-dir", str(tmp_path)]) == 0
    edited = json.loads((tmp_path / "train.json").read_text())
    edited["panels"][1]["title"] = "Steps"  # a hand edit
    (tmp_path / "train.json").write_text(json.dumps(edited, indent=2, sort_keys=True) + "\n")
    (tmp_path / "sweep.json").unlink()
    assert build.main(["--check", "--out-dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"{tmp_path / 'train.json'} is stale" in err and f"{tmp_path / 'sweep.json'} is stale" in err
    assert "python -m advflow.dashboards.grafana.build" in err
    assert build.main(["--out-dir", str(tmp_path)]) == 0 and build.stale(tmp_path) == []


def test_fixed_uids_and_unique_panel_ids(committed):
    assert committed["train.json"]["uid"] == "advflow-train" and committed["sweep.json"]["uid"] == "advflow-sweep"
    for dashboard in committed.values():
        ids = [p["id"] for p in panels(dashboard)]
        assert len(ids) == len(set(ids)), ids
        assert "version" not in dashboard and "id" not in dashboard  # Grafana assigns these on import


# ------------------------------------------------------------------------- the SDK's types


def round_trip(dashboard: dict) -> dict:
    """The dashboard decoded into the SDK's classes and encoded again: keys the SDK's model does
    not know (a misspelt field, a field of another Grafana version) do not survive."""
    register_default_plugins()  # the Prometheus query and panel types' decoders
    return json.loads(json.dumps(Dashboard.from_json(dashboard), cls=JSONEncoder))


@pytest.mark.parametrize("name", NAMES)
def test_json_loads_through_the_sdks_types_unchanged(committed, name):
    assert round_trip(committed[name]) == committed[name]


@pytest.mark.parametrize("mutate", [
    lambda d: d["panels"][1].update(gridPoss=d["panels"][1].pop("gridPos")),
    lambda d: d["panels"][1]["targets"][0].update(exprr=d["panels"][1]["targets"][0].pop("expr")),
    lambda d: d["panels"][1]["options"].update(reduceOption={}),
    lambda d: d["templating"]["list"][1].update(multiple=True),
    lambda d: d["annotations"]["list"][0].update(expression="up"),
], ids=["panel-field", "target-field", "stat-option", "variable-field", "annotation-field"])
def test_a_field_the_sdk_does_not_know_is_caught(committed, mutate):
    broken = copy.deepcopy(committed["train.json"])
    mutate(broken)
    assert round_trip(broken) != broken


# ------------------------------------------------------------------------- names, labels, variables


def check_query(expr: str) -> None:
    """Every metric is a catalogue series or an allowed Ray node metric, and every label a
    matcher, by()/on() or legend names is one that series carries."""
    names = metric_names(expr)
    assert names, f"{expr}: selects no metric"
    for metric in names:
        assert metric in SERIES or metric in build.RAY_NODE_METRICS, \
            f"{expr}: {metric} is neither in CATALOGUE (platform/tracking/live.py) nor one of Ray's node metrics"
    for metric, body in re.findall(r"(\w+)\{([^}]*)\}", expr):
        for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", body):
            allowed = SERIES[metric].labels if metric in SERIES else RAY_NODE_LABELS
            assert label in allowed, f"{expr}: {metric} has no label {label!r} (labels: {allowed})"
    labels = set().union(*(SERIES[m].labels for m in names if m in SERIES)) | RAY_NODE_LABELS
    for group in re.findall(r"\b(?:by|on)\s*\(([^)]*)\)", expr):
        for label in filter(None, (x.strip() for x in group.split(","))):
            assert label in labels, f"{expr}: by/on ({label}) is no label of {names}"


def legends(dashboard: dict) -> list[tuple[str, str, str]]:
    return [(p["title"], t["expr"], t.get("legendFormat", "")) for p in panels(dashboard) for t in p.get("targets", [])]


@pytest.mark.parametrize("name", NAMES)
def test_every_query_uses_catalogue_series_and_their_labels(committed, name):
    found = queries(committed[name])
    assert len(found) >= 10
    for where, expr in found:
        try:
            check_query(expr)
        except AssertionError as err:
            raise AssertionError(f"{name}, {where}: {err}") from None
    for title, expr, legend in legends(committed[name]):
        labels = set().union(*(SERIES[m].labels for m in metric_names(expr) if m in SERIES)) | RAY_NODE_LABELS
        for label in re.findall(r"\{\{\s*(\w+)\s*\}\}", legend):
            assert label in labels, f"{name}, {title}: legend {{{{{label}}}}} is no label of {expr}"


@pytest.mark.parametrize("expr, message", [
    ('ray_advflow_train_losses{run=~"$run"}', "neither in CATALOGUE"),
    ('advflow_train_loss{run=~"$run"}', "neither in CATALOGUE"),  # Ray's prefix missing
    ('ray_advflow_train_loss{run=~"$run", rank="0"}', "no label 'rank'"),
    ('sum by (rank) (ray_advflow_train_loss{run=~"$run"})', "by/on (rank)"),
    ('ray_node_gpu_utilization / 100', "neither in CATALOGUE"),
], ids=["misspelt", "no-prefix", "bad-matcher", "bad-by", "ray-metric"])
def test_a_wrong_name_or_label_is_caught(expr, message):
    with pytest.raises(AssertionError, match=re.escape(message)):
        check_query(expr)


@pytest.mark.parametrize("name", NAMES)
def test_every_variable_a_query_uses_is_defined(committed, name):
    dashboard = committed[name]
    defined = defined_variables(dashboard)
    for where, expr in queries(dashboard):
        assert variables_used(expr) <= defined, f"{name}, {where}: {variables_used(expr) - defined} undefined"
    for panel in panels(dashboard):  # data sources: the datasource variable
        for ref in [panel.get("datasource") or {}] + [t.get("datasource") or {} for t in panel.get("targets", [])]:
            assert variables_used(ref.get("uid", "")) <= defined, panel["title"]
    broken = copy.deepcopy(dashboard)
    broken["panels"][1]["targets"][0]["expr"] += ' + ray_advflow_train_step{run=~"$runs"}'
    assert any(variables_used(e) - defined_variables(broken) == {"runs"} for _, e in queries(broken))


def test_variables_list_label_values_of_catalogue_labels(committed):
    train = {v["name"]: v for v in committed["train.json"]["templating"]["list"]}
    assert train["run"]["query"] == f"label_values({CATALOGUE['advflow_train_step'].series}, run)"
    assert train["run"]["multi"] is True and train["datasource"]["query"] == "prometheus"
    sweep = {v["name"]: v for v in committed["sweep.json"]["templating"]["list"]}
    assert sweep["sweep"]["query"] == f"label_values({CATALOGUE['advflow_sweep_trials'].series}, sweep)"
    assert variable_query(train["run"]["query"]) == "count by (run) (ray_advflow_train_step)"
    with pytest.raises(ValueError, match="label_values"):
        variable_query("label_values(run)")


def test_every_catalogue_family_is_on_a_dashboard(committed):
    train = {m for _, e in queries(committed["train.json"]) for m in metric_names(e)}
    sweep = {m for _, e in queries(committed["sweep.json"]) for m in metric_names(e)}
    for family in CATALOGUE.values():
        where = sweep if family.name.startswith("advflow_sweep_") else train
        assert family.series in where, f"{family.series} is exported but on no dashboard"
    assert {"ray_node_gpus_utilization", "ray_node_gram_used"} <= train


# ------------------------------------------------------------------------- what the panels show


def test_units_and_descriptions_follow_the_catalogue(committed):
    for name, dashboard in committed.items():
        for panel in panels(dashboard):
            if panel["type"] == "row":
                continue
            unit = panel["fieldConfig"]["defaults"].get("unit")
            assert unit and panel.get("description"), f"{name}, {panel['title']}: no unit or description"
            for metric in {m for t in panel["targets"] for m in metric_names(t["expr"])}:
                family = SERIES.get(metric)
                if family is None or metric_names(panel["targets"][0]["expr"]) != {metric}:
                    continue
                assert family.help in panel["description"], f"{panel['title']}: not described by {metric}'s help"
                if metric.endswith("_seconds"):
                    assert unit == "s", f"{panel['title']}: {metric} in {unit}"
                if metric.endswith("_ratio"):
                    assert unit == "percentunit", f"{panel['title']}: {metric} in {unit}"
                if metric.endswith("_per_second"):
                    assert unit == "suffix: samples/s", f"{panel['title']}: {metric} in {unit}"


def test_the_training_dashboard_has_the_runs_rows_and_annotations(committed):
    train = committed["train.json"]
    titles = {p["title"] for p in panels(train)}
    for title in ("Throughput", "Step time per rank", "Data-wait ratio per rank", "Losses", "Loss terms",
                  "Discriminator logits (real / fake)", "Gradient norms and gn_scale", "Learning rates",
                  "Loss weights (λ)", "Phase", "FD / FID by NFE", "Classifier accuracy by NFE", "Checkpoint stalls",
                  "Watchdog rollbacks", "GPU utilisation", "GPU memory used"):
        assert title in titles, title
    (gpu,) = [p for p in train["panels"] if p["type"] == "row" and p["title"] == "GPU (where a GPU exists)"]
    assert gpu["collapsed"] and {p["title"] for p in gpu["panels"]} >= {"GPU utilisation", "GPU memory used"}
    annotations = {a["name"]: a["expr"] for a in train["annotations"]["list"]}
    assert annotations == {
        "Phase changes": 'changes(ray_advflow_train_phase{run=~"$run"}[$__interval]) > 0',
        "Watchdog rollbacks": 'increase(ray_advflow_watchdog_rollbacks_total{run=~"$run"}[$__interval]) > 0'}
    for a in train["annotations"]["list"]:
        assert a["datasource"] == {"type": "prometheus", "uid": "${datasource}"} and a["enable"]
    logits = [p for p in panels(train) if p["title"].startswith("Discriminator logits")][0]
    assert [t["expr"] for t in logits["targets"]] == ['ray_advflow_train_logit{run=~"$run"}']


def test_the_sweep_dashboard_follows_its_trials_runs(committed):
    sweep = committed["sweep.json"]
    exprs = dict(queries(sweep))
    assert exprs["Trials by state"] == 'sum by (state) (ray_advflow_sweep_trials{sweep=~"$sweep"})'
    assert exprs["Best value so far"] == 'ray_advflow_sweep_best_value{sweep=~"$sweep"}'
    assert exprs["Trial throughput"] == 'ray_advflow_train_samples_per_second{run=~"${sweep}-.+"}'
    assert exprs["Trial evaluation"] == 'ray_advflow_eval_metric{run=~"${sweep}-.+"}'
    # the trial runs' names: <study>-<Tune trial id> (platform/sweep/tune.py)
    from pathlib import Path

    tune = (Path(build.__file__).resolve().parents[2] / "platform" / "sweep" / "tune.py").read_text()
    assert 'spec.run.name = f"{sp.study_name}-{trial_id}"' in tune
    assert "SweepMetrics(space.study_name" in tune


# ------------------------------------------------------------------------- queries() and instantiate()


def test_queries_reads_rows_annotations_and_variables():
    dashboard = {
        "panels": [
            {"type": "row", "title": "r", "panels": [{"title": "inside", "targets": [{"refId": "A", "expr": "a"}]}]},
            {"title": "two", "targets": [{"refId": "A", "expr": "b"}, {"refId": "B", "expr": "c"}, {"refId": "C"}]},
        ],
        "annotations": {"list": [{"name": "builtin", "builtIn": 1}, {"name": "x", "expr": "d > 0"},
                                 {"name": "y", "target": {"expr": "e"}}]},
        "templating": {"list": [{"type": "datasource", "name": "ds", "query": "prometheus"},
                                {"type": "query", "name": "v", "query": {"query": "label_values(m{a=\"1\"}, v)"}},
                                {"type": "query", "name": "w", "query": "query_result(topk(3, m))"}]},
    }
    assert queries(dashboard) == [("inside", "a"), ("two [A]", "b"), ("two [B]", "c"), ("annotation: x", "d > 0"),
                                  ("annotation: y", "e"), ("variable: v", 'count by (v) (m{a="1"})'),
                                  ("variable: w", "topk(3, m)")]


def test_instantiate_fills_every_variable_syntax():
    expr = 'rate(x{run=~"$run", a=~"${run}", b=~"[[run]]", c=~"${run:regex}", d="${run:raw}"}[$__rate_interval])'
    assert instantiate(expr, run="demo", __rate_interval="2m") == \
        'rate(x{run=~"demo", a=~"demo", b=~"demo", c=~"demo", d="demo"}[2m])'
    assert instantiate('x{run=~"$run"}', run=["a.b", "c"]) == 'x{run=~"(a\\\\.b|c)"}'
    assert instantiate('x{run=~"${sweep}-.+"}[$__interval] offset $__range', sweep="s") == 'x{run=~"s-.+"}[1m] offset 1h'
    with pytest.raises(ValueError, match=r"no value for \$run"):
        instantiate('x{run=~"$run"}')
    # Grafana's globals with or without `__`, and their _s/_ms forms derived
    assert instantiate("x[$__interval] [$__rate_interval] [$__range] $__range_s $__interval_ms",
                       interval="15s", rate_interval="2m", range="1h30m") == "x[15s] [2m] [1h30m] 5400 15000"
    assert build.instantiate is instantiate and build.queries is queries  # reachable as build.* too
    with pytest.raises(ValueError, match=r"no value for \$__nope"):
        instantiate("x[$__nope]")
    with pytest.raises(ValueError, match="not a Prometheus duration"):
        instantiate("$__range_s", range="an hour")
    assert variables_used('x{a=~"$a", b="${b:raw}", c="[[c]]"}[$__interval]') == {"a", "b", "c", "__interval"}


@pytest.mark.parametrize("name", NAMES)
def test_every_query_instantiates_to_plain_promql(committed, name):
    for where, expr in queries(committed[name]):
        out = instantiate(expr, run=["digits-demo", "digits.2"], sweep="digits-afm")
        assert not VARIABLE.search(out), f"{where}: {out}"
        assert out.count("(") == out.count(")") and out.count("{") == out.count("}"), f"{where}: {out}"


def test_gpu_and_conditional_queries_are_named(committed):
    from advflow.dashboards.grafana.promql import CONDITIONAL_PANELS

    train = queries(committed["train.json"])
    gpu = {where for where, expr in train if build.needs_gpu(where, expr)}
    assert gpu == {"GPU utilisation", "GPU memory used", "GPU memory used (share)"}
    titles = {p["title"] for p in panels(committed["train.json"])}
    assert CONDITIONAL_PANELS <= titles, CONDITIONAL_PANELS - titles
    always = {where for where, expr in train if not build.conditional(where, expr)}
    assert {"Throughput", "Step time per rank", "Losses", "FD / FID by NFE", "Node CPU utilisation",
            "variable: run"} <= always
    assert not {"annotation: Phase changes", "GPU utilisation", "Loss terms"} & always


@pytest.mark.integration  # starts promtool
def test_every_query_parses_with_promtool(committed, tmp_path):
    """promtool (Prometheus' own parser) checks each instantiated query as a recording rule's
    expression; a broken one is shown to fail the same way."""
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian: apt-get install prometheus)")

    def check(exprs: list[str]) -> subprocess.CompletedProcess:
        rules = {"groups": [{"name": "advflow-dashboards", "rules": [
            {"record": f"advflow:dashboard_query:{i}", "expr": e} for i, e in enumerate(exprs)]}]}
        path = tmp_path / "rules.yml"
        path.write_text(yaml.safe_dump(rules, sort_keys=False))
        return subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)

    exprs = [instantiate(e, run=["digits-demo", "digits.2"], sweep="digits-afm")
             for name in NAMES for _, e in queries(committed[name])]
    done = check(exprs)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(exprs)} rules found" in done.stdout
    broken = check(exprs[:1] + [exprs[1].replace(")", "", 1)])
    assert broken.returncode != 0 and "parse error" in broken.stdout + broken.stderr
