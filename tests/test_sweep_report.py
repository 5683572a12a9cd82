"""The sweep report page: a real Optuna study in SQLite, rendered by headless Chromium.

The Chromium test checks what a person would see: plotly drew each of the three plots (plotly.js
creates `svg.main-svg` elements at run time; the page as written contains none), the table has one
row per trial, every grid image decoded to the size the test drew it at, in best-first order, and a
screenshot lands in $ADVFLOW_TEST_OUTPUT (default test-output/). The other tests parse the static
page: placeholders for missing grids, thin studies, storage errors, the CLI, the grid URI schemes.
"""

from __future__ import annotations

import base64
import os
from html.parser import HTMLParser
from pathlib import Path

import optuna
import pytest
from PIL import Image

from advflow.dashboards import sweep_report
from advflow.dashboards.sweep_grids import GridUnavailable, load_grid
from advflow.dashboards.sweep_report import StudyNotFoundError, build_report, write_report
from chromium import ChromiumError, chromium_or_fail, output_dir, run_headless

VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
# Marks every <img> with its decoded width once the page (and so every image) has loaded.
DECODE_PROBE = ("<script>window.addEventListener('load', () => { for (const img of document.images) "
                "img.setAttribute('data-natural-width', String(img.naturalWidth)); });</script>")

optuna.logging.set_verbosity(optuna.logging.ERROR)


