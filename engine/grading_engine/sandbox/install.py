"""Install the ``course-sandbox`` kernelspec (idempotent)."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

from grading_engine.sandbox import DISPLAY_NAME, KERNEL_NAME


def kernelspec(packages: Sequence[str] = (), bwrap: str | None = None) -> dict:
    """The kernelspec; ``packages`` are the packages the notebooks import, mounted read-only in the sandbox.

    ``bwrap`` (GradingEngine.bwrap: "system" or a path; None or "bundled" is the default, the wheel's)
    reaches the launcher as ``--bwrap VALUE``.
    """
    package_parent = str(Path(__file__).resolve().parent.parent.parent)
    # -I: the launcher runs outside the sandbox with the notebook's folder as working directory; isolated
    # mode keeps a student's file (json.py, course/...) in that folder from shadowing any module it imports.
    boot = f"import sys; sys.path.insert(0, {package_parent!r}); from grading_engine.sandbox.kernel import main; sys.exit(main())"
    return {
        "argv": [sys.executable, "-I", "-c", boot, *(a for n in packages for a in ("--package", n)),
                 *(["--bwrap", bwrap] if bwrap and bwrap != "bundled" else []), "-f", "{connection_file}"],
        "display_name": DISPLAY_NAME,
        "language": "python",
        "interrupt_mode": "signal",
        "metadata": {"course": "grading sandbox: used by nbgrader autograde only"},
    }


def kernel_dir(prefix: str | None = None) -> Path:
    return Path(prefix or sys.prefix) / "share" / "jupyter" / "kernels" / KERNEL_NAME


def installed_packages(prefix: str | None = None) -> list[str] | None:
    """The packages the installed kernelspec mounts, or None when it is not installed."""
    target = kernel_dir(prefix) / "kernel.json"
    if not target.exists():
        return None
    argv = json.loads(target.read_text()).get("argv", [])
    return [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--package"]


def installed_bwrap(prefix: str | None = None) -> str | None:
    """The installed kernelspec's ``--bwrap`` choice ("bundled" when it names none), or None when not installed."""
    target = kernel_dir(prefix) / "kernel.json"
    if not target.exists():
        return None
    argv = json.loads(target.read_text()).get("argv", [])
    return next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--bwrap"), "bundled")


def install(prefix: str | None = None, packages: Sequence[str] = (), bwrap: str | None = None) -> tuple[Path, bool]:
    """Write the kernelspec into ``<prefix>/share/jupyter/kernels``; return (path, changed)."""
    d = kernel_dir(prefix)
    d.mkdir(parents=True, exist_ok=True)
    target = d / "kernel.json"
    text = json.dumps(kernelspec(packages, bwrap), indent=1) + "\n"
    if target.exists() and target.read_text() == text:
        return target, False
    target.write_text(text)
    return target, True
