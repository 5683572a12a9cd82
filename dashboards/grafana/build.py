"""Generate advflow's Grafana dashboards (train.json, sweep.json) with Grafana's Foundation SDK.

    python -m advflow.dashboards.grafana.build           # writes dashboards/grafana/*.json
    python -m advflow.dashboards.grafana.build --check   # exit 1 when a committed file is stale

Every series name comes from `advflow.platform.tracking.live.CATALOGUE` (`Family.series`, Ray's
`ray_` prefix included) and every panel's description from that family's help text, so the
dashboards cannot drift from what the loop exports; GPU and node panels read Ray's own node
metrics (`RAY_NODE_METRICS`). Panels use the Prometheus data source picked in the `datasource`
variable; the output is deterministic (fixed uids and panel ids, sorted keys, no timestamps).

MFU is not on the training dashboard: it needs the model's FLOPs per sample and the GPUs' peak
FLOP/s, and neither is exported (only samples/s is).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import common as common_b
from grafana_foundation_sdk.builders import dashboard as dash_b
from grafana_foundation_sdk.builders import prometheus as prom_b
from grafana_foundation_sdk.builders import stat as stat_b
from grafana_foundation_sdk.builders import timeseries as ts_b
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as dash_m

from advflow.dashboards.grafana.promql import (  # noqa: F401 (re-exported: tests reach them as build.*)
    conditional, instantiate, needs_gpu, queries)
from advflow.platform.tracking.live import CATALOGUE

FOLDER = Path(__file__).resolve().parent
COMMAND = "python -m advflow.dashboards.grafana.build"
DATASOURCE = dash_m.DataSourceRef(type_val="prometheus", uid="${datasource}")
TAGS = ["advflow"]

# Ray's own node metrics the dashboards read (ray/dashboard/modules/reporter/reporter_agent.py):
# name -> what it is. GPU memory is reported in MiB (Ray's own dashboard multiplies by 1024^2).
RAY_NODE_METRICS = {
    "ray_node_cpu_utilization": "CPU use of the node, percent of all its cores",
    "ray_node_mem_used": "memory used on the node, bytes",
    "ray_node_gpus_utilization": "use of each GPU of the node, percent",
    "ray_node_gram_used": "memory used on each GPU, MiB",
    "ray_node_gram_available": "memory free on each GPU, MiB",
}

RUN = 'run=~"$run"'
SWEEP = 'sweep=~"$sweep"'
TRIALS = 'run=~"${sweep}-.+"'  # a trial's run is named <study>-<Tune trial id> (platform/sweep/tune.py)


def series(family: str, *matchers: str) -> str:
    """`ray_<family>{matchers}`: the name Prometheus stores, from the catalogue."""
    return f"{CATALOGUE[family].series}{{{', '.join(matchers)}}}"


def helptext(*families: str) -> str:
    return " ".join(f"{CATALOGUE[f].series}: {CATALOGUE[f].help}" for f in families)


def target(expr: str, legend: str, ref: str = "A") -> prom_b.Dataquery:
    return prom_b.Dataquery().expr(expr).legend_format(legend).ref_id(ref).datasource(DATASOURCE).range()


class Layout:
    """Panel ids in build order (Grafana wants them unique; fixed ones keep the JSON stable)."""

    def __init__(self) -> None:
        self.next_id = 1

    def take(self) -> int:
        self.next_id += 1
        return self.next_id - 1


def timeseries(layout: Layout, title: str, description: str, targets: list[prom_b.Dataquery], unit: str, *,
               span: int = 12, height: int = 8,
               stepped: bool = False, points: bool = False, min_val: float | None = None,
               max_val: float | None = None) -> ts_b.Panel:
    panel = (ts_b.Panel().id(layout.take()).title(title).description(description).datasource(DATASOURCE)
             .unit(unit).span(span).height(height).draw_style(common.GraphDrawStyle.LINE)
             .legend(common_b.VizLegendOptions().show_legend(True).display_mode(common.LegendDisplayMode.LIST)
                     .placement(common.LegendPlacement.BOTTOM))
             .tooltip(common_b.VizTooltipOptions().mode(common.TooltipDisplayMode.MULTI)
                      .sort(common.SortOrder.DESCENDING)))
    if stepped:
        panel = panel.line_interpolation(common.LineInterpolation.STEP_AFTER)
    if points:  # a value per checkpoint: show each one
        panel = panel.show_points(common.VisibilityMode.ALWAYS).point_size(6)
    if min_val is not None:
        panel = panel.min(min_val)
    if max_val is not None:
        panel = panel.max(max_val)
    for t in targets:
        panel = panel.with_target(t)
    return panel


def stat(layout: Layout, title: str, description: str, targets: list[prom_b.Dataquery], unit: str, *,
         span: int = 6, height: int = 4, no_value: str | None = None) -> stat_b.Panel:
    panel = (stat_b.Panel().id(layout.take()).title(title).description(description).datasource(DATASOURCE)
             .unit(unit).span(span).height(height).decimals(0)
             .reduce_options(common_b.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
             .graph_mode(common.BigValueGraphMode.NONE).text_mode(common.BigValueTextMode.VALUE_AND_NAME)
             .color_mode(common.BigValueColorMode.NONE))
    if no_value is not None:
        panel = panel.no_value(no_value)
    for t in targets:
        panel = panel.with_target(t)
    return panel


def row(layout: Layout, title: str) -> dash_b.Row:
    return dash_b.Row(title).id(layout.take())


def datasource_variable() -> dash_b.DatasourceVariable:
    return dash_b.DatasourceVariable("datasource").label("Prometheus").type("prometheus")


def query_variable(name: str, label: str, family: str, description: str, matchers: tuple[str, ...] = ()) -> \
        dash_b.QueryVariable:
    return (dash_b.QueryVariable(name).label(label).description(description).datasource(DATASOURCE)
            .query(f"label_values({series(family, *matchers) if matchers else CATALOGUE[family].series}, {name})")
            .multi(True).refresh(dash_m.VariableRefresh.ON_TIME_RANGE_CHANGED)
            .sort(dash_m.VariableSort.ALPHABETICAL_ASC))


def annotation(name: str, expr: str, color: str) -> dash_b.AnnotationQuery:
    return dash_b.AnnotationQuery().name(name).datasource(DATASOURCE).expr(expr).enable(True).icon_color(color)


def _dashboard(uid: str, title: str, description: str) -> dash_b.Dashboard:
    return (dash_b.Dashboard(title).uid(uid).description(description).tags(TAGS).editable()
            .tooltip(dash_m.DashboardCursorSync.CROSSHAIR).time("now-6h", "now").timezone("browser")
            .refresh("30s")
            .link(dash_b.DashboardLink("advflow dashboards").type(dash_m.DashboardLinkType.DASHBOARDS)
                  .tags(TAGS).as_dropdown(True).include_vars(False).keep_time(True)))


def train_dashboard() -> dash_b.Dashboard:
    L = Layout()
    s = series
    d = (_dashboard("advflow-train", "advflow: training run",
                    "Live metrics of advflow training runs (platform/tracking/live.py), scraped from Ray's "
                    "metrics endpoint. Generated by " + COMMAND + "; do not edit by hand.")
         .with_variable(datasource_variable())
         .with_variable(query_variable("run", "Run", "advflow_train_step", "run.name of the runs to show"))
         .annotation(annotation("Phase changes", f"changes({s('advflow_train_phase', RUN)}[$__interval]) > 0",
                                "blue"))
         .annotation(annotation("Watchdog rollbacks",
                                f"increase({s('advflow_watchdog_rollbacks_total', RUN)}[$__interval]) > 0", "red")))

    d = (d.with_row(row(L, "Overview"))
         .with_panel(stat(L, "Step", helptext("advflow_train_step"),
                          [target(f"max by (run) ({s('advflow_train_step', RUN)})", "{{run}}")], "none"))
         .with_panel(stat(L, "Phase", helptext("advflow_train_phase"),
                          [target(f"max by (run) ({s('advflow_train_phase', RUN)})", "{{run}}")], "none"))
         .with_panel(stat(L, "Checkpoints saved", helptext("advflow_checkpoints_total"),
                          [target(f"max by (run) ({s('advflow_checkpoints_total', RUN)})", "{{run}}")], "none",
                          no_value="0"))
         .with_panel(stat(L, "Watchdog rollbacks", helptext("advflow_watchdog_rollbacks_total"),
                          [target(f"max by (run) ({s('advflow_watchdog_rollbacks_total', RUN)})", "{{run}}")],
                          "none", no_value="0")))

    d = (d.with_row(row(L, "Throughput and input pipeline"))
         .with_panel(timeseries(L, "Throughput", helptext("advflow_train_samples_per_second"),
                                [target(s("advflow_train_samples_per_second", RUN), "{{run}}")],
                                "suffix: samples/s", span=8, min_val=0))
         .with_panel(timeseries(L, "Step time per rank", helptext("advflow_train_step_duration_seconds"),
                                [target(s("advflow_train_step_duration_seconds", RUN), "{{run}} rank {{rank}}")],
                                "s", span=8, min_val=0))
         .with_panel(timeseries(L, "Data-wait ratio per rank", helptext("advflow_train_data_wait_ratio"),
                                [target(s("advflow_train_data_wait_ratio", RUN), "{{run}} rank {{rank}}")],
                                "percentunit", span=8, min_val=0, max_val=1)))

    d = (d.with_row(row(L, "Losses and logits"))
         .with_panel(timeseries(L, "Losses", helptext("advflow_train_loss") + " Members named *_loss.",
                                [target(s("advflow_train_loss", RUN, 'name=~".*_loss"'), "{{run}} {{name}}")],
                                "none"))
         .with_panel(timeseries(L, "Loss terms", helptext("advflow_train_loss") + " Members not named *_loss.",
                                [target(s("advflow_train_loss", RUN, 'name!~".*_loss"'), "{{run}} {{name}}")],
                                "none"))
         .with_panel(timeseries(L, "Discriminator logits (real / fake)", helptext("advflow_train_logit"),
                                [target(s("advflow_train_logit", RUN), "{{run}} {{name}}")], "none"))
         .with_panel(timeseries(L, "Other per-step metrics", helptext("advflow_train_value"),
                                [target(s("advflow_train_value", RUN), "{{run}} {{name}}")], "none")))

    d = (d.with_row(row(L, "Optimisation"))
         .with_panel(timeseries(L, "Gradient norms and gn_scale",
                                helptext("advflow_train_grad_norm", "advflow_train_gradnorm_scale"),
                                [target(s("advflow_train_grad_norm", RUN), "{{run}} {{name}}"),
                                 target(s("advflow_train_gradnorm_scale", RUN), "{{run}} gn_scale", "B")], "none"))
         .with_panel(timeseries(L, "Learning rates", helptext("advflow_train_learning_rate"),
                                [target(s("advflow_train_learning_rate", RUN), "{{run}} {{name}}")], "sci"))
         .with_panel(timeseries(L, "Loss weights (λ)", helptext("advflow_train_loss_weight"),
                                [target(s("advflow_train_loss_weight", RUN), "{{run}} {{name}}")], "none",
                                stepped=True, span=8))
         .with_panel(timeseries(L, "Phase", helptext("advflow_train_phase"),
                                [target(s("advflow_train_phase", RUN), "{{run}}")], "none", stepped=True, span=8,
                                min_val=0))
         .with_panel(timeseries(L, "Augmentation probability", helptext("advflow_train_augment_probability"),
                                [target(s("advflow_train_augment_probability", RUN), "{{run}}")], "percentunit",
                                stepped=True, span=8, min_val=0, max_val=1)))

    d = (d.with_row(row(L, "Evaluation (at checkpoints)"))
         .with_panel(timeseries(L, "FD / FID by NFE", helptext("advflow_eval_metric"),
                                [target(s("advflow_eval_metric", RUN, 'name=~"fd|fid"'),
                                        "{{run}} {{name}} NFE {{nfe}}")], "none", span=8, points=True,
                                stepped=True))
         .with_panel(timeseries(L, "Classifier accuracy by NFE", helptext("advflow_eval_metric"),
                                [target(s("advflow_eval_metric", RUN, 'name="cls_acc"'), "{{run}} NFE {{nfe}}")],
                                "percentunit", span=8, points=True, stepped=True, min_val=0, max_val=1))
         .with_panel(timeseries(L, "Other evaluation metrics", helptext("advflow_eval_metric"),
                                [target(s("advflow_eval_metric", RUN, 'name!~"fd|fid|cls_acc"'),
                                        "{{run}} {{name}} NFE {{nfe}}")], "none", span=8, points=True,
                                stepped=True)))

    d = (d.with_row(row(L, "Checkpoints and watchdog"))
         .with_panel(timeseries(L, "Checkpoint stalls",
                                helptext("advflow_checkpoint_save_seconds", "advflow_checkpoint_report_seconds"),
                                [target(s("advflow_checkpoint_save_seconds", RUN), "{{run}} save (rank 0)"),
                                 target(s("advflow_checkpoint_report_seconds", RUN), "{{run}} report", "B")],
                                "s", points=True, stepped=True, min_val=0))
         .with_panel(timeseries(L, "Watchdog rollbacks", helptext("advflow_watchdog_rollbacks_total"),
                                [target(f"max by (run) ({s('advflow_watchdog_rollbacks_total', RUN)})", "{{run}}")],
                                "none", stepped=True, min_val=0)))

    # Every node of the cluster, not only the run's: filtering by the nodes where a rank reports
    # (`and on(instance)`) leaves the panels empty whenever Ray's node reporter and the ranks'
    # samples miss each other under load (measured on the 2-core stack).
    node = "Ray's node metrics, every node of the cluster."
    d = (d.with_row(row(L, "Nodes of the cluster"))
         .with_panel(timeseries(L, "Node CPU utilisation", f"ray_node_cpu_utilization: {node}",
                                [target("ray_node_cpu_utilization / 100", "{{instance}}")],
                                "percentunit", min_val=0, max_val=1))
         .with_panel(timeseries(L, "Node memory used", f"ray_node_mem_used: {node}",
                                [target("ray_node_mem_used", "{{instance}}")], "bytes",
                                min_val=0)))

    gpu = (row(L, "GPU (where a GPU exists)")
           .with_panel(timeseries(L, "GPU utilisation", f"ray_node_gpus_utilization: {node} Empty without GPUs.",
                                  [target("ray_node_gpus_utilization / 100",
                                          "{{instance}} GPU {{GpuIndex}}")], "percentunit", span=8, min_val=0,
                                  max_val=1))
           .with_panel(timeseries(L, "GPU memory used", f"ray_node_gram_used (MiB, shown in bytes): {node}",
                                  [target("ray_node_gram_used * 1024 * 1024",
                                          "{{instance}} GPU {{GpuIndex}}")], "bytes", span=8, min_val=0))
           .with_panel(timeseries(L, "GPU memory used (share)", f"ray_node_gram_used / (used + available): {node}",
                                  [target("ray_node_gram_used / (ray_node_gram_used + ray_node_gram_available)",
                                          "{{instance}} GPU {{GpuIndex}}")],
                                  "percentunit", span=8, min_val=0, max_val=1)))
    return d.with_row(gpu)


def sweep_dashboard() -> dash_b.Dashboard:
    L = Layout()
    s = series
    d = (_dashboard("advflow-sweep", "advflow: sweep",
                    "Live metrics of advflow sweeps (platform/tracking/live.py) and of their trials' training "
                    "runs (named <study>-<Tune trial id>). Generated by " + COMMAND + "; do not edit by hand.")
         .with_variable(datasource_variable())
         .with_variable(query_variable("sweep", "Sweep", "advflow_sweep_trials", "the sweep's study name"))
         .annotation(annotation("Trial rollbacks",
                                f"increase({s('advflow_watchdog_rollbacks_total', TRIALS)}[$__interval]) > 0",
                                "red")))

    d = (d.with_row(row(L, "Trials"))
         .with_panel(stat(L, "Trials by state", helptext("advflow_sweep_trials"),
                          [target(f"sum by (state) ({s('advflow_sweep_trials', SWEEP)})", "{{state}}")], "none",
                          span=12))
         .with_panel(stat(L, "Best value so far", helptext("advflow_sweep_best_value"),
                          [target(s("advflow_sweep_best_value", SWEEP), "{{sweep}} {{metric}}")], "none",
                          span=12).decimals(4))
         .with_panel(timeseries(L, "Trials by state over time", helptext("advflow_sweep_trials"),
                                [target(f"sum by (sweep, state) ({s('advflow_sweep_trials', SWEEP)})",
                                        "{{sweep}} {{state}}")], "none", stepped=True, min_val=0))
         .with_panel(timeseries(L, "Best value over time", helptext("advflow_sweep_best_value"),
                                [target(s("advflow_sweep_best_value", SWEEP), "{{sweep}} {{metric}}")], "none",
                                stepped=True)))

    d = (d.with_row(row(L, "Trials' training runs"))
         .with_panel(timeseries(L, "Trial throughput", helptext("advflow_train_samples_per_second"),
                                [target(s("advflow_train_samples_per_second", TRIALS), "{{run}}")],
                                "suffix: samples/s", min_val=0))
         .with_panel(timeseries(L, "Trial progress", helptext("advflow_train_step"),
                                [target(s("advflow_train_step", TRIALS), "{{run}}")], "none", min_val=0))
         .with_panel(timeseries(L, "Trial evaluation", helptext("advflow_eval_metric"),
                                [target(s("advflow_eval_metric", TRIALS), "{{run}} {{name}} NFE {{nfe}}")], "none",
                                points=True, stepped=True))
         .with_panel(timeseries(L, "Trial data-wait ratio (mean over ranks)", helptext("advflow_train_data_wait_ratio"),
                                [target(f"avg by (run) ({s('advflow_train_data_wait_ratio', TRIALS)})", "{{run}}")],
                                "percentunit", min_val=0, max_val=1)))
    return d


DASHBOARDS = {"train.json": train_dashboard, "sweep.json": sweep_dashboard}


def render(name: str) -> str:
    """The committed text of dashboards/grafana/<name>: the SDK's encoder, sorted keys, 2-space
    indent, trailing newline."""
    return json.dumps(DASHBOARDS[name]().build(), cls=JSONEncoder, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def stale(folder: Path = FOLDER) -> list[str]:
    """The files under `folder` that differ from (or lack) the generator's output."""
    return [name for name in DASHBOARDS
            if not (folder / name).is_file() or (folder / name).read_text(encoding="utf-8") != render(name)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=COMMAND, description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 when a committed file differs; write nothing")
    parser.add_argument("--out-dir", type=Path, default=FOLDER, help="where to write (default: %(default)s)")
    args = parser.parse_args(argv)
    if args.check:
        bad = stale(args.out_dir)
        for name in bad:
            print(f"{args.out_dir / name} is stale (differs from the generator's output); regenerate it: {COMMAND}",
                  file=sys.stderr)
        return 1 if bad else 0
    args.out_dir.mkdir(parents=True, exist_ok=True)
    for name in DASHBOARDS:
        (args.out_dir / name).write_text(render(name), encoding="utf-8")
        print(args.out_dir / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
