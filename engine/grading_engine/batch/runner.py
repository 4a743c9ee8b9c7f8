"""The batch grader's parent process: queue, workers, merge, journal, progress.

Design (see also :mod:`grading_engine.batch.worker` and :mod:`grading_engine.batch.gradebook`):

* Work unit: one student's submission of one assignment
  (``submitted/<student>/<assignment>/``).
* Workers: N processes, each with a private course directory under
  ``.batch/workers/``; each grades one submission at a time with nbgrader's
  own ``Autograde`` converter against a private SQLite gradebook.
* Merge: only this process writes the instructor's gradebook (SQLite or
  PostgreSQL, whatever ``db_url`` says). For each finished submission it
  (1) swaps the new ``autograded/<student>/<assignment>/`` folder into place
  by rename, (2) replaces the submission's rows in the gradebook in one
  transaction, (3) writes the journal entry ``.batch/journal/<assignment>/<student>.json``
  with a fingerprint of the submission, the assignment's source and the
  nbgrader configuration. Each step is idempotent, and the journal entry is
  written last, so a run stopped anywhere (Ctrl-C, a crash, a killed worker)
  and started again grades exactly the submissions without a matching
  journal entry, and ends with the gradebook an uninterrupted run makes.
* Failures: a submission nbgrader cannot grade is recorded as failed (its
  rows are whatever nbgrader left, as with stock autograde) and the batch
  goes on; a worker that dies is replaced and its job retried once, and so
  is a submission whose grading failed before any of its code ran (the
  worker could not set up, or a kernel never answered: the worker then
  starts a fresh fork server).
"""

from __future__ import annotations

import ast
import fcntl
import hashlib
import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat

STATE_DIR = ".batch"
MAX_ATTEMPTS = 2
# Files that grading one submission writes besides autograded/ and the
# gradebook, relative to the course root: the integrity record of
# grading_engine (flags shown beside the grade). The worker hands them
# back and the merge puts them in place, replacing the old one.
SIDE_FILES = ["integrity/{assignment}/{student}.json"]


# --------------------------------------------------------------------------- course configuration

@dataclass
class Course:
    root: Path
    db_url: str
    course_id: str
    config_file: Path
    ignore: list[str]

    @property
    def state(self) -> Path:
        return self.root / STATE_DIR


def load_course(course_dir: Path | str | None = None) -> Course:
    """The course's nbgrader configuration, read the way nbgrader reads it."""
    from nbgrader.apps.baseapp import NbGrader

    course_dir = Path(course_dir or os.getcwd()).resolve()
    cwd = os.getcwd()
    os.chdir(course_dir)
    try:
        app = NbGrader()
        app.initialize([])
        cd = app.coursedir
        root = Path(cd.root).resolve()
        return Course(root=root, db_url=cd.db_url, course_id=cd.course_id,
                      config_file=root / "nbgrader_config.py", ignore=list(cd.ignore))
    finally:
        os.chdir(cwd)


# --------------------------------------------------------------------------- fingerprints and journal

def _hash_tree(h, root: Path, ignore_names: set[str] = frozenset()) -> None:
    if not root.exists():
        h.update(b"<missing>")
        return
    for p in sorted(root.rglob("*")):
        if any(part in ignore_names for part in p.relative_to(root).parts):
            continue
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + b"\0")
            h.update(hashlib.sha256(p.read_bytes()).digest())


def source_fingerprint(course: Course, assignment: str) -> str:
    h = hashlib.sha256()
    _hash_tree(h, course.root / "source" / assignment, {".ipynb_checkpoints", "__pycache__"})
    if course.config_file.exists():
        h.update(course.config_file.read_bytes())
    return h.hexdigest()


def submission_fingerprint(course: Course, assignment: str, student: str, source_fp: str) -> str:
    h = hashlib.sha256(source_fp.encode())
    _hash_tree(h, course.root / "submitted" / student / assignment)
    return h.hexdigest()


