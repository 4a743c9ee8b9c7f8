"""The pip pins and the conda environment install the same packages."""

from __future__ import annotations

import re
from importlib import metadata

import yaml

from course_tools.paths import REPO_ROOT

PIN = re.compile(r"^([A-Za-z0-9_.\-\[\]]+)==([^\s;#]+)$")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements() -> dict[str, str]:
    pins = {}
    for line in (REPO_ROOT / "requirements.txt").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = PIN.match(line)
        assert m, f"requirements.txt line is not an exact pin: {line!r}"
        pins[_norm(m.group(1))] = m.group(2)
    return pins


def conda_pip_pins() -> tuple[dict[str, str], list]:
    env = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())
    deps = env["dependencies"]
    pip_lists = [d["pip"] for d in deps if isinstance(d, dict) and "pip" in d]
    assert len(pip_lists) == 1, "environment.yml needs exactly one pip: section"
    pins = {}
    for line in pip_lists[0]:
        m = PIN.match(line.strip())
        assert m, f"environment.yml pip line is not an exact pin: {line!r}"
        pins[_norm(m.group(1))] = m.group(2)
    return pins, deps


def test_every_requirement_is_an_exact_pin():
    pins = requirements()
    assert pins["torch"] == "2.13.0"
    assert pins["nbgrader"].startswith("0.9.")
    assert pins["jupyterlab"].startswith("4.")
    assert "transformers" in pins


def test_conda_environment_installs_the_same_pins():
    req = requirements()
    conda, deps = conda_pip_pins()
    only_pip = sorted(set(req) - set(conda))
    only_conda = sorted(set(conda) - set(req))
    differ = sorted(k for k in set(req) & set(conda) if req[k] != conda[k])
    assert not (only_pip or only_conda or differ), (
        f"only in requirements.txt: {only_pip}; only in environment.yml: {only_conda}; different versions: {differ}")
    assert "python=3.11" in deps


def test_installed_packages_match_the_pins():
    """The environment running the tests is the pinned one (catches a stale .venv)."""
    wrong = []
    for name, version in requirements().items():
        try:
            got = metadata.version(name)
        except metadata.PackageNotFoundError:
            wrong.append(f"{name} not installed")
            continue
        if got.split("+")[0] != version:
            wrong.append(f"{name} {got} (pinned {version})")
    assert not wrong, "; ".join(wrong)


def test_every_pin_installs_on_every_python_311():
    """Debian 12's python3 is 3.11.2: a pin that needs a later 3.11 (soupsieve 4 needs 3.11.5) breaks setup there."""
    from packaging.specifiers import SpecifierSet

    narrow = []
    for name in requirements():
        needs = metadata.metadata(name).get("Requires-Python")
        if needs and not SpecifierSet(needs).contains("3.11.0"):
            narrow.append(f"{name} needs Python {needs}")
    assert not narrow, "pins that refuse an early Python 3.11: " + "; ".join(narrow)


def test_importing_nbformat_compiles_no_grammar():
    """Every nbgrader command and batch worker imports nbformat: it must not build parsers at import time
    (rfc3987-syntax, pulled in by jsonschema 4.24+, compiles 38 Lark grammars: seconds per process)."""
    import subprocess
    import sys

    code = "import sys, nbformat, jsonschema; print(sorted(m for m in ('lark', 'rfc3987_syntax') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]", f"importing nbformat loaded {out}"
