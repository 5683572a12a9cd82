"""The reproduction report of jobs/reproduce.py: claim verdicts from fake results, and the page as
headless Chromium draws it.

`assess_claims` is checked against hand-built results whose numbers are flipped one at a time, so each
verdict must follow the numbers; its sentences may only quote numbers the input holds (or ratios of
them, the paper's, our threshold). The Chromium tests load the written page with two probes (one
records JavaScript errors, one marks each <img> with its decoded width) and check what was drawn:
one claim entry per claim with its verdict class, one table row per run, plotly's svgs in both plot
divs, every grid decoded at the width the test drew it at; a page with a missing run, a failed run
and no grids renders too. The rest parses the static page: escaping, the CLI, the atomic write.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import math
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from advflow.dashboards import reproduce_report
from advflow.dashboards.reproduce_report import assess_claims, build_report, write_report
from chromium import chromium_or_fail, output_dir, run_headless


# Probes added to the written page before Chromium loads it: the first (in <head>, so it sees errors of
# every later script) records JavaScript errors on <html>; the second marks each image's decoded width.
ERROR_PROBE = ("<script>document.documentElement.setAttribute('data-probe', 'on');"
               "window.addEventListener('error', (e) => { const el = document.documentElement;"
               "el.setAttribute('data-js-errors', (el.getAttribute('data-js-errors') || '') + e.message + ' | '); });"
               "</script>")
DECODE_PROBE = ("<script>window.addEventListener('load', () => { for (const img of document.images) "
                "img.setAttribute('data-natural-width', String(img.naturalWidth)); });</script>")

# Final eval/fd per run: with these every claim holds (lower is better).
FD = {"afm_1nfe": 12.5, "afm_k2": 11.25, "afm_k4": 10.75, "afm_r2": 10.5, "afm_r4": 9.75,
      "phases_none": 14.5, "phases_manual": 13.25, "phases_auto": 12.75}
FM_FD_AT = {1: 250.0, 2: 120.0, 4: 40.0, 8: 15.0, 16: 10.0, 32: 9.5}
FM_NFE = 32
SPECS = [  # name, label, group, method, nfe, repeats, params
    ("afm_1nfe", "AFM 1NFE", "afm", "afm", 1, 1, 123456),
    ("fm", "FM", "fm", "fm", FM_NFE, 1, 118000),
    ("afm_k2", "AFM K=2", "multistep", "afm", 2, 1, 123456),
    ("afm_k4", "AFM K=4", "multistep", "afm", 4, 1, 123456),
    ("afm_r2", "AFM R=2", "depth", "afm", 1, 2, 246912),
    ("afm_r4", "AFM R=4", "depth", "afm", 1, 4, 493824),
    ("phases_none", "no phases", "phases", "afm", 1, 1, 123456),
    ("phases_manual", "manual phases", "phases", "afm", 1, 1, 123456),
    ("phases_auto", "auto phases", "phases", "afm", 1, 1, 123456),
]
STEPS = [250, 500, 750, 1000, 1250, 1500, 1750, 2000]
TRANSITIONS = {
    "phases_manual": [{"step": 750, "from": "warmup", "to": "decay", "reason": "hand-placed at step 750"},
                      {"step": 1500, "from": "decay", "to": "ema", "reason": "hand-placed at step 1500"}],
    "phases_auto": [{"step": 1000, "from": "decay", "to": "ema",
                     "reason": "eval/fd plateaued: <b>not bold</b> & under 1% drop over 3 evals"}],
}


COVERAGE = ("eval/precision", "eval/recall", "eval/diversity", "eval/diversity_min")


def coverage(i: int) -> dict[str, float]:
    """Run i's mode coverage; the phase ablations (i >= 6) predate it and have none."""
    if i >= 6:
        return {}
    return {"eval/precision": round(0.8 - i / 40, 4), "eval/recall": round(0.55 + i / 50, 4),
            "eval/diversity": round(0.9 - i / 30, 4), "eval/diversity_min": round(0.7 - i / 9, 4)}