def journal_path(course: Course, assignment: str, student: str) -> Path:
    return course.state / "journal" / assignment / f"{student}.json"


def read_journal(course: Course, assignment: str, student: str) -> dict | None:
    p = journal_path(course, assignment, student)
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------- warm-up modules

def setup_imports(notebooks: list[Path]) -> list[str]:
    """Modules imported at the top level of the notebooks' setup cells (their first code cell)."""
    mods: list[str] = []
    for path in notebooks:
        try:
            nb = nbformat.read(str(path), as_version=4)
        except Exception:  # noqa: BLE001
            continue
        code = next((c for c in nb.cells if c.cell_type == "code" and c.source.strip()), None)
        if code is None:
            continue
        src = "\n".join(ln for ln in code.source.splitlines() if not ln.lstrip().startswith(("%", "!")))
        try:
            tree = ast.parse(src)
        except SyntaxError:
            continue
        for node in tree.body:
            if isinstance(node, ast.Import):
                mods += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                mods.append(node.module)
    seen: list[str] = []
    for m in ["IPython", "matplotlib_inline.backend_inline", *mods]:
        if m not in seen:
            seen.append(m)
    return seen


# --------------------------------------------------------------------------- jobs and results

@dataclass
class Job:
    assignment: str
    student: str
    notebooks: int
    fingerprint: str
    attempts: int = 0


@dataclass
class Summary:
    graded: list[tuple[str, str]] = field(default_factory=list)
    failed: dict[tuple[str, str], str] = field(default_factory=dict)
    skipped: int = 0
    interrupted: bool = False
    seconds: float = 0.0
    notebooks: int = 0
    timings: list[dict] = field(default_factory=list)
    zygote: dict = field(default_factory=dict)
    retried: list[tuple[str, str, str]] = field(default_factory=list)  # graded again after an infrastructure failure
    zygote_restarts: int = 0

    @property
    def ok(self) -> bool:
        return not self.failed and not self.interrupted

    def split(self) -> dict[str, float]:
        """Mean seconds per notebook: kernel start, imports, execution, shutdown, nbgrader bookkeeping."""
        return time_split(self.timings)


def time_split(timings: list[dict]) -> dict[str, float]:
    keys = ["kernel_start", "imports", "execution", "shutdown"]
    tot = {k: 0.0 for k in keys}
    n_nb = 0
    book = 0.0
    warm = 0
    for t in timings:
        nbs = t.get("notebooks", [])
        n_nb += len(nbs)
        inside = 0.0
        for d in nbs:
            for k in keys:
                tot[k] += d.get(k, 0.0)
                inside += d.get(k, 0.0)
            warm += int(d.get("warm", 0))
        book += t.get("prepare", 0) + t.get("autograde", 0) + t.get("export", 0) + t.get("merge", 0) - inside
    if not n_nb:
        return {}
    out = {k: v / n_nb for k, v in tot.items()}
    out["bookkeeping"] = book / n_nb
    out["notebooks"] = n_nb
    out["warm_fraction"] = warm / n_nb
    return out


class Worker:
    def __init__(self, k: int, course: Course, run: dict, env: dict[str, str]):
        self.k = k
        self.dir = course.state / "workers" / f"w{k}"
        self.course = course
        self.run = run
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.job: Job | None = None
        self.started = 0.0
        self.buf = b""
        self.log = course.state / "logs" / f"worker{k}.log"

    def start(self, assignments: list[str]) -> None:
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        shutil.copy2(self.course.config_file, self.dir / "nbgrader_config.py")
        for a in assignments:
            shutil.copytree(self.course.root / "source" / a, self.dir / "source" / a,
                            ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
        env = dict(self.env)
        env["COURSE_DB_URL"] = f"sqlite:///{self.dir / 'gradebook.db'}"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "grading_engine.batch.worker"], cwd=self.dir, env=env,
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                         start_new_session=True)
        self.send(self.run)
        self.buf = b""
        self.job = None

    def send(self, msg: dict) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(msg).encode() + b"\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        """Stop the worker now; it kills its kernels on SIGTERM (SIGKILL after 3 s)."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.proc.terminate()
                self.proc.wait(timeout=3)
            except (OSError, subprocess.TimeoutExpired):
                pass
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                pass
            self.proc.wait()
        self.proc = None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            try:
                self.send({"stop": True})
                self.proc.stdin.close()
                self.proc.wait(timeout=20)
            except (OSError, subprocess.TimeoutExpired, ValueError):
                pass
        self.kill()


