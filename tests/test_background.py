"""The suite's background fixtures (tests/background.py), in a pytest run of their own."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
from pathlib import Path

TESTS = Path(__file__).resolve().parent

CONFTEST = f"""
import sys, threading, time
sys.path.insert(0, {str(TESTS)!r})
import background

EVENTS = []

@background.session_fixture(turn=2)
def slow(config):
    EVENTS.append("slow set up in " + threading.current_thread().name)
    time.sleep(float(config.getoption("--sleep")))
    if config.getoption("--boom"):
        raise RuntimeError("boom in the set-up")
    yield 42
    EVENTS.append("slow torn down")

@background.session_fixture(turn=1)
def quick(config):
    EVENTS.append("quick set up in " + threading.current_thread().name)
    yield "q"
    EVENTS.append("quick torn down")

def pytest_addoption(parser):
    parser.addoption("--sleep", default="1")
    parser.addoption("--boom", action="store_true")

def pytest_collection_modifyitems(items):
    background.order_items(items)

def pytest_collection_finish(session):
    background.start(session.config, session.items)

def pytest_sessionfinish(session):
    background.stop()
    print("EVENTS", EVENTS)
    for line in background.timeline():
        print("TIMELINE", line)
"""

TESTS_FILE = """
import time

def test_uses_slow(slow):
    assert slow == 42
    print("RAN", "test_uses_slow")

def test_uses_quick(quick):
    print("RAN", "test_uses_quick")

def test_fails_when_asked(request):
    print("RAN", "test_fails_when_asked")
    assert request.config.getoption("maxfail") != 1

def test_other():
    print("RAN", "test_other")
"""


def run(tmp_path: Path, *args: str) -> tuple[list[str], list[str], str]:
    (tmp_path / "conftest.py").write_text(textwrap.dedent(CONFTEST))
    (tmp_path / "test_things.py").write_text(TESTS_FILE)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-s", "-q", *args],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    out = proc.stdout + proc.stderr
    ran = re.findall(r"RAN (\w+)", out)
    events = next((ast.literal_eval(m) for m in re.findall(r"EVENTS (\[.*\])", out)), None)
    assert events is not None, out
    return ran, events, out


def test_users_run_last_in_turn_order_and_each_fixture_is_set_up_once_in_the_background(tmp_path):
    ran, events, out = run(tmp_path)
    assert ran == ["test_fails_when_asked", "test_other", "test_uses_quick", "test_uses_slow"], out
    assert events == ["quick set up in background fixtures", "slow set up in background fixtures",
                      "slow torn down", "quick torn down"], out  # pytest's order: the last set up goes first
    assert "4 passed" in out, out
    timeline = re.findall(r"TIMELINE (\w+) +(\d+) -> +(\d+) s +\( *(\d+) s, background fixtures; first test waited", out)
    assert [t[0] for t in timeline] == ["quick", "slow"], out
    assert int(timeline[1][3]) == 1 and int(timeline[1][2]) >= 1, out  # slow's set-up sleeps 1 s


def test_a_run_that_stops_early_tears_down_what_the_background_set_up(tmp_path):
    ran, events, out = run(tmp_path, "-x", "--sleep", "0.5")
    assert ran == ["test_fails_when_asked"], out
    assert "1 failed" in out, out
    assert "slow torn down" in events and "quick torn down" in events, out


def test_a_set_up_that_fails_is_the_error_of_every_test_that_uses_it(tmp_path):
    ran, events, out = run(tmp_path, "--boom", "--sleep", "0")
    assert "test_uses_slow" not in ran, out
    assert "boom in the set-up" in out and "1 error" in out and "3 passed" in out, out
    assert "slow torn down" not in events and "quick torn down" in events, out
