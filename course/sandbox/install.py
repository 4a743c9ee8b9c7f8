"""Install the ``course-sandbox`` kernelspec (idempotent)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from course.sandbox import DISPLAY_NAME, KERNEL_NAME


def kernelspec() -> dict:
    package_parent = str(Path(__file__).resolve().parent.parent.parent)
    # -I: the launcher runs outside the sandbox with the notebook's folder as working directory; isolated
    # mode keeps a student's file (json.py, course/...) in that folder from shadowing any module it imports.
    boot = f"import sys; sys.path.insert(0, {package_parent!r}); from course.sandbox.kernel import main; sys.exit(main())"
    return {
        "argv": [sys.executable, "-I", "-c", boot, "-f", "{connection_file}"],
        "display_name": DISPLAY_NAME,
        "language": "python",
        "interrupt_mode": "signal",
        "metadata": {"course": "grading sandbox: used by nbgrader autograde only"},
    }


def kernel_dir(prefix: str | None = None) -> Path:
    return Path(prefix or sys.prefix) / "share" / "jupyter" / "kernels" / KERNEL_NAME


def install(prefix: str | None = None) -> tuple[Path, bool]:
    """Write the kernelspec into ``<prefix>/share/jupyter/kernels``; return (path, changed)."""
    d = kernel_dir(prefix)
    d.mkdir(parents=True, exist_ok=True)
    target = d / "kernel.json"
    text = json.dumps(kernelspec(), indent=1) + "\n"
    if target.exists() and target.read_text() == text:
        return target, False
    target.write_text(text)
    return target, True