# --------------------------------------------------------------------------- the batch

def discover(course: Course, assignment: str) -> list[str]:
    sub = course.root / "submitted"
    if not sub.exists():
        return []
    return sorted(p.parent.name for p in sub.glob(f"*/{assignment}") if p.is_dir())


def plan(course: Course, assignments: list[str], students: list[str] | None = None, regrade: bool = False,
         retry_failed: bool = False) -> tuple[list[Job], int]:
    """Submissions still to grade, and how many are already graded (journal matches)."""
    from grading_engine.batch.gradebook import engine, graded_students

    db = engine(course.db_url)
    jobs: list[Job] = []
    done = 0
    try:
        for a in assignments:
            src_fp = source_fingerprint(course, a)
            in_gradebook = graded_students(db, a)
            for s in discover(course, a):
                if students and s not in students:
                    continue
                fp = submission_fingerprint(course, a, s, src_fp)
                n = len(list((course.root / "submitted" / s / a).glob("*.ipynb"))) or 1
                j = read_journal(course, a, s)
                if not regrade and j and j.get("fingerprint") == fp:
                    if j.get("status") == "ok" and s in in_gradebook:
                        done += 1
                        continue
                    if j.get("status") == "failed" and not retry_failed:
                        done += 1
                        continue
                jobs.append(Job(a, s, n, fp))
    finally:
        db.dispose()
    jobs.sort(key=lambda j: (-j.notebooks, j.assignment, j.student))
    return jobs, done


class BatchLocked(RuntimeError):
    pass


class WorkerRefused(RuntimeError):
    """The course's nbgrader configuration refused to autograde (e.g. no sandbox)."""


