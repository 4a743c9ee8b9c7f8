"""Grade every submission of a class with nbgrader's own autograde, in parallel, resumably.

    python -m grading_engine.batch grade  ASSIGNMENT [...]   grade what is not graded yet (Ctrl-C and run again to resume)
    python -m grading_engine.batch report ASSIGNMENT [...]   grades.csv and an HTML/PNG report per assignment
    python -m grading_engine.batch status ASSIGNMENT [...]   how many submissions are graded, failed, to do

Run in the course directory (where nbgrader_config.py is), after
`nbgrader generate_assignment` and `nbgrader collect` or `nbgrader zip_collect`.
Results go to the course's gradebook (db_url, COURSE_DB_URL) and to
autograded/, so `nbgrader export`, `nbgrader generate_feedback` and the
formgrader work as after `nbgrader autograde`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _fmt_split(split: dict) -> str:
    if not split:
        return "no notebook was run"
    keys = ["kernel_start", "imports", "execution", "shutdown", "bookkeeping"]
    total = sum(split[k] for k in keys)
    return "  ".join(f"{k.replace('_', ' ')} {split[k]:.2f} s" for k in keys) + f"  (total {total:.2f} s/notebook)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m grading_engine.batch", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["grade", "report", "status"])
    ap.add_argument("assignments", nargs="+")
    ap.add_argument("--course-dir", type=Path, default=None, help="course directory (default: the current one)")
    ap.add_argument("--workers", "-j", type=int, default=None,
                    help="parallel workers of the LocalCluster (default: CPU count)")
    ap.add_argument("--scheduler", default=None, metavar="tcp://HOST:PORT",
                    help="grade on the Dask cluster of this scheduler (default: c.GradingEngine.dask_scheduler, "
                         "else a LocalCluster on this machine)")
    ap.add_argument("--engine", choices=["dask", "processes"], default=None,
                    help="what runs the workers (default: c.GradingEngine.batch_engine, 'dask')")
    ap.add_argument("--student", action="append", dest="students", help="only this student (repeatable)")
    ap.add_argument("--regrade", action="store_true", help="grade everything again, ignoring the journal")
    ap.add_argument("--retry-failed", action="store_true", help="grade again the submissions that failed")
    ap.add_argument("--cold", action="store_true",
                    help="start every kernel from scratch (no fork server with the setup imports done)")
    ap.add_argument("--graceful-shutdown", action="store_true",
                    help="wait for each kernel to shut down cleanly instead of stopping it at once")
    ap.add_argument("--job-timeout", type=float, default=3600.0, help="seconds before a submission's worker is killed")
    ap.add_argument("--no-progress", action="store_true")
    ap.add_argument("--report", type=Path, default=None, help="after grading, write the reports to this folder")
    ap.add_argument("--out", type=Path, default=None, help="report: output folder (default: reports/)")
    args = ap.parse_args(argv)

    from grading_engine.batch.runner import load_course, plan, time_split

    if args.command == "status":
        course = load_course(args.course_dir)
        jobs, done = plan(course, args.assignments)
        todo = {}
        for j in jobs:
            todo[j.assignment] = todo.get(j.assignment, 0) + 1
        print(f"{done} submission(s) graded or failed for good; to do: {todo or 'nothing'}")
        return 0

    if args.command == "report":
        from grading_engine.batch.report import write_reports

        course = load_course(args.course_dir)
        out = (args.out or course.root / "reports").resolve()
        paths = write_reports(args.assignments, out, course.root)
        for k, p in paths.items():
            print(f"{k}: {p}")
        return 0

    from grading_engine.batch.runner import BatchLocked, WorkerRefused, grade

    unreachable: tuple[type[BaseException], ...] = ()
    if args.engine != "processes":
        from grading_engine.batch.cluster import SchedulerUnreachable

        unreachable = (SchedulerUnreachable,)

    try:
        s = grade(args.assignments, args.course_dir, workers=args.workers, warm=not args.cold,
                  fast_shutdown=not args.graceful_shutdown, regrade=args.regrade,
                  retry_failed=args.retry_failed, students=args.students, progress=not args.no_progress,
                  job_timeout=args.job_timeout, scheduler=args.scheduler, engine=args.engine)
    except (BatchLocked, WorkerRefused, *unreachable) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    n = len(s.graded) + len(s.failed)
    rate = 60 * s.notebooks / s.seconds if s.seconds else 0
    print(f"graded {len(s.graded)}, failed {len(s.failed)}, already done {s.skipped}; "
          f"{s.notebooks} notebooks in {s.seconds:.1f} s ({rate:.1f} notebooks/min)")
    if n:
        print("time per notebook: " + _fmt_split(time_split(s.timings)))
    if s.retried:
        print(f"graded again after an infrastructure failure (a kernel that never answered, a worker "
              f"that could not set up): {len(s.retried)}; fork server restarts: {s.zygote_restarts}")
    for (a, st), why in sorted(s.failed.items()):
        last = [ln for ln in str(why).strip().splitlines() if ln.strip()][-1:] or [""]
        print(f"  FAILED {a}/{st}: {last[0][:200]}")
    if s.interrupted:
        print("interrupted: run the same command again to grade what is left", file=sys.stderr)
        return 130
    if args.report:
        from grading_engine.batch.report import write_reports

        for k, p in write_reports(args.assignments, args.report.resolve(), args.course_dir).items():
            print(f"{k}: {p}")
    return 0 if not s.failed else 1


if __name__ == "__main__":
    sys.exit(main())
