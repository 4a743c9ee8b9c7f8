"""The grading sandbox (grading_engine.sandbox): its command line, its kernelspec and, in a real kernel, its walls.

CI installs bubblewrap (.ci/system-packages.sh); on a machine where it cannot
start these tests fail with the sandbox's own explanation, unless
COURSE_SANDBOX=off says that grading here runs without it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from course_tools.paths import REPO_ROOT
from grading_engine.sandbox import KERNEL_NAME, REFUSAL, requested
from grading_engine.sandbox.bwrap import Limits, availability, build_command, sandbox_env

needs_sandbox = pytest.mark.skipif(not requested(), reason="COURSE_SANDBOX=off: grading here runs without the sandbox")


@needs_sandbox
def test_bubblewrap_can_start_here():
    ok, why = availability()
    assert ok, REFUSAL.format(why=why)


def test_the_command_exposes_nothing_of_the_course(tmp_path):
    cmd = build_command(["python"], workdir_name="w", home_dir=tmp_path / "h", run_dir=tmp_path / "r",
                        etc_dir=tmp_path / "e", env=sandbox_env(Limits(), packages=["course"]), uid=200_001,
                        limits=Limits(), packages=["course"])
    for flag in ("--unshare-net", "--unshare-pid", "--die-with-parent", "--new-session", "--clearenv"):
        assert flag in cmd
    binds = [cmd[i + 1] for i, a in enumerate(cmd) if a in ("--bind", "--ro-bind")]
    for forbidden in (REPO_ROOT, REPO_ROOT / "source", Path.home(), Path("/")):
        assert str(forbidden) not in binds, f"{forbidden} is bound into the sandbox"
    assert str(REPO_ROOT / "course") in binds  # the support package, read-only
    engine = REPO_ROOT / "engine" / "grading_engine"
    assert str(engine / "kernel") in binds and str(engine / "protocol.py") in binds  # the engine's kernel side
    assert not any(b.startswith(str(engine / part)) for b in binds for part in ("batch", "evidence", "preprocessors"))
    writable = [cmd[i + 2] for i, a in enumerate(cmd) if a == "--bind"]
    assert writable == ["/home/student", "/run/kernel"]
    assert "setpriv" in " ".join(cmd) and "--reuid=200001" in cmd


def test_the_environment_is_not_inherited(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    env = sandbox_env(Limits())
    assert "AWS_SECRET_ACCESS_KEY" not in env and env["HF_HUB_OFFLINE"] == "1"


def test_kernelspec_install_is_idempotent(tmp_path):
    from grading_engine.sandbox.install import install

    path, changed = install(str(tmp_path))
    assert changed and path.parent.name == KERNEL_NAME
    spec = json.loads(path.read_text())
    # isolated mode: a student's file in the working folder cannot shadow the launcher's imports
    assert spec["argv"][1] == "-I" and spec["argv"][-2:] == ["-f", "{connection_file}"]
    assert install(str(tmp_path)) == (path, False)


def test_the_launcher_refuses_tcp(tmp_path, capsys):
    from grading_engine.sandbox.kernel import main

    conn = tmp_path / "k.json"
    conn.write_text(json.dumps({"transport": "tcp", "ip": "127.0.0.1", "shell_port": 1, "iopub_port": 2,
                                "stdin_port": 3, "control_port": 4, "hb_port": 5, "key": "k",
                                "signature_scheme": "hmac-sha256"}))
    os.environ.pop("COURSE_SANDBOX", None)
    if not requested():
        pytest.skip("COURSE_SANDBOX=off")
    assert main(["-f", str(conn)]) == 2
    assert "ipc" in capsys.readouterr().err


def test_autograde_refuses_loudly_without_bubblewrap(tmp_path):
    """bwrap not on PATH: nbgrader autograde stops before touching any submission."""
    (tmp_path / "nbgrader_config.py").write_text((REPO_ROOT / "nbgrader_config.py").read_text())
    env = dict(os.environ, PATH=str(Path(sys.executable).parent), PYTHONPATH=str(REPO_ROOT))
    env.pop("COURSE_SANDBOX", None)
    p = subprocess.run([sys.executable, "-m", "nbgrader", "autograde", "anything"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert "refuses" in p.stdout + p.stderr and "bubblewrap" in p.stdout + p.stderr


def test_opting_out_warns(tmp_path):
    (tmp_path / "nbgrader_config.py").write_text((REPO_ROOT / "nbgrader_config.py").read_text())
    env = dict(os.environ, COURSE_SANDBOX="off", PYTHONPATH=str(REPO_ROOT))
    code = "from grading_engine.preprocessors.execute import require_sandbox; require_sandbox()"
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and "WITHOUT isolation" in p.stderr


@needs_sandbox
def test_the_walls_hold():
    """A real sandbox kernel: unprivileged, no network, nothing of the course visible, writes stay inside,
    a fork bomb and a memory bomb stopped, interrupts delivered, audit events out."""
    from grading_engine.sandbox.selftest import run_checks

    checks, start = run_checks(nproc=48, memory_mb=1024)
    failed = [f"{c.name}: {c.detail}" for c in checks if not c.ok]
    assert not failed, "\n".join(failed)
    print(f"sandbox kernel start: {start:.1f} s")
