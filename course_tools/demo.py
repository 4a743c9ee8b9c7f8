"""The course's main job, end to end, with real nbgrader commands.

In a fresh folder (``build/demo/`` by default) it:

1. copies the course (``nbgrader_config.py`` and ``source/``) into an
   instructor's course directory and runs ``nbgrader generate_assignment``;
2. releases every assignment to a real exchange directory
   (``nbgrader release_assignment``);
3. for three sample students, fetches (``nbgrader fetch_assignment``), works
   and submits (``nbgrader submit``): *alice* hands in the reference
   answers, *bob* hands in the blank notebooks, *carol* hands in the
   reference with plausible mistakes (the first mutant of every other answer
   cell, from ``tests/mutants/``);
4. collects (``nbgrader collect``), autogrades (``nbgrader autograde``),
   generates feedback (``nbgrader generate_feedback``) and exports the
   gradebook (``nbgrader export``) to ``grades.csv``;
5. prints a grade table per student and assignment.

The instructor's own gradebook, ``release/`` and ``source/`` are never touched.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import sys
import time
from collections import defaultdict
from pathlib import Path

import nbformat

from course_tools.grading.check import all_assignments
from course_tools.grading.mutants import load_mutants
from course_tools.grading.notebooks import answer_cells, read_notebook
from course_tools.grading.workspace import clean_env, run_nbgrader
from course_tools.paths import REPO_ROOT, SOURCE_DIR

COURSE_ID = "lm-mechanics"

STUDENTS = {
    "alice": "hands in the reference answers",
    "bob": "hands in the notebooks as released (blank)",
    "carol": "hands in answers with plausible mistakes",
}

STUDENT_CONFIG = """\
c = get_config()
c.CourseDirectory.course_id = "lm-mechanics"
c.Exchange.root = {exchange!r}
c.Exchange.path_includes_course = True
"""


def _step(msg: str) -> None:
    print(f"\n==> {msg}", flush=True)


def _grade_id(cell) -> str | None:
    return cell.get("metadata", {}).get("nbgrader", {}).get("grade_id")


def work_of(student: str, assignment: str, stem: str, fetched: nbformat.NotebookNode) -> nbformat.NotebookNode:
    """What a sample student hands in: the fetched notebook with its answer cells written in.

    Only cells a student may edit (code answers and written answers) change.
    """
    if student == "bob":
        return fetched
    reference = read_notebook(SOURCE_DIR / assignment / f"{stem}.ipynb")
    answers = {_grade_id(c): c.source for c in reference.cells if _grade_id(c)}
    if student == "carol":
        mutants = load_mutants(assignment, stem)
        for i, cell in enumerate(answer_cells(reference)):
            first = next((m for m in mutants if m.cell == cell.grade_id), None)
            if first is not None and i % 2 == 0:
                answers[cell.grade_id] = first.source
    out = nbformat.from_dict(fetched)
    for cell in out.cells:
        if cell.get("metadata", {}).get("nbgrader", {}).get("solution") and _grade_id(cell) in answers:
            cell.source = answers[_grade_id(cell)]
    return out


def run(workdir: Path, assignments: list[str]) -> list[dict]:
    t0 = time.perf_counter()
    if workdir.exists():
        shutil.rmtree(workdir)
    course = workdir / "instructor"
    exchange = workdir / "exchange"
    course.mkdir(parents=True)
    exchange.mkdir()
    env = clean_env()
    env["COURSE_EXCHANGE"] = str(exchange)
    log = workdir / "nbgrader.log"

    _step(f"instructor: copy the course to {course}")
    shutil.copy2(REPO_ROOT / "nbgrader_config.py", course / "nbgrader_config.py")
    for a in assignments:
        shutil.copytree(SOURCE_DIR / a, course / "source" / a,
                        ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))

    for a in assignments:
        _step(f"instructor: nbgrader generate_assignment {a} && nbgrader release_assignment {a}")
        run_nbgrader(["generate_assignment", a, "--force"], course, log, env)
        run_nbgrader(["release_assignment", a, "--force"], course, log, env)

    for student, what in STUDENTS.items():
        home = workdir / "students" / student
        home.mkdir(parents=True)
        (home / "nbgrader_config.py").write_text(STUDENT_CONFIG.format(exchange=str(exchange)))
        senv = dict(env, JUPYTERHUB_USER=student, USER=student)
        for a in assignments:
            _step(f"{student} ({what}): nbgrader fetch_assignment {a}, work, nbgrader submit {a}")
            run_nbgrader(["fetch_assignment", a], home, log, senv)
            for path in sorted((home / COURSE_ID / a).glob("*.ipynb")):
                nb = nbformat.read(str(path), as_version=4)
                nbformat.write(work_of(student, a, path.stem, nb), str(path))
            run_nbgrader(["submit", a, "--student", student], home, log, senv)

    for a in assignments:
        _step(f"instructor: nbgrader collect {a}; autograde; generate_feedback")
        run_nbgrader(["collect", a, "--update"], course, log, env)
        run_nbgrader(["autograde", a, "--force"], course, log, env)
        run_nbgrader(["generate_feedback", a, "--force"], course, log, env)

    _step("instructor: nbgrader export (grades.csv)")
    run_nbgrader(["export", "--to", str(workdir / "grades.csv")], course, log, env)
    with (workdir / "grades.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    print_table(rows, assignments)
    print(f"\nfeedback: {course / 'feedback'}\ngrades:   {workdir / 'grades.csv'}\n"
          f"log:      {log}\ndone in {time.perf_counter() - t0:.0f} s")
    return rows


def autograded_max(assignment: str) -> float:
    """Points of an assignment's test cells (written answers and tasks are graded by hand)."""
    from course_tools.grading.notebooks import autograded_points
    from course_tools.paths import source_notebooks

    return sum(autograded_points(read_notebook(p)) for p in source_notebooks(assignment))


def print_table(rows: list[dict], assignments: list[str]) -> None:
    scores: dict[str, dict[str, float]] = defaultdict(dict)
    for r in rows:
        scores[r["student_id"]][r["assignment"]] = float(r["raw_score"] or 0)
    width = max([len(a) for a in assignments] + [len("total")])
    print("\nAutograded points per student and assignment "
          "(written answers and plots wait for a person in the formgrader)\n")
    header = f"{'assignment':<{width}}  {'max':>6}  " + "  ".join(f"{s:>8}" for s in STUDENTS)
    print(header)
    print("-" * len(header))
    totals = defaultdict(float)
    total_max = 0.0
    for a in assignments:
        mx = autograded_max(a)
        total_max += mx
        cells = []
        for s in STUDENTS:
            got = scores.get(s, {}).get(a, 0.0)
            totals[s] += got
            cells.append(f"{got:8.1f}")
        print(f"{a:<{width}}  {mx:6.1f}  " + "  ".join(cells))
    print("-" * len(header))
    print(f"{'total':<{width}}  {total_max:6.1f}  " + "  ".join(f"{totals[s]:8.1f}" for s in STUDENTS))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="course-demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=REPO_ROOT / "build" / "demo")
    ap.add_argument("assignments", nargs="*", help="default: every assignment in source/")
    args = ap.parse_args(argv)
    assignments = args.assignments or all_assignments()
    run(args.workdir.resolve(), assignments)
    return 0


if __name__ == "__main__":
    sys.exit(main())
