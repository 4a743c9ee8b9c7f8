"""Benchmark: stock sequential `nbgrader autograde` against `python -m grading_engine.batch grade`, on one synthetic class.

    python benchmarks/bench_batch.py            # 40 students, every assignment in source/
    python benchmarks/bench_batch.py --quick    # 6 students: a few minutes
    python benchmarks/bench_batch.py --students 20 --assignments 04_hands_on_exercises --workers 2

Makes a course directory in a temporary folder (the course's nbgrader_config.py
and source/, `nbgrader generate_assignment` for each assignment), then a
class of synthetic students handing in, for every notebook of the course:

* 40 % the reference answers ("correct"),
* 30 % the reference with about half of the answer cells replaced by a
  plausible wrong answer from tests/mutants/ ("partial"),
* 15 % the notebooks as released ("blank"),
* 15 % something broken ("broken"): a notebook that is not JSON, a kernel
  that dies in an answer cell, or a missing notebook.

The same class is graded twice, from identical copies: by stock nbgrader,
one `nbgrader autograde ASSIGNMENT` after another, and by the batch command.
It prints wall time, notebooks per minute, the ratio, whether the two
gradebooks hold the same grades, and where the time per notebook goes
(kernel start, imports, execution, kernel shutdown, nbgrader bookkeeping).
The course's configuration applies to both (sandbox and integrity checks
included, unless COURSE_SANDBOX=off / COURSE_INTEGRITY=off are set).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import nbformat  # noqa: E402
from grading_engine.batch import timing  # noqa: E402
from grading_engine.batch.gradebook import dump  # noqa: E402
from grading_engine.batch.runner import grade, time_split  # noqa: E402  (imported now: the run takes long)

from course_tools.grading.mutants import load_mutants  # noqa: E402
from course_tools.grading.notebooks import answer_cells, read_notebook  # noqa: E402
from course_tools.paths import SOURCE_DIR  # noqa: E402

# 8 correct, 6 partial, 3 blank, 3 broken in every 20 students, interleaved so that small classes get each kind
KINDS = ["correct", "partial", "blank", "broken", "correct", "partial", "correct", "partial", "correct", "blank",
         "correct", "partial", "broken", "correct", "partial", "correct", "blank", "partial", "broken", "correct"]


def env() -> dict[str, str]:
    e = dict(os.environ)
    for k in ("COURSE_DB_URL", "COURSE_EXCHANGE", "JUPYTER_CONFIG_DIR"):
        e.pop(k, None)
    e["PYTHONPATH"] = str(REPO) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    return e


def nbgrader(args, cwd, **extra):
    return subprocess.run([sys.executable, "-m", "nbgrader", *args], cwd=cwd, env={**env(), **extra},
                          capture_output=True, text=True)


def gid(cell):
    return cell.get("metadata", {}).get("nbgrader", {}).get("grade_id")


def make_class(root: Path, assignments: list[str], n: int, seed: int = 0) -> dict[str, str]:
    rng = random.Random(seed)
    students = {f"st{i:03d}": KINDS[i % len(KINDS)] for i in range(n)}
    for a in assignments:
        release = sorted((root / "release" / a).glob("*.ipynb"))
        for s, kind in students.items():
            d = root / "submitted" / s / a
            d.mkdir(parents=True)
            (d / "timestamp.txt").write_text("2026-11-20 12:00:00.000000 UTC")
            broken = rng.choice(["invalid", "crash", "missing"]) if kind == "broken" else None
            victim = rng.randrange(len(release)) if broken else -1
            for i, rel in enumerate(release):
                nb = nbformat.read(str(rel), as_version=4)
                if kind != "blank":
                    ref = read_notebook(SOURCE_DIR / a / rel.name)
                    answers = {gid(c): c.source for c in ref.cells if gid(c)}
                    if kind == "partial":
                        muts = load_mutants(a, rel.stem)
                        for cell in answer_cells(ref):
                            options = [m for m in muts if m.cell == cell.grade_id]
                            if options and rng.random() < 0.5:
                                answers[cell.grade_id] = rng.choice(options).source
                    for c in nb.cells:
                        if c.get("metadata", {}).get("nbgrader", {}).get("solution") and gid(c) in answers:
                            c.source = answers[gid(c)]
                if i == victim:
                    if broken == "missing":
                        continue
                    if broken == "invalid":
                        (d / rel.name).write_text('{"cells": [ oops')
                        continue
                    first = next((c for c in nb.cells if c.get("metadata", {}).get("nbgrader", {}).get("solution")
                                  and c.cell_type == "code"), None)
                    if first is not None:
                        first.source = "import os\nos._exit(3)"
                nbformat.write(nb, str(d / rel.name))
    return students


def kernel_start_seconds(kernel_name: str, n: int = 3) -> dict[str, float]:
    """Mean time to start a kernel until it answers, and to shut it down gracefully (what nbclient does)."""
    from jupyter_client.manager import AsyncKernelManager

    async def once():
        rt = tempfile.mkdtemp(prefix="cs-")
        kw = {}
        if kernel_name != "python3":
            kw = {"transport": "ipc", "connection_file": rt + "/k.json", "ip": rt + "/k-ipc"}
        km = AsyncKernelManager(kernel_name=kernel_name, **kw)
        t0 = time.perf_counter()
        await km.start_kernel(cwd=rt)
        kc = km.client()
        kc.start_channels()
        await kc.wait_for_ready(timeout=120)
        t1 = time.perf_counter()
        kc.stop_channels()
        await km.shutdown_kernel(now=False)
        t2 = time.perf_counter()
        shutil.rmtree(rt, ignore_errors=True)
        return t1 - t0, t2 - t1

    res = [asyncio.run(once()) for _ in range(n)]
    return {"kernel_start": sum(r[0] for r in res) / n, "shutdown": sum(r[1] for r in res) / n}


def cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    s = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime + s.ru_utime + s.ru_stime


def fmt_split(d: dict[str, float]) -> str:
    keys = ["kernel_start", "imports", "execution", "shutdown", "bookkeeping"]
    return "  ".join(f"{k.replace('_', ' ')} {d.get(k, float('nan')):5.2f}" for k in keys)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--students", type=int, default=40)
    ap.add_argument("--quick", action="store_true", help="6 students")
    ap.add_argument("--assignments", nargs="*", default=None, help="default: all of source/")
    ap.add_argument("--workers", type=int, default=None, help="batch workers (default: CPU count)")
    ap.add_argument("--skip-stock", action="store_true", help="only the batch (for trying things)")
    ap.add_argument("--cold", action="store_true", help="batch without the kernel fork server")
    ap.add_argument("--engine", choices=["dask", "processes"], default=None,
                    help="batch workers on Dask (the default: a LocalCluster, or --scheduler) or the former pool")
    ap.add_argument("--scheduler", default=None, help="grade on the Dask cluster of this scheduler (tcp://HOST:PORT)")
    ap.add_argument("--keep", action="store_true", help="keep the course directories")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    n = 6 if args.quick else args.students
    assignments = args.assignments or sorted(p.name for p in SOURCE_DIR.iterdir()
                                             if p.is_dir() and any(p.glob("*.ipynb")))
    workers = args.workers or os.cpu_count() or 1
    base = Path(tempfile.mkdtemp(prefix="bench-batch-"))
    print(f"course directories in {base}; {n} students; assignments {assignments}; {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)

    stock = base / "stock"
    stock.mkdir()
    shutil.copy2(REPO / "nbgrader_config.py", stock / "nbgrader_config.py")
    for a in assignments:
        shutil.copytree(SOURCE_DIR / a, stock / "source" / a, ignore=shutil.ignore_patterns(".ipynb_checkpoints",
                                                                                            "__pycache__"))
        r = nbgrader(["generate_assignment", a, "--force"], stock)
        if r.returncode:
            print(r.stdout, r.stderr)
            return 1
    students = make_class(stock, assignments, n)
    n_nb = sum(len(list((stock / "submitted" / s / a).glob("*.ipynb"))) for s in students for a in assignments)
    n_release = len(students) * sum(len(list((stock / "release" / a).glob("*.ipynb"))) for a in assignments)
    print(f"class: {json.dumps({k: list(students.values()).count(k) for k in dict.fromkeys(KINDS)})}; "
          f"{n_nb} notebooks handed in ({n_release - n_nb} missing)", flush=True)
    ours = base / "batch"
    shutil.copytree(stock, ours)
    figures: dict = {"students": n, "notebooks": n_nb, "assignments": assignments, "cpus": os.cpu_count(),
                     "workers": workers}

    kernel = "python3"
    try:
        from grading_engine.plugin import integrity_requested
        from grading_engine.sandbox import KERNEL_NAME, requested

        if requested() or integrity_requested():
            kernel = KERNEL_NAME  # what grading_engine.plugin makes autograde use
    except ImportError:
        pass
    # Work done once per notebook for the whole class (the integrity checks'
    # reference runs, cached in ~/.cache/course-integrity) must not count for
    # whichever command runs first: grade one student untimed first.
    warm = base / "warmup"
    shutil.copytree(stock, warm)
    t0 = time.perf_counter()
    for a in assignments:
        nbgrader(["autograde", a, "--student", next(iter(students)), "--force"], warm)
    shutil.rmtree(warm, ignore_errors=True)
    print(f"warm-up (one student, untimed, fills caches shared by both runs): {time.perf_counter() - t0:.0f} s",
          flush=True)
    ks = kernel_start_seconds(kernel)
    print(f"kernel '{kernel}': start until it answers {ks['kernel_start']:.2f} s, graceful shutdown "
          f"{ks['shutdown']:.2f} s (mean of 3)", flush=True)

    if not args.skip_stock:
        with (stock / "nbgrader_config.py").open("a") as fh:
            fh.write("\n# benchmark: timestamps only (grading_engine.batch.timing)\n" + timing.CONFIG_LINES)
        tfile = base / "stock-timing.jsonl"
        print("\n== stock: nbgrader autograde, one assignment after another", flush=True)
        c0, t0 = cpu(), time.perf_counter()
        for a in assignments:
            ta = time.perf_counter()
            r = nbgrader(["autograde", a, "--force"], stock, BATCH_TIMING_FILE=str(tfile))
            print(f"   {a}: {time.perf_counter() - ta:.0f} s (exit {r.returncode})", flush=True)
        wall = time.perf_counter() - t0
        figures["stock"] = {"wall": wall, "cpu": cpu() - c0, "nb_per_min": 60 * n_nb / wall}
        ev = [(json.loads(ln)["event"], json.loads(ln)["t"]) for ln in tfile.read_text().splitlines()]
        per = timing.split(ev)
        k = len(per) or 1
        split = {key: sum(d.get(key, 0.0) for d in per) / k for key in ("imports", "execution")}
        split["kernel_start"] = ks["kernel_start"]
        split["shutdown"] = ks["shutdown"]
        split["bookkeeping"] = wall / max(n_nb, 1) - sum(split.values())
        figures["stock"]["split"] = split
        print(f"stock: {wall:.0f} s, {60 * n_nb / wall:.1f} notebooks/min", flush=True)

    print(f"\n== batch: python -m grading_engine.batch grade ... --workers {workers}", flush=True)
    c0, t0 = cpu(), time.perf_counter()
    s = grade(assignments, ours, workers=workers, warm=not args.cold, engine=args.engine, scheduler=args.scheduler)
    wall = time.perf_counter() - t0
    figures["batch"] = {"wall": wall, "cpu": cpu() - c0, "nb_per_min": 60 * n_nb / wall,
                        "split": time_split(s.timings), "graded": len(s.graded), "failed": len(s.failed),
                        "zygote": s.zygote}
    print(f"batch: {wall:.0f} s, {60 * n_nb / wall:.1f} notebooks/min; graded {len(s.graded)}, "
          f"could not grade {len(s.failed)}", flush=True)

    print("\n== results")
    print(f"{'':8}{'wall s':>9}{'nb/min':>9}   time per notebook (s): kernel start, imports, execution, "
          "shutdown, bookkeeping")
    for name in ("stock", "batch"):
        if name in figures:
            f = figures[name]
            print(f"{name:8}{f['wall']:9.0f}{f['nb_per_min']:9.1f}   {fmt_split(f['split'])}")
    bsplit = figures["batch"]["split"]
    if bsplit:
        print(f"batch per-notebook times are per worker ({workers} at once); "
              f"{100 * bsplit.get('warm_fraction', 0):.0f}% of kernels came from the fork server")
    if "stock" in figures:
        ratio = figures["stock"]["wall"] / figures["batch"]["wall"]
        figures["ratio"] = ratio
        same = dump(f"sqlite:///{stock / 'gradebook.db'}") == dump(f"sqlite:///{ours / 'gradebook.db'}")
        figures["same_grades"] = same
        print(f"ratio stock/batch wall time: {ratio:.2f}   same grades in both gradebooks: {'yes' if same else 'NO'}")
    print(f"load average now {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1, default=str))
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