def curve(final: float) -> list[list[float]]:
    """A falling eval/fd curve over STEPS that ends at `final`."""
    return [[s, round(final * (1 + 6 / (i + 1) - 6 / len(STEPS)), 4)] for i, s in enumerate(STEPS)]


def base_results() -> dict:
    """All nine runs FINISHED, every claim reproduced, no grids."""
    runs = []
    for i, (name, label, group, method, nfe, reps, params) in enumerate(SPECS):
        fm = method == "fm"
        fd = FM_FD_AT[FM_NFE] if fm else FD[name]
        runs.append({
            "name": name, "label": label, "group": group, "method": method, "nfe": nfe, "repeats": reps,
            "params": params, "train_seconds": 100.0 + 37.5 * i, "status": "FINISHED", "run_id": f"run{i:02d}beef",
            "metrics": {"eval/fd": fd, "eval/fd_floor": 3.25, "eval/cls_acc": round(0.9 + i / 200, 3),
                        **coverage(i)},
            "fd_at": {str(k): v for k, v in FM_FD_AT.items()} if fm else {},
            "curve": curve(fd),
            "curve_at": {str(k): curve(v) for k, v in FM_FD_AT.items()} if fm else {},
            "grid_png": None,
            "phase_transitions": copy.deepcopy(TRANSITIONS.get(name, [])),
        })
    return {"title": "advflow reproduction on digits", "created": "2026-12-04T15:00:00Z",
            "parent_run_id": "parent42cafe", "wall_seconds": 3723.4, "images_per_run": 128000, "runs": runs}


def run_of(results: dict, name: str) -> dict:
    return next(r for r in results["runs"] if r["name"] == name)


def drop(results: dict, name: str) -> None:
    results["runs"] = [r for r in results["runs"] if r["name"] != name]


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


# -- assess_claims -----------------------------------------------------------------------------------
NUMBER = re.compile(r"\d+(?:\.\d+)?")


def allowed_numbers(results: dict) -> set[str]:
    """Every number a sentence may quote: the input's eval/fd values and K, ratios of them, the
    paper's numbers, our thresholds, and digits inside run names/labels."""
    allowed = {"256", f"{reproduce_report.APPROACH_RATIO:g}", f"{reproduce_report.MULTISTEP_RATIO:g}"}
    allowed |= set(NUMBER.findall(reproduce_report.PAPER_DEPTH_NUMBERS))
    fds = {}
    for run in results["runs"]:
        allowed |= set(NUMBER.findall(run["name"] + " " + run["label"]))
        fd = run["metrics"].get("eval/fd")
        if isinstance(fd, float) and math.isfinite(fd):
            fds[run["name"]] = fd
            allowed.add(f"{fd:.4g}")
        for k, v in run["fd_at"].items():
            allowed |= {k, f"{v:.4g}"}
            fds[f"fm@{k}"] = v
    allowed |= {f"{a / b:.2f}" for a in fds.values() for b in fds.values() if b}
    return allowed


def verdicts(results: dict) -> list[str]:
    return [c["verdict"] for c in assess_claims(results)]


def test_all_claims_reproduced_and_sentences_quote_the_input():
    results = base_results()
    claims = assess_claims(results)
    assert [c["claim"] for c in claims] == list(reproduce_report.CLAIMS)
    assert [c["verdict"] for c in claims] == ["reproduced"] * 5
    few, many, multi, depth, phases = (c["sentence"] for c in claims)
    assert f"{FD['afm_1nfe']:g}" in few and all(f"{FM_FD_AT[k]:g} at K={k}" in few for k in (1, 2, 4))
    best_k = min((k for k in FM_FD_AT if k >= 8), key=FM_FD_AT.get)
    assert f"{FM_FD_AT[best_k]:g} (K={best_k}" in many
    assert f"{FD['afm_1nfe'] / FM_FD_AT[best_k]:.2f}x" in many and "1.5x" in many
    for name in ("afm_1nfe", "afm_k2", "afm_k4"):
        assert f"{run_of(results, name)['label']} {FD[name]:g}" in multi
    for name in ("afm_r2", "afm_k2", "afm_r4", "afm_k4"):
        assert f"{FD[name]:g}" in depth
    for paper in ("2.08", "2.11", "1.94", "2.02"):
        assert paper in depth
    for name in ("phases_auto", "phases_manual", "phases_none"):
        assert f"{FD[name]:g}" in phases
    allowed = allowed_numbers(results)
    for c in claims:
        quoted = set(NUMBER.findall(c["sentence"]))
        assert quoted <= allowed, (c["sentence"], quoted - allowed)


