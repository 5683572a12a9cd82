"""Load advflow's Grafana dashboards (dashboards/grafana/*.json) into a Grafana server the user runs.

The stack runs no Grafana (Debian has no package for it). Where one exists, `RAY_GRAFANA_HOST` names
it for Ray's dashboard, and `advflow stack dashboards` (or `up`, when RAY_GRAFANA_HOST is set)
posts every dashboard through Grafana's HTTP API (`POST /api/dashboards/db`, overwrite on: the
dashboards' fixed uids make a reload replace them, never duplicate them). Credentials: a service
account token in GRAFANA_API_TOKEN, else GRAFANA_USER / GRAFANA_PASSWORD (Grafana's first-start
default admin/admin).
"""

from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.request
from pathlib import Path

from advflow.infra.local.proc import ServiceError

DASHBOARDS = Path(__file__).resolve().parents[2] / "dashboards" / "grafana"
FOLDER_TITLE = "advflow"


def _auth_header(environ) -> str:
    token = environ.get("GRAFANA_API_TOKEN")
    if token:
        return f"Bearer {token}"
    user, password = environ.get("GRAFANA_USER", "admin"), environ.get("GRAFANA_PASSWORD", "admin")
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def _call(url: str, method: str, body: dict | None, auth: str, timeout: float) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method,
                                     headers={"Content-Type": "application/json", "Authorization": auth})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as exc:
        detail = exc.read().decode("utf-8", "replace")[:300]
        hint = (" (set GRAFANA_API_TOKEN, or GRAFANA_USER and GRAFANA_PASSWORD)" if exc.code in (401, 403) else "")
        raise ServiceError(f"Grafana at {url}: HTTP {exc.code} {detail}{hint}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise ServiceError(f"Grafana at {url} does not answer ({getattr(exc, 'reason', exc)}); "
                           "check RAY_GRAFANA_HOST") from None


def load_dashboards(host: str, environ=None, folder: Path = DASHBOARDS, timeout: float = 10.0) -> list[str]:
    """Post every dashboard JSON in `folder` to the Grafana at `host` (into folder "advflow");
    returns the URLs Grafana gives them."""
    environ = os.environ if environ is None else environ
    host = host.rstrip("/")
    files = sorted(folder.glob("*.json"))
    if not files:
        raise ServiceError(f"no dashboards in {folder}; run `python -m advflow.dashboards.grafana.build`")
    auth = _auth_header(environ)
    folders = _call(f"{host}/api/folders", "GET", None, auth, timeout)
    uid = next((f["uid"] for f in folders if f.get("title") == FOLDER_TITLE), None) if isinstance(folders, list) else None
    if uid is None:
        uid = _call(f"{host}/api/folders", "POST", {"title": FOLDER_TITLE, "uid": "advflow"}, auth, timeout)["uid"]
    urls = []
    for path in files:
        dashboard = json.loads(path.read_text())
        dashboard.pop("id", None)  # Grafana assigns ids; the uid identifies it
        out = _call(f"{host}/api/dashboards/db", "POST",
                    {"dashboard": dashboard, "folderUid": uid, "overwrite": True,
                     "message": f"advflow: {path.name}"}, auth, timeout)
        urls.append(f"{host}{out.get('url', '')}")
    return urls