def grade(assignments: list[str], course_dir: Path | str | None = None, workers: int | None = None,
          warm: bool = True, fast_shutdown: bool = True, regrade: bool = False, retry_failed: bool = False,
          students: list[str] | None = None, progress: bool = True, job_timeout: float = 3600.0,
          stop_after: int | None = None) -> Summary:
    """Grade every submission of ``assignments`` that is not graded yet. See the module docstring."""
    from grading_engine.batch import gradebook as gbm

    t_start = time.perf_counter()
    course = load_course(course_dir)
    course.state.mkdir(parents=True, exist_ok=True)
    lock = open(course.state / "lock", "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise BatchLocked(f"another batch grading run is using {course.root}")
    db = gbm.engine(course.db_url)
    summary = Summary()
    pool: list[Worker] = []
    bar = None
    try:
        missing = [a for a in assignments if not gbm.assignment_exists(db, a)]
        if missing:
            raise SystemExit(f"not in the gradebook: {missing}; run `nbgrader generate_assignment` for them first")
        jobs, summary.skipped = plan(course, assignments, students, regrade, retry_failed)
        if not jobs:
            return summary
        run_dir = course.state / "run"
        shutil.rmtree(run_dir, ignore_errors=True)
        run_dir.mkdir(parents=True)
        template = run_dir / "template.db"
        gbm.make_template(template, db, course.course_id)
        definitions = {}
        with db.connect() as conn:
            for a in assignments:
                p = run_dir / f"definitions-{a}.json"
                p.write_text(json.dumps(gbm.rows_to_json(gbm.definition_rows(conn, a))))
                definitions[a] = str(p)
        preload = None
        if warm:
            preload = setup_imports(sorted(p for a in assignments for p in (course.root / "source" / a).glob("*.ipynb")))
        run = {"course_root": str(course.root), "template_db": str(template), "definitions": definitions,
               "preload": preload, "fast_shutdown": fast_shutdown}
        env = dict(os.environ)
        env.pop("COURSE_DB_URL", None)
        # the workers run this very `course` package, installed or not; the
        # kernels get the environment unchanged (the worker restores it)
        here = str(Path(__file__).resolve().parents[2])
        env["BATCH_ORIG_PYTHONPATH"] = json.dumps(os.environ.get("PYTHONPATH"))
        env["BATCH_EXTRA_PATH"] = here
        env["PYTHONPATH"] = here + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")
        env.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
        n_workers = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
        pool = [Worker(k, course, run, env) for k in range(n_workers)]
        for w in pool:
            w.start(assignments)

        queue = deque(jobs)
        total_nb = sum(j.notebooks for j in jobs)
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=total_nb, unit="nb", desc="grading", dynamic_ncols=True, file=sys.stderr,
                       smoothing=0.1)
            if summary.skipped:
                bar.write(f"resuming: {summary.skipped} submission(s) already graded, {len(jobs)} to go")
        sel = selectors.DefaultSelector()
        for w in pool:
            sel.register(w.proc.stdout, selectors.EVENT_READ, w)
        ready = {w.k: False for w in pool}
        finished = 0

        def dispatch(w: Worker) -> None:
            if not queue or w.job is not None or not ready[w.k]:
                return
            job = queue.popleft()
            job.attempts += 1
            existing = None
            with db.connect() as conn:
                rows = gbm.submission_rows(conn, job.assignment, job.student)
                if rows["submitted_assignment"] or rows["student"]:
                    existing = gbm.rows_to_json(rows)
            w.job = job
            w.started = time.monotonic()
            w.send({"job": finished + len(queue), "assignment": job.assignment, "student": job.student,
                    "existing": existing})

        restarts = [0]

        def restart(w: Worker, why: str) -> None:
            job = w.job
            restarts[0] += 1
            if restarts[0] > 3 * n_workers + 2 * len(jobs):
                raise RuntimeError(f"batch workers keep dying ({why}); see {course.state / 'logs'}")
            sel.unregister(w.proc.stdout)
            w.kill()
            if job is not None:
                if job.attempts < MAX_ATTEMPTS:
                    queue.appendleft(job)
                else:
                    record_failure(job, f"the grading process died twice ({why})")
            ready[w.k] = False
            if queue:
                w.start(assignments)
                sel.register(w.proc.stdout, selectors.EVENT_READ, w)
            else:
                w.proc = None

        def record_failure(job: Job, why: str) -> None:
            nonlocal finished
            summary.failed[(job.assignment, job.student)] = why
            _atomic_write(journal_path(course, job.assignment, job.student), json.dumps(
                {"fingerprint": job.fingerprint, "status": "failed", "error": why, "infrastructure": True}))
            finished += 1
            if bar is not None:
                bar.update(job.notebooks)
                bar.write(f"FAILED {job.assignment}/{job.student}: {why}")

        while (queue or any(w.job for w in pool)) and not (stop_after is not None and finished >= stop_after):
            for w in pool:
                dispatch(w)
            events = sel.select(timeout=1.0)
            for key, _ in events:
                w: Worker = key.data
                chunk = os.read(key.fd, 1 << 20)
                if not chunk:
                    restart(w, "exited")
                    continue
                w.buf += chunk
                while b"\n" in w.buf:
                    line, w.buf = w.buf.split(b"\n", 1)
                    msg = json.loads(line)
                    if "fatal" in msg:
                        raise WorkerRefused(msg["fatal"])
                    if msg.get("ready"):
                        ready[w.k] = True
                        summary.zygote = msg.get("zygote", {})
                        continue
                    job = w.job
                    w.job = None
                    if job is None:
                        continue
                    summary.zygote_restarts += bool(msg.get("zygote_restarted"))
                    if msg.get("infra") and job.attempts < MAX_ATTEMPTS:
                        # the worker could not set up, or a kernel never answered: no student code
                        # ran and nothing is merged; the submission is graded again in this run
                        summary.retried.append((job.assignment, job.student, msg.get("error") or ""))
                        queue.append(job)
                        if bar is not None:
                            why = (msg.get("error") or "").strip().splitlines()[-1:] or [""]
                            bar.write(f"again {job.assignment}/{job.student}: {why[0][:200]}")
                        dispatch(w)
                        continue
                    t0 = time.perf_counter()
                    merge(course, db, w, job, msg)
                    timings = dict(msg.get("timings") or {})
                    timings["merge"] = time.perf_counter() - t0
                    summary.timings.append(timings)
                    finished += 1
                    summary.notebooks += job.notebooks
                    if msg.get("ok"):
                        summary.graded.append((job.assignment, job.student))
                    else:
                        summary.failed[(job.assignment, job.student)] = msg.get("error") or "failed"
                        if bar is not None:
                            first = (msg.get("error") or "").strip().splitlines()[-1:] or [""]
                            bar.write(f"FAILED {job.assignment}/{job.student}: {first[0][:200]}")
                    if bar is not None:
                        bar.update(job.notebooks)
                        bar.set_postfix(failed=len(summary.failed), refresh=False)
                    dispatch(w)
            now = time.monotonic()
            for w in pool:
                if w.job is not None and now - w.started > job_timeout:
                    restart(w, f"no result after {job_timeout:.0f} s")
                elif w.proc is not None and w.proc.poll() is not None and w.job is not None:
                    restart(w, f"exit code {w.proc.returncode}")
        if queue or any(w.job for w in pool):
            summary.interrupted = True
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        if bar is not None:
            bar.close()
        for w in pool:
            if summary.interrupted:
                w.kill()
            else:
                w.stop()
        if not summary.interrupted:
            shutil.rmtree(course.state / "workers", ignore_errors=True)
        db.dispose()
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()
        summary.seconds = time.perf_counter() - t_start
    return summary


