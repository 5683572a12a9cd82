"""A self-contained HTML report of `jobs/reproduce.py`: the paper's claims checked on digits.

`build_report(results)` renders one page that needs no network to view: plotly.js is inlined once
(the first figure), sample grids are base64 data URIs. The page holds
- a header: title, creation time, the job's wall time, images seen per run, the parent MLflow run;
- the claims of the Adversarial Flow Models paper, each with a verdict (reproduced / not reproduced /
  incomplete) and a sentence with the numbers it rests on (`assess_claims`);
- a table with one row per run (method, NFE, R, parameters, training time, final eval/fd,
  eval/fd_floor, eval/cls_acc, the mode coverage eval/precision, eval/recall, eval/diversity and
  eval/diversity_min (higher is better; a diversity_min near 0 is a class drawn as one image), status)
  and, for the flow-matching run, its final eval/fd per K;
- eval/fd over training steps (log scale; FM's eval/fd@K curves as extra traces, phase changes
  marked) and final eval/fd against network passes per sample;
- the phase transitions of the phase-schedule runs (step, from -> to, reason);
- a sample grid per run, or a note saying why there is none.

The input is the plain dict described in `build_report`; runs may be missing or FAILED, and the page
says so instead of failing. `write_report(results, out)` writes the page atomically.
CLI: python -m advflow.dashboards.reproduce_report --results results.json --out report.html
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import math
import sys
from pathlib import Path
from typing import Any

from advflow.dashboards.page import BASE_CSS, esc, na
from advflow.dashboards.sweep_grids import GridUnavailable, image_mime, load_grid
from advflow.platform.atomic import write_text
from advflow.platform.eval import COVERAGE_KEYS

# Our operationalisation of "AFM at 1 step approaches flow matching at many steps": AFM 1NFE's eval/fd
# is at most this multiple of FM's best eval/fd over K >= MANY_STEP_MIN_K. The paper gives no number.
APPROACH_RATIO = 1.5
# Our operationalisation of "multi-step AFM works": each multi-step run's eval/fd is at most this
# multiple of AFM 1NFE's (or better). Also ours, not the paper's.
MULTISTEP_RATIO = 1.5
FEW_STEP_KS = (1, 2, 4)  # FM sampling steps that count as "few"
MANY_STEP_MIN_K = 8  # FM sampling steps from which on they count as "many"
# The numbers the paper reports for this comparison (ImageNet 256, FID), quoted in the depth sentence.
PAPER_DEPTH_NUMBERS = "56-layer 1NFE FID 2.08 vs XL/2 2NFE 2.11; 112-layer 1NFE FID 1.94 vs 4NFE 2.02"
# The runs jobs/reproduce.py trains; the page lists the ones the results lack.
EXPECTED_RUNS = ("afm_1nfe", "fm", "afm_k2", "afm_k4", "afm_r2", "afm_r4", "phases_none", "phases_manual",
                 "phases_auto")

CLAIMS = (
    "AFM at 1 step beats flow matching at few steps",
    "AFM at 1 step approaches flow matching at many steps",
    "Multi-step AFM works",
    "A depth-repeated 1NFE generator beats the multi-step generator of equal compute",
    "The automatic phase schedule is no worse than hand-placed phases",
)
VERDICTS = ("reproduced", "not reproduced", "incomplete")

# One colour per run trace (and its phase-change markers), cycled when there are more runs.
_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
            "#bcbd22", "#7f7f7f", "#393b79", "#637939")
_FM_K_PALETTE = ("#08306b", "#08519c", "#2171b5", "#4292c6", "#6baed6", "#9ecae1")

_CSS = BASE_CSS + """
h3 { font-size: 15px; margin: 12px 0 4px; }
.note { color: #6b7385; font-style: italic; padding: 8px 12px; background: #f5f6f8; border-radius: 4px; }
ol.claims { padding-left: 22px; margin: 0; }
li.claim { margin: 0 0 10px; }
li.claim .claim-text { font-weight: 600; }
li.claim .sentence { margin: 2px 0 0; }
.verdict { display: inline-block; padding: 1px 9px; border-radius: 10px; font-size: 12px; margin-right: 8px;
           font-weight: 600; text-transform: uppercase; letter-spacing: .03em; }
.verdict.reproduced { background: #cdebd6; color: #17622f; }
.verdict.not-reproduced { background: #f6c9c9; color: #8a1c1c; }
.verdict.incomplete { background: #e3e6eb; color: #4a5162; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px; background: #dfe3ea; }
.status-FINISHED { background: #cdebd6; } .status-FAILED { background: #f6c9c9; }
.status-MISSING { background: #fbe7c0; }
table.data { border-collapse: collapse; font-size: 13px; }
table.data th, table.data td { border-bottom: 1px solid #e3e6eb; padding: 4px 8px; text-align: left;
                               white-space: nowrap; }
table.data td.num { font-variant-numeric: tabular-nums; text-align: right; }
table.data td.reason { white-space: normal; max-width: 640px; }
#runs-table { width: 100%; }
"""


# -- small helpers -----------------------------------------------------------------------------------
def _finite(value: Any) -> float | None:
    """`value` as a float when it is a finite real number (bools excluded), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _num(value: float) -> str:
    """A metric as the sentences and the table show it: 4 significant digits."""
    return f"{value:.4g}"


def _cell_num(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return na() if value is None else esc(value)
    return _num(float(value)) if math.isfinite(float(value)) else esc(value)  # nan/inf shown as such


def _fmt_seconds(seconds: Any) -> str:
    """1h 02m 03s, 4m 05s or 12.3 s; '' when `seconds` is no finite number."""
    seconds = _finite(seconds)
    if seconds is None:
        return ""
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {secs:02d}s" if hours else f"{minutes}m {secs:02d}s"


def _fmt_int(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return na() if value is None else esc(value)
    return f"{round(value):,}"


def _verdict_class(verdict: str) -> str:
    return verdict.replace(" ", "-")


def _index(results: dict) -> dict[str, dict]:
    """Runs by name; ValueError when `runs` is malformed (not a list, a run without a name, duplicates)."""
    runs = results.get("runs")
    if runs is None:
        return {}
    if not isinstance(runs, list):
        raise ValueError(f"results['runs'] must be a list of run dicts, got {type(runs).__name__}")
    out: dict[str, dict] = {}
    for i, run in enumerate(runs):
        if not isinstance(run, dict) or not isinstance(run.get("name"), str) or not run["name"]:
            raise ValueError(f"results['runs'][{i}] is not a dict with a non-empty 'name'")
        if run["name"] in out:
            raise ValueError(f"results['runs'] holds two runs named {run['name']!r}; names must be unique")
        out[run["name"]] = run
    return out


def _label(runs: dict[str, dict], name: str) -> str:
    run = runs.get(name) or {}
    return str(run.get("label") or name)


def _metric(run: dict, key: str) -> Any:
    metrics = run.get("metrics")
    return metrics.get(key) if isinstance(metrics, dict) else None


def _usable(runs: dict[str, dict], name: str) -> str | None:
    """Why run `name` cannot back a claim (absent or not FINISHED), or None when it can."""
    run = runs.get(name)
    if run is None:
        return f"{name} is not in the results"
    status = run.get("status") or "MISSING"
    if status != "FINISHED":
        return f"{name} is {status}"
    return None


def _fd(runs: dict[str, dict], name: str) -> tuple[float | None, str | None]:
    """(final eval/fd of run `name`, None) or (None, why it has none usable)."""
    why = _usable(runs, name)
    if why is not None:
        return None, why
    fd = _finite(_metric(runs[name], "eval/fd"))
    if fd is None:
        return None, f"{name} has no finite eval/fd"
    return fd, None


def _k_map(mapping: Any) -> dict[int, Any]:
    """A {"K": value} dict (JSON string keys) as {K: value}, K ascending; keys that are no int dropped."""
    out: dict[int, Any] = {}
    for key, value in (mapping or {}).items() if isinstance(mapping, dict) else ():
        try:
            out[int(key)] = value
        except (TypeError, ValueError):
            continue
    return dict(sorted(out.items()))


def _fm_fd_at(runs: dict[str, dict]) -> tuple[dict[int, float], str | None]:
    """FM's finite final eval/fd@K per K, or ({}, why none is usable)."""
    why = _usable(runs, "fm")
    if why is not None:
        return {}, why
    values = {k: _finite(v) for k, v in _k_map(runs["fm"].get("fd_at")).items()}
    return {k: v for k, v in values.items() if v is not None}, None


def _cannot(claim: str, reasons: list[str], extra: str = "") -> dict:
    sentence = "Cannot assess: " + "; ".join(reasons) + "."
    return {"claim": claim, "verdict": "incomplete", "sentence": sentence + (" " + extra if extra else "")}


def _ratio(a: float, b: float) -> float:
    """a / b for eval/fd values (>= 0): 1 when both are 0, inf when only b is."""
    if b > 0:
        return a / b
    return 1.0 if a == b else math.inf


# -- the claims --------------------------------------------------------------------------------------
def _claim_few_steps(runs: dict[str, dict]) -> dict:
    claim = CLAIMS[0]
    fd1, why1 = _fd(runs, "afm_1nfe")
    fd_at, why_fm = _fm_fd_at(runs)
    few = {k: v for k, v in fd_at.items() if k <= max(FEW_STEP_KS)}
    reasons = [r for r in (why1, why_fm) if r]
    if why_fm is None and not few:
        reasons.append(f"fm has no finite eval/fd@K for K <= {max(FEW_STEP_KS)}")
    if reasons:
        return _cannot(claim, reasons)
    label = _label(runs, "afm_1nfe")
    fm_label = _label(runs, "fm")
    listed = ", ".join(f"{_num(v)} at K={k}" for k, v in few.items())
    absent = [k for k in FEW_STEP_KS if k not in few]
    gap = f" ({fm_label} has no finite eval/fd at K={', '.join(map(str, absent))})" if absent else ""
    worse = [k for k, v in few.items() if not fd1 < v]
    head = f"{label} reaches eval/fd {_num(fd1)} (lower is better) against {fm_label}'s {listed}{gap}"
    if not worse:
        return {"claim": claim, "verdict": "reproduced",
                "sentence": f"{head}: lower than flow matching at every few-step K."}
    where = ", ".join(f"K={k} ({_num(few[k])})" for k in worse)
    return {"claim": claim, "verdict": "not reproduced",
            "sentence": f"{head}: flow matching is as good or better at {where}."}


def _claim_many_steps(runs: dict[str, dict]) -> dict:
    claim = CLAIMS[1]
    fd1, why1 = _fd(runs, "afm_1nfe")
    fd_at, why_fm = _fm_fd_at(runs)
    many = {k: v for k, v in fd_at.items() if k >= MANY_STEP_MIN_K}
    reasons = [r for r in (why1, why_fm) if r]
    if why_fm is None and not many:
        reasons.append(f"fm has no finite eval/fd@K for K >= {MANY_STEP_MIN_K}")
    if reasons:
        return _cannot(claim, reasons)
    best_k = min(many, key=lambda k: (many[k], k))
    best = many[best_k]
    ratio = _ratio(fd1, best)
    ok = ratio <= APPROACH_RATIO
    sentence = (f"{_label(runs, 'afm_1nfe')} eval/fd {_num(fd1)} is {ratio:.2f}x {_label(runs, 'fm')}'s best "
                f"many-step eval/fd {_num(best)} (K={best_k}, best of K={', '.join(map(str, many))}); "
                f"{'within' if ok else 'outside'} the {APPROACH_RATIO:g}x we count as \"approaches\" "
                "(our threshold, not the paper's).")
    return {"claim": claim, "verdict": "reproduced" if ok else "not reproduced", "sentence": sentence}


def _claim_multistep(runs: dict[str, dict]) -> dict:
    claim = CLAIMS[2]
    names = ("afm_1nfe", "afm_k2", "afm_k4")
    fds = {n: _fd(runs, n) for n in names}
    reasons = [why for _, why in fds.values() if why]
    if reasons:
        return _cannot(claim, reasons)
    fd1 = fds["afm_1nfe"][0]
    parts = [f"{_label(runs, 'afm_1nfe')} {_num(fd1)}"]
    too_far = []
    for name in names[1:]:
        fd = fds[name][0]
        ratio = _ratio(fd, fd1)
        parts.append(f"{_label(runs, name)} {_num(fd)} ({ratio:.2f}x of 1NFE)")
        if ratio > MULTISTEP_RATIO:
            too_far.append(_label(runs, name))
    head = f"eval/fd: {', '.join(parts)}; each multi-step run must be within {MULTISTEP_RATIO:g}x of 1NFE's"
    if not too_far:
        return {"claim": claim, "verdict": "reproduced", "sentence": f"{head} or better, and is."}
    return {"claim": claim, "verdict": "not reproduced",
            "sentence": f"{head} or better; {' and '.join(too_far)} {'is' if len(too_far) == 1 else 'are'} not."}


def _claim_depth(runs: dict[str, dict]) -> dict:
    claim = CLAIMS[3]
    paper = f"The paper (ImageNet 256): {PAPER_DEPTH_NUMBERS}."
    pairs = (("afm_r2", "afm_k2"), ("afm_r4", "afm_k4"))
    fds = {n: _fd(runs, n) for pair in pairs for n in pair}
    reasons = [why for _, why in fds.values() if why]
    if reasons:
        return _cannot(claim, reasons, paper)
    parts, losers = [], []
    for deep, multi in pairs:
        a, b = fds[deep][0], fds[multi][0]
        outcome = "lower" if a < b else ("tie" if a == b else "worse")
        parts.append(f"{_label(runs, deep)} {_num(a)} vs {_label(runs, multi)} {_num(b)} ({outcome})")
        if outcome != "lower":
            losers.append(f"{_label(runs, deep)} is {'no better than' if a == b else 'worse than'} "
                          f"{_label(runs, multi)}")
    head = f"eval/fd (lower is better): {'; '.join(parts)}."
    if not losers:
        return {"claim": claim, "verdict": "reproduced",
                "sentence": f"{head} Both depth-repeated runs beat their equal-compute multi-step pair. {paper}"}
    return {"claim": claim, "verdict": "not reproduced", "sentence": f"{head} {'; '.join(losers)}. {paper}"}


def _claim_phases(runs: dict[str, dict]) -> dict:
    claim = CLAIMS[4]
    auto, why_auto = _fd(runs, "phases_auto")
    manual, why_manual = _fd(runs, "phases_manual")
    reasons = [r for r in (why_auto, why_manual) if r]
    if reasons:
        return _cannot(claim, reasons)
    none, why_none = _fd(runs, "phases_none")
    baseline = (f"{_label(runs, 'phases_none')} {_num(none)}" if none is not None
                else f"no-phase baseline n/a ({why_none})")
    ok = auto <= manual
    sentence = (f"eval/fd: {_label(runs, 'phases_auto')} {_num(auto)} vs {_label(runs, 'phases_manual')} "
                f"{_num(manual)}, {baseline}; the automatic schedule is "
                f"{'no worse than' if ok else 'worse than'} the hand-placed one.")
    return {"claim": claim, "verdict": "reproduced" if ok else "not reproduced", "sentence": sentence}


def assess_claims(results: dict) -> list[dict]:
    """The paper's claims in a fixed order, each {"claim", "verdict", "sentence"}.

    verdict is "reproduced", "not reproduced" or "incomplete" (a run it needs is absent, not FINISHED,
    or has no finite eval/fd; the sentence names which). Lower eval/fd is better. The sentence quotes
    the numbers from `results` it rests on and nothing else.
    """
    runs = _index(results)
    return [check(runs) for check in (_claim_few_steps, _claim_many_steps, _claim_multistep, _claim_depth,
                                      _claim_phases)]


# -- header and claims -------------------------------------------------------------------------------
def _render_header(results: dict, title: str) -> str:
    created = results.get("created")
    wall = _fmt_seconds(results.get("wall_seconds"))
    images = results.get("images_per_run")
    parent = results.get("parent_run_id")
    spans = [
        f"<span>created {esc(created) if created else 'unknown'}</span>",
        f'<span id="wall-time">wall time {esc(wall) if wall else "unknown"}</span>',
        f'<span id="images-per-run">{_fmt_int(images) if images is not None else "unknown"} images per run</span>',
        ('<span id="parent-run">parent run '
         + (f"<code>{esc(parent)}</code>" if parent else "none") + "</span>"),
    ]
    return f'<header><h1>{esc(title)}</h1><div class="meta">{"".join(spans)}</div></header>'


def _render_claims(claims: list[dict]) -> str:
    items = []
    for i, c in enumerate(claims):
        verdict = c["verdict"]
        items.append(
            f'<li class="claim" data-claim="{i}" data-verdict="{esc(verdict)}">'
            f'<span class="verdict {_verdict_class(verdict)}">{esc(verdict)}</span>'
            f'<span class="claim-text">{esc(c["claim"])}</span>'
            f'<p class="sentence">{esc(c["sentence"])}</p></li>')
    return ('<section id="claims"><h2>Claims of the paper</h2>'
            f'<ol class="claims">{"".join(items)}</ol>'
            '<p class="note">Lower eval/fd is better. Thresholds for "approaches" and "works" '
            f"({APPROACH_RATIO:g}x, {MULTISTEP_RATIO:g}x) are ours, not the paper's.</p></section>")


# -- runs table --------------------------------------------------------------------------------------
_METRIC_COLUMNS = ("eval/fd", "eval/fd_floor", "eval/cls_acc", *COVERAGE_KEYS)
_COLUMNS = ("run", "method", "NFE", "R", "parameters", "training time", *_METRIC_COLUMNS, "status", "MLflow run")


def _render_fd_at(run: dict) -> str:
    fd_at = _k_map(run.get("fd_at"))
    if not fd_at:
        return ""
    head = "".join(f"<th>K={k}</th>" for k in fd_at)
    cells = "".join(f'<td class="num" data-k="{k}">{_cell_num(v)}</td>' for k, v in fd_at.items())
    return (f'<h3>{esc(run.get("label") or run["name"])}: final eval/fd per sampling steps K</h3>'
            f'<div class="table-wrap"><table class="data fd-at" data-run="{esc(run["name"])}">'
            f"<thead><tr><th></th>{head}</tr></thead><tbody><tr><th>eval/fd</th>{cells}</tr></tbody></table></div>")


def _render_table(runs: dict[str, dict]) -> str:
    thead = "".join(f"<th>{esc(c)}</th>" for c in _COLUMNS)
    rows = []
    for name, run in runs.items():
        status = str(run.get("status") or "MISSING")
        cells = [
            f'<td title="{esc(name)}">{esc(run.get("label") or name)}</td>',
            f"<td>{esc(run['method']) if run.get('method') else na()}</td>",
            f'<td class="num">{_fmt_int(run.get("nfe"))}</td>',
            f'<td class="num">{_fmt_int(run.get("repeats"))}</td>',
            f'<td class="num">{_fmt_int(run.get("params"))}</td>',
            f'<td class="num">{esc(_fmt_seconds(run.get("train_seconds"))) or na()}</td>',
        ]
        cells += [f'<td class="num" data-metric="{key}">{_cell_num(_metric(run, key))}</td>'
                  for key in _METRIC_COLUMNS]
        cells.append(f'<td><span class="badge status-{esc(status)}">{esc(status)}</span></td>')
        cells.append(f"<td><code>{esc(run['run_id'])}</code></td>" if run.get("run_id") else f"<td>{na()}</td>")
        rows.append(f'<tr data-run="{esc(name)}" data-status="{esc(status)}">{"".join(cells)}</tr>')
    body = "".join(rows) or f'<tr><td colspan="{len(_COLUMNS)}" class="na">no runs</td></tr>'
    absent = [n for n in EXPECTED_RUNS if n not in runs]
    note = (f'<p class="note" id="absent-runs">Not in the results: {esc(", ".join(absent))}.</p>'
            if absent else "")
    fd_at = "".join(_render_fd_at(r) for r in runs.values() if r.get("method") == "fm")
    return ('<section id="runs"><h2>Runs</h2><div class="table-wrap"><table class="data" id="runs-table">'
            f"<thead><tr>{thead}</tr></thead><tbody>{body}</tbody></table></div>{note}{fd_at}</section>")


# -- plots -------------------------------------------------------------------------------------------
def _points(curve: Any) -> tuple[list[float], list[float]]:
    """(steps, values) of a [[step, value], ...] curve, keeping points a log axis can draw."""
    xs, ys = [], []
    for point in curve if isinstance(curve, (list, tuple)) else ():
        if not isinstance(point, (list, tuple)) or len(point) != 2:
            continue
        x, y = _finite(point[0]), _finite(point[1])
        if x is not None and y is not None and y > 0:
            xs.append(x)
            ys.append(y)
    order = sorted(range(len(xs)), key=xs.__getitem__)
    return [xs[i] for i in order], [ys[i] for i in order]


def _at(xs: list[float], ys: list[float], x: float) -> float:
    """The curve's value at step x, interpolated linearly (clamped at its ends); xs is not empty."""
    if x <= xs[0]:
        return ys[0]
    for i in range(1, len(xs)):
        if x <= xs[i]:
            t = (x - xs[i - 1]) / (xs[i] - xs[i - 1]) if xs[i] > xs[i - 1] else 1.0
            return ys[i - 1] + t * (ys[i] - ys[i - 1])
    return ys[-1]


def _transitions(run: dict) -> list[dict]:
    items = run.get("phase_transitions")
    return [t for t in items if isinstance(t, dict)] if isinstance(items, list) else []


def _curves_figure(runs: dict[str, dict]):
    import plotly.graph_objects as go

    fig = go.Figure()
    for i, (name, run) in enumerate(runs.items()):
        label = str(run.get("label") or name)
        colour = _PALETTE[i % len(_PALETTE)]
        status = run.get("status") or "MISSING"
        suffix = "" if status == "FINISHED" else f" ({status})"
        xs, ys = _points(run.get("curve"))
        if xs:
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name=label + suffix, legendgroup=name,
                                     line={"color": colour, "width": 2}, marker={"size": 4}))
        for j, (k, curve) in enumerate(_k_map(run.get("curve_at")).items()):
            kx, ky = _points(curve)
            if kx:
                fig.add_trace(go.Scatter(x=kx, y=ky, mode="lines", name=f"{label} K={k}", legendgroup=f"{name}@K",
                                         line={"color": _FM_K_PALETTE[j % len(_FM_K_PALETTE)], "dash": "dot"}))
        marks = [t for t in _transitions(run) if _finite(t.get("step")) is not None]
        for t in marks:
            fig.add_vline(x=_finite(t["step"]), line={"color": colour, "width": 1, "dash": "dash"}, opacity=0.6)
        if marks and xs:
            steps = [_finite(t["step"]) for t in marks]
            text = [f"{label} step {s:g}: {t.get('from')} → {t.get('to')}<br>{t.get('reason') or ''}"
                    for s, t in zip(steps, marks, strict=True)]
            fig.add_trace(go.Scatter(x=steps, y=[_at(xs, ys, s) for s in steps], mode="markers",
                                     name=f"{label}: phase changes", legendgroup=name, hovertext=text,
                                     hoverinfo="text", marker={"color": colour, "size": 11, "symbol": "diamond",
                                                               "line": {"color": "#fff", "width": 1}}))
    if not fig.data:
        return None
    fig.update_layout(title="eval/fd over training (lower is better)", height=560,
                      xaxis_title="training step", yaxis={"type": "log", "title": "eval/fd (log scale)"},
                      margin={"l": 70, "r": 30, "t": 60, "b": 50}, legend={"font": {"size": 11}})
    return fig


def _compute_figure(runs: dict[str, dict]):
    """Final eval/fd against network passes per sample (NFE x R): FM's fd_at line and one marker per
    AFM run outside the phase ablations."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, run in runs.items():
        label = str(run.get("label") or name)
        if run.get("method") == "fm":
            fd_at = {k: _finite(v) for k, v in _k_map(run.get("fd_at")).items()}
            pts = [(k, v) for k, v in fd_at.items() if v is not None and v > 0 and k > 0]
            if pts:
                fig.add_trace(go.Scatter(x=[k for k, _ in pts], y=[v for _, v in pts], mode="lines+markers",
                                         name=f"{label} (K steps)", line={"color": "#08519c"}))
        elif run.get("method") == "afm" and run.get("group") != "phases":
            fd = _finite(_metric(run, "eval/fd"))
            nfe, reps = _finite(run.get("nfe")) or 1, _finite(run.get("repeats")) or 1
            if fd is not None and fd > 0:
                # Depth-repeated runs share x with the multi-step run of equal compute: label them below.
                where = "bottom center" if reps > 1 else "top center"
                fig.add_trace(go.Scatter(x=[nfe * reps], y=[fd], mode="markers+text", name=label, text=[label],
                                         textposition=where, marker={"size": 11}))
    if not fig.data:
        return None
    fig.update_layout(title="final eval/fd against network passes per sample", height=440,
                      xaxis={"type": "log", "title": "network passes per sample (NFE x R)", "dtick": math.log10(2)},
                      yaxis={"type": "log", "title": "eval/fd (log scale)"},
                      margin={"l": 70, "r": 30, "t": 60, "b": 50})
    return fig


def _render_plots(runs: dict[str, dict]) -> str:
    parts = []
    plotly_inlined = False
    specs = (("fd-curves", "eval/fd over training steps", _curves_figure, "No run recorded an eval/fd curve."),
             ("fd-vs-compute", "Final eval/fd against compute", _compute_figure,
              "No finished run has a finite final eval/fd to draw."))
    for key, heading, factory, note in specs:
        body = f'<p class="note">{esc(note)}</p>'
        try:
            fig = factory(runs)
            if fig is not None:
                body = fig.to_html(full_html=False, include_plotlyjs=not plotly_inlined, div_id=key,
                                   config={"displaylogo": False, "responsive": True})
                plotly_inlined = True
        except Exception as e:  # noqa: BLE001 - one bad plot must not take the report down
            body = f'<p class="note">Could not draw this plot: {esc(type(e).__name__)}: {esc(e)}</p>'
        parts.append(f'<div class="plot" id="plot-{key}" data-plot="{key}"><h3>{esc(heading)}</h3>{body}</div>')
    return '<section id="curves"><h2>Curves</h2>' + "".join(parts) + "</section>"


# -- phase transitions -------------------------------------------------------------------------------
def _render_phases(runs: dict[str, dict]) -> str:
    shown = [(n, r) for n, r in runs.items() if r.get("group") == "phases" or _transitions(r)]
    if not shown:
        return ('<section id="phases"><h2>Phase transitions</h2>'
                '<p class="note">No phase-schedule runs in the results.</p></section>')
    rows, quiet = [], []
    for name, run in shown:
        label = esc(run.get("label") or name)
        items = _transitions(run)
        if not items:
            quiet.append(label)
        for t in items:
            step = _finite(t.get("step"))
            rows.append(f'<tr data-run="{esc(name)}"><td>{label}</td>'
                        f'<td class="num">{_fmt_int(step) if step is not None else na()}</td>'
                        f"<td>{esc(t.get('from'))} &rarr; {esc(t.get('to'))}</td>"
                        f'<td class="reason">{esc(t.get("reason") or "")}</td></tr>')
    table = ('<div class="table-wrap"><table class="data" id="phase-transitions"><thead><tr><th>run</th>'
             f"<th>step</th><th>phase</th><th>reason</th></tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
             if rows else "")
    note = f'<p class="note">No transitions recorded by: {", ".join(quiet)}.</p>' if quiet else ""
    return f'<section id="phases"><h2>Phase transitions</h2>{table}{note}</section>'


# -- sample grids ------------------------------------------------------------------------------------
def _grid_bytes(grid: Any) -> bytes:
    if isinstance(grid, (bytes, bytearray, memoryview)):
        data = bytes(grid)
    elif isinstance(grid, (str, Path)):
        data = load_grid(str(grid))
    else:
        raise GridUnavailable(f"grid_png is a {type(grid).__name__}, not bytes or a path")
    if image_mime(data) is None:
        raise GridUnavailable("the grid is not a PNG/JPEG/GIF/WebP image")
    return data


def _render_grids(runs: dict[str, dict]) -> str:
    if not runs:
        return '<section id="grids"><h2>Sample grids</h2><p class="note">No runs in the results.</p></section>'
    figures = []
    for name, run in runs.items():
        label = str(run.get("label") or name)
        fd = _finite(_metric(run, "eval/fd"))
        caption = f"{esc(label)} &middot; eval/fd {_num(fd) if fd is not None else 'n/a'}"
        status = run.get("status") or "MISSING"
        if status != "FINISHED":
            caption += f" &middot; {esc(status)}"
        grid = run.get("grid_png")
        if grid is None:
            body = '<div class="placeholder">no grid</div>'
        else:
            try:
                data = _grid_bytes(grid)
                src = f"data:{image_mime(data)};base64,{base64.b64encode(data).decode('ascii')}"
                body = f'<img class="grid-img" alt="samples of {esc(label)}" src="{src}">'
            except GridUnavailable as e:
                body = f'<div class="placeholder">no grid: {esc(e)}</div>'
        figures.append(f'<figure class="grid" data-run="{esc(name)}">{body}'
                       f"<figcaption>{caption}</figcaption></figure>")
    return f'<section id="grids"><h2>Sample grids</h2><div class="gallery">{"".join(figures)}</div></section>'


# -- public API --------------------------------------------------------------------------------------
def build_report(results: dict) -> str:
    """One self-contained HTML page describing the results of `jobs/reproduce.py`.

    results: {"title", "created", "parent_run_id", "wall_seconds", "images_per_run", "runs": [run, ...]};
    each run: {"name" (unique), "label", "group", "method" ("afm"/"fm"), "nfe", "repeats", "params",
    "train_seconds", "status" ("FINISHED"/"FAILED"/"MISSING"), "run_id", "metrics" ({"eval/fd",
    "eval/fd_floor", "eval/cls_acc", "eval/precision", "eval/recall", "eval/diversity",
    "eval/diversity_min"}, keys may be missing: shown as a dash), "fd_at" ({"K": fd}, FM only), "curve"
    ([[step, fd], ...]), "curve_at" ({"K": curve}, FM only), "grid_png" (bytes, a path/URI, or None),
    "phase_transitions" ([{"step", "from", "to", "reason"}, ...])}. ValueError when `runs` is not a
    list of uniquely named dicts; anything else missing shows as a dash or a note.
    """
    if not isinstance(results, dict):
        raise ValueError(f"results must be a dict, got {type(results).__name__}")
    runs = _index(results)
    claims = assess_claims(results)
    title = str(results.get("title") or "advflow reproduction report")
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
        _render_header(results, title),
        "<main>",
        _render_claims(claims),
        _render_table(runs),
        _render_plots(runs),
        _render_phases(runs),
        _render_grids(runs),
        f"<footer>Generated by advflow.dashboards.reproduce_report at {now}.</footer>",
        "</main></body></html>",
    ])


def write_report(results: dict, out_path: str | Path) -> Path:
    """Render `results` and write the page to `out_path` atomically (a temporary file in the same folder,
    then os.replace; parent folders are created); returns the absolute path. A failure while rendering
    leaves any previous file untouched."""
    page = build_report(results)
    return write_text(Path(out_path).expanduser().resolve(), page)  # 0644: a report is meant to be shared


def load_results(path: str | Path) -> dict:
    """The results JSON at `path`; a relative `grid_png` path is taken relative to the JSON's folder."""
    path = Path(path).expanduser()
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(results, dict):
        raise ValueError(f"{path} holds a {type(results).__name__}, not a results object")
    for run in results.get("runs") or []:
        grid = run.get("grid_png") if isinstance(run, dict) else None
        if isinstance(grid, str) and grid.strip() and "://" not in grid and ":/" not in grid:
            grid_path = Path(grid).expanduser()
            run["grid_png"] = str(grid_path if grid_path.is_absolute() else path.parent.resolve() / grid_path)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m advflow.dashboards.reproduce_report",
                                description="Write the self-contained HTML report of jobs/reproduce.py.")
    p.add_argument("--results", required=True,
                   help="results JSON written by the job (relative grid_png paths are relative to its folder)")
    p.add_argument("--out", required=True, help="HTML file to write")
    args = p.parse_args(argv)
    try:
        path = write_report(load_results(args.results), args.out)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
