"""`advflow stack dashboards` / infra/local/grafana.py against a fake Grafana HTTP API (a real
server on 127.0.0.1 that records what it is sent, answering as Grafana's API documents)."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

pytestmark = pytest.mark.integration  # a real HTTP server on 127.0.0.1

from advflow.infra.local.grafana import DASHBOARDS, load_dashboards
from advflow.infra.local.proc import ServiceError


class FakeGrafana:
    def __init__(self, password: str = "admin", folders: list | None = None):
        self.requests: list[tuple[str, str, dict | None, str]] = []
        self.folders = folders if folders is not None else []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _answer(self, code: int, body) -> None:
                raw = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def _handle(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                auth = self.headers.get("Authorization", "")
                fake.requests.append((method, self.path, body, auth))
                expected = "Basic " + base64.b64encode(f"admin:{password}".encode()).decode()
                if auth != expected:
                    return self._answer(401, {"message": "invalid username or password"})
                if self.path == "/api/folders" and method == "GET":
                    return self._answer(200, fake.folders)
                if self.path == "/api/folders" and method == "POST":
                    fake.folders.append({"title": body["title"], "uid": "f-1"})
                    return self._answer(200, {"uid": "f-1", "title": body["title"]})
                if self.path == "/api/dashboards/db" and method == "POST":
                    uid = body["dashboard"]["uid"]
                    return self._answer(200, {"status": "success", "uid": uid, "url": f"/d/{uid}/x"})
                return self._answer(404, {"message": "not found"})

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


@pytest.fixture
def grafana():
    fake = FakeGrafana()
    yield fake
    fake.close()


def test_every_dashboard_is_posted_into_one_folder_with_overwrite(grafana, tmp_path):
    for uid in ("a-train", "b-sweep"):
        (tmp_path / f"{uid}.json").write_text(json.dumps({"uid": uid, "id": 7, "title": uid, "panels": []}))
    urls = load_dashboards(grafana.url, environ={}, folder=tmp_path)
    assert urls == [f"{grafana.url}/d/a-train/x", f"{grafana.url}/d/b-sweep/x"]
    posts = [(p, b) for m, p, b, _ in grafana.requests if m == "POST" and p == "/api/dashboards/db"]
    assert [b["dashboard"]["uid"] for _, b in posts] == ["a-train", "b-sweep"]
    assert all(b["overwrite"] and b["folderUid"] == "f-1" and "id" not in b["dashboard"] for _, b in posts)
    # A second load reuses the folder (no second folder is created) and replaces the dashboards.
    load_dashboards(grafana.url, environ={}, folder=tmp_path)
    assert sum(1 for m, p, *_ in grafana.requests if m == "POST" and p == "/api/folders") == 1


def test_wrong_credentials_name_the_variables_to_set(tmp_path):
    fake = FakeGrafana(password="secret")
    try:
        (tmp_path / "x.json").write_text(json.dumps({"uid": "x"}))
        with pytest.raises(ServiceError, match="GRAFANA_API_TOKEN, or GRAFANA_USER and GRAFANA_PASSWORD"):
            load_dashboards(fake.url, environ={}, folder=tmp_path)
        assert load_dashboards(fake.url, environ={"GRAFANA_PASSWORD": "secret"}, folder=tmp_path)
    finally:
        fake.close()


def test_no_grafana_and_no_dashboards_are_clear_errors(grafana, tmp_path):
    with pytest.raises(ServiceError, match="no dashboards in"):
        load_dashboards(grafana.url, environ={}, folder=tmp_path)
    (tmp_path / "x.json").write_text(json.dumps({"uid": "x"}))
    with pytest.raises(ServiceError, match="does not answer.*RAY_GRAFANA_HOST"):
        load_dashboards("http://127.0.0.1:1", environ={}, folder=tmp_path, timeout=2)


def test_the_committed_dashboards_load(grafana):
    urls = load_dashboards(grafana.url, environ={})
    assert len(urls) == len(list(DASHBOARDS.glob("*.json"))) >= 2
