"""The code's own rules: the import layering by process, and ruff."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent



def _tool(name: str) -> str:
    exe = BIN / name
    if exe.exists():
        return str(exe)
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: it is pinned in requirements.txt (python3 bootstrap.py setup)")
    return found


def test_imports_follow_the_layers_by_process():
    """.importlinter: the engine imports nothing of the course, students' package nothing of the engine,
    and inside the engine nothing imports upward (the kernel side imports only the protocol)."""
    proc = subprocess.run([_tool("lint-imports"), "--no-cache"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "0 broken" in proc.stdout


def test_a_broken_layer_is_caught(tmp_path):
    """The contract can fail: a kernel-side module that imports the grader side breaks it."""
    bad = REPO / "engine" / "grading_engine" / "kernel" / "_layer_probe_for_test.py"
    bad.write_text("import grading_engine.evidence.judge  # noqa: F401\n")
    try:
        proc = subprocess.run([_tool("lint-imports"), "--no-cache"], cwd=REPO, capture_output=True, text=True)
    finally:
        bad.unlink()
    assert proc.returncode != 0 and "grading_engine.kernel._layer_probe_for_test" in proc.stdout


def test_ruff_is_clean():
    proc = subprocess.run([_tool("ruff"), "check", "--no-cache", "."], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
