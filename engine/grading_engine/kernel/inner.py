"""The kernel process inside the sandbox: ipykernel behind an audit hook.

Started by :mod:`grading_engine.sandbox.kernel` as ``python -P -m grading_engine.kernel.inner
--audit-fd N [--preload MODULES] [--watch MODULES] -f CONNECTION_FILE ...``. Before anything else it
installs the audit hook (:mod:`grading_engine.kernel.audit`) writing to the inherited pipe ``N``,
imports the preloaded modules (comma-separated; default numpy and torch) and records the
interpreter's state (:mod:`grading_engine.kernel.probe`), then runs ipykernel with the rest of
its arguments.
"""

from __future__ import annotations

import argparse
import sys


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    ap = argparse.ArgumentParser(prog="grading_engine.kernel.inner", allow_abbrev=False, add_help=False)
    ap.add_argument("--audit-fd", type=int, default=-1, help="inherited pipe for the audit events (-1: none)")
    ap.add_argument("--preload", default=None, help="modules imported before student code (comma-separated)")
    ap.add_argument("--watch", default="", help="modules whose functions the probe also watches")
    return ap.parse_known_args(argv)


def _names(text: str) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


def main() -> None:
    args, kernel_args = parse_args(sys.argv[1:])
    run(args.audit_fd, None if args.preload is None else _names(args.preload), _names(args.watch), kernel_args)


def run(audit_fd: int, preload: list[str] | None, watch: list[str], kernel_args: list[str]) -> None:
    """Audit hook, preloads, the probe's snapshot, then ipykernel: a cold kernel and a warm one
    (:mod:`grading_engine.kernel.warm`, whose server imported the preloads already) do exactly this."""
    from grading_engine.kernel import audit

    audit.install(audit_fd)
    from grading_engine.kernel import probe

    extra = [m for m in watch if m not in probe.WATCH_MODULES]
    probe.WATCH_MODULES = probe.WATCH_MODULES + tuple(extra)  # read when the probe records the state
    if preload is None:
        probe.preload()
    else:
        from grading_engine.protocol import import_preload

        for name in preload:
            try:
                import_preload(name)
            except Exception:  # noqa: BLE001 - a module that is not installed is skipped, as probe.preload does
                pass
        probe.capture()
    from ipykernel.kernelapp import IPKernelApp

    from grading_engine.protocol import GRADING_KERNEL_ARGS

    kernel_args = [*kernel_args, *GRADING_KERNEL_ARGS]
    sys.argv = [sys.argv[0], *kernel_args]
    app = IPKernelApp.instance()
    app.initialize(kernel_args)
    probe.attach(app.shell)
    audit.emit("kernel.ready")
    app.start()


if __name__ == "__main__":
    main()
