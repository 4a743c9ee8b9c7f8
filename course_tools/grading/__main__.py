"""Instructor tools for checking and releasing notebooks.

    python -m course_tools.grading check [ASSIGNMENT ...]   lint, regenerate release/, grade reference, release and mutants
    python -m course_tools.grading release [ASSIGNMENT ...] only regenerate release/ from source/
    python -m course_tools.grading lint [ASSIGNMENT ...]    only the static checks
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from course_tools.grading.check import all_assignments, grade, sync_release
from course_tools.grading.lint import lint_assignment_files, lint_release, lint_source
from course_tools.grading.workspace import Workspace
from course_tools.paths import RELEASE_DIR, SOURCE_DIR, source_notebooks


def _lint(assignments: list[str], release: bool) -> int:
    n = 0
    for a in assignments:
        for p in source_notebooks(a):
            probs = lint_source(p)
            if release:
                probs += lint_release(p, RELEASE_DIR / a / p.name)
            for msg in probs:
                print(f"LINT {a}/{p.name}: {msg}")
            n += len(probs)
        for msg in lint_assignment_files(SOURCE_DIR / a):
            print(f"LINT {a}: {msg}")
            n += 1
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m course_tools.grading", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["check", "release", "lint"])
    ap.add_argument("assignments", nargs="*", help="assignment folders of source/ (default: all)")
    ap.add_argument("--workers", type=int, default=None, help="parallel nbgrader processes (default: CPU count)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary course directory and print its path")
    args = ap.parse_args(argv)

    known = all_assignments()
    assignments = args.assignments or known
    unknown = [a for a in assignments if a not in known]
    if unknown:
        ap.error(f"unknown assignment(s) {unknown}; source/ has {known}")

    if args.command == "lint":
        return 1 if _lint(assignments, release=True) else 0

    tmp = tempfile.mkdtemp(prefix="course-grading-")
    if args.command == "release":
        Workspace(Path(tmp), assignments).create()
        for a in assignments:
            changed = sync_release(Path(tmp), a)
            print(f"release/{a}: " + (f"updated {changed}" if changed else "up to date"))
        return 0

    problems = _lint(assignments, release=False)
    report = grade(assignments, Path(tmp), workers=args.workers)
    for a in assignments:
        changed = sync_release(Path(tmp), a)
        if changed:
            print(f"release/{a}: updated {changed}")
    for a in assignments:
        for p in source_notebooks(a):
            for msg in lint_release(p, RELEASE_DIR / a / p.name):
                print(f"LINT {a}/{p.name} (release): {msg}")
                problems += 1
    print(report.render())
    ok = problems == 0 and not report.errors
    for r in report.notebooks:
        ids = set(r.test_ids)
        ok &= r.reference is not None and r.reference.auto_total(ids) == r.autograded_max
        ok &= r.release is not None and r.release.auto_total(ids) == 0
        ok &= all(r.mutant_caught(m, s) for m, s in r.mutants)
        ok &= all(any(m.cell == c for m, _ in r.mutants) for c in r.answer_ids)
    if args.keep:
        print(f"\ncourse directory kept at {tmp}")
    else:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    print("\nOK" if ok else "\nPROBLEMS: see above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