def set_fd(name: str, value: float):
    def apply(results):
        run_of(results, name)["metrics"]["eval/fd"] = value
    return apply


def both(*changes):
    def apply(results):
        for change in changes:
            change(results)
    return apply


def set_fm_k(k: int, value: float):
    def apply(results):
        run_of(results, "fm")["fd_at"][str(k)] = value
    return apply


@pytest.mark.parametrize("change, flipped, must_say", [
    # FM at K=4 drops below AFM 1NFE's 12.5: AFM no longer beats FM at every few-step K.
    (set_fm_k(4, FD["afm_1nfe"] - 0.5), {0: "not reproduced"}, ["K=4", f"{FD['afm_1nfe'] - 0.5:g}"]),
    # FM's best many-step fd falls so that AFM 1NFE is 12.5 / 8 = 1.5625x of it (> 1.5).
    (set_fm_k(32, 8.0), {1: "not reproduced"}, ["K=32", f"{FD['afm_1nfe'] / 8.0:.2f}x"]),
    # ... and exactly 1.5x (15 vs FM's best, 10 at K=16) still counts as approaching.
    (both(set_fd("afm_1nfe", 15.0), set_fm_k(32, 10.5)), {}, ["1.50x", "(K=16"]),
    # AFM 1NFE gets worse than FM at K=4 and far from FM at many steps.
    (set_fd("afm_1nfe", 45.0), {0: "not reproduced", 1: "not reproduced"}, ["45"]),
    # A multi-step run more than 1.5x worse than 1NFE.
    (set_fd("afm_k4", 19.0), {2: "not reproduced"}, ["AFM K=4", f"{19.0 / FD['afm_1nfe']:.2f}x"]),
    # Depth-repeated R=2 worse than its equal-compute 2-step pair; R=4 tied with its 4-step pair.
    (set_fd("afm_r2", 11.5), {3: "not reproduced"}, ["AFM R=2 is worse than AFM K=2"]),
    (set_fd("afm_r4", FD["afm_k4"]), {3: "not reproduced"}, ["AFM R=4 is no better than AFM K=4"]),
    # The automatic schedule worse than the hand-placed one; equal is "no worse".
    (set_fd("phases_auto", 13.5), {4: "not reproduced"}, ["13.5", f"{FD['phases_manual']:g}"]),
    (set_fd("phases_auto", FD["phases_manual"]), {}, ["no worse than"]),
])
def test_verdicts_follow_the_numbers(change, flipped, must_say):
    results = base_results()
    change(results)
    claims = assess_claims(results)
    expected = [flipped.get(i, "reproduced") for i in range(5)]
    assert [c["verdict"] for c in claims] == expected
    changed = [claims[i]["sentence"] for i in flipped] or [c["sentence"] for c in claims]
    for text in must_say:
        assert any(text in s for s in changed), (text, changed)
    allowed = allowed_numbers(results)
    for c in claims:
        assert set(NUMBER.findall(c["sentence"])) <= allowed, c["sentence"]


def remove(name):
    return lambda results: drop(results, name)


def set_status(name, status):
    def apply(results):
        run_of(results, name)["status"] = status
    return apply


def del_metric(name):
    def apply(results):
        run_of(results, name)["metrics"].pop("eval/fd")
    return apply


def only_many_k(results):
    fm = run_of(results, "fm")
    fm["fd_at"] = {k: v for k, v in fm["fd_at"].items() if int(k) >= 8}


