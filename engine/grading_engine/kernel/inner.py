"""The kernel process inside the sandbox: ipykernel behind an audit hook.

Started by :mod:`grading_engine.sandbox.kernel` as ``python -P -m grading_engine.kernel.inner
-f CONNECTION_FILE ...``. Before anything else it installs the audit hook
(:mod:`grading_engine.kernel.audit`) writing to the pipe the launcher holds, imports
numpy and torch and records the interpreter's state
(:mod:`grading_engine.kernel.probe`), then runs ipykernel.
"""

from __future__ import annotations

import os
import sys


def main() -> None:
    fd = int(os.environ.pop("COURSE_AUDIT_FD", "-1") or -1)
    from grading_engine.kernel import audit

    audit.install(fd)
    from grading_engine.kernel import probe

    probe.preload()
    from ipykernel.kernelapp import IPKernelApp

    app = IPKernelApp.instance()
    app.initialize(sys.argv[1:])
    probe.attach(app.shell)
    audit.emit("kernel.ready")
    app.start()


if __name__ == "__main__":
    main()
