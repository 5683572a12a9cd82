"""What a person sees of a registered generator in the MLflow UI (3.17), rendered by headless Chromium
against the session MLflow server of conftest.

The generator is registered the way a training run does it: a tracked run with the dataset's tags
(`tracked_run` with `dataset_tags`), its evaluation logged on the run by the RunLogger, then the
`Registration` callback calling `GeneratorMethod.register`. The model version page must show the
description advflow wrote; its link to the source LoggedModel leads to the page that shows the
evaluation results as metrics (name, dataset, source run, value) under the same description.
Screenshots: test-output/mlflow_model_page.png (the LoggedModel page) and
test-output/mlflow_model_version_page.png.

The server refuses anonymous requests (basic auth). The UI builds its API URLs from the page's own
address, and a browser refuses requests to URLs that carry credentials, so the pages are opened
through a small local proxy that adds the admin credential's Authorization header.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import threading
import uuid
from html.parser import HTMLParser
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import urlsplit

import pytest
import torch

from advflow.platform.tracking.registry import metric_name
from chromium import chromium_or_fail, output_dir, run_headless

PIXEL = {"name": "pixel", "scaling_factor": 1.0}
STEP = 120
EVAL = {"eval/fd": 12.75, "eval/fd@4": 9.5, "eval/cls_acc": 0.875}
SHOWN = {metric_name(k): f"{v:g}" for k, v in EVAL.items()}  # MLflow names ('@' -> '_at_'), as the UI prints them
_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "host", "content-length",
        "proxy-authorization", "proxy-authenticate"}


@contextlib.contextmanager
def auth_proxy(target: str, user: str, password: str):
    """http://127.0.0.1:PORT forwarding every request to `target` with basic-auth credentials added."""
    parts = urlsplit(target)
    token = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    class Forward(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def forward(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
            conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
            try:
                conn.request(self.command, self.path, body=body or None, headers={**headers, "Authorization": token})
                reply = conn.getresponse()
                data = reply.read()
            finally:
                conn.close()
            self.send_response(reply.status)
            for k, v in reply.getheaders():
                if k.lower() not in _HOP:
                    self.send_header(k, v)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PATCH = do_PUT = do_DELETE = forward

        def log_message(self, *args):  # the server's own log has the requests
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Forward)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


class Page(HTMLParser):
    """The rendered DOM's text, and its table rows (role=row) as lists of cells (role=cell):
    {"text": ..., "hrefs": [...]}."""

    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self, dom: str):
        super().__init__(convert_charrefs=True)
        self.depth = 0
        self.in_row: int | None = None  # the depth of the open row / cell element
        self.in_cell: int | None = None
        self.rows: list[list[dict]] = []
        self.hrefs: list[str] = []
        self.parts: list[str] = []
        self.hidden = 0  # inside <style> / <script>: no page text
        self.feed(dom)
        self.text = " ".join("".join(self.parts).split())  # inline markup (<strong>K</strong>: 1) reads as it shows

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if a.get("href"):
            self.hrefs.append(a["href"])
            if self.in_cell is not None:
                self.rows[-1][-1]["hrefs"].append(a["href"])
        if tag in self.VOID:
            return
        self.depth += 1
        self.hidden += tag in ("style", "script")
        if a.get("role") == "row":
            self.rows.append([])
            self.in_row = self.depth
        elif a.get("role") == "cell" and self.in_row is not None:
            self.rows[-1].append({"text": "", "hrefs": []})
            self.in_cell = self.depth

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        self.hidden -= tag in ("style", "script")
        if self.depth == self.in_cell:
            self.in_cell = None
        if self.depth == self.in_row:
            self.in_row = None
        self.depth -= 1

    def handle_data(self, data):
        if not self.hidden:
            self.parts.append(data)
        if self.in_cell is not None:
            self.rows[-1][-1]["text"] += data

    def row(self, first: str) -> list[dict] | None:
        """The table row whose first cell reads `first`."""
        found = [r for r in self.rows if r and r[0]["text"].strip() == first]
        assert len(found) <= 1, f"{len(found)} rows start with {first!r}"
        return found[0] if found else None


def _open(base: str, route: str, tmp_path: Path, shot: Path) -> Page:
    """Render base/#/route (a local page sends the browser there) and screenshot it to `shot`."""
    start = tmp_path / f"open-{uuid.uuid4().hex[:6]}.html"
    start.write_text(f"<!doctype html><script>location.replace({json.dumps(f'{base}/#/{route}')})</script>")
    return Page(run_headless(start, dump_dom=True, screenshot=shot, window=(1600, 1400), virtual_time_ms=20000))


