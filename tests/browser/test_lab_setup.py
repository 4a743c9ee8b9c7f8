"""JupyterLab and nbgrader's extensions as installed, and course_tools.lab's configuration per role (no browser)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from course_tools.lab import (
    INSTRUCTOR_ONLY_PLUGINS,
    INSTRUCTOR_ONLY_SERVER_EXTENSIONS,
    SHARED_SERVER_EXTENSIONS,
    prepare,
)

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _jupyter(*args: str) -> str:
    proc = subprocess.run([sys.executable, "-m", "jupyter", *args], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return ANSI.sub("", proc.stdout + proc.stderr)


def test_jupyterlab_4_with_nbgrader_lab_extension_enabled():
    out = _jupyter("labextension", "list")
    assert re.search(r"JupyterLab v4\.6\.", out), out
    assert re.search(r"@jupyter/nbgrader v0\.9\.6 enabled\s+OK", out), out


def test_nbgrader_server_extensions_enabled():
    out = _jupyter("server", "extension", "list")
    for ext in SHARED_SERVER_EXTENSIONS + INSTRUCTOR_ONLY_SERVER_EXTENSIONS:
        assert re.search(rf"{re.escape(ext)} enabled", out), f"{ext} is not enabled:\n{out}"
        assert re.search(rf"{re.escape(ext)}\s+OK", out), f"{ext} does not load:\n{out}"


@pytest.mark.parametrize("role", ["student", "instructor"])
def test_launcher_configures_each_role(role, tmp_path):
    root, config, exchange = tmp_path / "root", tmp_path / "config", tmp_path / "exchange"
    root.mkdir()
    (root / "nbgrader_config.py").write_text("c = get_config()\n")
    base = {"PATH": "/usr/bin", "HOME": str(tmp_path / "home")}
    cmd, env, cwd = prepare(role, root, exchange, "ada" if role == "student" else None,
                            ["--port", "9999"], config_dir=config, env=base)

    assert cwd == root.resolve()
    assert cmd[:3] == [sys.executable, "-m", "jupyterlab"]
    assert f"--ServerApp.root_dir={root.resolve()}" in cmd and "--ServerApp.ip=127.0.0.1" in cmd
    assert cmd[-2:] == ["--port", "9999"]
    # the role's config comes first; the user's own config and settings still count
    assert env["JUPYTER_CONFIG_DIR"] == str(config)
    assert env["JUPYTER_CONFIG_PATH"] == str(tmp_path / "home" / ".jupyter")
    assert env["JUPYTERLAB_SETTINGS_DIR"] == str(tmp_path / "home" / ".jupyter" / "lab" / "user-settings")

    disabled = json.loads((config / "labconfig" / "page_config.json").read_text())["disabledExtensions"]
    server = json.loads((config / "jupyter_server_config.json").read_text())
    extensions = server["ServerApp"]["jpserver_extensions"]
    assert all(extensions[e] for e in SHARED_SERVER_EXTENSIONS)
    assert disabled.get("@jupyterlab/apputils-extension:announcements") is True
    assert server["KernelSpecManager"]["allowed_kernelspecs"] == ["python3"]
    assert server["LabApp"]["custom_css"] is True
    assert "jp-mod-readOnly" in (config / "custom" / "custom.css").read_text()
    if role == "student":
        assert all(disabled.get(p) is True for p in INSTRUCTOR_ONLY_PLUGINS)
        assert not any(extensions[e] for e in INSTRUCTOR_ONLY_SERVER_EXTENSIONS)
        nbconfig = (config / "nbgrader_config.py").read_text()
        assert "'lm-mechanics'" in nbconfig and repr(str(exchange.resolve())) in nbconfig
        assert "student_id = 'ada'" in nbconfig
    else:
        assert not any(p in disabled for p in INSTRUCTOR_ONLY_PLUGINS)
        assert all(extensions[e] for e in INSTRUCTOR_ONLY_SERVER_EXTENSIONS)
        assert not (config / "nbgrader_config.py").exists(), "the instructor uses the course's nbgrader_config.py"


def test_instructor_needs_a_course_root(tmp_path):
    with pytest.raises(SystemExit, match="nbgrader_config.py"):
        prepare("instructor", tmp_path, tmp_path / "exchange", config_dir=tmp_path / "c", env={})
