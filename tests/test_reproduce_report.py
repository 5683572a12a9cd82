"""The reproduction report of jobs/reproduce.py: the aggregation over seeds, the verdict rules, the
claims from synthetic per-seed results, and the page as headless Chromium draws it.

Every expected number is computed here from the synthetic inputs (by hand or with `statistics`), never
copied from the module's output; each verdict rule is checked with numbers made to satisfy it, and a
claim's sentence may only quote numbers derived from the inputs (means, stds, mins, maxes, K, seed
counts). The Chromium tests load the written page with two probes (one records JavaScript errors, one
marks each <img> with its decoded width) and check what was drawn.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import math
import os
import re
import statistics
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from advflow.dashboards import reproduce_report as rr
from advflow.dashboards.reproduce_report import aggregate, assess_claims, build_report, compare, write_report
from chromium import chromium_or_fail, output_dir, run_headless

ERROR_PROBE = ("<script>document.documentElement.setAttribute('data-probe', 'on');"
               "window.addEventListener('error', (e) => { const el = document.documentElement;"
               "el.setAttribute('data-js-errors', (el.getAttribute('data-js-errors') || '') + e.message + ' | '); });"
               "</script>")
DECODE_PROBE = ("<script>window.addEventListener('load', () => { for (const img of document.images) "
                "img.setAttribute('data-natural-width', String(img.naturalWidth)); });</script>")

COVERAGE = ("eval/precision", "eval/recall", "eval/diversity", "eval/diversity_min")
SEEDS = (0, 1, 2)
# Per run and metric, the three seeds' final values; with these every measured claim holds.
FM_AT = {1: [200.0, 210.0, 220.0], 2: [80.0, 90.0, 100.0], 4: [30.0, 32.0, 34.0], 8: [20.0, 21.0, 23.0]}
CAFM_AT = {1: [50.0, 55.0, 60.0], 2: [25.0, 26.0, 27.0], 4: [15.0, 16.0, 18.0], 8: [12.0, 13.0, 14.0]}
CAFM_BUDGET = {"steps": 1200, "warmup": 200, "d_steps": 4, "lr": 0.0001, "g_updates": 200, "d_updates": 1000}
VALUES = {
    "afm_1nfe": {"eval/fd": [10.0, 11.0, 12.0], "eval/precision": [0.8, 0.82, 0.81], "eval/recall": [0.6, 0.62, 0.61],
                 "eval/diversity": [0.9, 0.88, 0.92], "eval/diversity_min": [0.7, 0.6, 0.65]},
    "meanflow": {"eval/fd": [20.0, 22.0, 24.0], "eval/precision": [0.7, 0.72, 0.71], "eval/recall": [0.5, 0.52, 0.51],
                 "eval/diversity": [0.8, 0.78, 0.82], "eval/diversity_min": [0.5, 0.4, 0.45]},
    "meanflow_up": {"eval/fd": [9.0, 11.5, 13.0], "eval/precision": [0.81, 0.8, 0.83], "eval/recall": [0.6, 0.64, 0.6],
                    "eval/diversity": [0.91, 0.9, 0.93], "eval/diversity_min": [0.7, 0.72, 0.71]},
    "fm": {"eval/fd": FM_AT[4], "eval/precision": [0.6, 0.62, 0.61], "eval/recall": [0.4, 0.42, 0.41],
           "eval/diversity": [0.7, 0.72, 0.71], "eval/diversity_min": [0.3, 0.32, 0.31],
           **{f"eval/fd@{k}": v for k, v in FM_AT.items()},
           **{f"eval/recall@{k}": [0.1 * k, 0.1 * k + 0.01, 0.1 * k + 0.02] for k in FM_AT},
           **{f"eval/precision@{k}": [0.15 * k, 0.15 * k + 0.01, 0.15 * k + 0.02] for k in FM_AT},
           **{f"eval/diversity@{k}": [0.2 * k, 0.2 * k + 0.01, 0.2 * k + 0.02] for k in FM_AT}},
    "cafm": {"eval/fd": CAFM_AT[4], "eval/precision": [0.9, 0.91, 0.92], "eval/recall": [0.9, 0.91, 0.92],
             "eval/diversity": [0.9, 0.91, 0.92], **{f"eval/fd@{k}": v for k, v in CAFM_AT.items()},
             **{f"eval/{m}@{k}": [0.9, 0.91, 0.93] for m in ("precision", "recall", "diversity") for k in CAFM_AT}},
    "afm_k2": {"eval/fd": [15.0, 16.0, 17.0], "eval/recall": [0.55, 0.56, 0.57], "eval/diversity": [0.85, 0.86, 0.87]},
    "afm_r2": {"eval/fd": [12.0, 13.0, 14.0], "eval/recall": [0.58, 0.59, 0.6], "eval/diversity": [0.87, 0.88, 0.89]},
    "afm_ot0": {"eval/fd": [30.0, 35.0, 40.0], "eval/recall": [0.2, 0.25, 0.3], "eval/diversity": [0.3, 0.35, 0.4],
                "eval/diversity_min": [0.0, 0.01, 0.02]},
    "phases_manual": {"eval/fd": [11.0, 12.0, 13.0]},
    "phases_auto": {"eval/fd": [10.0, 11.0, 12.5]},
}
SPECS = [  # name, label, group, method, size, nfe, repeats, eval_nfe, params
    ("afm_1nfe", "AFM 1NFE", "afm", "afm", "tiny", 1, 1, [], 123456),
    ("meanflow", "MeanFlow 1NFE", "meanflow", "meanflow", "tiny", 1, 1, [1, 2, 4], 120000),
    ("meanflow_up", "MeanFlow 1NFE, XXS/2", "meanflow", "meanflow", "XXS/2", 1, 1, [1, 2, 4], 800000),
    ("fm", "FM (Euler)", "fm", "fm", "tiny", 4, 1, [1, 2, 4, 8], 118000),
    ("cafm", "CAFM (FM post-trained)", "cafm", "cafm", "tiny", 4, 1, [1, 2, 4, 8], 118000),
    ("afm_k2", "AFM K=2", "multistep", "afm", "tiny", 2, 1, [], 123456),
    ("afm_r2", "AFM 1NFE, R=2", "depth", "afm", "tiny", 1, 2, [], 246912),
    ("afm_ot0", "AFM 1NFE, lambda_ot=0", "ot", "afm", "tiny", 1, 1, [], 123456),
    ("phases_manual", "manual phases", "phases", "afm", "tiny", 1, 1, [], 123456),
    ("phases_auto", "auto phases", "phases", "afm", "tiny", 1, 1, [], 123456),
]
STEPS = [250, 500, 750, 1000]
TRANSITIONS = {
    "phases_manual": [{"step": 500, "from": "decay", "to": "ema", "reason": "hand-placed"}],
    "phases_auto": [{"step": 750, "from": "decay", "to": "ema",
                     "reason": "eval/fd plateaued: <b>not bold</b> & under 1% drop"}],
}


def curve(final: float) -> list[list[float]]:
    """A falling eval/fd curve over STEPS that ends at `final`."""
    return [[s, final * (1 + 3 / (i + 1) - 3 / len(STEPS))] for i, s in enumerate(STEPS)]


def base_results() -> dict:
    """All nine runs x three seeds FINISHED, every measured claim holds, no grids."""
    runs = []
    for i, (name, label, group, method, size, nfe, reps, eval_nfe, params) in enumerate(SPECS):
        seeds = []
        for j, seed in enumerate(SEEDS):
            metrics = {k: v[j] for k, v in VALUES[name].items()}
            seeds.append({"seed": seed, "status": "FINISHED", "run_id": f"r{i}s{seed}", "params": params,
                          "train_seconds": 100.0 + 10 * j, "metrics": metrics, "curve": curve(metrics["eval/fd"]),
                          "curve_at": {str(k): curve(metrics[f"eval/fd@{k}"]) for k in eval_nfe
                                       if f"eval/fd@{k}" in metrics},
                          "grid_png": None, "phase_transitions": copy.deepcopy(TRANSITIONS.get(name, []))})
        runs.append({"name": name, "label": label, "group": group, "method": method, "size": size, "nfe": nfe,
                     "repeats": reps, "steps": 1000 if method == "afm" else 2000, "eval_nfe": eval_nfe,
                     "seeds": seeds})
    return {"title": "advflow reproduction on digits", "created": "2026-12-04T15:00:00Z",
            "parent_run_id": "parent42cafe", "wall_seconds": 3723.4, "images_per_run": 128000, "steps": 1000,
            "seeds": list(SEEDS), "sizes": ["tiny", "XXS/2"], "tuning": "tuning budget: base config",
            "note": "AFM: 2 batches per iteration", "cafm_budget": dict(CAFM_BUDGET), "runs": runs}


def run_of(results: dict, name: str) -> dict:
    return next(r for r in results["runs"] if r["name"] == name)


def set_values(results: dict, name: str, key: str, values: list[float]) -> None:
    for s, v in zip(run_of(results, name)["seeds"], values, strict=True):
        s["metrics"][key] = v


def png(width: int, seed: int) -> bytes:
    """A small PNG whose width identifies its run; a gradient, so it is not one flat colour."""
    img = Image.new("RGB", (width, 24))
    img.putdata([((x * 9 + seed * 50) % 256, (y * 10) % 256, (seed * 70) % 256)
                 for y in range(24) for x in range(width)])
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


# -- a small element tree of a page, for the checks --------------------------------------------------
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class Node:
    def __init__(self, tag: str, attrs: dict[str, str], parent: Node | None) -> None:
        self.tag, self.attrs, self.parent = tag, attrs, parent
        self.children: list[Node | str] = []

    @property
    def classes(self) -> list[str]:
        return self.attrs.get("class", "").split()

    def walk(self):
        yield self
        for child in self.children:
            if isinstance(child, Node):
                yield from child.walk()

    def all(self, tag: str | None = None, cls: str | None = None) -> list[Node]:
        return [n for n in self.walk() if n is not self and (tag is None or n.tag == tag)
                and (cls is None or cls in n.classes)]

    def by_id(self, ident: str) -> Node:
        found = [n for n in self.walk() if n.attrs.get("id") == ident]
        assert len(found) == 1, f"{len(found)} elements with id={ident!r}"
        return found[0]

    def text(self) -> str:
        if self.tag in ("script", "style"):
            return ""
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)


class TreeBuilder(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#root", {}, None)
        self.open = [self.root]

    def handle_starttag(self, tag, attrs):
        node = Node(tag, {k: v or "" for k, v in attrs}, self.open[-1])
        self.open[-1].children.append(node)
        if tag not in VOID:
            self.open.append(node)

    def handle_endtag(self, tag):
        for i in range(len(self.open) - 1, 0, -1):
            if self.open[i].tag == tag:
                del self.open[i:]
                return

    def handle_data(self, data):
        self.open[-1].children.append(data)


def tree(page: str) -> Node:
    builder = TreeBuilder()
    builder.feed(page)
    builder.close()
    return builder.root


# -- aggregation and verdict rules -------------------------------------------------------------------
def test_aggregate_against_hand_computation():
    stat = aggregate([10.0, 11.0, 15.0, float("nan"), None])
    # mean 12; deviations -2, -1, 3 -> sample variance (4 + 1 + 9) / 2 = 7
    assert stat["n"] == 3 and stat["mean"] == pytest.approx(12.0) and stat["std"] == pytest.approx(math.sqrt(7))
    assert (stat["min"], stat["max"]) == (10.0, 15.0)
    one = aggregate([4.0])
    assert one["n"] == 1 and one["std"] is None and one["mean"] == 4.0
    assert aggregate([]) is None and aggregate([float("inf")]) is None
    assert rr.fmt_stat(aggregate([10.0, 11.0, 15.0])) == "12 ± 2.65 (10-15, 3 seeds)"
    assert rr.fmt_stat(one) == "4 (1 seed)" and rr.fmt_stat(None) == "n/a"


def test_run_stat_uses_finished_seeds_only():
    results = base_results()
    run = run_of(results, "afm_1nfe")
    run["seeds"][2]["status"] = "FAILED"
    stat = rr.run_stat(run, "eval/fd")
    assert stat["n"] == 2 and stat["mean"] == pytest.approx(statistics.fmean(VALUES["afm_1nfe"]["eval/fd"][:2]))
    assert rr.run_stat(run_of(results, "fm"), "eval/fd@2")["mean"] == pytest.approx(statistics.fmean(FM_AT[2]))


@pytest.mark.parametrize("a, b, key, relation, expected", [
    ([1.0, 2.0, 3.0], [4.0, 5.0, 6.0], "eval/fd", "beats", "holds"),  # every A below every B
    ([4.0, 5.0, 6.0], [1.0, 2.0, 3.0], "eval/fd", "beats", "does not hold"),  # every B below every A
    ([1.0, 2.0, 5.0], [3.0, 4.0, 6.0], "eval/fd", "beats", "inconclusive"),  # A's mean lower, ranges overlap
    ([3.0, 4.0, 6.0], [1.0, 2.0, 5.0], "eval/fd", "beats", "inconclusive"),  # B's mean lower, ranges overlap
    ([2.0, 2.0], [2.0, 2.0], "eval/fd", "beats", "inconclusive"),  # ties
    ([1.0], [4.0, 5.0, 6.0], "eval/fd", "beats", "incomplete"),  # one seed of A
    ([1.0, 2.0], [4.0], "eval/fd", "beats", "incomplete"),
    ([0.8, 0.9], [0.1, 0.2], "eval/recall", "beats", "holds"),  # higher is better
    ([0.1, 0.2], [0.8, 0.9], "eval/recall", "beats", "does not hold"),
    ([1.0, 2.0, 5.0], [3.0, 4.0, 6.0], "eval/fd", "no worse", "holds"),  # mean no worse
    ([3.0, 4.0, 6.0], [1.0, 2.0, 5.0], "eval/fd", "no worse", "inconclusive"),  # mean worse, within spread
    ([4.0, 5.0], [1.0, 2.0], "eval/fd", "no worse", "does not hold"),
    ([3.0, 4.0, 6.0], [1.0, 2.0, 5.0], "eval/fd", "approaches", "holds"),  # worse mean but overlapping
    ([4.0, 5.0], [1.0, 2.0], "eval/fd", "approaches", "does not hold"),
    ([1.0], [1.0, 2.0], "eval/fd", "approaches", "incomplete"),
])
def test_compare_rules(a, b, key, relation, expected):
    assert compare(a, b, key, relation) == expected


def test_combine_and_direction():
    assert rr.combine(["holds", "holds"]) == "holds"
    assert rr.combine(["holds", "does not hold"]) == "does not hold"
    assert rr.combine(["holds", "inconclusive"]) == "inconclusive"
    assert rr.combine(["incomplete", "holds"]) == "incomplete"
    assert rr.lower_is_better("eval/fd") and rr.lower_is_better("eval/fd@4")
    assert not any(rr.lower_is_better(k) for k in COVERAGE)


# -- the claims --------------------------------------------------------------------------------------
def verdicts(results: dict) -> dict[str, str]:
    return {c["id"]: c["verdict"] for c in assess_claims(results)}


MEASURED_IDS = ["a1", "a2", "b1", "b2", "b4", "c", "d", "e", "f1", "f2", "f4", "f8"]
NUMBER = re.compile(r"\d+(?:\.\d+)?")


def allowed_numbers(results: dict) -> set[str]:
    """The numbers a sentence may quote: per run and metric the mean, std, min and max over its finished
    seeds (3 significant digits), K, seed counts, MIN_SEEDS, digits in run names and labels."""
    allowed = {str(rr.MIN_SEEDS), "0"} | {str(n) for n in range(len(SEEDS) + 1)}
    budget = results.get("cafm_budget") or {}  # the CAFM claim's sentence names its budget
    allowed |= set(NUMBER.findall(" ".join(f"{v:,}" if isinstance(v, int) else str(v) for v in budget.values())))
    for run in results["runs"]:
        allowed |= set(NUMBER.findall(run["name"] + " " + run["label"]))
        allowed |= {str(k) for k in run["eval_nfe"]}
        keys = {k for s in run["seeds"] for k in s["metrics"]}
        for key in keys:
            vals = [s["metrics"][key] for s in run["seeds"] if s["status"] == "FINISHED" and key in s["metrics"]
                    and isinstance(s["metrics"][key], float) and math.isfinite(s["metrics"][key])]
            if vals:
                nums = [statistics.fmean(vals), min(vals), max(vals)]
                if len(vals) > 1:
                    nums.append(statistics.stdev(vals))
                allowed |= {f"{x:.3g}" for x in nums}
    return allowed


def check_sentences(results: dict) -> None:
    allowed = allowed_numbers(results)
    for c in assess_claims(results):
        quoted = set(NUMBER.findall(c["sentence"].replace("ImageNet 256", "")))
        if c["verdict"] == "needs ImageNet scale":
            continue
        assert quoted <= allowed, (c["sentence"], quoted - allowed)


def test_every_measured_claim_holds_on_the_base_and_quotes_the_input():
    results = base_results()
    claims = assess_claims(results)
    assert [c["claim"] for c in claims] == list(rr.CLAIMS)
    assert [c["id"] for c in claims[:len(MEASURED_IDS)]] == MEASURED_IDS
    assert [c["verdict"] for c in claims[:len(MEASURED_IDS)]] == ["holds"] * len(MEASURED_IDS)
    by = {c["id"]: c for c in claims}
    afm = aggregate(VALUES["afm_1nfe"]["eval/fd"])
    mf = aggregate(VALUES["meanflow"]["eval/fd"])
    # mean ± std (min-max, n seeds) of both groups, as computed here
    assert f"{afm['mean']:.3g} ± {afm['std']:.3g} ({afm['min']:.3g}-{afm['max']:.3g}, 3 seeds)" in by["a1"]["sentence"]
    assert f"{mf['mean']:.3g} ± {mf['std']:.3g} ({mf['min']:.3g}-{mf['max']:.3g}, 3 seeds)" in by["a1"]["sentence"]
    assert "AFM 1NFE better on every seed" in by["a1"]["sentence"]
    recall = statistics.fmean(VALUES["afm_1nfe"]["eval/recall"]), statistics.fmean(VALUES["meanflow"]["eval/recall"])
    assert f"recall {recall[0]:.3g} vs {recall[1]:.3g}" in by["a1"]["sentence"]
    assert "within the seed spread" in by["a2"]["sentence"]  # approaches: overlapping ranges
    for k in (1, 2, 4):
        fm = aggregate(FM_AT[k])
        assert f"vs FM (Euler) at K={k} {fm['mean']:.3g} ± {fm['std']:.3g} (" in by[f"b{k}"]["sentence"]
        group_b = by[f"b{k}"]["groups"][1]
        assert group_b["k"] == k and group_b["stats"]["eval/recall"]["mean"] == pytest.approx(
            statistics.fmean(VALUES["fm"][f"eval/recall@{k}"]))
    assert "diversity" in by["d"]["sentence"] and "recall" in by["d"]["sentence"]
    assert by["d"]["deciding"] == ["eval/diversity", "eval/recall"]
    check_sentences(results)


def test_imagenet_claims_are_labelled_not_refuted():
    claims = assess_claims(base_results())
    imagenet = [c for c in claims if c["id"].startswith("imagenet")]
    assert len(imagenet) == len(rr.IMAGENET_CLAIMS) >= 3
    assert all(c["verdict"] == "needs ImageNet scale" for c in imagenet)
    assert any("2.38" in c["claim"] for c in imagenet)
    assert not any(c["verdict"] == "does not hold" for c in imagenet)
    # Even with no runs at all they stay "needs ImageNet scale", never incomplete or refuted.
    assert [c["verdict"] for c in assess_claims({"runs": []}) if c["id"].startswith("imagenet")] == \
        ["needs ImageNet scale"] * len(imagenet)


@pytest.mark.parametrize("change, expected, must_say", [
    # MeanFlow better on every seed -> a1 does not hold
    (lambda r: set_values(r, "meanflow", "eval/fd", [5.0, 6.0, 7.0]), {"a1": "does not hold"},
     ["MeanFlow 1NFE better on every seed"]),
    # MeanFlow overlapping with AFM, mean worse -> inconclusive
    (lambda r: set_values(r, "meanflow", "eval/fd", [9.0, 12.5, 13.0]), {"a1": "inconclusive"},
     ["within the seed spread"]),
    # MeanFlow one size up better on every seed -> does not approach
    (lambda r: set_values(r, "meanflow_up", "eval/fd", [2.0, 3.0, 4.0]), {"a2": "does not hold"}, []),
    # FM at K=4 overlapping with AFM; FM at K=2 better everywhere
    (lambda r: set_values(r, "fm", "eval/fd@4", [11.5, 12.5, 30.0]), {"b4": "inconclusive"}, ["K=4"]),
    (lambda r: set_values(r, "fm", "eval/fd@2", [1.0, 2.0, 3.0]), {"b2": "does not hold"}, []),
    # R=2 worse than K=2 everywhere
    (lambda r: set_values(r, "afm_r2", "eval/fd", [20.0, 21.0, 22.0]), {"c": "does not hold"}, []),
    # the OT run collapses no more than AFM in recall (overlap) -> d inconclusive
    (lambda r: set_values(r, "afm_ot0", "eval/recall", [0.55, 0.6, 0.65]), {"d": "inconclusive"}, []),
    # ... more diverse on every seed -> d does not hold
    (lambda r: set_values(r, "afm_ot0", "eval/diversity", [0.95, 0.96, 0.97]), {"d": "does not hold"}, []),
    # auto worse on average within the spread -> inconclusive; worse on every seed -> does not hold
    (lambda r: set_values(r, "phases_auto", "eval/fd", [11.5, 12.5, 13.5]), {"e": "inconclusive"}, []),
    (lambda r: set_values(r, "phases_auto", "eval/fd", [14.0, 15.0, 16.0]), {"e": "does not hold"}, []),
])
def test_verdicts_follow_the_numbers(change, expected, must_say):
    results = base_results()
    change(results)
    got = verdicts(results)
    assert {k: got[k] for k in MEASURED_IDS[:8]} == {k: expected.get(k, "holds") for k in MEASURED_IDS[:8]}
    changed = [c["sentence"] for c in assess_claims(results) if c["id"] in expected]
    for text in must_say:
        assert any(text in s for s in changed), (text, changed)
    check_sentences(results)


def test_incomplete_below_two_finished_seeds():
    results = base_results()
    mf = run_of(results, "meanflow")
    mf["seeds"][1]["status"] = "FAILED"
    mf["seeds"][2]["status"] = "MISSING"
    results["runs"] = [r for r in results["runs"] if r["name"] != "afm_ot0"]
    run_of(results, "afm_k2")["seeds"] = run_of(results, "afm_k2")["seeds"][:1]
    by = {c["id"]: c for c in assess_claims(results)}
    assert by["a1"]["verdict"] == "incomplete" and by["a2"]["verdict"] == "holds"
    assert "meanflow has 1 finished seed with a finite eval/fd (needs 2; 1 FINISHED, 1 FAILED, 1 MISSING)" in \
        by["a1"]["sentence"]
    assert by["d"]["verdict"] == "incomplete" and "afm_ot0 is not in the results" in by["d"]["sentence"]
    assert by["c"]["verdict"] == "incomplete" and "afm_k2 has 1 finished seed" in by["c"]["sentence"]
    # two finished seeds are enough
    mf["seeds"][2]["status"] = "FINISHED"
    assert verdicts(results)["a1"] == "holds"
    check_sentences(results)


def test_bad_runs_are_refused():
    results = base_results()
    results["runs"].append(copy.deepcopy(results["runs"][0]))
    with pytest.raises(ValueError, match="afm_1nfe"):
        assess_claims(results)
    with pytest.raises(ValueError, match="list"):
        build_report({"runs": {"afm_1nfe": {}}})


def check_claims(dom: Node, results: dict) -> None:
    rows = dom.by_id("claims-table").all("tbody")[0].all("tr", "claim")
    expected = assess_claims(results)
    assert len(rows) == len(expected) == len(rr.CLAIMS)
    for row, claim in zip(rows, expected, strict=True):
        badges = row.all("span", "verdict")
        assert len(badges) == 1 and claim["verdict"].replace(" ", "-") in badges[0].classes
        assert badges[0].text() == claim["verdict"] and row.attrs["data-verdict"] == claim["verdict"]
        assert claim["claim"] in row.text() and claim["sentence"] in row.text()


# -- the static page ---------------------------------------------------------------------------------
def test_page_holds_each_claim_groups_and_coverage_columns():
    results = base_results()
    dom = tree(build_report(results))
    check_claims(dom, results)
    # Each measured claim's groups: mean ± std (min-max) of fd, precision, recall, diversity.
    row = [r for r in dom.by_id("claims-table").all("tr", "claim") if r.attrs["data-claim"] == "a1"][0]
    groups = {td.attrs["data-group"]: td for td in row.all("td", "group")}
    assert groups["A"].attrs["data-run"] == "afm_1nfe" and groups["B"].attrs["data-run"] == "meanflow"
    for role, name in (("A", "afm_1nfe"), ("B", "meanflow")):
        cells = {d.attrs["data-metric"]: d.text() for d in groups[role].all("div") if "data-metric" in d.attrs}
        assert list(cells) == ["eval/fd", "eval/precision", "eval/recall", "eval/diversity"]
        for key, text in cells.items():
            s = aggregate(VALUES[name][key])
            assert f"{s['mean']:.3g} ± {s['std']:.3g} ({s['min']:.3g}-{s['max']:.3g}, 3 seeds)" in text, (key, text)
    # Runs table: coverage columns and fd@K beside eval/fd, mean ± std per run.
    table = dom.by_id("runs-table")
    header = [th.text() for th in table.all("th")]
    for column in ("eval/fd", "eval/fd@1", "eval/fd@2", "eval/fd@4", *COVERAGE, "parameters", "training time",
                   "seeds", "size"):
        assert column in header, column
    rows = {r.attrs["data-run"]: r for r in table.all("tbody")[0].all("tr")}
    assert list(rows) == [s[0] for s in SPECS]
    for name, row in rows.items():
        tds = row.all("td")
        assert len(tds) == len(header)
        cells = {td.attrs["data-metric"]: td.text() for td in tds if "data-metric" in td.attrs}
        for key in ("eval/fd", *COVERAGE):
            if key in VALUES[name]:
                s = aggregate(VALUES[name][key])
                assert cells[key] == f"{s['mean']:.3g} ± {s['std']:.3g}", (name, key)
            else:
                assert cells[key] == "\u2014", (name, key)
        at2 = {"fm": FM_AT[2], "cafm": CAFM_AT[2]}.get(name)
        assert cells["eval/fd@2"] == ("\u2014" if at2 is None else
                                      f"{statistics.fmean(at2):.3g} ± {statistics.stdev(at2):.3g}")
        assert "3/3" in row.text()
    # Per-seed details: one row per (run, seed) with its raw values.
    details = dom.by_id("seeds-table").all("tbody")[0].all("tr")
    assert len(details) == len(SPECS) * len(SEEDS)
    first = [d for d in details if d.attrs["data-run"] == "afm_ot0" and d.attrs["data-seed"] == "1"][0]
    cells = {td.attrs["data-metric"]: td.text() for td in first.all("td") if "data-metric" in td.attrs}
    assert cells["eval/diversity_min"] == f"{VALUES['afm_ot0']['eval/diversity_min'][1]:.3g}"
    # Header: sizes, steps, images, seeds, wall time, tuning budget.
    head = dom.all("header")[0].text()
    for text in ("tiny, XXS/2", "1,000 AFM steps", "128,000 images per run", "seeds 0 1 2", "1h 02m 03s",
                 results["tuning"], results["note"]):
        assert text in head, text


def test_empty_results_render_without_plotly():
    page = build_report({"runs": []})
    dom = tree(page)
    assert "plotly" not in page.lower()  # no figure, so no plotly.js either
    got = [r.attrs["data-verdict"] for r in dom.by_id("claims-table").all("tr", "claim")]
    assert got == ["incomplete"] * len(MEASURED_IDS) + ["needs ImageNet scale"] * len(rr.IMAGENET_CLAIMS)
    assert "No run recorded an eval/fd curve." in dom.by_id("plot-fd-curves").text()
    assert all(n in dom.by_id("absent-runs").text() for n in rr.EXPECTED_RUNS)


def test_text_is_escaped():
    results = base_results()
    results["title"] = "<script>alert(1)</script> & digits"
    run_of(results, "afm_1nfe")["label"] = "AFM <i>1</i>NFE"
    page = build_report(results)
    dom = tree(page)
    assert "<script>alert(1)" not in page
    assert dom.all("h1")[0].text() == results["title"]
    assert "AFM <i>1</i>NFE" in dom.by_id("runs-table").text()
    assert dom.by_id("runs-table").all("i") == [] and dom.by_id("claims-table").all("i") == []


def test_mean_curve_averages_the_seeds():
    xs, ys, n = rr.mean_curve([[[1, 2.0], [2, 4.0]], [[1, 4.0], [2, 8.0], [3, 1.0]], []])
    assert (xs, n) == ([1, 2, 3], 2) and ys == pytest.approx([3.0, 6.0, 1.0])


# -- the page in Chromium ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chromium_binary() -> str:
    return chromium_or_fail()


def render(page: str, tmp_path: Path, name: str, screenshot: Path | None = None) -> Node:
    probed = tmp_path / f"{name}-probed.html"
    probed.write_text(page.replace("<head>", "<head>" + ERROR_PROBE, 1).replace("</body>", DECODE_PROBE + "</body>"),
                      encoding="utf-8")
    dom = tree(run_headless(probed, dump_dom=True, screenshot=screenshot))
    html_el = dom.all("html")[0]
    assert html_el.attrs.get("data-probe") == "on", "the error probe did not run"
    assert "data-js-errors" not in html_el.attrs, f"JavaScript errors: {html_el.attrs.get('data-js-errors')}"
    return dom


def main_svgs(node: Node) -> int:
    return len([n for n in node.all("svg", "main-svg")])


def legend(node: Node) -> list[str]:
    return [n.text() for n in node.all("text", "legendtext")]


@pytest.mark.integration
def test_report_renders_in_chromium(tmp_path, chromium_binary):
    results = base_results()
    set_values(results, "phases_auto", "eval/fd", [14.0, 15.0, 16.0])  # -> e does not hold
    failed = run_of(results, "afm_r2")  # two failed seeds -> c incomplete
    for s in failed["seeds"][1:]:
        s["status"], s["metrics"] = "FAILED", {}
    widths = {}
    for i, name in enumerate(rr.GRID_RUNS):
        widths[name] = 24 + 8 * i
        data = png(widths[name], seed=i)
        seed0 = run_of(results, name)["seeds"][0]
        if i % 2:
            seed0["grid_png"] = data
        else:
            path = tmp_path / "grids" / f"{name}.png"
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(data)
            seed0["grid_png"] = str(path)
    expected = verdicts(results)
    assert expected["e"] == "does not hold" and expected["c"] == "incomplete" and expected["a1"] == "holds"

    report = write_report(results, tmp_path / "site" / "report.html")
    page = report.read_text(encoding="utf-8")
    assert "http://" not in page.split("<script", 1)[0] and 'src="http' not in page  # nothing fetched
    assert page.count("* plotly.js v") == 1, "plotly.js must be inlined exactly once"

    out = output_dir()
    shot = out / "reproduce_report.png"
    shot.unlink(missing_ok=True)
    dom = render(page, tmp_path, "full", screenshot=shot)
    (out / "reproduce_report.html").write_text(page, encoding="utf-8")  # for a human to open

    check_claims(dom, results)
    assert [r.attrs["data-run"] for r in dom.by_id("runs-table").all("tbody")[0].all("tr")] == [s[0] for s in SPECS]
    r2 = [r for r in dom.by_id("runs-table").all("tr") if r.attrs.get("data-run") == "afm_r2"][0]
    assert "1/3" in r2.text() and "2 FAILED" in r2.text()
    curves = dom.by_id("plot-fd-curves")
    assert main_svgs(curves) >= 1 and main_svgs(dom.by_id("plot-fd-vs-compute")) >= 1
    names = legend(curves)
    for _, label, *_ in SPECS:  # a failed seed's (partial) curve still counts in the mean
        assert f"{label} (mean of {len(SEEDS)})" in names, (label, names)
    assert {f"FM (Euler) K={k}" for k in FM_AT} <= set(names)
    assert {"manual phases: phase changes", "auto phases: phase changes"} <= set(names)
    phase_rows = dom.by_id("phase-transitions").all("tbody")[0].all("tr")
    assert len(phase_rows) == sum(len(v) for v in TRANSITIONS.values()) * len(SEEDS)
    assert TRANSITIONS["phases_auto"][0]["reason"] in dom.by_id("phases").text()
    figures = dom.by_id("grids").all("figure", "grid")
    assert [f.attrs["data-run"] for f in figures] == list(rr.GRID_RUNS)
    for fig in figures:
        imgs = fig.all("img")
        assert len(imgs) == 1 and imgs[0].attrs.get("data-natural-width") == str(widths[fig.attrs["data-run"]])
        assert "seed 0" in fig.all("figcaption")[0].text()
    assert "at its own K=4" in figures[2].text()
    with Image.open(shot) as img:
        colours = img.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50, "screenshot is (nearly) a single colour"


@pytest.mark.integration
def test_report_with_missing_runs_and_no_grids_renders(tmp_path, chromium_binary):
    results = base_results()
    results["runs"] = [r for r in results["runs"] if r["name"] not in ("meanflow", "afm_ot0")]
    for s in run_of(results, "fm")["seeds"]:
        s["status"] = "FAILED"
    results["parent_run_id"] = None
    dom = render(build_report(results), tmp_path, "degraded")
    check_claims(dom, results)
    got = verdicts(results)
    assert [got[k] for k in ("a1", "b1", "b2", "b4", "d")] == ["incomplete"] * 5 and got["c"] == "holds"
    assert "meanflow" in dom.by_id("absent-runs").text() and "afm_ot0" in dom.by_id("absent-runs").text()
    assert "parent run none" in dom.all("header")[0].text()
    assert main_svgs(dom.by_id("plot-fd-curves")) >= 1
    assert dom.by_id("grids").all("img") == []
    assert "not in the results" in dom.by_id("grids").text()


# -- CLI, atomic write -------------------------------------------------------------------------------
def test_cli_resolves_grid_paths_next_to_the_json(tmp_path, capsys):
    results = base_results()
    data = png(40, seed=3)
    (tmp_path / "job" / "grids").mkdir(parents=True)
    (tmp_path / "job" / "grids" / "afm.png").write_bytes(data)
    run_of(results, "afm_1nfe")["seeds"][0]["grid_png"] = "grids/afm.png"  # relative to the JSON's folder
    src = tmp_path / "job" / "report_input.json"
    src.write_text(json.dumps(results))
    out = tmp_path / "reports" / "deep" / "report.html"
    assert rr.main(["--results", str(src), "--out", str(out)]) == 0
    assert str(out.resolve()) in capsys.readouterr().out
    dom = tree(out.read_text(encoding="utf-8"))
    img = [f for f in dom.all("figure", "grid") if f.attrs["data-run"] == "afm_1nfe"][0].all("img")[0]
    assert base64.b64decode(img.attrs["src"].split(",", 1)[1]) == data
    (tmp_path / "bad.json").write_text("{not json")
    assert rr.main(["--results", str(tmp_path / "bad.json"), "--out", str(out)]) == 2
    assert "not valid JSON" in capsys.readouterr().err


@pytest.mark.integration
def test_module_runs_as_advertised(tmp_path):
    src = tmp_path / "report_input.json"
    src.write_text(json.dumps(base_results()))
    proc = subprocess.run([sys.executable, "-m", "advflow.dashboards.reproduce_report", "--results", str(src),
                           "--out", str(tmp_path / "m.html")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "m.html").read_text(encoding="utf-8").count("* plotly.js v") == 1


def test_write_is_atomic(tmp_path, monkeypatch):
    out = tmp_path / "reports" / "report.html"
    out.parent.mkdir()
    out.write_text("previous")

    def boom(results):
        raise RuntimeError("render failed")

    monkeypatch.setattr(rr, "build_report", boom)
    with pytest.raises(RuntimeError, match="render failed"):
        write_report(base_results(), out)
    assert out.read_text() == "previous" and sorted(p.name for p in out.parent.iterdir()) == ["report.html"]
    monkeypatch.undo()

    def no_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", no_replace)
    with pytest.raises(OSError, match="disk full"):
        write_report(base_results(), out)
    assert out.read_text() == "previous" and sorted(p.name for p in out.parent.iterdir()) == ["report.html"]


# -- the CAFM claim ----------------------------------------------------------------------------------
def cafm_claims(results: dict) -> dict[str, dict]:
    return {c["id"]: c for c in assess_claims(results) if c["id"].startswith("f")}


def test_cafm_claim_one_row_per_k_names_the_budget_and_the_numbers():
    claims = cafm_claims(base_results())
    assert list(claims) == ["f1", "f2", "f4", "f8"]
    for k, c in zip((1, 2, 4, 8), claims.values(), strict=True):
        assert c["verdict"] == "holds" and f"K = {k}" in c["claim"]
        assert [(g["run"], g["k"]) for g in c["groups"]] == [("cafm", k), ("fm", k)]
        assert "200 G updates, 1,000 D updates" in c["sentence"]
        a, b = CAFM_AT[k], FM_AT[k]
        assert f"{statistics.fmean(a):.3g} ± {statistics.stdev(a):.3g}" in c["sentence"]
        assert f"{statistics.fmean(b):.3g} ± {statistics.stdev(b):.3g}" in c["sentence"]
        assert c["groups"][0]["stats"]["eval/recall"]["mean"] == pytest.approx(statistics.fmean([0.9, 0.91, 0.93]))
    check_sentences(base_results())


def test_cafm_claim_verdicts_follow_the_numbers():
    results = base_results()
    set_values(results, "cafm", "eval/fd@1", [300.0, 310.0, 320.0])  # worse than FM on every seed
    set_values(results, "cafm", "eval/fd@2", [85.0, 95.0, 99.0])  # mean 93 worse than 90, ranges overlap
    set_values(results, "cafm", "eval/fd@4", [29.0, 31.0, 35.0])  # mean 31.7 better than 32, ranges overlap
    claims = cafm_claims(results)
    assert claims["f1"]["verdict"] == "does not hold"
    assert claims["f2"]["verdict"] == "inconclusive" and "within the seed spread" in claims["f2"]["sentence"]
    assert claims["f4"]["verdict"] == "inconclusive"
    assert claims["f8"]["verdict"] == "holds"
    for s in run_of(results, "cafm")["seeds"][1:]:
        s["status"] = "SKIPPED"
    claims = cafm_claims(results)
    assert {c["verdict"] for c in claims.values()} == {"incomplete"}
    assert "cafm has 1 finished seed" in claims["f8"]["sentence"] and "2 SKIPPED" in claims["f8"]["sentence"]


def test_page_holds_the_cafm_claim_and_budget():
    html = build_report(base_results())
    dom = tree(html)
    rows = {r.attrs["data-claim"]: r for r in dom.by_id("claims-table").all("tr", "claim")}
    for k in (1, 2, 4, 8):
        assert rows[f"f{k}"].attrs["data-verdict"] == "holds"
    assert "200 G updates, 1,000 D updates" in dom.by_id("cafm-budget").text()
    assert "eval/fd@8" in html and 'data-run="cafm"' in html
    no_budget = base_results()
    del no_budget["cafm_budget"]
    assert 'id="cafm-budget"' not in build_report(no_budget)
    assert "budget: unknown" in cafm_claims(no_budget)["f1"]["sentence"]