@pytest.mark.parametrize("change, incomplete, reason", [
    (remove("afm_1nfe"), {0, 1, 2}, "afm_1nfe is not in the results"),
    (set_status("fm", "FAILED"), {0, 1}, "fm is FAILED"),
    (set_status("afm_k4", "MISSING"), {2, 3}, "afm_k4 is MISSING"),
    (set_fd("afm_k2", float("nan")), {2, 3}, "afm_k2 has no finite eval/fd"),
    (set_fd("afm_r4", float("inf")), {3}, "afm_r4 has no finite eval/fd"),
    (del_metric("phases_manual"), {4}, "phases_manual has no finite eval/fd"),
    (only_many_k, {0}, "fm has no finite eval/fd@K for K <= 4"),
])
def test_incomplete_when_a_needed_run_is_unusable(change, incomplete, reason):
    results = base_results()
    change(results)
    claims = assess_claims(results)
    assert [c["verdict"] for c in claims] == ["incomplete" if i in incomplete else "reproduced" for i in range(5)]
    for i in incomplete:
        assert reason in claims[i]["sentence"]
    allowed = allowed_numbers(results)
    for c in claims:
        assert set(NUMBER.findall(c["sentence"])) <= allowed, c["sentence"]


def test_optional_baseline_and_absent_few_k():
    results = base_results()
    set_status("phases_none", "FAILED")(results)
    del run_of(results, "fm")["fd_at"]["2"]
    run_of(results, "fm")["fd_at"]["4"] = float("nan")
    claims = assess_claims(results)
    assert [c["verdict"] for c in claims] == ["reproduced"] * 5  # phases_none is context, not evidence
    assert "phases_none is FAILED" in claims[4]["sentence"] and f"{FD['phases_none']:g}" not in claims[4]["sentence"]
    assert "no finite eval/fd at K=2, 4" in claims[0]["sentence"]
    assert f"{FM_FD_AT[1]:g} at K=1" in claims[0]["sentence"]
    assert f"{FM_FD_AT[2]:g}" not in claims[0]["sentence"] and "nan" not in claims[0]["sentence"]


def test_bad_runs_are_refused():
    results = base_results()
    results["runs"].append(copy.deepcopy(results["runs"][0]))
    with pytest.raises(ValueError, match="afm_1nfe"):
        assess_claims(results)
    with pytest.raises(ValueError, match="list"):
        build_report({"runs": {"afm_1nfe": {}}})


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


def check_claims(dom: Node, results: dict) -> None:
    items = dom.by_id("claims").all("li", "claim")
    expected = assess_claims(results)
    assert len(items) == len(expected) == 5
    for item, claim in zip(items, expected, strict=True):
        badges = item.all("span", "verdict")
        assert len(badges) == 1 and claim["verdict"].replace(" ", "-") in badges[0].classes
        assert badges[0].text() == claim["verdict"]
        assert claim["claim"] in item.text() and claim["sentence"] in item.text()


