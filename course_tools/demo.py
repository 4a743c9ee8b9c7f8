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
4. collects (``nbgrader collect``), autogrades with the course's batch grader
   (``python -m grading_engine.batch grade``: nbgrader's own autograde per
   submission, sandbox and evidence checks on, in parallel workers), generates
   feedback (``nbgrader generate_feedback``), exports the gradebook
   (``nbgrader export``) to ``grades.csv``, and writes the batch reports
   (``reports/``) and the integrity reports (``integrity/``);
5. prints a grade table per student and assignment, one line per student on
   why it got its score (the checks it failed), and where the feedback HTML
   and the reports are.

The instructor's own gradebook, ``release/`` and ``source/`` are never touched.
"""

from __future__ import annotations

import argparse
import csv
import shutil
import subprocess
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from course_tools.grading.check import all_assignments
from course_tools.grading.mutants import load_mutants
from course_tools.grading.notebooks import answer_cells, read_notebook, test_cells
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
        _step(f"instructor: nbgrader collect {a}")
        run_nbgrader(["collect", a, "--update"], course, log, env)
    _step("instructor: python -m grading_engine.batch grade (nbgrader autograde of every submission, in the "
          "sandbox, in parallel workers), and its reports")
    run_tool(["grading_engine.batch", "grade", *assignments, "--no-progress", "--report", str(course / "reports")],
             course, log, env)
    for a in assignments:
        _step(f"instructor: nbgrader generate_feedback {a}; python -m grading_engine report {a}")
        run_nbgrader(["generate_feedback", a, "--force"], course, log, env)
        run_tool(["grading_engine", "report", a, "--brief"], course, log, env)

    _step("instructor: nbgrader export (grades.csv)")
    run_nbgrader(["export", "--to", str(workdir / "grades.csv")], course, log, env)
    with (workdir / "grades.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    print_table(rows, assignments)
    print_verdicts(verdicts(course, assignments))
    print_where(workdir, course, assignments, log)
    print(f"\ndone in {time.perf_counter() - t0:.0f} s")
    return rows


def run_tool(args: list[str], cwd: Path, log: Path, env: dict) -> None:
    """``python -m ARGS`` in ``cwd``; its output goes to the log, and with the error when it fails."""
    proc = subprocess.run([sys.executable, "-m", *args], cwd=cwd, env=env, capture_output=True, text=True)
    with log.open("a") as fh:
        fh.write(f"$ python -m {' '.join(args)}\n{proc.stdout}{proc.stderr}\n")
    if proc.returncode != 0:
        raise RuntimeError(f"python -m {' '.join(args)} failed with exit code {proc.returncode} in {cwd}:\n"
                           f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")


@dataclass
class Verdict:
    """Why a student got their autograded score: the test cells that did not give full points."""

    student: str
    got: float = 0.0
    max: float = 0.0
    checks: int = 0
    failing: dict[str, list[str]] = field(default_factory=dict)  # "assignment/notebook" -> grade_ids

    def line(self) -> str:
        lost = sum(len(v) for v in self.failing.values())
        head = f"{self.student:<6} {self.got:6.1f} of {self.max:.1f}: "
        if lost == 0:
            return head + f"full marks, all {self.checks} autograded checks pass"
        if self.got == 0:
            return head + f"zero, all {self.checks} autograded checks fail (nothing answered)"
        return head + f"partial, {lost} of {self.checks} checks fail: " + "; ".join(
            f"{where}: {', '.join(ids)}" for where, ids in self.failing.items())


def verdicts(course: Path, assignments: list[str]) -> list[Verdict]:
    """Per sample student, from the gradebook: points, and the autograded checks that lost points."""
    from grading_engine.batch.runner import load_course
    from nbgrader.api import Gradebook, MissingEntry

    c = load_course(course)
    out = []
    with Gradebook(c.db_url, c.course_id) as gb:
        for student in STUDENTS:
            v = Verdict(student)
            for a in assignments:
                for path in sorted((SOURCE_DIR / a).glob("*.ipynb")):
                    checks = {t.grade_id: t.points for t in test_cells(read_notebook(path))}
                    try:
                        grades = {g.name: g for g in gb.find_submission_notebook(path.stem, a, student).grades}
                    except MissingEntry:
                        grades = {}
                    for gid, points in checks.items():
                        got = (grades[gid].auto_score or 0.0) if gid in grades else 0.0
                        v.got, v.max, v.checks = v.got + got, v.max + points, v.checks + 1
                        if got < points - 1e-9:
                            v.failing.setdefault(f"{a}/{path.stem}", []).append(gid)
            out.append(v)
    return out


def print_verdicts(vs: list[Verdict]) -> None:
    print("\nWhy each student got their score (autograded checks):\n")
    for v in vs:
        print(f"  {v.line()}")


def print_where(workdir: Path, course: Path, assignments: list[str], log: Path) -> None:
    first = next(iter(STUDENTS))
    example = sorted((course / "feedback" / first / assignments[0]).glob("*.html")) if assignments else []
    print("\nWhere to look:")
    print(f"  feedback HTML (what each student gets back): {course / 'feedback'}/<student>/<assignment>/"
          + (f"\n    for example {example[0]}" if example else ""))
    print(f"  grade reports (score histogram, pass rate per question, worst first): "
          f"{course / 'reports'}/<assignment>.html and .png, {course / 'reports' / 'grades.csv'}")
    print(f"  integrity reports (what looked like interference): {course / 'integrity'}/<assignment>.csv")
    print(f"  gradebook export: {workdir / 'grades.csv'}")
    print(f"  every command's output: {log}")


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
