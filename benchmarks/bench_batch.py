"""Benchmark: what an instructor would compare, on one synthetic class over the whole course, in one run.

    python benchmarks/bench_batch.py            # 40 students, every assignment in source/
    python benchmarks/bench_batch.py --quick    # 6 students
    python benchmarks/bench_batch.py --students 20 --assignments 04_hands_on_exercises --configs stock full

Makes a course directory in a temporary folder (the course's nbgrader_config.py
and source/, `nbgrader generate_assignment` for each assignment), then a
class of synthetic students handing in, for every notebook of the course:

* 40 % the reference answers ("correct"),
* 30 % the reference with about half of the answer cells replaced by a
  plausible wrong answer from tests/mutants/ ("partial"),
* 15 % the notebooks as released ("blank"),
* 15 % something broken ("broken"): a notebook that is not JSON, a kernel
  that dies in an answer cell, or a missing notebook.

Identical copies of the class are graded by each configuration (``--configs``):

* ``stock``: what instructors use today: `nbgrader autograde ASSIGNMENT`, one
  assignment after another, with the engine's block cut out of
  nbgrader_config.py (nothing of this project runs but two timestamp hooks);
* ``full``: `python -m grading_engine.batch grade` as configured (sandbox and
  evidence-based scoring on, warm sandboxed kernels, a Dask LocalCluster);
* ``full-pool``: the same on the former process pool (``--engine processes``);
* ``off``: the batch with ``GradingEngine.sandbox`` and ``evidence`` False
  (stock nbgrader's grading, plain kernels forked warm), for the split.

It prints, per configuration, wall time, notebooks per minute, the ratio to
stock, where the time per notebook goes (kernel start, imports, execution,
kernel shutdown, bookkeeping), the peak memory per worker (proportional set
size of the worker and every process under it: its kernels, sandboxes and
servers) and how many sandboxed kernels were warm; and whether each
configuration's grades equal stock nbgrader's.
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
import threading
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
    return "  ".join(f"{d.get(k, float('nan')):5.2f}" for k in keys)


def stock_config(text: str) -> str:
    """The course's nbgrader_config.py without the grading engine's block (between its two ``# ---`` rules)."""
    lines = text.splitlines(keepends=True)
    rules = [i for i, ln in enumerate(lines) if ln.startswith("# ----")]
    if len(rules) < 2:
        raise SystemExit("nbgrader_config.py: the engine's block (between two '# ----' lines) was not found")
    return "".join(lines[:rules[0]] + lines[rules[-1] + 1:])


def _pss_mb(proc) -> float:
    try:
        with open(f"/proc/{proc.pid}/smaps_rollup") as fh:
            for ln in fh:
                if ln.startswith("Pss:"):
                    return int(ln.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class PeakMemory(threading.Thread):
    """Samples, once a second, the memory of each process tree under this one: one tree per worker.

    Proportional set size, so pages a fork server shares with its kernels count once. The trees are the
    direct children of this process (a Dask nanny, a pool worker, a stock `nbgrader` command); this
    process itself (the batch's client, the LocalCluster's scheduler) is reported apart."""

    def __init__(self):
        super().__init__(daemon=True)
        self.stop_event = threading.Event()
        self.per_worker = 0.0
        self.main = 0.0

    def run(self):
        import psutil

        me = psutil.Process()
        while not self.stop_event.wait(1.0):
            try:
                self.main = max(self.main, _pss_mb(me))
                for child in me.children():
                    tree = [child, *child.children(recursive=True)]
                    self.per_worker = max(self.per_worker, sum(_pss_mb(p) for p in tree))
            except Exception:  # noqa: BLE001 - a process ended while sampled
                continue

    def __enter__(self):
        self.start()
        return self

    def __exit__(self, *exc):
        self.stop_event.set()
        self.join()


def auto_scores(db: Path) -> dict:
    out = {}
    for key, entry in dump(f"sqlite:///{db}").items():
        for nb, rec in entry["notebooks"].items():
            for cell, g in rec["grades"].items():
                out[(key, nb, cell)] = g[0]
    return out


def kernel_sources(course: Path) -> dict[str, int]:
    """How the sandboxed kernels of a batch run started: warm (from a sandbox server) or cold, per the records."""
    counts: dict[str, int] = {}
    for f in (course / "integrity").glob("*/*.json"):
        for nb in json.loads(f.read_text()).get("notebooks", {}).values():
            kind = (nb.get("execution") or {}).get("kernel") or "unknown"
            counts[kind] = counts.get(kind, 0) + 1
    return counts


CONFIGS = ["stock", "full", "full-pool", "off"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--students", type=int, default=40)
    ap.add_argument("--quick", action="store_true", help="6 students")
    ap.add_argument("--assignments", nargs="*", default=None, help="default: all of source/")
    ap.add_argument("--configs", nargs="+", choices=CONFIGS, default=CONFIGS, help="default: all four")
    ap.add_argument("--workers", type=int, default=None, help="batch workers (default: CPU count)")
    ap.add_argument("--scheduler", default=None, help="grade 'full' on the Dask cluster of this scheduler")
    ap.add_argument("--keep", action="store_true", help="keep the course directories")
    ap.add_argument("--workdir", type=Path, default=None, help="where the course directories go (default: the temp folder)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    args = ap.parse_args(argv)
    n = 6 if args.quick else args.students
    assignments = args.assignments or sorted(p.name for p in SOURCE_DIR.iterdir()
                                             if p.is_dir() and any(p.glob("*.ipynb")))
    workers = args.workers or os.cpu_count() or 1
    if args.workdir:
        Path(args.workdir).mkdir(parents=True, exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="bench-batch-", dir=args.workdir))
    print(f"course directories in {base}; {n} students; assignments {assignments}; {os.cpu_count()} CPUs; "
          f"configurations {args.configs}; load average {os.getloadavg()[0]:.1f}", flush=True)

    template = base / "template"
    template.mkdir()
    shutil.copy2(REPO / "nbgrader_config.py", template / "nbgrader_config.py")
    for a in assignments:
        shutil.copytree(SOURCE_DIR / a, template / "source" / a,
                        ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
        r = nbgrader(["generate_assignment", a, "--force"], template)
        if r.returncode:
            print(r.stdout, r.stderr)
            return 1
    students = make_class(template, assignments, n)
    n_nb = sum(len(list((template / "submitted" / s / a).glob("*.ipynb"))) for s in students for a in assignments)
    n_release = len(students) * sum(len(list((template / "release" / a).glob("*.ipynb"))) for a in assignments)
    print(f"class: {json.dumps({k: list(students.values()).count(k) for k in dict.fromkeys(KINDS)})}; "
          f"{n_nb} notebooks handed in ({n_release - n_nb} missing)", flush=True)
    figures: dict = {"students": n, "notebooks": n_nb, "assignments": assignments, "cpus": os.cpu_count(),
                     "workers": workers, "configs": {}}

    # Work done once per notebook for the whole class (the evidence's reference runs, cached in
    # GradingEngine.reference_cache) must not count for the first configuration that needs it: one
    # student per worker graded untimed first, by the batch grader with as many workers (the cache key
    # holds the kernels' threads, which the batch sets from the number of workers at once: a warm-up by
    # plain `nbgrader autograde`, one notebook at a time with more threads, filled the cache for another key).
    if any(c.startswith("full") for c in args.configs):
        warm = base / "warmup"
        shutil.copytree(template, warm)
        t0 = time.perf_counter()
        grade(assignments, warm, workers=workers, progress=False, students=list(students)[:workers])
        shutil.rmtree(warm, ignore_errors=True)
        print(f"warm-up (one student, untimed: the reference runs, cached for the whole class): "
              f"{time.perf_counter() - t0:.0f} s", flush=True)

    for name in args.configs:
        course = base / name
        shutil.copytree(template, course)
        cfg = course / "nbgrader_config.py"
        if name == "stock":
            cfg.write_text(stock_config(cfg.read_text()))
        if name == "off":
            cfg.write_text(cfg.read_text() + "\n# benchmark: the engine's two switches off\n"
                           "c.GradingEngine.sandbox = False\nc.GradingEngine.evidence = False\n")
        print(f"\n== {name}", flush=True)
        c0, t0 = cpu(), time.perf_counter()
        with PeakMemory() as mem:
            if name == "stock":
                with cfg.open("a") as fh:
                    fh.write("\n# benchmark: timestamps only (grading_engine.batch.timing)\n" + timing.CONFIG_LINES)
                tfile = base / "stock-timing.jsonl"
                for a in assignments:
                    ta = time.perf_counter()
                    r = nbgrader(["autograde", a, "--force"], course, BATCH_TIMING_FILE=str(tfile))
                    print(f"   {a}: {time.perf_counter() - ta:.0f} s (exit {r.returncode})", flush=True)
            else:
                s = grade(assignments, course, workers=workers, progress=False,
                          engine="processes" if name == "full-pool" else "dask",
                          scheduler=args.scheduler if name == "full" else None)
        wall = time.perf_counter() - t0
        f = {"wall": wall, "cpu": cpu() - c0, "nb_per_min": 60 * n_nb / wall,
             "peak_mb_per_worker": mem.per_worker, "peak_mb_main": mem.main}
        if name == "stock":
            ev = [(json.loads(ln)["event"], json.loads(ln)["t"]) for ln in tfile.read_text().splitlines()]
            per = timing.split(ev)
            k = len(per) or 1
            split = {key: sum(d.get(key, 0.0) for d in per) / k for key in ("imports", "execution")}
            ks = kernel_start_seconds("python3")
            split.update(ks)
            split["bookkeeping"] = wall / max(n_nb, 1) - sum(split.values())
            f["split"] = split
        else:
            f.update(split=time_split(s.timings), graded=len(s.graded), failed=len(s.failed),
                     kernels=kernel_sources(course))
        figures["configs"][name] = f
        print(f"{name}: {wall:.0f} s, {f['nb_per_min']:.1f} notebooks/min, peak {mem.per_worker:.0f} MB per worker"
              + (f"; kernels {f['kernels']}" if f.get("kernels") else ""), flush=True)

    print("\n== results (time per notebook in s; the batch's are per worker, its workers running at once)")
    print(f"{'':10}{'wall s':>8}{'nb/min':>8}{'x stock':>8}{'MB/wkr':>8}   kernel start  imports  execution"
          "  shutdown  bookkeeping")
    stock_fig = figures["configs"].get("stock")
    ref_scores = auto_scores(base / "stock" / "gradebook.db") if stock_fig else None
    for name, f in figures["configs"].items():
        ratio = stock_fig["wall"] / f["wall"] if stock_fig else float("nan")
        f["ratio_to_stock"] = ratio
        print(f"{name:10}{f['wall']:8.0f}{f['nb_per_min']:8.1f}{ratio:8.2f}{f['peak_mb_per_worker']:8.0f}   "
              f"{fmt_split(f['split'])}")
    # every configuration's grades against stock nbgrader's, or against the first configuration's without stock
    first = "stock" if stock_fig else next(iter(figures["configs"]))
    ref_scores = ref_scores if ref_scores is not None else auto_scores(base / first / "gradebook.db")
    against = "stock nbgrader" if first == "stock" else first
    for name in figures["configs"]:
        if name == first:
            continue
        other = auto_scores(base / name / "gradebook.db")
        differ = sorted(k for k in set(ref_scores) | set(other) if ref_scores.get(k) != other.get(k))
        figures["configs"][name][f"cells_differing_from_{first}"] = len(differ)
        print(f"{name}: {len(differ)} of {len(ref_scores)} graded cells differ from {against}"
              + (f", e.g. {differ[:3]}" if differ else ""))
    print(f"load average now {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1, default=str))
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
