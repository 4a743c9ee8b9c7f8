"""Set up and check the grading sandbox.

    python -m course.sandbox install   install the course-sandbox kernelspec (idempotent)
    python -m course.sandbox check     can the sandbox start here? run a kernel in it and test its walls
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m course.sandbox", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["install", "check"])
    args = ap.parse_args(argv)
    if args.command == "install":
        from course.sandbox.install import install

        path, changed = install()
        print(f"kernelspec course-sandbox: {path} ({'written' if changed else 'up to date'})")
        from course.sandbox.kernel import matplotlib_cache

        matplotlib_cache()
        from course.sandbox.bwrap import availability

        ok, why = availability()
        print(("sandbox: OK, " if ok else "sandbox: CANNOT START: ") + why)
        return 0
    from course.sandbox.selftest import run_selftest

    return run_selftest()


if __name__ == "__main__":
    sys.exit(main())
