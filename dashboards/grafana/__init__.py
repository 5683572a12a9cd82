"""advflow's Grafana dashboards as code: `build` generates train.json and sweep.json (Grafana's
Foundation SDK) against the metric catalogue (platform/tracking/live.py); `promql` reads the
queries back out of a dashboard JSON (`queries`) and fills in Grafana's variables (`instantiate`)
so each one can be sent to a real Prometheus. `python -m advflow.dashboards.grafana.build` writes
the files; `--check` says which committed file is stale."""

from advflow.dashboards.grafana.promql import (conditional, defined_variables, instantiate, metric_names, needs_gpu,
                                               queries, variables_used)

__all__ = ["conditional", "defined_variables", "instantiate", "metric_names", "needs_gpu", "queries", "variables_used"]
