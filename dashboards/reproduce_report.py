"""A self-contained HTML report of `jobs/reproduce.py`: the paper's claims measured on digits, side by
side over several seeds.

`build_report(results)` renders one page that needs no network to view: plotly.js is inlined once
(the first figure), sample grids are base64 data URIs. The page holds
- a header: title, creation time, the job's wall time, the sizes, AFM steps, images seen per run, the
  seeds, the tuning budget, the CAFM post-training budget (steps, D-only warm-up, D updates per G
  update, lr, and the G and D updates they give) and the parent MLflow run;
- the claims table (`assess_claims`; the CAFM claim, CAFM post-training of the fm run's registered
  model vs that fm run, one row per K of CAFM_KS, its sentence naming the post-training budget): each claim of the Adversarial Flow Models paper with a verdict
  badge, one measured sentence, and for each compared group mean ± sample std (min-max, n seeds) of
  eval/fd, eval/precision, eval/recall and eval/diversity; the ImageNet-scale claims are listed as
  "needs ImageNet scale";
- a runs table, one row per run with mean ± std over its finished seeds of eval/fd, eval/fd@K (where
  the run was evaluated at several K), the mode coverage eval/precision, eval/recall, eval/diversity,
  eval/diversity_min (higher is better; a diversity_min near 0 is a class drawn as one image),
  parameters and training time, and a per-seed detail table in a collapsible <details>;
- eval/fd over training steps, the mean over seeds per run (log scale; FM's and MeanFlow's eval/fd@K
  as dotted traces; phase changes of seed 0 marked), and final eval/fd against network passes;
- the phase transitions of the phase-schedule runs, per seed;
- the sample grids of seed 0 of AFM 1NFE, MeanFlow 1NFE and FM (at its own K) side by side.

Verdicts (VERDICTS; our operationalisation, not the paper's): per compared metric, the groups are the
values of the finished seeds of two runs ("A" the claim's subject, "B" what it is compared with);
lower is better for eval/fd*, higher for precision, recall and diversity.
- "holds": A's mean is better AND the ranges do not overlap (every seed of A better than every seed
  of B);
- "does not hold": B's mean is better and B is better on every seed;
- "inconclusive": the means point one way but the ranges overlap ("within the seed spread"), or the
  means are equal;
- "incomplete": a compared run has fewer than MIN_SEEDS finished seeds with a finite value;
- "needs ImageNet scale": a claim digits cannot test (the FID numbers).
Two claims are weaker than "beats" and say so: "no worse" (phases: auto vs hand-placed) holds when
A's mean is no worse, and "approaches" (AFM vs MeanFlow one size up) holds unless B is better on
every seed; both do not hold when B is better on every seed, and "no worse" is inconclusive when A's
mean is worse within the spread. A claim resting on several metrics (the OT claim: diversity and
recall) holds when each holds, does not hold when any does not hold, else is inconclusive.

The input is the plain dict described in `build_report`; runs and seeds may be missing or FAILED,
and the page says so instead of failing. `write_report(results, out)` writes the page atomically.
CLI: python -m advflow.dashboards.reproduce_report --results results.json --out report.html
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

from advflow.dashboards.page import BASE_CSS, esc, na
from advflow.dashboards.sweep_grids import GridUnavailable, image_mime, load_grid
from advflow.platform.atomic import write_text
from advflow.platform.eval import COVERAGE_KEYS

MIN_SEEDS = 2  # finished seeds per compared run below which a claim is "incomplete"
FEW_KS = (1, 2, 4)  # the K at which AFM 1NFE is compared with flow matching
CAFM_KS = (1, 2, 4, 8)  # the K at which CAFM post-training is compared with the flow model it started from
# The runs jobs/reproduce.py trains; the page lists the ones the results lack.
EXPECTED_RUNS = ("afm_1nfe", "meanflow", "meanflow_up", "fm", "cafm", "afm_k2", "afm_r2", "afm_ot0",
                 "phases_manual", "phases_auto")
# The grids shown side by side: seed 0 of these runs (FM's grid is drawn at its own K).
GRID_RUNS = ("afm_1nfe", "meanflow", "fm")
VERDICTS = ("holds", "does not hold", "inconclusive", "incomplete", "needs ImageNet scale")
# The claims digits cannot test: the paper's ImageNet 256 FID numbers.
IMAGENET_CLAIMS = (
    ("AFM XL/2 at 1NFE reaches FID 2.38 on ImageNet 256",
     "An FID on ImageNet 256 at XL/2 scale; digits measure eval/fd in a digit classifier's features instead."),
    ("AFM B/2 at 1NFE approaches consistency-based XL/2 models on ImageNet 256",
     "ImageNet FIDs at B/2 and XL/2; the digits analogue is claim a2 (MeanFlow one size up)."),
    ("Depth-repeated 1NFE generators beat multi-step ones of equal compute on ImageNet 256 "
     "(56-layer 1NFE FID 2.08 vs XL/2 2NFE 2.11; 112-layer 1NFE FID 1.94 vs 4NFE 2.02)",
     "ImageNet FIDs of 56- and 112-layer generators; the digits analogue is claim c."),
)
# The metrics the claims table shows per group (at the compared K), and their short names.
GROUP_METRICS = ("eval/fd", "eval/precision", "eval/recall", "eval/diversity")
SHORT = {"eval/fd": "eval/fd", "eval/precision": "precision", "eval/recall": "recall",
         "eval/diversity": "diversity", "eval/diversity_min": "diversity_min"}

# One colour per run trace (and its phase-change markers), cycled when there are more runs.
_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf",
            "#bcbd22", "#7f7f7f", "#393b79", "#637939")
_K_PALETTE = ("#08306b", "#2171b5", "#6baed6", "#9ecae1")

_CSS = BASE_CSS + """
h3 { font-size: 15px; margin: 12px 0 4px; }
.note { color: #6b7385; font-style: italic; padding: 8px 12px; background: #f5f6f8; border-radius: 4px; }
.verdict { display: inline-block; padding: 1px 9px; border-radius: 10px; font-size: 12px;
           font-weight: 600; text-transform: uppercase; letter-spacing: .03em; white-space: nowrap; }
.verdict.holds { background: #cdebd6; color: #17622f; }
.verdict.does-not-hold { background: #f6c9c9; color: #8a1c1c; }
.verdict.inconclusive { background: #fbe7c0; color: #7a5200; }
.verdict.incomplete { background: #e3e6eb; color: #4a5162; }
.verdict.needs-ImageNet-scale { background: #dde6f7; color: #23407a; }
.badge { display: inline-block; padding: 1px 8px; border-radius: 10px; font-size: 12px; background: #dfe3ea; }
.status-FINISHED { background: #cdebd6; } .status-FAILED { background: #f6c9c9; }
.status-MISSING { background: #fbe7c0; } .status-SKIPPED { background: #e3e6eb; }
table.data { border-collapse: collapse; font-size: 13px; }
table.data th, table.data td { border-bottom: 1px solid #e3e6eb; padding: 4px 8px; text-align: left;
                               white-space: nowrap; vertical-align: top; }
table.data td.num { font-variant-numeric: tabular-nums; text-align: right; }
table.data td.reason { white-space: normal; max-width: 520px; }
table.data td.group { white-space: normal; font-size: 12px; }
#runs-table, #claims-table { width: 100%; }
details { margin-top: 10px; }
"""


# -- small helpers -----------------------------------------------------------------------------------
def _finite(value: Any) -> float | None:
    """`value` as a float when it is a finite real number (bools excluded), else None."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _num(value: float) -> str:
    """A metric as the sentences and the tables show it: 3 significant digits."""
    return f"{value:.3g}"


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


def lower_is_better(key: str) -> bool:
    """eval/fd, eval/fd@K, eval/fid...: lower is better; the coverage metrics: higher is better."""
    return key.split("@")[0].startswith(("eval/fd", "eval/fid"))


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


def _seeds(run: dict | None) -> list[dict]:
    seeds = (run or {}).get("seeds")
    return [s for s in seeds if isinstance(s, dict)] if isinstance(seeds, list) else []


def _finished(run: dict | None) -> list[dict]:
    return [s for s in _seeds(run) if s.get("status") == "FINISHED"]


def _label(runs: dict[str, dict], name: str) -> str:
    return str((runs.get(name) or {}).get("label") or name)


# -- aggregation over seeds --------------------------------------------------------------------------
def aggregate(values: list[Any]) -> dict | None:
    """{"n", "mean", "std" (sample std, None for one value), "min", "max", "values"} of the finite
    values, or None when there is none."""
    vals = [v for v in (_finite(x) for x in values) if v is not None]
    if not vals:
        return None
    return {"n": len(vals), "mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else None,
            "min": min(vals), "max": max(vals), "values": vals}


def run_values(run: dict | None, key: str) -> list[float]:
    """The finite final values of metric `key` (e.g. "eval/fd", "eval/recall@2") over the finished seeds."""
    vals = [_finite((s.get("metrics") or {}).get(key)) if isinstance(s.get("metrics"), dict) else None
            for s in _finished(run)]
    return [v for v in vals if v is not None]


def run_stat(run: dict | None, key: str) -> dict | None:
    """aggregate(run_values(run, key))."""
    return aggregate(run_values(run, key))


def fmt_stat(stat: dict | None, seeds: bool = True) -> str:
    """"52.1 ± 7.3 (46.1-60.7, 3 seeds)"; one seed: "52.1 (1 seed)"; none: "n/a"."""
    if stat is None:
        return "n/a"
    if stat["n"] == 1:
        return f"{_num(stat['mean'])} (1 seed)" if seeds else _num(stat["mean"])
    n = f", {stat['n']} seeds" if seeds else ""
    return f"{_num(stat['mean'])} ± {_num(stat['std'])} ({_num(stat['min'])}-{_num(stat['max'])}{n})"


def compare(a: list[float], b: list[float], key: str, relation: str = "beats") -> str:
    """The verdict of "A `relation` B" on metric `key` from the seeds' values (see the module doc).
    relation: "beats", "no worse" or "approaches"."""
    if len(a) < MIN_SEEDS or len(b) < MIN_SEEDS:
        return "incomplete"
    low = lower_is_better(key)
    ma, mb = statistics.fmean(a), statistics.fmean(b)
    a_all_better = max(a) < min(b) if low else min(a) > max(b)
    b_all_better = max(b) < min(a) if low else min(b) > max(a)
    a_mean_better = ma < mb if low else ma > mb
    b_mean_better = mb < ma if low else mb > ma
    if b_all_better:  # implies B's mean is better too
        return "does not hold"
    if relation == "approaches":
        return "holds"
    if relation == "no worse":
        return "inconclusive" if b_mean_better else "holds"
    if a_all_better and a_mean_better:
        return "holds"
    return "inconclusive"


def combine(verdicts: list[str]) -> str:
    """Several metrics' verdicts as one: incomplete if any is; holds if all hold; does not hold if any
    does not; else inconclusive."""
    if "incomplete" in verdicts:
        return "incomplete"
    if all(v == "holds" for v in verdicts):
        return "holds"
    if "does not hold" in verdicts:
        return "does not hold"
    return "inconclusive"


# -- the claims --------------------------------------------------------------------------------------
def _key(metric: str, k: int | None) -> str:
    return metric if k is None else f"{metric}@{k}"


# Each measured claim: id, text, A (run, K or None = the run's own), B, the deciding metrics, the
# relation ("beats" / "no worse" / "approaches"), and the extra metrics the sentence quotes (means).
MEASURED = (
    ("a1", "AFM 1NFE beats MeanFlow 1NFE at equal size", ("afm_1nfe", None), ("meanflow", None),
     ("eval/fd",), "beats", ("eval/precision", "eval/recall", "eval/diversity")),
    ("a2", "AFM 1NFE approaches MeanFlow 1NFE one size up", ("afm_1nfe", None), ("meanflow_up", None),
     ("eval/fd",), "approaches", ("eval/precision", "eval/recall", "eval/diversity")),
    *((f"b{k}", f"AFM 1NFE beats flow matching at K = {k}", ("afm_1nfe", None), ("fm", k), ("eval/fd",), "beats",
       ("eval/precision", "eval/recall", "eval/diversity")) for k in FEW_KS),
    ("c", "Depth repetition R = 2 beats multi-step K = 2 at equal compute", ("afm_r2", None), ("afm_k2", None),
     ("eval/fd",), "beats", ("eval/recall", "eval/diversity")),
    ("d", "The OT term prevents mode collapse (AFM vs the same run with lambda_ot = 0)", ("afm_1nfe", None),
     ("afm_ot0", None), ("eval/diversity", "eval/recall"), "beats", ("eval/fd",)),
    ("e", "phases: auto is no worse than hand-placed phases", ("phases_auto", None), ("phases_manual", None),
     ("eval/fd",), "no worse", ("eval/recall", "eval/diversity")),
    *((f"f{k}", f"CAFM post-training improves a flow model's few-step samples (K = {k})", ("cafm", k), ("fm", k),
       ("eval/fd",), "beats", ("eval/precision", "eval/recall", "eval/diversity")) for k in CAFM_KS),
)
CLAIMS = tuple(m[1] for m in MEASURED) + tuple(c for c, _ in IMAGENET_CLAIMS)


def _group_label(runs: dict[str, dict], name: str, k: int | None) -> str:
    return _label(runs, name) + ("" if k is None else f" at K={k}")


def _why_short(runs: dict[str, dict], name: str, key: str) -> str:
    run = runs.get(name)
    if run is None:
        return f"{name} is not in the results"
    statuses = [str(s.get("status") or "MISSING") for s in _seeds(run)]
    n = len(run_values(run, key))
    detail = ", ".join(f"{statuses.count(s)} {s}" for s in dict.fromkeys(statuses)) or "no seeds"
    return f"{name} has {n} finished seed{'' if n == 1 else 's'} with a finite {key} (needs {MIN_SEEDS}; {detail})"


def _outcome(verdict: str, relation: str, a_label: str, b_label: str, a: list[float], b: list[float],
             key: str) -> str:
    low = lower_is_better(key)
    ma, mb = statistics.fmean(a), statistics.fmean(b)
    a_all = max(a) < min(b) if low else min(a) > max(b)
    if verdict == "does not hold":
        return f"{b_label} better on every seed"
    if a_all:
        return f"{a_label} better on every seed"
    if ma == mb:
        return "equal means, within the seed spread"
    leader = a_label if (ma < mb) == low else b_label
    return f"the means favour {leader}, within the seed spread"


def _assess(runs: dict[str, dict], spec: tuple) -> dict:
    cid, text, (a_run, a_k), (b_run, b_k), deciding, relation, extras = spec
    a_label, b_label = _group_label(runs, a_run, a_k), _group_label(runs, b_run, b_k)
    groups = [{"run": name, "k": k, "label": _group_label(runs, name, k), "role": role,
               "stats": {m: run_stat(runs.get(name), _key(m, k)) for m in GROUP_METRICS}}
              for role, (name, k) in (("A", (a_run, a_k)), ("B", (b_run, b_k)))]
    claim = {"id": cid, "claim": text, "relation": relation, "deciding": list(deciding), "groups": groups}
    per_metric, parts, missing = [], [], []
    for metric in deciding:
        a = run_values(runs.get(a_run), _key(metric, a_k))
        b = run_values(runs.get(b_run), _key(metric, b_k))
        verdict = compare(a, b, metric, relation)
        per_metric.append(verdict)
        if verdict == "incomplete":
            missing += [_why_short(runs, n, _key(metric, k)) for n, k, v in ((a_run, a_k, a), (b_run, b_k, b))
                        if len(v) < MIN_SEEDS]
            continue
        parts.append(f"{a_label} {SHORT.get(metric, metric)} {fmt_stat(aggregate(a))} vs {b_label} "
                     f"{fmt_stat(aggregate(b))}: {_outcome(verdict, relation, a_label, b_label, a, b, metric)}")
    claim["verdict"] = combine(per_metric)
    if claim["verdict"] == "incomplete":
        claim["sentence"] = "Cannot assess: " + "; ".join(dict.fromkeys(missing)) + "."
        return claim
    quoted = []
    for metric in extras:
        sa = run_stat(runs.get(a_run), _key(metric, a_k))
        sb = run_stat(runs.get(b_run), _key(metric, b_k))
        if sa is not None and sb is not None:
            quoted.append(f"{SHORT.get(metric, metric)} {_num(sa['mean'])} vs {_num(sb['mean'])}")
    tail = f"; {a_label}'s mean " + ", ".join(quoted) if quoted else ""
    claim["sentence"] = "; ".join(parts) + tail + "."
    return claim


def assess_claims(results: dict) -> list[dict]:
    """The paper's claims in a fixed order (CLAIMS), each {"id", "claim", "verdict", "sentence",
    "relation", "deciding" (metric keys), "groups" ([{"run", "k", "label", "role" ("A"/"B"), "stats":
    {metric: aggregate(...) or None}}])}; the ImageNet-scale ones last, verdict "needs ImageNet scale"
    and no groups. The verdict rules are the module doc's; the sentence quotes the numbers of `results`
    it rests on (mean ± std (min-max, n seeds) of the deciding metrics; the means of the others)."""
    runs = _index(results)
    claims = [_assess(runs, spec) for spec in MEASURED]
    budget = cafm_budget_text(results.get("cafm_budget"))
    for c in claims:
        if c["id"].startswith("f") and c["verdict"] != "incomplete":
            c["sentence"] = f"Post-training budget: {budget}. " + c["sentence"]
    for i, (text, why) in enumerate(IMAGENET_CLAIMS, 1):
        claims.append({"id": f"imagenet{i}", "claim": text, "verdict": "needs ImageNet scale",
                       "sentence": f"Not tested here: {why}", "relation": None, "deciding": [], "groups": []})
    return claims


def cafm_budget_text(budget: Any) -> str:
    """"200 G updates, 1000 D updates (1,200 steps: 200 D-only warm-up, then 4 D per G; lr 0.0001)"
    from results["cafm_budget"] ({"steps", "warmup", "d_steps", "lr", "g_updates", "d_updates"});
    "unknown" when it is missing."""
    if not isinstance(budget, dict) or _finite(budget.get("g_updates")) is None:
        return "unknown"
    return (f"{_fmt_int(budget.get('g_updates'))} G updates, {_fmt_int(budget.get('d_updates'))} D updates "
            f"({_fmt_int(budget.get('steps'))} steps: {_fmt_int(budget.get('warmup'))} D-only warm-up, then "
            f"{_fmt_int(budget.get('d_steps'))} D per G; lr {budget.get('lr')})")


# -- header and claims -------------------------------------------------------------------------------
def _render_header(results: dict, title: str) -> str:
    created = results.get("created")
    wall = _fmt_seconds(results.get("wall_seconds"))
    images = results.get("images_per_run")
    parent = results.get("parent_run_id")
    seeds = results.get("seeds")
    sizes = results.get("sizes")
    steps = results.get("steps")
    spans = [
        f"<span>created {esc(created) if created else 'unknown'}</span>",
        f'<span id="wall-time">wall time {esc(wall) if wall else "unknown"}</span>',
        f'<span id="sizes">sizes {esc(", ".join(map(str, sizes))) if sizes else "unknown"}</span>',
        f'<span id="steps">{_fmt_int(steps) if steps is not None else "unknown"} AFM steps</span>',
        f'<span id="images-per-run">{_fmt_int(images) if images is not None else "unknown"} images per run</span>',
        f'<span id="seeds">seeds {esc(" ".join(map(str, seeds))) if seeds else "unknown"}</span>',
        ('<span id="parent-run">parent run '
         + (f"<code>{esc(parent)}</code>" if parent else "none") + "</span>"),
    ]
    extra = "".join(f'<div class="meta" id="header-{k}">{esc(results[k])}</div>' for k in ("tuning", "note")
                    if results.get(k))
    if results.get("cafm_budget"):
        extra += (f'<div class="meta" id="cafm-budget">CAFM post-training of each seed\'s registered FM model: '
                  f'{esc(cafm_budget_text(results["cafm_budget"]))}</div>')
    return f'<header><h1>{esc(title)}</h1><div class="meta">{"".join(spans)}</div>{extra}</header>'


def _stat_cell(stat: dict | None, metric: str) -> str:
    return f'<div data-metric="{esc(metric)}">{esc(SHORT.get(metric, metric))} {esc(fmt_stat(stat))}</div>'


def _render_claims(claims: list[dict]) -> str:
    rows = []
    for c in claims:
        verdict = c["verdict"]
        groups = {g["role"]: g for g in c.get("groups") or []}
        cells = []
        for role in ("A", "B"):
            g = groups.get(role)
            if g is None:
                cells.append(f'<td class="group" data-group="{role}">{na()}</td>')
                continue
            stats = "".join(_stat_cell(g["stats"].get(m), m) for m in GROUP_METRICS)
            cells.append(f'<td class="group" data-group="{role}" data-run="{esc(g["run"])}">'
                         f"<strong>{esc(g['label'])}</strong>{stats}</td>")
        rows.append(f'<tr class="claim" data-claim="{esc(c["id"])}" data-verdict="{esc(verdict)}">'
                    f'<td class="reason claim-text">{esc(c["claim"])}</td>'
                    f'<td><span class="verdict {_verdict_class(verdict)}">{esc(verdict)}</span></td>'
                    f'<td class="reason sentence">{esc(c["sentence"])}</td>{"".join(cells)}</tr>')
    note = ("Lower eval/fd is better; higher precision, recall and diversity. Each value is the mean "
            "± sample std (min-max, n seeds) over the finished seeds. holds: the claimed direction holds "
            "for the means and on every seed (the ranges do not overlap); does not hold: the opposite on "
            "every seed; inconclusive: the means point one way within the seed spread; incomplete: a run "
            f"has fewer than {MIN_SEEDS} finished seeds. 'No worse' holds unless the mean is worse; "
            "'approaches' holds unless the other is better on every seed. Our operationalisation, not the "
            "paper's.")
    return ('<section id="claims"><h2>Claims of the paper</h2><div class="table-wrap">'
            '<table class="data" id="claims-table"><thead><tr><th>claim</th><th>verdict</th><th>measured</th>'
            f'<th>A</th><th>B</th></tr></thead><tbody>{"".join(rows)}</tbody></table></div>'
            f'<p class="note">{esc(note)}</p></section>')


# -- runs table --------------------------------------------------------------------------------------
_COVERAGE_COLUMNS = tuple(COVERAGE_KEYS)


def _all_ks(runs: dict[str, dict]) -> list[int]:
    """Every K some run has an eval/fd@K for (any seed), ascending."""
    ks = set()
    for run in runs.values():
        for s in _seeds(run):
            for key in (s.get("metrics") or {}) if isinstance(s.get("metrics"), dict) else ():
                base, _, k = key.partition("@")
                if base == "eval/fd" and k.isdigit():
                    ks.add(int(k))
    return sorted(ks)


def _mean_std(stat: dict | None) -> str:
    if stat is None:
        return na()
    return esc(_num(stat["mean"]) if stat["std"] is None else f"{_num(stat['mean'])} ± {_num(stat['std'])}")


def _status_summary(run: dict) -> str:
    statuses = [str(s.get("status") or "MISSING") for s in _seeds(run)]
    if not statuses:
        return '<span class="badge status-MISSING">MISSING</span>'
    return " ".join(f'<span class="badge status-{esc(st)}">{statuses.count(st)} {esc(st)}</span>'
                    for st in dict.fromkeys(statuses))


def _render_table(runs: dict[str, dict]) -> str:
    ks = _all_ks(runs)
    metrics = ["eval/fd", *(f"eval/fd@{k}" for k in ks), *_COVERAGE_COLUMNS]
    columns = ["run", "method", "size", "NFE", "R", "steps", "seeds", *metrics, "parameters", "training time",
               "status"]
    thead = "".join(f"<th>{esc(c)}</th>" for c in columns)
    rows, detail = [], []
    for name, run in runs.items():
        finished = _finished(run)
        params = aggregate([s.get("params") for s in finished])
        seconds = aggregate([s.get("train_seconds") for s in finished])
        cells = [
            f'<td title="{esc(name)}">{esc(run.get("label") or name)}</td>',
            f"<td>{esc(run['method']) if run.get('method') else na()}</td>",
            f"<td>{esc(run['size']) if run.get('size') else na()}</td>",
            f'<td class="num">{_fmt_int(run.get("nfe"))}</td>',
            f'<td class="num">{_fmt_int(run.get("repeats"))}</td>',
            f'<td class="num">{_fmt_int(run.get("steps"))}</td>',
            f'<td class="num" data-seeds="{len(finished)}">{len(finished)}/{len(_seeds(run))}</td>',
        ]
        cells += [f'<td class="num" data-metric="{esc(key)}">{_mean_std(run_stat(run, key))}</td>' for key in metrics]
        cells += [f'<td class="num">{_fmt_int(params["mean"]) if params else na()}</td>',
                  f'<td class="num">{esc(_fmt_seconds(seconds["mean"])) if seconds else na()}</td>',
                  f"<td>{_status_summary(run)}</td>"]
        rows.append(f'<tr data-run="{esc(name)}">{"".join(cells)}</tr>')
        for s in _seeds(run):
            m = s.get("metrics") if isinstance(s.get("metrics"), dict) else {}
            status = str(s.get("status") or "MISSING")
            dcells = [f"<td>{esc(run.get('label') or name)}</td>", f'<td class="num">{esc(s.get("seed"))}</td>',
                      f'<td><span class="badge status-{esc(status)}">{esc(status)}</span></td>']
            dcells += [f'<td class="num" data-metric="{esc(key)}">{_cell_num(m.get(key))}</td>' for key in metrics]
            dcells += [f'<td class="num">{_fmt_int(s.get("params"))}</td>',
                       f'<td class="num">{esc(_fmt_seconds(s.get("train_seconds"))) or na()}</td>',
                       f"<td><code>{esc(s['run_id'])}</code></td>" if s.get("run_id") else f"<td>{na()}</td>"]
            detail.append(f'<tr data-run="{esc(name)}" data-seed="{esc(s.get("seed"))}" '
                          f'data-status="{esc(status)}">{"".join(dcells)}</tr>')
    body = "".join(rows) or f'<tr><td colspan="{len(columns)}" class="na">no runs</td></tr>'
    dhead = "".join(f"<th>{esc(c)}</th>" for c in ["run", "seed", "status", *metrics, "parameters",
                                                   "training time", "MLflow run"])
    absent = [n for n in EXPECTED_RUNS if n not in runs]
    note = (f'<p class="note" id="absent-runs">Not in the results: {esc(", ".join(absent))}.</p>'
            if absent else "")
    return ('<section id="runs"><h2>Runs (mean ± sample std over the finished seeds)</h2>'
            '<div class="table-wrap"><table class="data" id="runs-table">'
            f"<thead><tr>{thead}</tr></thead><tbody>{body}</tbody></table></div>{note}"
            '<details id="seed-details"><summary>Per seed</summary><div class="table-wrap">'
            f'<table class="data" id="seeds-table"><thead><tr>{dhead}</tr></thead><tbody>{"".join(detail)}'
            "</tbody></table></div></details></section>")


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


def mean_curve(curves: list[Any]) -> tuple[list[float], list[float], int]:
    """The mean over seeds of [[step, value], ...] curves: at each step some curve has, the mean of
    the curves that have it; also how many curves had points."""
    by_step: dict[float, list[float]] = {}
    n = 0
    for curve in curves:
        xs, ys = _points(curve)
        n += bool(xs)
        for x, y in zip(xs, ys, strict=True):
            by_step.setdefault(x, []).append(y)
    steps = sorted(by_step)
    return steps, [statistics.fmean(by_step[x]) for x in steps], n


def _at(xs: list[float], ys: list[float], x: float) -> float:
    """The curve's value at step x, interpolated linearly (clamped at its ends); xs is not empty."""
    if x <= xs[0]:
        return ys[0]
    for i in range(1, len(xs)):
        if x <= xs[i]:
            t = (x - xs[i - 1]) / (xs[i] - xs[i - 1]) if xs[i] > xs[i - 1] else 1.0
            return ys[i - 1] + t * (ys[i] - ys[i - 1])
    return ys[-1]


def _transitions(seed: dict) -> list[dict]:
    items = seed.get("phase_transitions")
    return [t for t in items if isinstance(t, dict)] if isinstance(items, list) else []


def _curves_figure(runs: dict[str, dict]):
    import plotly.graph_objects as go

    fig = go.Figure()
    for i, (name, run) in enumerate(runs.items()):
        label = str(run.get("label") or name)
        colour = _PALETTE[i % len(_PALETTE)]
        seeds = _seeds(run)
        xs, ys, n = mean_curve([s.get("curve") for s in seeds])
        if xs:
            fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines+markers", name=f"{label} (mean of {n})",
                                     legendgroup=name, line={"color": colour, "width": 2}, marker={"size": 4}))
        ks = sorted({int(k) for s in seeds for k in (s.get("curve_at") or {}) if str(k).isdigit()})
        for j, k in enumerate(ks):
            kx, ky, kn = mean_curve([(s.get("curve_at") or {}).get(str(k)) for s in seeds])
            if kx:
                fig.add_trace(go.Scatter(x=kx, y=ky, mode="lines", name=f"{label} K={k}", legendgroup=f"{name}@K",
                                         line={"color": _K_PALETTE[j % len(_K_PALETTE)], "dash": "dot"}))
        marks = [t for t in (_transitions(seeds[0]) if seeds else []) if _finite(t.get("step")) is not None]
        for t in marks:
            fig.add_vline(x=_finite(t["step"]), line={"color": colour, "width": 1, "dash": "dash"}, opacity=0.6)
        if marks and xs:
            steps = [_finite(t["step"]) for t in marks]
            text = [f"{label} seed {seeds[0].get('seed')} step {s:g}: {t.get('from')} → {t.get('to')}<br>"
                    f"{t.get('reason') or ''}" for s, t in zip(steps, marks, strict=True)]
            fig.add_trace(go.Scatter(x=steps, y=[_at(xs, ys, s) for s in steps], mode="markers",
                                     name=f"{label}: phase changes", legendgroup=name, hovertext=text,
                                     hoverinfo="text", marker={"color": colour, "size": 11, "symbol": "diamond",
                                                               "line": {"color": "#fff", "width": 1}}))
    if not fig.data:
        return None
    fig.update_layout(title="eval/fd over training, mean over seeds (lower is better)", height=560,
                      xaxis_title="training step", yaxis={"type": "log", "title": "eval/fd (log scale)"},
                      margin={"l": 70, "r": 30, "t": 60, "b": 50}, legend={"font": {"size": 11}})
    return fig


def _compute_figure(runs: dict[str, dict]):
    """Final eval/fd (mean ± std over seeds) against network passes per sample: the runs evaluated at
    several K as lines over K, the other runs outside the phase and OT ablations as markers at NFE x R."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for name, run in runs.items():
        label = str(run.get("label") or name)
        ks = [int(k) for k in run.get("eval_nfe") or [] if isinstance(k, int) and k > 0]
        if ks:
            pts = [(k, run_stat(run, f"eval/fd@{k}")) for k in ks]
            pts = [(k, s) for k, s in pts if s is not None and s["mean"] > 0]
            if pts:
                fig.add_trace(go.Scatter(x=[k for k, _ in pts], y=[s["mean"] for _, s in pts], mode="lines+markers",
                                         name=f"{label} (K steps)",
                                         error_y={"type": "data", "array": [s["std"] or 0 for _, s in pts]}))
        elif run.get("group") not in ("phases", "ot"):
            stat = run_stat(run, "eval/fd")
            nfe, reps = _finite(run.get("nfe")) or 1, _finite(run.get("repeats")) or 1
            if stat is not None and stat["mean"] > 0:
                where = "bottom center" if reps > 1 else "top center"
                fig.add_trace(go.Scatter(x=[nfe * reps], y=[stat["mean"]], mode="markers+text", name=label,
                                         text=[label], textposition=where, marker={"size": 11},
                                         error_y={"type": "data", "array": [stat["std"] or 0]}))
    if not fig.data:
        return None
    fig.update_layout(title="final eval/fd (mean ± std over seeds) against network passes per sample", height=440,
                      xaxis={"type": "log", "title": "network passes per sample (NFE x R)", "dtick": math.log10(2)},
                      yaxis={"type": "log", "title": "eval/fd (log scale)"},
                      margin={"l": 70, "r": 30, "t": 60, "b": 50})
    return fig


def _render_plots(runs: dict[str, dict]) -> str:
    parts = []
    plotly_inlined = False
    specs = (("fd-curves", "eval/fd over training steps (mean over seeds)", _curves_figure,
              "No run recorded an eval/fd curve."),
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
    shown = [(n, r) for n, r in runs.items() if r.get("group") == "phases" or any(_transitions(s) for s in _seeds(r))]
    if not shown:
        return ('<section id="phases"><h2>Phase transitions</h2>'
                '<p class="note">No phase-schedule runs in the results.</p></section>')
    rows, quiet = [], []
    for name, run in shown:
        label = esc(run.get("label") or name)
        any_rows = False
        for s in _seeds(run):
            for t in _transitions(s):
                any_rows = True
                step = _finite(t.get("step"))
                rows.append(f'<tr data-run="{esc(name)}" data-seed="{esc(s.get("seed"))}"><td>{label}</td>'
                            f'<td class="num">{esc(s.get("seed"))}</td>'
                            f'<td class="num">{_fmt_int(step) if step is not None else na()}</td>'
                            f"<td>{esc(t.get('from'))} &rarr; {esc(t.get('to'))}</td>"
                            f'<td class="reason">{esc(t.get("reason") or "")}</td></tr>')
        if not any_rows:
            quiet.append(label)
    table = ('<div class="table-wrap"><table class="data" id="phase-transitions"><thead><tr><th>run</th>'
             "<th>seed</th><th>step</th><th>phase</th><th>reason</th></tr></thead>"
             f"<tbody>{''.join(rows)}</tbody></table></div>" if rows else "")
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


def _grid_seed(run: dict | None) -> dict | None:
    """Seed 0's row of `run` (else its first seed's), or None."""
    seeds = _seeds(run)
    return next((s for s in seeds if s.get("seed") == 0), seeds[0] if seeds else None)


def _render_grids(runs: dict[str, dict]) -> str:
    figures = []
    for name in GRID_RUNS:
        run = runs.get(name)
        s = _grid_seed(run)
        label = _label(runs, name)
        if name == "fm" and run and run.get("nfe"):
            label += f" at its own K={run['nfe']}"
        if s is None:
            figures.append(f'<figure class="grid" data-run="{esc(name)}"><div class="placeholder">not in the '
                           f"results</div><figcaption>{esc(label)}</figcaption></figure>")
            continue
        fd = _finite((s.get("metrics") or {}).get("eval/fd") if isinstance(s.get("metrics"), dict) else None)
        caption = f"{esc(label)} &middot; seed {esc(s.get('seed'))} &middot; eval/fd {_num(fd) if fd is not None else 'n/a'}"
        status = s.get("status") or "MISSING"
        if status != "FINISHED":
            caption += f" &middot; {esc(status)}"
        grid = s.get("grid_png")
        if grid is None:
            body = '<div class="placeholder">no grid</div>'
        else:
            try:
                data = _grid_bytes(grid)
                src = f"data:{image_mime(data)};base64,{base64.b64encode(data).decode('ascii')}"
                body = f'<img class="grid-img" alt="samples of {esc(label)}" src="{src}">'
            except GridUnavailable as e:
                body = f'<div class="placeholder">no grid: {esc(e)}</div>'
        figures.append(f'<figure class="grid" data-run="{esc(name)}" data-seed="{esc(s.get("seed"))}">{body}'
                       f"<figcaption>{caption}</figcaption></figure>")
    return ('<section id="grids"><h2>Sample grids (seed 0, side by side)</h2>'
            f'<div class="gallery">{"".join(figures)}</div></section>')


# -- public API --------------------------------------------------------------------------------------
def build_report(results: dict) -> str:
    """One self-contained HTML page describing the results of `jobs/reproduce.py`.

    results: {"title", "created", "parent_run_id", "wall_seconds", "images_per_run", "steps", "seeds",
    "sizes", "tuning", "note", "runs": [run, ...]}; each run: {"name" (unique), "label", "group",
    "method", "size", "nfe", "repeats", "steps", "eval_nfe" ([K, ...] or []), "seeds": [seed, ...]};
    each seed: {"seed", "status" ("FINISHED"/"FAILED"/"MISSING"), "run_id", "params", "train_seconds",
    "metrics" ({"eval/fd", "eval/fd_floor", "eval/cls_acc", "eval/precision", "eval/recall",
    "eval/diversity", "eval/diversity_min", and per K "eval/fd@K", "eval/precision@K", ...}; keys may be
    missing: shown as a dash), "curve" ([[step, fd], ...]), "curve_at" ({"K": curve}), "grid_png"
    (bytes, a path/URI, or None), "phase_transitions" ([{"step", "from", "to", "reason"}, ...])}.
    ValueError when `runs` is not a list of uniquely named dicts; anything else missing shows as a
    dash or a note.
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
        _render_grids(runs),
        _render_plots(runs),
        _render_phases(runs),
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
        for s in _seeds(run) if isinstance(run, dict) else ():
            grid = s.get("grid_png")
            if isinstance(grid, str) and grid.strip() and "://" not in grid and ":/" not in grid:
                grid_path = Path(grid).expanduser()
                s["grid_png"] = str(grid_path if grid_path.is_absolute() else path.parent.resolve() / grid_path)
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m advflow.dashboards.reproduce_report",
                                description="Write the self-contained HTML report of jobs/reproduce.py.")
    p.add_argument("--results", required=True,
                   help="results JSON (the report's input; relative grid_png paths are relative to its folder)")
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
