"""A self-contained HTML report of one Optuna sweep study.

`build_report(study)` renders one page that needs no network to view: plotly.js is inlined once
(the first figure), sample grids are base64 data URIs. The page holds
- a header: study name, direction, best value and params, trial counts by state;
- Optuna's optimisation history, parameter importances and parallel-coordinates plots (a short
  note replaces a plot the study cannot support yet, e.g. importances before 2 completed trials);
- a table with one row per trial: number, state, value, the mode coverage beside it when the trials
  carry it (eval/precision, eval/recall, eval/diversity, eval/diversity_min: `COVERAGE_KEYS`, higher
  is better; diversity_min ~0 is a class drawn as one image), every param, duration, selected user attrs;
- a gallery of sample grids (`grids` bytes, else the trial's `sample_grid` URI), best first.

`write_report(storage, study_name, out)` loads a stored study and writes the page atomically.
CLI: python -m advflow.dashboards.sweep_report --storage sqlite:///sweeps/x.db --study NAME --out report.html
"""

from __future__ import annotations

import argparse
import base64
import copy
import datetime as dt
import logging
import math
import sys
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from advflow.dashboards.page import BASE_CSS, esc, na
from advflow.dashboards.sweep_grids import SAMPLE_GRID_ATTR, GridUnavailable, image_mime, load_grid
from advflow.platform.atomic import write_text
from advflow.platform.eval import COVERAGE_KEYS
from advflow.platform.tracking.secrets import redact_url

# User attributes advflow's sweep job records; shown as table columns when any trial has them.
DEFAULT_ATTR_COLUMNS = ("mlflow_run_id", "stopped_early", "steps")

_CSS = BASE_CSS + """
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px; margin-right: 6px;
         background: #dfe3ea; color: #1d2330; }
.state-COMPLETE { background: #cdebd6; } .state-PRUNED { background: #fbe7c0; }
.state-FAIL { background: #f6c9c9; } .state-RUNNING, .state-WAITING { background: #d4e2f7; }
h3 { font-size: 15px; margin: 8px 0 4px; }
.note { color: #6b7385; font-style: italic; padding: 12px; background: #f5f6f8; border-radius: 4px; }
table.trials { border-collapse: collapse; width: 100%; font-size: 13px; }
table.trials th, table.trials td { border-bottom: 1px solid #e3e6eb; padding: 4px 8px; text-align: left;
                                   white-space: nowrap; }
table.trials td.num { font-variant-numeric: tabular-nums; }
table.trials tr.best { background: #eef8f1; }
"""


class StudyNotFoundError(LookupError):
    """The storage holds no study of the requested name; the message lists the ones it holds."""


