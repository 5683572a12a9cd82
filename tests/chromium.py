"""Headless Chromium for tests: render an HTML file, return its DOM after the page's scripts ran,
and/or save a screenshot. Not a test module.

The binary is `$CHROMIUM`, else `chromium`, else `chromium-browser` on PATH; `bash infra/test.sh`
installs Debian's `chromium` when none is found. Every run has a hard timeout, after which the whole
process tree (the wrapper script, the browser, its zygote/renderer/GPU children) is killed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

MISSING_HINT = "run `bash infra/test.sh` once (it installs chromium via apt-get), or set $CHROMIUM to the binary"


class ChromiumError(RuntimeError):
    """Chromium is missing, failed, or timed out; the message carries its stderr tail."""


def find_chromium() -> str:
    """Path of a Chromium binary, or ChromiumError saying how to get one."""
    env = os.environ.get("CHROMIUM")
    if env:
        found = shutil.which(env)
        if not found:
            raise ChromiumError(f"$CHROMIUM={env!r} is not an executable: fix or unset it; {MISSING_HINT}")
        return found
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    raise ChromiumError(f"no Chromium binary (chromium, chromium-browser) on PATH: {MISSING_HINT}")


def _kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL `proc`, its process group and every descendant (Chromium's helpers may leave the group)."""
    try:
        import psutil
    except ImportError:  # psutil is a test dependency; without it the process group kill still runs
        psutil = None
    descendants = []
    if psutil is not None:
        with contextlib.suppress(psutil.Error):
            descendants = psutil.Process(proc.pid).children(recursive=True)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    for child in descendants:
        with contextlib.suppress(psutil.Error):  # already exited
            child.kill()
    proc.wait()


def run_headless(html_path: str | Path, *, dump_dom: bool = False, screenshot: str | Path | None = None,
                 window: tuple[int, int] = (1280, 2400), virtual_time_ms: int = 15000,
                 timeout_s: float = 90.0) -> str:
    """Load `html_path` in headless Chromium; return the serialised DOM when `dump_dom`, else "".

    screenshot: PNG path to write (the viewport of size `window`).
    virtual_time_ms: virtual time the page gets before the dump/screenshot, so plotly's JS runs.
    """
    if not dump_dom and screenshot is None:
        raise ValueError("run_headless: ask for dump_dom=True and/or a screenshot path")
    binary = find_chromium()
    url = Path(html_path).resolve().as_uri()
    # Headless Chromium occasionally never settles its virtual-time budget on a loaded 2-core machine
    # (seen once in a full CI run; the same page rendered in 5 s alone): one retry in a fresh profile
    # before failing. A page that really hangs still fails, after 2 x timeout_s.
    for attempt in range(2):
        with tempfile.TemporaryDirectory(prefix="advflow-chromium-") as profile:
            args = [
                binary, "--headless", "--no-sandbox",  # no sandbox: tests run as root
                "--disable-gpu", "--disable-dev-shm-usage",  # containers have a tiny /dev/shm
                "--no-first-run", "--no-default-browser-check", "--disable-extensions",
                "--hide-scrollbars", "--mute-audio", "--allow-file-access-from-files",
                f"--user-data-dir={profile}", f"--window-size={window[0]},{window[1]}",
                f"--virtual-time-budget={virtual_time_ms}", "--run-all-compositor-stages-before-draw",
            ]
            if screenshot is not None:
                args.append(f"--screenshot={Path(screenshot).resolve()}")
            if dump_dom:
                args.append("--dump-dom")
            args.append(url)
            # start_new_session: the browser and its helpers share one process group we can kill at once.
            proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                                    env={**os.environ, "HOME": profile})
            try:
                out, err = proc.communicate(timeout=timeout_s)
                break
            except subprocess.TimeoutExpired:
                _kill_tree(proc)
                if attempt == 1:
                    raise ChromiumError(f"chromium did not finish {url} within {timeout_s:.0f} s, twice; "
                                        "killed it") from None
    if proc.returncode != 0:
        tail = err.decode(errors="replace")[-2000:]
        raise ChromiumError(f"chromium exited with {proc.returncode} on {url}; stderr tail:\n{tail}")
    if screenshot is not None and not Path(screenshot).is_file():
        raise ChromiumError(f"chromium wrote no screenshot to {screenshot}; stderr tail:\n"
                            f"{err.decode(errors='replace')[-2000:]}")
    return out.decode("utf-8", errors="replace") if dump_dom else ""


def output_dir() -> Path:
    """Where tests leave pages and screenshots for people to look at (ADVFLOW_TEST_OUTPUT or test-output/)."""
    out = Path(os.environ.get("ADVFLOW_TEST_OUTPUT") or Path(__file__).resolve().parents[1] / "test-output")
    out.mkdir(parents=True, exist_ok=True)
    return out


def chromium_or_fail() -> str:
    """The browser, or a test failure: a missing browser is a setup failure, never a skip."""
    import pytest

    try:
        return find_chromium()
    except ChromiumError as e:
        pytest.fail(str(e))
