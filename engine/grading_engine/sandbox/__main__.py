"""Set up and check the grading sandbox.

    python -m grading_engine.sandbox install [--package NAME ...]   install the course-sandbox kernelspec (idempotent)
    python -m grading_engine.sandbox check     can the sandbox start here? run a kernel in it and test its walls
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
    args = ap.parse_args(argv)
    if args.command == "install":
        from grading_engine.sandbox.install import install

        path, changed = install(packages=args.packages)
        print(f"kernelspec course-sandbox: {path} ({'written' if changed else 'up to date'})")
        from grading_engine.sandbox.kernel import matplotlib_cache

        matplotlib_cache()
        from grading_engine.sandbox.bwrap import availability

        ok, why = availability()
        print(("sandbox: OK, " if ok else "sandbox: CANNOT START: ") + why)
        return 0
    from grading_engine.sandbox.selftest import run_selftest

    return run_selftest()


if __name__ == "__main__":
    sys.exit(main())