# -- small formatting helpers ------------------------------------------------------------------------
def _fmt_num(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return esc(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _fmt_duration(delta: dt.timedelta | None) -> str:
    if delta is None:
        return ""
    seconds = delta.total_seconds()
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


# -- study-level facts -------------------------------------------------------------------------------
def _objective(trial: FrozenTrial) -> float | None:
    """The value the report ranks by: the (first) objective; None when the trial has none."""
    return trial.values[0] if trial.values else None


def _ranked_complete(study: optuna.Study) -> list[FrozenTrial]:
    """Completed trials, best first (by the first objective for multi-objective studies)."""
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.values]
    maximize = study.directions[0] == optuna.study.StudyDirection.MAXIMIZE
    return sorted(done, key=lambda t: (-_objective(t) if maximize else _objective(t), t.number))


def _directions_text(study: optuna.Study) -> str:
    names = [d.name.lower() for d in study.directions]
    if len(names) == 1:
        return names[0]
    return ", ".join(names) + " (report ranks by objective 0)"


# -- plots -------------------------------------------------------------------------------------------
def _plot_specs(study: optuna.Study, complete: list[FrozenTrial], metric_name: str
                ) -> list[tuple[str, str, Callable[[], Any] | None, str]]:
    """(key, heading, figure factory or None, note when None) for each plot, checked up front because
    Optuna returns empty figures (with a logged warning) rather than raising on thin studies."""
    from optuna import importance
    from optuna import visualization as vis

    multi = len(study.directions) > 1
    kw: dict[str, Any] = {"target_name": metric_name}
    if multi:
        kw["target"] = _objective  # Optuna's plots need an explicit scalar for multi-objective studies
    varying = sorted({name for t in complete for name in t.params
                      if len({repr(u.params.get(name)) for u in complete}) > 1})
    shared = set.intersection(*(set(t.params) for t in complete)) if complete else set()

    history = (lambda: vis.plot_optimization_history(study, **kw)) if complete else None
    if len(complete) < 2:
        imp, imp_note = None, f"Parameter importances need at least 2 completed trials (have {len(complete)})."
    elif not shared & set(varying):
        imp, imp_note = None, ("Parameter importances need a parameter that every completed trial has and "
                               "whose value varies; none does yet.")
    else:
        # Seeded so that re-rendering the same study gives the same page.
        evaluator = importance.FanovaImportanceEvaluator(seed=0)
        imp, imp_note = (lambda: vis.plot_param_importances(study, evaluator=evaluator, **kw)), ""
    has_params = any(t.params for t in complete)
    parallel = (lambda: vis.plot_parallel_coordinate(study, **kw)) if has_params else None
    no_complete = "No completed trials yet."
    return [
        ("history", "Optimisation history", history, no_complete),
        ("importances", "Parameter importances", imp, imp_note),
        ("parallel", "Parallel coordinates", parallel,
         no_complete if not complete else "The completed trials have no parameters to draw."),
    ]


def _render_plots(study: optuna.Study, complete: list[FrozenTrial], metric_name: str) -> str:
    parts: list[str] = []
    plotly_inlined = False
    for key, heading, factory, note in _plot_specs(study, complete, metric_name):
        body = f'<p class="note">{esc(note)}</p>'
        if factory is not None:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # Optuna flags its plots as experimental
                    fig = factory()
                if not fig.data:
                    raise ValueError("Optuna produced an empty figure")
                fig.update_layout(height=440, margin={"l": 60, "r": 30, "t": 60, "b": 50})
                body = fig.to_html(full_html=False, include_plotlyjs=not plotly_inlined,
                                   div_id=f"fig-{key}", config={"displaylogo": False, "responsive": True})
                plotly_inlined = True
            except Exception as e:  # noqa: BLE001 - one bad plot must not take the report down
                body = f'<p class="note">Could not draw this plot: {esc(type(e).__name__)}: {esc(e)}</p>'
        parts.append(f'<div class="plot" id="plot-{key}" data-plot="{key}"><h3>{esc(heading)}</h3>{body}</div>')
    return '<section id="plots"><h2>Plots</h2>' + "".join(parts) + "</section>"


# -- header ------------------------------------------------------------------------------------------
def _render_header(study: optuna.Study, title: str, trials: list[FrozenTrial],
                   complete: list[FrozenTrial], metric_name: str) -> str:
    counts = Counter(t.state.name for t in trials)
    badges = "".join(f'<span class="badge state-{s}">{s.lower()}: {counts[s]}</span>'
                     for s in sorted(counts)) or '<span class="badge">no trials</span>'
    if complete:
        best = complete[0]
        params = ", ".join(f"{esc(k)}={_fmt_num(v)}" for k, v in best.params.items()) or "none"
        best_html = (f'<span>best {esc(metric_name)}: <b>{_fmt_num(_objective(best))}</b> '
                     f'(trial #{best.number})</span><span>params: <code>{params}</code></span>')
    else:
        best_html = "<span>best: no completed trials yet</span>"
    return (f"<header><h1>{esc(title)}</h1><div class=\"meta\">"
            f"<span>study <code>{esc(study.study_name)}</code></span>"
            f"<span>direction: {esc(_directions_text(study))}</span>"
            f"<span>{len(trials)} trials</span></div>"
            f'<div class="meta">{best_html}</div><div class="meta" style="margin-top:6px">{badges}</div>'
            "</header>")


# -- trials table ------------------------------------------------------------------------------------
def _attr_columns(trials: list[FrozenTrial], extra_columns: list[str] | None) -> list[str]:
    present = [c for c in DEFAULT_ATTR_COLUMNS if any(c in t.user_attrs for t in trials)]
    return list(dict.fromkeys(present + list(extra_columns or [])))


def _coverage_columns(trials: list[FrozenTrial]) -> list[str]:
    """The mode-coverage attributes any trial has (`eval/precision`, or `eval/precision@K` when the sweep
    optimises a metric at K), in `COVERAGE_KEYS` order."""
    keys = {k for t in trials for k in t.user_attrs if k.split("@")[0] in COVERAGE_KEYS}
    return sorted(keys, key=lambda k: (k.partition("@")[2], COVERAGE_KEYS.index(k.split("@")[0])))


def _render_table(trials: list[FrozenTrial], best_number: int | None, metric_name: str,
                  extra_columns: list[str] | None) -> str:
    params = sorted({name for t in trials for name in t.params})
    coverage = _coverage_columns(trials)
    attrs = [a for a in _attr_columns(trials, extra_columns) if a not in coverage]
    head = ["#", "state", metric_name] + coverage + params + ["duration"] + attrs
    thead = "".join(f"<th>{esc(h)}</th>" for h in head)
    rows = []
    for t in trials:
        value = ", ".join(_fmt_num(v) for v in t.values) if t.values else na()
        cells = [f'<td class="num">{t.number}</td>',
                 f'<td><span class="badge state-{t.state.name}">{t.state.name.lower()}</span></td>',
                 f'<td class="num">{value}</td>']
        cells += [f'<td class="num" data-metric="{esc(c)}">{_fmt_num(t.user_attrs[c])}</td>' if c in t.user_attrs
                  else f'<td data-metric="{esc(c)}">{na()}</td>' for c in coverage]
        cells += [f'<td class="num">{_fmt_num(t.params[p])}</td>' if p in t.params else f"<td>{na()}</td>"
                  for p in params]
        cells.append(f'<td class="num">{_fmt_duration(t.duration) or na()}</td>')
        cells += [f"<td>{_fmt_num(t.user_attrs[a])}</td>" if a in t.user_attrs else f"<td>{na()}</td>"
                  for a in attrs]
        cls = ' class="best"' if t.number == best_number else ""
        rows.append(f'<tr data-trial="{t.number}"{cls}>{"".join(cells)}</tr>')
    return ('<section id="trials"><h2>Trials</h2><div class="table-wrap"><table class="trials">'
            f"<thead><tr>{thead}</tr></thead><tbody>{''.join(rows)}</tbody></table></div></section>")


# -- sample grids ------------------------------------------------------------------------------------
def _grid_figure(trial: FrozenTrial, grids: dict[int, bytes], metric_name: str, best: bool) -> str:
    value = _fmt_num(_objective(trial)) if trial.values else trial.state.name.lower()
    caption = f"#{trial.number} &middot; {esc(metric_name)} {value}"
    if best:
        caption += " &middot; <b>best</b>"
    elif trial.state != TrialState.COMPLETE:
        caption += f" &middot; {trial.state.name.lower()}"  # e.g. a pruned trial's last reported value
    try:
        if trial.number in grids:
            data = grids[trial.number]
        elif SAMPLE_GRID_ATTR in trial.user_attrs:
            data = load_grid(trial.user_attrs[SAMPLE_GRID_ATTR])
        else:
            raise GridUnavailable(f"trial has no {SAMPLE_GRID_ATTR} attribute")
        mime = image_mime(data)
        if mime is None:
            raise GridUnavailable("the grid is not a PNG/JPEG/GIF/WebP image")
        src = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
        body = f'<img class="grid-img" alt="samples of trial {trial.number}" src="{src}">'
    except GridUnavailable as e:
        body = f'<div class="placeholder">no sample grid: {esc(e)}</div>'
    return f'<figure class="grid" data-trial="{trial.number}">{body}<figcaption>{caption}</figcaption></figure>'


def _render_gallery(trials: list[FrozenTrial], complete: list[FrozenTrial], grids: dict[int, bytes],
                    metric_name: str) -> str:
    # Completed trials best first; pruned trials follow only when they left a grid behind.
    pruned = [t for t in trials if t.state == TrialState.PRUNED
              and (t.number in grids or SAMPLE_GRID_ATTR in t.user_attrs)]
    shown = complete + pruned
    if not shown:
        return '<section id="grids"><h2>Sample grids</h2><p class="note">No finished trials yet.</p></section>'
    best = complete[0].number if complete else None
    figures = "".join(_grid_figure(t, grids, metric_name, t.number == best) for t in shown)
    return f'<section id="grids"><h2>Sample grids</h2><div class="gallery">{figures}</div></section>'


# -- public API --------------------------------------------------------------------------------------
def build_report(study: optuna.Study, *, title: str | None = None, grids: dict[int, bytes] | None = None,
                 metric_name: str = "value", extra_columns: list[str] | None = None,
                 annotations: dict[int, dict] | None = None) -> str:
    """One self-contained HTML page describing `study`.

    title: page heading (default "Sweep report: <study name>").
    grids: PNG bytes per trial number; a trial not in it falls back to its `sample_grid` user attr.
    metric_name: what the objective value is called in plots, table and captions.
    extra_columns: user-attribute keys to add as table columns besides DEFAULT_ATTR_COLUMNS.
    annotations: extra attributes per trial number, shown like user attrs (Optuna refuses user-attr
      updates on finished trials, so facts known only afterwards, e.g. `stopped_early`, come here).
      The mode-coverage keys among them (`COVERAGE_KEYS`, e.g. `eval/precision`) are shown as columns
      beside the objective.
    """
    title = title or f"Sweep report: {study.study_name}"
    notes = annotations or {}

    def annotate(t):
        if t.number not in notes:
            return t
        t = copy.deepcopy(t)
        t.user_attrs = {**t.user_attrs, **notes[t.number]}
        return t

    trials = [annotate(t) for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)]
    complete = [annotate(t) for t in _ranked_complete(study)]
    best_number = complete[0].number if complete else None
    previous = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(logging.ERROR)  # plots log warnings for thin studies; the page says so
    try:
        plots = _render_plots(study, complete, metric_name)
    finally:
        optuna.logging.set_verbosity(previous)
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
        _render_header(study, title, trials, complete, metric_name),
        "<main>",
        plots,
        _render_table(trials, best_number, metric_name, extra_columns),
        _render_gallery(trials, complete, dict(grids or {}), metric_name),
        f"<footer>Generated by advflow.dashboards.sweep_report at {now}.</footer>",
        "</main></body></html>",
    ])