def merge(course: Course, db, w: Worker, job: Job, msg: dict) -> None:
    """Put one finished submission into the instructor's course: files, gradebook rows, journal."""
    from grading_engine.batch import gradebook as gbm

    a, s = job.assignment, job.student
    # 1. the autograded folder, swapped in by rename (same file system: .batch/ is inside the course)
    parent = course.root / "autograded" / s
    dest = parent / a
    new = w.dir / "out" / "autograded"
    parent.mkdir(parents=True, exist_ok=True)
    old = parent / f".{a}.batch-old"
    if old.exists():
        shutil.rmtree(old)
    if dest.exists():
        dest.rename(old)
    if new.exists():
        tmp = parent / f".{a}.batch-new"
        if tmp.exists():
            shutil.rmtree(tmp)
        try:
            new.rename(tmp)
        except OSError:
            shutil.copytree(new, tmp)
        tmp.rename(dest)
    if old.exists():
        shutil.rmtree(old)
    # 2. the gradebook rows, in one transaction
    rows = gbm.rows_from_json(msg.get("rows"))
    if rows is not None:
        gbm.replace_submission(db, a, s, rows)
    # 2b. per-submission records of the course's preprocessors (integrity flags)
    for k, pattern in enumerate(SIDE_FILES):
        src = w.dir / "out" / "side" / str(k)
        if src.exists():
            dst = course.root / pattern.format(assignment=a, student=s)
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(f".{dst.name}.batch-new")
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
    # 3. the log and the journal entry, last
    log = w.dir / "out" / "autograde.log"
    if log.exists():
        dst = course.state / "logs" / a / f"{s}.log"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(log, dst)
    _atomic_write(journal_path(course, a, s), json.dumps(
        {"fingerprint": job.fingerprint, "status": "ok" if msg.get("ok") else "failed",
         "error": msg.get("error"), "graded_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
         "timings": msg.get("timings")}))
