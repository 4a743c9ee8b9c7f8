"""Benchmark: what the grading sandbox and the integrity checks cost on one student's whole course.

    python benchmarks/bench_isolation.py              # every assignment in source/, one honest student
    python benchmarks/bench_isolation.py --repeat 2   # best of two timed runs per configuration

Makes a course directory in a temporary folder (the course's nbgrader_config.py
and source/, `nbgrader generate_assignment` for each assignment) and one
student who hands in the reference answers of every notebook. Then it grades
that student with stock `nbgrader autograde`, one assignment after another,
in three configurations of the same nbgrader_config.py:

* plain: COURSE_SANDBOX=off COURSE_INTEGRITY=off (stock nbgrader: the python3 kernel, stock scoring);
* sandbox: the bubblewrap kernel, stock scoring (COURSE_INTEGRITY=off);
* full: the sandbox and the evidence-based scoring (the course's default).

The integrity checks compare each notebook with three reference runs, computed
once per notebook version and cached (~/.cache/course-integrity); the first
student of a class pays for them. The script prints that first-student time
(cache emptied first) and the steady-state time of every configuration, and
checks that every configuration gives the student full marks.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from course_tools.paths import SOURCE_DIR  # noqa: E402

CONFIGS = {
    "plain": {"COURSE_SANDBOX": "off", "COURSE_INTEGRITY": "off"},
    "sandbox": {"COURSE_SANDBOX": "on", "COURSE_INTEGRITY": "off"},
    "full": {"COURSE_SANDBOX": "on", "COURSE_INTEGRITY": "on"},
}
STUDENT = "honest"


def nbgrader(args: list[str], cwd: Path, extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("COURSE_DB_URL", "COURSE_EXCHANGE")}
    env.update(extra, PYDEVD_DISABLE_FILE_VALIDATION="1")
    return subprocess.run([sys.executable, "-m", "nbgrader", *args], cwd=cwd, env=env, capture_output=True, text=True)


def make_course(root: Path, assignments: list[str]) -> int:
    shutil.copy2(REPO / "nbgrader_config.py", root / "nbgrader_config.py")
    n = 0
    for a in assignments:
        shutil.copytree(SOURCE_DIR / a, root / "source" / a,
                        ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
        r = nbgrader(["generate_assignment", a, "--force"], root, {})
        if r.returncode:
            raise SystemExit(f"generate_assignment {a} failed:\n{r.stdout}{r.stderr}")
        sub = root / "submitted" / STUDENT / a
        shutil.copytree(root / "release" / a, sub, ignore=shutil.ignore_patterns("*.ipynb"))
        for nb in (SOURCE_DIR / a).glob("*.ipynb"):
            shutil.copy2(nb, sub / nb.name)
            n += 1
    return n


def grade_all(root: Path, assignments: list[str], extra: dict[str, str]) -> float:
    t0 = time.perf_counter()
    for a in assignments:
        r = nbgrader(["autograde", a, "--student", STUDENT, "--force"], root, extra)
        if r.returncode:
            raise SystemExit(f"autograde {a} failed:\n{r.stdout[-3000:]}{r.stderr[-3000:]}")
    return time.perf_counter() - t0


def score(root: Path, assignments: list[str]) -> tuple[float, float]:
    """Autograded points of the student and their maximum (cells graded by hand left out)."""
    from nbgrader.api import Gradebook

    got = mx = 0.0
    with Gradebook(f"sqlite:///{root / 'gradebook.db'}") as gb:
        for a in assignments:
            for nb in gb.find_submission(a, STUDENT).notebooks:
                for g in nb.grades:
                    if g.auto_score is not None:
                        got, mx = got + g.auto_score, mx + g.max_score
    return got, mx


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--assignments", nargs="*", default=None, help="default: all of source/")
    ap.add_argument("--repeat", type=int, default=1, help="timed runs per configuration (the best is kept)")
    args = ap.parse_args(argv)
    assignments = args.assignments or sorted(p.name for p in SOURCE_DIR.iterdir()
                                             if p.is_dir() and any(p.glob("*.ipynb")))
    root = Path(tempfile.mkdtemp(prefix="bench-isolation-"))
    cache = Path(tempfile.mkdtemp(prefix="bench-isolation-cache-"))
    try:
        n = make_course(root, assignments)
        print(f"one student, {n} notebooks ({', '.join(assignments)}); {os.cpu_count()} CPUs; "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)
        first = grade_all(root, assignments, {**CONFIGS["full"], "COURSE_INTEGRITY_CACHE": str(cache)})
        print(f"full, first student of the class (reference runs computed and cached): {first:.1f} s", flush=True)
        best: dict[str, float] = {}
        for _ in range(args.repeat):
            for name, extra in CONFIGS.items():
                t = grade_all(root, assignments, {**extra, "COURSE_INTEGRITY_CACHE": str(cache)})
                got, mx = score(root, assignments)
                if got != mx:
                    print(f"WARNING: {name} gave the reference answers {got} / {mx}", flush=True)
                best[name] = min(t, best.get(name, float("inf")))
        base = best["plain"]
        print(f"\n{'configuration':<12} {'wall s':>8} {'s/notebook':>11} {'vs plain':>9}")
        for name, t in best.items():
            print(f"{name:<12} {t:8.1f} {t / n:11.2f} {t / base:8.2f}x")
        print(f"{'full, first':<12} {first:8.1f} {first / n:11.2f} {first / base:8.2f}x")
        print(f"\nload average after: {os.getloadavg()[0]:.1f}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