def load_study(storage: str, study_name: str) -> optuna.Study:
    """`optuna.load_study` with errors that say what to fix.

    A `sqlite:///` URL whose file does not exist is refused (SQLAlchemy would silently create an
    empty database there); an unknown study name lists the names the storage holds.
    """
    if not isinstance(storage, str) or "://" not in storage:
        raise ValueError(f"--storage {storage!r} is not an SQLAlchemy URL: use e.g. sqlite:///sweeps/x.db "
                         "(relative path) or sqlite:////abs/path/x.db")
    if storage.startswith("sqlite:///"):
        db = storage[len("sqlite:///"):].split("?", 1)[0]
        if db and db != ":memory:" and not Path(db).is_file():
            raise FileNotFoundError(f"--storage {storage!r}: no database file at {Path(db).resolve()}; "
                                    "check the path (sqlite:////abs/path.db has four slashes)")
    try:
        names = optuna.study.get_all_study_names(storage=storage)
    except Exception as e:  # driver/URL errors come in many types; rewrap them all
        raise ValueError(f"--storage {redact_url(storage)!r}: cannot open the Optuna storage "
                         f"({type(e).__name__}: {redact_url(str(e))}); "
                         "pass the sweep's SQLAlchemy URL, e.g. sqlite:///sweeps/x.db") from e
    if study_name not in names:
        held = ", ".join(repr(n) for n in sorted(names)) or "none"
        raise StudyNotFoundError(f"--study {study_name!r} is not in {redact_url(storage)}; studies there: {held}")
    return optuna.load_study(study_name=study_name, storage=storage)