def _register_like_training(name: str, prefix: str, tmp_path: Path):
    """A tracked run with the dataset's tags, its evaluation on the run (RunLogger), then the
    Registration callback with GeneratorMethod.register: what the training loop does at a checkpoint."""
    from advflow.platform.config import RunSpec
    from advflow.platform.data.shards import dataset_tags
    from advflow.platform.tracking.logger import RunLogger
    from advflow.platform.tracking.runs import tracked_run
    from advflow.platform.train import callbacks as cb
    from advflow.platform.train.cadence import Cadence
    from advflow.platform.train.methods.generator import GeneratorMethod
    from advflow.trainers.models import build_generator

    spec = RunSpec.from_dict({"data": {"prefix": prefix}, "run": {"name": name},
                              "tracking": {"experiment": "model-page-tests", "register_name": name,
                                           "system_metrics": False}})
    torch.manual_seed(0)
    G = build_generator("tiny", in_channels=1, input_size=8, num_classes=10).eval()
    samples = cb.Samples((1, 8, 8), 10, torch.device("cpu"), PIXEL, method="afm")
    method = SimpleNamespace(samples=samples, env=SimpleNamespace(spec=spec))
    with tracked_run(spec, data_tags=dataset_tags(prefix)) as run:
        logger = RunLogger(spec, run.run_id)
        logger.log_metrics(EVAL, STEP)  # the Evaluation callback's numbers, on the run
        registration = cb.Registration(lambda *a, **kw: GeneratorMethod.register(method, *a, **kw), logger, name,
                                       prefix, Cadence(0, STEP))
        registration(cb.Moment.at(STEP, True, lambda: G, since=0, checkpoint_dir=tmp_path / "checkpoint",
                                  metrics={**EVAL, "eval/seconds": 3.0}))
        logger.close()
        run.ok = True
    (done,) = registration.registered
    return run.run_id, done, sum(p.numel() for p in G.parameters())


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_model_version_and_logged_model_pages_show_description_and_metrics(mlflow_env, mlflow_server, s3_prefix,
                                                                         tmp_path):
    import hashlib

    import mlflow

    from advflow.platform.data.shards import MANIFEST_NAME
    from advflow.platform.data.storage import Storage
    from advflow.platform.tracking import registry

    chromium_or_fail()
    name = f"page-{uuid.uuid4().hex[:8]}"
    prefix = f"{s3_prefix}/digits"  # only the manifest's bytes matter here (its digest names the dataset)
    manifest = json.dumps({"format": "advflow-shards", "num_classes": 10}).encode()
    Storage(prefix).write_atomic(MANIFEST_NAME, manifest)
    digest = hashlib.sha256(manifest).hexdigest()[:registry.DATASET_DIGEST_CHARS]
    run_id, done, n_params = _register_like_training(name, prefix, tmp_path)
    assert done["version"] == "1"
    client = mlflow.MlflowClient()
    for metric in SHOWN:  # the run held each number already: registering it on the model adds no copy
        assert [m.step for m in client.get_metric_history(run_id, metric)] == [STEP], metric
    model_id = done["model_uri"].removeprefix("models:/")
    experiment_id = mlflow.get_logged_model(model_id).experiment_id
    title = f"AFM one-step generator (DiT tiny, K=1, R=1) trained on {prefix}."
    command = f"python jobs/generate.py --model models:/{name}/1 --labels 0-9 --per-label 8 --out grid.png"
    described = [title, "Method: afm", f"Size: tiny, {n_params:,} parameters", "K (sampling steps, nfe): 1",
                 "R (depth repetition): 1", f"{run_id}, step {STEP}", command]

    out = output_dir()
    env = mlflow_server.env
    with auth_proxy(mlflow_server.url, env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]) as base:
        version = _open(base, f"models/{name}/versions/1", tmp_path, out / "mlflow_model_version_page.png")
        for part in described:
            assert part in version.text, f"model version page: {part!r} not shown"
        # The version page links its source: the LoggedModel's page, where MLflow shows model metrics.
        link = f"#/experiments/{experiment_id}/models/{model_id}"
        assert link in version.hrefs, f"model version page: no link to the LoggedModel ({link})"
        page = _open(base, link.removeprefix("#/"), tmp_path, out / "mlflow_model_page.png")

    for part in described:
        assert part in page.text, f"LoggedModel page: {part!r} not shown in the description"
    assert "Metrics (3)" in page.text, "LoggedModel page: not the 3 evaluation results as metrics"
    for metric, value in SHOWN.items():
        row = page.row(metric)
        assert row is not None, f"LoggedModel page: no metrics row {metric!r}"
        # Columns: metric, dataset, source run, value.
        assert [c["text"].strip() for c in row] == [metric, f"{prefix} (#{digest})", row[2]["text"].strip(), value]
        assert row[2]["hrefs"] == [f"#/runs/{run_id}"], f"{metric}: source run link {row[2]['hrefs']}"
    assert page.row("eval/seconds") is None  # timing, not an evaluation result
    assert (out / "mlflow_model_page.png").stat().st_size > 10_000