class PageParser(HTMLParser):
    """Just the facts the tests check, gathered by walking the element tree."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, dict[str, str]]] = []
        self.main_svgs: dict[str, int] = {}  # plot key -> svg.main-svg elements inside its container
        self.plot_text: dict[str, str] = {}
        self.rows: list[str] = []  # data-trial of each row of table.trials > tbody
        self.row_text: dict[str, str] = {}
        self.header_cells: list[str] = []
        self.figures: list[dict] = []  # one per figure.grid: trial, img attrs or None, text
        self.section_text: dict[str, str] = {}

    def _nearest(self, pred) -> dict[str, str] | None:
        """Attributes of the innermost open element matching pred(tag, attrs), else None."""
        return next((a for t, a in reversed(self.stack) if pred(t, a)), None)

    def _inside(self, pred) -> bool:
        return any(pred(t, a) for t, a in self.stack)

    def handle_starttag(self, tag, attrs):
        a = {k: v or "" for k, v in attrs}
        plot = self._nearest(lambda t, x: "data-plot" in x)
        if tag == "svg" and "main-svg" in a.get("class", "").split() and plot is not None:
            self.main_svgs[plot["data-plot"]] = self.main_svgs.get(plot["data-plot"], 0) + 1
        in_table = self._nearest(lambda t, x: t == "table" and "trials" in x.get("class", "").split())
        if tag == "tr" and in_table is not None and self._inside(lambda t, x: t == "tbody"):
            self.rows.append(a.get("data-trial", ""))
        if tag == "figure" and "grid" in a.get("class", "").split():
            self.figures.append({"trial": a.get("data-trial"), "img": None, "text": ""})
        if tag == "img" and self._inside(lambda t, x: t == "figure"):
            self.figures[-1]["img"] = a
        if tag not in VOID:
            self.stack.append((tag, a))

    def handle_endtag(self, tag):
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                del self.stack[i:]
                break

    def handle_data(self, data):
        if self._nearest(lambda t, x: t in ("script", "style")) is not None:
            return
        plot = self._nearest(lambda t, x: "data-plot" in x)
        if plot is not None:
            key = plot["data-plot"]
            self.plot_text[key] = self.plot_text.get(key, "") + data
        row = self._nearest(lambda t, x: t == "tr" and "data-trial" in x)
        if row is not None:
            key = row["data-trial"]
            self.row_text[key] = self.row_text.get(key, "") + " " + data
        if self._inside(lambda t, x: t == "th"):
            self.header_cells.append(data.strip())
        if self.figures and self._inside(lambda t, x: t == "figure"):
            self.figures[-1]["text"] += data
        section = self._nearest(lambda t, x: t == "section" and "id" in x)
        if section is not None:
            self.section_text[section["id"]] = self.section_text.get(section["id"], "") + data


def parse(page: str) -> PageParser:
    p = PageParser()
    p.feed(page)
    p.close()
    return p


def grid_png(path: Path, width: int, seed: int) -> Path:
    """A small PNG whose width identifies its trial; a colour gradient so it is not one flat colour."""
    img = Image.new("RGB", (width, 32))
    img.putdata([((x * 7 + seed * 40) % 256, (y * 8) % 256, (seed * 90) % 256)
                 for y in range(32) for x in range(width)])
    img.save(path)
    return path


def make_sweep(tmp_path: Path) -> tuple[str, dict]:
    """8 trials of a 3-parameter objective (`momentum` only exists for sgd): 6 complete, trial 5
    pruned, trial 6 failed. Returns the storage URL and what the test knows about each trial."""
    storage = f"sqlite:///{tmp_path / 'sweep.db'}"
    study = optuna.create_study(study_name="digits-afm", storage=storage, direction="minimize",
                                sampler=optuna.samplers.TPESampler(seed=0))
    plan = [
        {"opt": "adam", "lr": 3e-4, "width": 64},
        {"opt": "sgd", "lr": 1e-2, "momentum": 0.9, "width": 32},
        {"opt": "adam", "lr": 1e-3, "width": 128},
        {"opt": "sgd", "lr": 3e-2, "momentum": 0.5, "width": 64},
        {"opt": "adam", "lr": 1e-4, "width": 96},
        {"opt": "sgd", "lr": 5e-2, "momentum": 0.7, "width": 32},  # pruned
        {"opt": "adam", "lr": 2e-3, "width": 64},  # fails
        {"opt": "sgd", "lr": 2e-4, "momentum": 0.95, "width": 128},
    ]
    for params in plan:
        study.enqueue_trial(params)
    known: dict[int, dict] = {}

    def objective(trial: optuna.Trial) -> float:
        opt = trial.suggest_categorical("opt", ["adam", "sgd"])
        lr = trial.suggest_float("lr", 1e-5, 1e-1, log=True)
        width = trial.suggest_int("width", 32, 128, step=32)
        momentum = trial.suggest_float("momentum", 0.0, 0.99) if opt == "sgd" else 0.0
        n = trial.number
        png = grid_png(tmp_path / f"grid-{n}.png", width=40 + 8 * n, seed=n)
        trial.set_user_attr("sample_grid", str(png))
        trial.set_user_attr("mlflow_run_id", f"run{n:04d}cafe")
        trial.set_user_attr("steps", 100 * (n + 1))
        trial.set_user_attr("fid", 10.0 + n)
        value = abs(lr - 1e-3) * 100 + (1 - momentum) * 0.1 + 64 / width * 0.01
        known[n] = {"value": value, "width": 40 + 8 * n}
        if n == 5:
            trial.report(value, step=1)
            raise optuna.TrialPruned()
        if n == 6:
            raise RuntimeError("simulated worker crash")
        trial.set_user_attr("stopped_early", n == 3)
        return value

    study.optimize(objective, n_trials=len(plan), catch=(RuntimeError,))
    return storage, known


@pytest.fixture(scope="module")
def chromium_binary() -> str:
    return chromium_or_fail()


@pytest.mark.integration
def test_report_renders_in_chromium(tmp_path, chromium_binary):
    storage, known = make_sweep(tmp_path)
    report = write_report(storage, "digits-afm", tmp_path / "site" / "report.html", metric_name="fid_proxy",
                          extra_columns=["fid"])
    assert report == (tmp_path / "site" / "report.html").resolve() and report.is_file()
    page = report.read_text(encoding="utf-8")
    assert "http://" not in page.split("<script", 1)[0] and 'src="http' not in page  # nothing fetched
    assert page.count("* plotly.js v") == 1, "plotly.js must be inlined exactly once"
    static = parse(page)
    assert static.main_svgs == {}, "the page as written has no plot SVGs; only plotly.js can make them"

    probed = tmp_path / "probed.html"
    probed.write_text(page.replace("</body>", DECODE_PROBE + "</body>"), encoding="utf-8")
    out = output_dir()
    shot = out / "sweep_report.png"
    shot.unlink(missing_ok=True)
    dom = parse(run_headless(probed, dump_dom=True, screenshot=shot))
    (out / "sweep_report.html").write_text(page, encoding="utf-8")  # for a human to open

    # Each plot was drawn by plotly, under its own title.
    titles = {"history": "Optimization History Plot", "importances": "Hyperparameter Importances",
              "parallel": "Parallel Coordinate Plot"}
    for key, title in titles.items():
        assert dom.main_svgs.get(key, 0) >= 1, f"plot {key!r} did not render: {dom.main_svgs}"
        assert title in dom.plot_text[key]
    # One table row per trial, in order, with state, attrs and the extra column.
    assert dom.rows == [str(n) for n in range(8)]
    assert "pruned" in dom.row_text["5"] and "fail" in dom.row_text["6"]
    for n in range(8):
        assert f"run{n:04d}cafe" in dom.row_text[str(n)]
    for column in ("fid_proxy", "opt", "lr", "width", "momentum", "duration", "mlflow_run_id", "steps",
                   "stopped_early", "fid"):
        assert column in dom.header_cells
    # Grids: completed trials best first, then the pruned one; each decoded at the width drawn for it.
    complete = [n for n in known if n not in (5, 6)]
    expected = sorted(complete, key=lambda n: known[n]["value"]) + [5]
    assert [int(f["trial"]) for f in dom.figures] == expected
    for fig in dom.figures:
        n = int(fig["trial"])
        assert fig["img"] is not None, f"trial {n} shows no image: {fig['text']}"
        assert fig["img"].get("data-natural-width") == str(known[n]["width"]), f"trial {n} image not decoded"
        assert f"#{n}" in fig["text"]
    assert "best" in dom.figures[0]["text"]
    # Header: the best trial is named.
    best = expected[0]
    assert f"trial #{best}" in page

    with Image.open(shot) as img:
        assert img.size == (1280, 2400)
        colours = img.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50, "screenshot is (nearly) a single colour"


def _sweep_job():
    """jobs/sweep.py as a module (jobs/ is a folder of scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sweep_job", Path(__file__).resolve().parents[1] / "jobs" / "sweep.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    return job


@pytest.mark.integration  # end-to-end: renders a whole sweep report (seconds)
def test_the_sweep_job_renders_the_report_the_library_describes(tmp_path, capsys):
    """The sweep library returns a `SweepReport` and renders nothing; jobs/sweep.py writes the page
    from it: the trials' annotations (facts settled after they finished) and the trial attributes
    the library records as extra columns, at `out` (or --report). A report problem is one warning
    line and a `report_error` entry, never an exception that would lose the sweep's results."""
    from advflow.platform.config import RunSpec
    from advflow.platform.sweep.tune import REPORT_COLUMNS, SweepReport

    storage, known = make_sweep(tmp_path)
    spec = RunSpec.from_dict({"data": {"prefix": str(tmp_path)}, "tracking": {"enabled": False}})
    report = SweepReport(storage=storage, study_name="digits-afm", metric="fid_proxy", out=tmp_path / "at" / "r.html",
                         annotations={2: {"stopped_early": "annotated-early"}}, extra_columns=("fid",))
    assert REPORT_COLUMNS == ("lr_g", "model.kind", "tune_trial_id")
    job = _sweep_job()
    assert job.write_sweep_report(spec, report) == {"report": str(tmp_path / "at" / "r.html")}
    page = (tmp_path / "at" / "r.html").read_text(encoding="utf-8")
    p = parse(page)
    assert p.rows == [str(n) for n in range(8)]
    assert "fid_proxy" in p.header_cells and "fid" in p.header_cells
    assert "annotated-early" in p.row_text["2"] and "annotated-early" not in p.row_text["3"]
    assert page.count("* plotly.js v") == 1

    elsewhere = tmp_path / "cli" / "report.html"  # --report wins over the library's default
    assert job.write_sweep_report(spec, report, str(elsewhere)) == {"report": str(elsewhere)}
    assert parse(elsewhere.read_text(encoding="utf-8")).rows == p.rows

    capsys.readouterr()
    broken = SweepReport(storage=f"sqlite:///{tmp_path / 'missing.db'}", study_name="digits-afm", metric="v",
                         out=tmp_path / "broken.html")
    entries = job.write_sweep_report(spec, broken)
    assert set(entries) == {"report_error"} and "missing.db" in entries["report_error"]
    assert f"[advflow] sweep report failed: {entries['report_error']}" in capsys.readouterr().err
    assert not (tmp_path / "broken.html").exists() and not (tmp_path / "missing.db").exists()


COVERAGE = ("eval/precision", "eval/recall", "eval/diversity", "eval/diversity_min")


def test_trials_table_shows_the_mode_coverage_beside_the_objective(monkeypatch):
    """eval/precision, eval/recall, eval/diversity, eval/diversity_min (the sweep's annotations, from each
    trial's run) are columns right after the objective; a within-class collapse is a number
    (diversity_min ~0), a trial without them shows the dash."""
    monkeypatch.setattr(sweep_report, "_render_plots", lambda *a: "")  # plotly is not what this checks
    study = optuna.create_study(study_name="cov")
    x = optuna.distributions.FloatDistribution(0, 9)
    for n in range(3):
        study.add_trial(optuna.trial.create_trial(params={"x": float(n)}, distributions={"x": x}, value=1.0 + n,
                                                  user_attrs={"mlflow_run_id": f"r{n}"}))
    notes = {0: {"steps": 10, "eval/precision": 0.71, "eval/recall": 0.52, "eval/diversity": 0.93,
                 "eval/diversity_min": 0.61},
             1: {"steps": 10, "eval/precision": 0.98, "eval/recall": 0.04, "eval/diversity": 0.21,
                 "eval/diversity_min": 0.0012}}  # 2: an older run, without them
    p = parse(build_report(study, metric_name="eval/fd", annotations=notes, extra_columns=["eval/recall"]))
    head = p.header_cells
    assert head[head.index("eval/fd"):head.index("eval/fd") + 5] == ["eval/fd", *COVERAGE]
    assert head.count("eval/recall") == 1  # not repeated as an attribute column
    row = {n: p.row_text[str(n)].split() for n in range(3)}
    assert row[0][3:7] == ["0.71", "0.52", "0.93", "0.61"]
    assert row[1][3:7] == ["0.98", "0.04", "0.21", "0.0012"]
    assert row[2][3:7] == ["\u2014"] * 4
    # Without any trial carrying them, no such columns.
    assert not set(COVERAGE) & set(parse(build_report(study, metric_name="eval/fd")).header_cells)


def test_the_sweep_annotates_each_trial_with_its_runs_coverage_at_the_swept_k():
    from advflow.platform.sweep.tune import coverage_notes

    logged = {"eval/fd": 3.0, "eval/precision": 0.7, "eval/recall": 0.6, "eval/diversity": 0.9,
              "eval/diversity_min": 0.5, "eval/precision_at_4": 0.4, "eval/recall_at_4": 0.3}
    assert coverage_notes(logged, "eval/fd") == {"eval/precision": 0.7, "eval/recall": 0.6, "eval/diversity": 0.9,
                                                 "eval/diversity_min": 0.5}
    assert coverage_notes(logged, "eval/fd@4") == {"eval/precision@4": 0.4, "eval/recall@4": 0.3}
    assert coverage_notes({"eval/fid": 9.0}, "eval/fid") == {}


@pytest.mark.integration  # end-to-end: renders whole sweep reports from Optuna studies (seconds)
def test_missing_and_bad_grids_show_placeholders(tmp_path):
    study = optuna.create_study(study_name="grids", storage=f"sqlite:///{tmp_path / 'g.db'}")
    (tmp_path / "notes.txt").write_text("not an image")
    given = grid_png(tmp_path / "given.png", width=24, seed=3).read_bytes()
    attrs = [
        {"sample_grid": str(tmp_path / "gone.png")},  # 0: file missing
        {},  # 1: no attribute at all
        {"sample_grid": str(tmp_path / "notes.txt")},  # 2: not an image
        {"sample_grid": str(tmp_path / "also-gone.png")},  # 3: overridden by `grids`
    ]
    for n, a in enumerate(attrs):
        study.add_trial(optuna.trial.create_trial(params={"x": float(n)},
                                                  distributions={"x": optuna.distributions.FloatDistribution(0, 9)},
                                                  value=float(n), user_attrs=a))
    p = parse(build_report(study, grids={3: given}))
    by_trial = {int(f["trial"]): f for f in p.figures}
    assert sorted(by_trial) == [0, 1, 2, 3]
    for n in (0, 1, 2):
        assert by_trial[n]["img"] is None and "no sample grid" in by_trial[n]["text"]
    assert "gone.png" in by_trial[0]["text"]
    assert "sample_grid" in by_trial[1]["text"]
    assert "not a PNG" in by_trial[2]["text"]
    src = by_trial[3]["img"]["src"]
    assert src.startswith("data:image/png;base64,") and base64.b64decode(src.split(",", 1)[1]) == given


@pytest.mark.integration  # end-to-end: renders whole sweep reports from Optuna studies (seconds)
@pytest.mark.parametrize("n_trials", [0, 1])
def test_thin_studies_still_render(tmp_path, n_trials):
    study = optuna.create_study(study_name="thin", storage=f"sqlite:///{tmp_path / 't.db'}")
    study.optimize(lambda t: t.suggest_float("x", -1, 1) ** 2, n_trials=n_trials)
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL))
    page = build_report(study)
    p = parse(page)
    assert p.rows == [str(n) for n in range(n_trials + 1)]
    assert "at least 2 completed trials" in p.plot_text["importances"]
    assert 'id="fig-importances"' not in page
    assert ('id="fig-history"' in page) == (n_trials == 1)
    if n_trials == 0:
        assert "No completed trials yet." in p.plot_text["history"]
        assert "plotly" not in page.lower()  # no figure, so no 4 MB of plotly.js either
    else:
        assert page.count("* plotly.js v") == 1