def write_report(storage: str, study_name: str, out: str | Path, **kw: Any) -> Path:
    """Load `study_name` from `storage`, render it with `build_report(**kw)`, write it to `out`
    atomically (a temporary file in the same folder, then os.replace); returns the absolute path."""
    page = build_report(load_study(storage, study_name), **kw)
    return write_text(Path(out).expanduser().resolve(), page)  # 0644: a report is meant to be shared


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m advflow.dashboards.sweep_report",
                                description="Write a self-contained HTML report of an Optuna sweep study.")
    p.add_argument("--storage", required=True, help="Optuna storage URL, e.g. sqlite:///sweeps/x.db")
    p.add_argument("--study", required=True, help="study name inside the storage")
    p.add_argument("--out", required=True, help="HTML file to write")
    p.add_argument("--title", default=None, help="page heading (default: 'Sweep report: <study>')")
    p.add_argument("--metric-name", default="value", help="what the objective is called (default: value)")
    p.add_argument("--extra-column", action="append", default=[], metavar="ATTR",
                   help="user attribute to add as a table column (repeatable)")
    args = p.parse_args(argv)
    try:
        path = write_report(args.storage, args.study, args.out, title=args.title,
                            metric_name=args.metric_name, extra_columns=args.extra_column)
    except (ValueError, LookupError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