@pytest.mark.integration
def test_report_renders_in_chromium(tmp_path, chromium_binary):
    results = base_results()
    set_fd("phases_auto", 13.5)(results)  # -> not reproduced
    failed = run_of(results, "afm_r4")  # -> the depth claim is incomplete
    failed["status"], failed["metrics"] = "FAILED", {}
    failed["curve"] = failed["curve"][:3]
    widths = {}
    for i, run in enumerate(results["runs"]):
        widths[run["name"]] = 24 + 8 * i
        data = png(widths[run["name"]], seed=i)
        if i % 2:  # half as bytes, half as files
            run["grid_png"] = data
        else:
            path = tmp_path / "grids" / f"{run['name']}.png"
            path.parent.mkdir(exist_ok=True)
            path.write_bytes(data)
            run["grid_png"] = str(path)
    run_of(results, "afm_k2")["grid_png"] = None
    run_of(results, "phases_none")["grid_png"] = str(tmp_path / "grids" / "gone.png")
    no_grid = {"afm_k2", "phases_none"}
    expected_verdicts = ["reproduced", "reproduced", "reproduced", "incomplete", "not reproduced"]
    assert verdicts(results) == expected_verdicts

    report = write_report(results, tmp_path / "site" / "report.html")
    assert report == (tmp_path / "site" / "report.html").resolve() and report.is_file()
    page = report.read_text(encoding="utf-8")
    assert "http://" not in page.split("<script", 1)[0] and 'src="http' not in page  # nothing fetched
    assert page.count("* plotly.js v") == 1, "plotly.js must be inlined exactly once"
    assert main_svgs(tree(page)) == 0, "the page as written has no plot svgs; only plotly.js can make them"

    out = output_dir()
    shot = out / "reproduce_report.png"
    shot.unlink(missing_ok=True)
    dom = render(page, tmp_path, "full", screenshot=shot)
    (out / "reproduce_report.html").write_text(page, encoding="utf-8")  # for a human to open

    # Header.
    header = dom.all("header")[0].text()
    assert results["title"] in header and results["created"] in header and "1h 02m 03s" in header
    assert f"{results['images_per_run']:,}" in header and results["parent_run_id"] in header
    # Claims: one entry each, verdict class and sentence as assess_claims gives them.
    check_claims(dom, results)
    assert [i.attrs["data-verdict"] for i in dom.by_id("claims").all("li", "claim")] == expected_verdicts
    # Table: one row per run, in order, with its values.
    table = dom.by_id("runs-table")
    header_cells = [th.text() for th in table.all("th")]
    for column in ("method", "NFE", "R", "parameters", "training time", "eval/fd", "eval/fd_floor", "eval/cls_acc",
                   *COVERAGE, "status"):
        assert column in header_cells
    rows = table.all("tbody")[0].all("tr")
    assert [r.attrs["data-run"] for r in rows] == [r["name"] for r in results["runs"]]
    for row, run in zip(rows, results["runs"], strict=True):
        text = row.text()
        assert run["label"] in text and run["status"] in text and f"{run['params']:,}" in text
        assert run["method"] in text and run["run_id"] in text
        cells = {td.attrs["data-metric"]: td.text() for td in row.all("td") if "data-metric" in td.attrs}
        for key in ("eval/fd", "eval/fd_floor", "eval/cls_acc", *COVERAGE):
            value = run["metrics"].get(key)
            assert cells[key] == (f"{value:.4g}" if value is not None else "\u2014"), (run["name"], key)
    fm_table = [t for t in dom.all("table", "fd-at") if t.attrs.get("data-run") == "fm"]
    assert len(fm_table) == 1
    fd_at_cells = {td.attrs["data-k"]: td.text() for td in fm_table[0].all("td")}
    assert fd_at_cells == {str(k): f"{v:.4g}" for k, v in FM_FD_AT.items()}
    # Plots: plotly drew both; every run's curve, FM's per-K curves and the phase changes are traces.
    curves = dom.by_id("plot-fd-curves")
    assert main_svgs(curves) >= 1 and main_svgs(dom.by_id("plot-fd-vs-compute")) >= 1
    names = legend(curves)
    for run in results["runs"]:
        suffix = "" if run["status"] == "FINISHED" else f" ({run['status']})"
        assert run["label"] + suffix in names
    assert {f"FM K={k}" for k in FM_FD_AT} <= set(names)
    assert {"manual phases: phase changes", "auto phases: phase changes"} <= set(names)
    n_marks = sum(len(TRANSITIONS[n]) for n in TRANSITIONS)
    shape_paths = [p for layer in curves.all("g", "shapelayer") for p in layer.all("path")]
    assert len(shape_paths) == n_marks, "one vertical line per phase transition"
    curves_js = page.split('id="fd-curves"', 1)[1].split('id="fd-vs-compute"', 1)[0]
    assert re.search(r'"yaxis":\{[^}]*"type":"log"', curves_js), "the curves' y axis is not log"
    # Phase transitions, escaped text intact.
    phase_rows = dom.by_id("phase-transitions").all("tbody")[0].all("tr")
    expected_rows = [(n, t) for n in ("phases_manual", "phases_auto") for t in TRANSITIONS[n]]
    assert [r.attrs["data-run"] for r in phase_rows] == [n for n, _ in expected_rows]
    for row, (_, t) in zip(phase_rows, expected_rows, strict=True):
        assert f"{t['step']:,}" in row.text() and f"{t['from']} \u2192 {t['to']}" in row.text()
        assert t["reason"] in row.text()
    assert "no phases" in dom.by_id("phases").text()  # the run without transitions is named
    # Grids: one figure per run; each image decoded at the width drawn for it; placeholders otherwise.
    figures = dom.by_id("grids").all("figure", "grid")
    assert [f.attrs["data-run"] for f in figures] == [r["name"] for r in results["runs"]]
    for fig, run in zip(figures, results["runs"], strict=True):
        imgs = fig.all("img")
        caption = fig.all("figcaption")[0].text()
        assert run["label"] in caption
        fd = run["metrics"].get("eval/fd")
        assert (f"eval/fd {fd:.4g}" if fd is not None else "eval/fd n/a") in caption
        if run["name"] in no_grid:
            assert imgs == [] and "no grid" in fig.text()
        else:
            assert len(imgs) == 1 and imgs[0].attrs.get("data-natural-width") == str(widths[run["name"]]), run["name"]
    assert "gone.png" in figures[[r["name"] for r in results["runs"]].index("phases_none")].text()

    with Image.open(shot) as img:
        colours = img.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50, "screenshot is (nearly) a single colour"


