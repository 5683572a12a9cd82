"""Where a run's code came from, for run tags: the git commit, the Ray job submission id and the
installed advflow version. (The dataset's provenance is `advflow.platform.data.shards.dataset_tags`.)
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

# This file is <repo>/platform/tracking/provenance.py: the checkout is two folders up.
REPO_ROOT = Path(__file__).resolve().parents[2]


def git_commit() -> str:
    """The source commit: the checkout's HEAD (+ '-dirty'), else $ADVFLOW_GIT_COMMIT, else 'unknown'.

    `ray job submit --working-dir .` uploads the files without .git, so demo.sh passes the commit
    in ADVFLOW_GIT_COMMIT."""
    try:
        head = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("ADVFLOW_GIT_COMMIT", "unknown")


def ray_submission_id() -> str | None:
    """The Ray job submission id when running as a `ray job submit` driver (from Ray's job config)."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if not raw:
        return None
    try:
        return json.loads(raw).get("metadata", {}).get("job_submission_id")
    except ValueError:
        return None


def advflow_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("advflow")
    except PackageNotFoundError:
        return "unknown"
