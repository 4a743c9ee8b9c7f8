"""The integrity report, beside the grades.

    python -m grading_engine report ASSIGNMENT [--root DIR] [--brief]
    python -m grading_engine settings [--root DIR] [--GradingEngine.NAME=VALUE ...]   every setting, help and value

Run it in the course directory (where nbgrader_config.py is) after
``nbgrader autograde ASSIGNMENT``. It prints every submission's autograded
score next to what looked like interference, and writes
``integrity/ASSIGNMENT.csv``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _course_settings(root: Path | None) -> tuple[Path, str]:
    from nbgrader.coursedir import CourseDirectory
    from traitlets.config import Config

    if root is None:
        root = Path.cwd()
    from traitlets.config.loader import PyFileConfigLoader

    cfg = Config()
    cfg_file = root / "nbgrader_config.py"
    if cfg_file.exists():
        cfg = PyFileConfigLoader(str(cfg_file), path=str(root)).load_config()
    cd = CourseDirectory(config=cfg)
    return Path(cd.root or root), cd.db_url


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["settings"]:  # python -m grading_engine settings [--root DIR] [--GradingEngine.NAME=VALUE ...]
        from grading_engine.config import main as settings

        return settings(argv[1:])
    ap = argparse.ArgumentParser(prog="python -m grading_engine", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["report"])
    ap.add_argument("assignment")
    ap.add_argument("--root", type=Path, default=None, help="course directory (default: the current folder)")
    ap.add_argument("--brief", action="store_true", help="one line per notebook")
    args = ap.parse_args(argv)
    from grading_engine.record import render, write_csv

    root, db_url = _course_settings(args.root)
    text, rows = render(root, db_url, args.assignment, verbose=not args.brief)
    print(text)
    path = write_csv(root, args.assignment, rows)
    print(f"\n(written to {path})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