def test_storage_errors_name_the_fix(tmp_path):
    storage = f"sqlite:///{tmp_path / 's.db'}"
    for name in ("alpha", "beta"):
        optuna.create_study(study_name=name, storage=storage)
    with pytest.raises(StudyNotFoundError) as err:
        write_report(storage, "gamma", tmp_path / "r.html")
    assert "'gamma'" in str(err.value) and "'alpha'" in str(err.value) and "'beta'" in str(err.value)
    assert not (tmp_path / "r.html").exists()

    missing = tmp_path / "nope.db"
    with pytest.raises(FileNotFoundError, match="nope.db"):
        write_report(f"sqlite:///{missing}", "alpha", tmp_path / "r.html")
    assert not missing.exists(), "loading must not create an empty database"
    with pytest.raises(ValueError, match="SQLAlchemy URL"):
        write_report(str(tmp_path / "s.db"), "alpha", tmp_path / "r.html")


@pytest.mark.integration  # end-to-end: renders whole sweep reports from Optuna studies (seconds)
def test_write_is_atomic_and_cli(tmp_path, capsys, monkeypatch):
    storage = f"sqlite:///{tmp_path / 'c.db'}"
    optuna.create_study(study_name="cli", storage=storage).optimize(
        lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    out = tmp_path / "reports" / "cli.html"
    assert sweep_report.main(["--storage", storage, "--study", "cli", "--out", str(out)]) == 0
    assert str(out.resolve()) in capsys.readouterr().out
    assert parse(out.read_text()).rows == ["0", "1"]
    assert sweep_report.main(["--storage", storage, "--study", "nope", "--out", str(out)]) == 2
    assert "'cli'" in capsys.readouterr().err

    # A failure while rendering leaves the previous report intact and no temporary file behind.
    out.write_text("previous")

    def boom(*a, **k):
        raise RuntimeError("render failed")

    monkeypatch.setattr(sweep_report, "build_report", boom)
    with pytest.raises(RuntimeError):
        write_report(storage, "cli", out)
    assert out.read_text() == "previous" and sorted(p.name for p in out.parent.iterdir()) == ["cli.html"]


@pytest.mark.integration
def test_grid_uri_schemes(tmp_path, s3_prefix, monkeypatch):
    png = grid_png(tmp_path / "g.png", width=16, seed=1).read_bytes()
    assert load_grid(str(tmp_path / "g.png")) == png
    assert load_grid((tmp_path / "g.png").as_uri()) == png
    # s3:// through the endpoint in AWS_ENDPOINT_URL (the moto server).
    import fsspec

    with fsspec.open(f"{s3_prefix}/grids/g.png", "wb", endpoint_url=os.environ["AWS_ENDPOINT_URL"]) as f:
        f.write(png)
    assert load_grid(f"{s3_prefix}/grids/g.png") == png
    with pytest.raises(GridUnavailable, match="missing.png"):
        load_grid(f"{s3_prefix}/grids/missing.png")
    # runs:/ through MLflow (SQLite tracking store, local artifacts: no server needed).
    import mlflow

    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    try:
        exp = mlflow.create_experiment("grids", artifact_location=(tmp_path / "artifacts").as_uri())
        with mlflow.start_run(experiment_id=exp) as run:
            mlflow.log_artifact(str(tmp_path / "g.png"), artifact_path="samples")
        assert load_grid(f"runs:/{run.info.run_id}/samples/g.png") == png
        with pytest.raises(GridUnavailable):
            load_grid(f"runs:/{run.info.run_id}/samples/none.png")
    finally:
        mlflow.set_tracking_uri(previous)
    with pytest.raises(GridUnavailable, match="not a URI"):
        load_grid("")


@pytest.mark.integration
def test_chromium_timeout_kills_the_process_tree(tmp_path, chromium_binary):
    import psutil

    hang = tmp_path / "hang.html"
    hang.write_text("<!DOCTYPE html><html><body><script>while (true) {}</script></body></html>")
    with pytest.raises(ChromiumError, match="did not finish"):
        run_headless(hang, dump_dom=True, timeout_s=3)
    # Every browser process (they all carry the helper's throw-away profile dir in argv) is gone.
    leftover = [p.pid for p in psutil.process_iter(["cmdline"])
                if any("advflow-chromium-" in c for c in (p.info["cmdline"] or []))]
    assert leftover == []
