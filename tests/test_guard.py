"""The fast-tier guard of tests/conftest.py: an unmarked test that opens an INET socket, starts a process
or requests a service fixture fails, naming itself and the fix; the same test marked integration passes.

Each case runs tiny test files through pytester in this process (runpytest_inprocess: no process is
started for the run itself) under a copy of the real conftest.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).with_name("conftest.py")
FIX = "but it is not marked integration: mark it @pytest.mark.integration"

# name -> (source, what the failure says it did)
CASES = {
    "bind": ("""
import socket

def test_bind():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
""", "opened an INET socket (bind ('127.0.0.1', 0)) at case_bind.py:5"),
    "connect": ("""
import socket

def test_connect():
    with socket.socket() as s:
        try:
            s.connect(("127.0.0.1", 9))
        except Exception:  # the code under test swallows the guard's error: the test fails all the same
            pass
""", "opened an INET socket (connect ('127.0.0.1', 9))"),
    "subprocess": ("""
import subprocess

def test_subprocess():
    subprocess.run(["true"], check=True)
""", "started a process (['true'])"),
    "multiprocessing": ("""
import multiprocessing

def test_multiprocessing():
    p = multiprocessing.get_context("spawn").Process(target=print)
    p.start()
    p.join()
""", "started a process (multiprocessing SpawnProcess"),
    "thread": ("""
import subprocess, threading

def test_thread():
    t = threading.Thread(target=subprocess.run, args=(["true"],))
    t.start()
    t.join()
""", "started a process (['true'])"),
}
PURE = """
import socket

def test_pure():
    a, b = socket.socketpair()  # AF_UNIX: not a network socket
    a.close(); b.close()
    assert sum(range(4)) == 6
"""


def marked(source: str, marker: str = "integration") -> str:
    return source.replace("\ndef test_", f"\nimport pytest\n\n@pytest.mark.{marker}\ndef test_", 1)


@pytest.fixture
def run(pytester):
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makeini("[pytest]\nmarkers =\n    integration: starts a server, a process or Ray\n"
                     "    slow: long\n    multinode: many nodes\n")

    def go(files: dict[str, str], *args: str):  # case_*.py: no clash with this suite's test modules
        pytester.makepyfile(**files)
        return pytester.runpytest_inprocess("-p", "no:cacheprovider", "-o", "python_files=case_*.py", *args)

    return go


def test_unmarked_tests_that_open_a_socket_or_start_a_process_fail_naming_the_test_and_the_fix(run):
    result = run({f"case_{name}": source for name, (source, _) in CASES.items()})
    result.assert_outcomes(failed=len(CASES))
    out = result.stdout.str()
    for name, (_, what) in CASES.items():
        assert f"case_{name}.py::test_{name} {what}" in out, (name, out)
    assert out.count(FIX) >= len(CASES)


def test_the_same_tests_marked_integration_pass_and_pure_ones_need_no_mark(run):
    files = {f"case_{name}": marked(CASES[name][0]) for name in ("bind", "connect", "subprocess", "thread")}
    run({**files, "case_pure": PURE}).assert_outcomes(passed=5)


def test_a_service_fixture_fails_an_unmarked_test_before_the_service_starts(run):
    result = run({"case_fixture": "def test_fixture(s3_env):\n    pass\n"})
    result.assert_outcomes(errors=1)
    out = result.stdout.str()
    assert "case_fixture.py::test_fixture uses the service fixture(s) moto_endpoint, s3_env, " + FIX in out, out


def test_slow_and_multinode_tests_are_integration_and_left_out_of_the_fast_tier(run):
    files = {"case_slow": marked(CASES["bind"][0], "slow"),
             "case_multinode": marked(CASES["subprocess"][0], "multinode")}
    result = run(files, "-m", "not integration")
    result.assert_outcomes(deselected=2)
    run(files).assert_outcomes(passed=2)