@pytest.mark.integration
def test_report_with_missing_run_and_no_grids_renders(tmp_path, chromium_binary):
    results = base_results()
    drop(results, "afm_k4")
    run_of(results, "fm")["status"] = "FAILED"
    run_of(results, "afm_1nfe")["curve"] = []
    results["parent_run_id"] = None
    page = build_report(results)
    dom = render(page, tmp_path, "degraded")

    check_claims(dom, results)
    assert verdicts(results) == ["incomplete", "incomplete", "incomplete", "incomplete", "reproduced"]
    claims = dom.by_id("claims").text()
    assert "afm_k4 is not in the results" in claims and "fm is FAILED" in claims
    assert "afm_k4" in dom.by_id("absent-runs").text()
    rows = dom.by_id("runs-table").all("tbody")[0].all("tr")
    assert [r.attrs["data-run"] for r in rows] == [r["name"] for r in results["runs"]]
    assert "FAILED" in rows[1].text()
    assert "parent run none" in dom.all("header")[0].text()
    curves = dom.by_id("plot-fd-curves")
    assert main_svgs(curves) >= 1
    assert "AFM 1NFE" not in legend(curves) and "FM (FAILED)" in legend(curves)
    figures = dom.by_id("grids").all("figure", "grid")
    assert len(figures) == len(results["runs"]) and dom.by_id("grids").all("img") == []
    assert all("no grid" in f.text() for f in figures)


# -- static page, CLI, atomic write ------------------------------------------------------------------
def test_empty_results_render_without_plotly():
    page = build_report({"runs": []})
    dom = tree(page)
    assert "plotly" not in page.lower()  # no figure, so no plotly.js either
    assert [i.attrs["data-verdict"] for i in dom.by_id("claims").all("li", "claim")] == ["incomplete"] * 5
    assert "No run recorded an eval/fd curve." in dom.by_id("plot-fd-curves").text()
    assert all(n in dom.by_id("absent-runs").text() for n in reproduce_report.EXPECTED_RUNS)


def test_runs_table_shows_the_mode_coverage_and_a_dash_where_a_run_has_none():
    """eval/precision, eval/recall, eval/diversity and eval/diversity_min beside eval/fd, one column each;
    a within-class collapse is a number in the table (diversity_min ~0), a run without them a dash."""
    results = base_results()
    run_of(results, "afm_k4")["metrics"].update({"eval/diversity": 0.4, "eval/diversity_min": 0.0123})
    table = tree(build_report(results)).by_id("runs-table")
    header = [th.text() for th in table.all("th")]
    assert header[header.index("eval/cls_acc") + 1:header.index("status")] == list(COVERAGE)
    rows = {r.attrs["data-run"]: r for r in table.all("tbody")[0].all("tr")}
    cells = {name: {td.attrs["data-metric"]: td for td in row.all("td") if "data-metric" in td.attrs}
             for name, row in rows.items()}
    assert cells["afm_1nfe"]["eval/precision"].text() == "0.8" and cells["afm_1nfe"]["eval/recall"].text() == "0.55"
    assert cells["afm_k4"]["eval/diversity_min"].text() == "0.0123"
    assert cells["afm_k4"]["eval/diversity"].text() == "0.4"
    for key in COVERAGE:
        absent = cells["phases_auto"][key]
        assert absent.text() == "\u2014" and absent.all("span", "na"), key
    # Every cell of a row sits under its column.
    for name, row in rows.items():
        tds = row.all("td")
        assert len(tds) == len(header)
        for key in COVERAGE:
            assert tds[header.index(key)].attrs.get("data-metric") == key


def test_text_is_escaped():
    results = base_results()
    results["title"] = "<script>alert(1)</script> & digits"
    run_of(results, "afm_1nfe")["label"] = "AFM <i>1</i>NFE"
    page = build_report(results)
    dom = tree(page)
    assert "<script>alert(1)" not in page
    assert dom.all("h1")[0].text() == results["title"]
    assert "AFM <i>1</i>NFE" in dom.by_id("runs-table").text()
    assert dom.by_id("runs-table").all("i") == []


@pytest.mark.integration
def test_cli_resolves_grid_paths_next_to_the_json(tmp_path, capsys):
    results = base_results()
    data = png(40, seed=3)
    (tmp_path / "job" / "grids").mkdir(parents=True)
    (tmp_path / "job" / "grids" / "afm.png").write_bytes(data)
    run_of(results, "afm_1nfe")["grid_png"] = "grids/afm.png"  # relative to the JSON's folder
    run_of(results, "fm")["metrics"]["eval/fd"] = float("nan")  # JSON's NaN round-trips
    src = tmp_path / "job" / "results.json"
    src.write_text(json.dumps(results))
    out = tmp_path / "reports" / "deep" / "report.html"
    assert reproduce_report.main(["--results", str(src), "--out", str(out)]) == 0
    assert str(out.resolve()) in capsys.readouterr().out
    dom = tree(out.read_text(encoding="utf-8"))
    img = [f for f in dom.all("figure", "grid") if f.attrs["data-run"] == "afm_1nfe"][0].all("img")[0]
    assert img.attrs["src"].startswith("data:image/png;base64,")
    assert base64.b64decode(img.attrs["src"].split(",", 1)[1]) == data
    fm_row = [r for r in dom.by_id("runs-table").all("tr") if r.attrs.get("data-run") == "fm"][0]
    assert [td.text() for td in fm_row.all("td") if td.attrs.get("data-metric") == "eval/fd"] == ["nan"]

    (tmp_path / "bad.json").write_text("{not json")
    assert reproduce_report.main(["--results", str(tmp_path / "bad.json"), "--out", str(out)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    # The module runs as advertised.
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

    monkeypatch.setattr(reproduce_report, "build_report", boom)
    with pytest.raises(RuntimeError, match="render failed"):
        write_report(base_results(), out)
    assert out.read_text() == "previous" and sorted(p.name for p in out.parent.iterdir()) == ["report.html"]
    fresh = tmp_path / "new" / "report.html"
    with pytest.raises(RuntimeError):
        write_report(base_results(), fresh)
    assert not fresh.exists()

    # A failure while writing (after rendering) leaves no temporary file either.
    monkeypatch.undo()

    def no_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", no_replace)
    with pytest.raises(OSError, match="disk full"):
        write_report(base_results(), out)
    assert out.read_text() == "previous" and sorted(p.name for p in out.parent.iterdir()) == ["report.html"]
