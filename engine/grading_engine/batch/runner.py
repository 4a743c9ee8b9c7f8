"""The batch grader's parent process: queue, workers, merge, journal, progress.

Design (see also :mod:`grading_engine.batch.worker` and :mod:`grading_engine.batch.gradebook`):

* Work unit: one student's submission of one assignment
  (``submitted/<student>/<assignment>/``).
* Workers: Dask workers (:mod:`grading_engine.batch.cluster`: a LocalCluster
  of N single-threaded processes by default, or an existing cluster at
  ``--scheduler`` / ``GradingEngine.dask_scheduler``), each hosting one
  grading process with a private course directory in its own temporary
  folder; each grades one submission at a time with nbgrader's own
  ``Autograde`` converter against a private SQLite gradebook. The submission's
  files travel to the worker and the results back as bytes: no shared file
  system. ``GradingEngine.batch_engine = "processes"`` runs the former pool
  of N worker processes instead (:class:`Pool`, private courses under
  ``.batch/workers/``).
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
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nbformat

from grading_engine.batch.scheduler import MAX_ATTEMPTS, Action, Job, Scheduler, WorkersKeepDying  # noqa: F401

STATE_DIR = ".batch"
# Files that grading one submission writes besides autograded/ and the
# gradebook, relative to the course root: the integrity record of
# grading_engine (flags shown beside the grade). The worker hands them
# back and the merge puts them in place, replacing the old one.
SIDE_FILES = ["integrity/{assignment}/{student}.json"]


# --------------------------------------------------------------------------- course configuration

@dataclass
class Course:
    """The instructor's course, as its nbgrader configuration says (root, gradebook, folder layout)."""

    root: Path
    db_url: str
    course_id: str
    config_file: Path  # the course folder's own nbgrader_config.py (copied into each worker's private course)
    ignore: list[str]
    config_files: list[Path] = field(default_factory=list)  # every configuration file nbgrader loaded
    directory_structure: str = "{nbgrader_step}/{student_id}/{assignment_id}"
    source_directory: str = "source"
    submitted_directory: str = "submitted"
    autograded_directory: str = "autograded"
    batch_engine: str = "dask"  # GradingEngine.batch_engine: "dask" or "processes"
    dask_scheduler: str = ""  # GradingEngine.dask_scheduler: empty for a LocalCluster
    dask_allowed_failures: int = 3

    @property
    def state(self) -> Path:
        return self.root / STATE_DIR

    def path(self, step: str, student: str, assignment: str) -> Path:
        """nbgrader's ``CourseDirectory.format_path``: where ``step``'s folder of a submission is."""
        return self.root / self.directory_structure.format(nbgrader_step=step, student_id=student,
                                                           assignment_id=assignment)

    def source(self, assignment: str) -> Path:
        return self.path(self.source_directory, ".", assignment)

    def submitted(self, student: str, assignment: str) -> Path:
        return self.path(self.submitted_directory, student, assignment)

    def autograded(self, student: str, assignment: str) -> Path:
        return self.path(self.autograded_directory, student, assignment)


def load_course(course_dir: Path | str | None = None) -> Course:
    """The course's nbgrader configuration, read the way nbgrader reads it (an absolute root included)."""
    from nbgrader.apps.baseapp import NbGrader

    from grading_engine.config import GradingEngine

    course_dir = Path(course_dir or os.getcwd()).resolve()
    cwd = os.getcwd()
    os.chdir(course_dir)
    try:
        app = NbGrader()
        app.initialize([])
        cd = app.coursedir
        ge = GradingEngine(config=app.config)
        root = Path(cd.root).resolve()
        local = next((p for p in (course_dir / "nbgrader_config.py", root / "nbgrader_config.py") if p.exists()),
                     root / "nbgrader_config.py")
        return Course(root=root, db_url=cd.db_url, course_id=cd.course_id, config_file=local,
                      ignore=list(cd.ignore), config_files=[Path(p) for p in app.loaded_config_files],
                      directory_structure=cd.directory_structure, source_directory=cd.source_directory,
                      submitted_directory=cd.submitted_directory, autograded_directory=cd.autograded_directory,
                      batch_engine=ge.batch_engine, dask_scheduler=ge.dask_scheduler,
                      dask_allowed_failures=ge.dask_allowed_failures)
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
    _hash_tree(h, course.source(assignment), {".ipynb_checkpoints", "__pycache__"})
    for config in course.config_files or [course.config_file]:  # what nbgrader loaded, in its order
        if config.exists():
            h.update(config.read_bytes())
    return h.hexdigest()


def submission_fingerprint(course: Course, assignment: str, student: str, source_fp: str) -> str:
    h = hashlib.sha256(source_fp.encode())
    _hash_tree(h, course.submitted(student, assignment))
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
    """What the warm kernels' servers preload: what the instructor's notebooks import at the top level of
    their code cells (:func:`grading_engine.sandbox.warm.setup_imports`), and what that imports on first use."""
    from grading_engine.sandbox import warm

    mods: list[str] = []
    for path in notebooks:
        try:
            mods += warm.setup_imports(nbformat.read(str(path), as_version=4), every_cell=True)
        except Exception:  # noqa: BLE001 - a notebook that cannot be read preloads nothing
            continue
    return warm.preload_modules(mods)


# --------------------------------------------------------------------------- results

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
    book = refs = 0.0
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
        refs += t.get("references", 0)
    if not n_nb:
        return {}
    out = {k: v / n_nb for k, v in tot.items()}
    out["bookkeeping"] = book / n_nb
    out["references"] = refs / n_nb  # the reference runs built before grading (once per notebook of the class)
    out["notebooks"] = n_nb
    out["warm_fraction"] = warm / n_nb
    return out


# --------------------------------------------------------------------------- one worker process

class Worker:
    """One worker process and its private course (``.batch/workers/w<k>/``)."""

    def __init__(self, k: int, course: Course, run: dict, env: dict[str, str]):
        self.k = k
        self.dir = course.state / "workers" / f"w{k}"
        self.course = course
        self.run = run
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.buf = b""
        self.log = course.state / "logs" / f"worker{k}.log"

    @property
    def out(self) -> Path:
        """Where the worker leaves one finished submission for the merge."""
        return self.dir / "out"

    def make_private_course(self, assignments: list[str]) -> None:
        """A private course: the course's nbgrader_config.py and the assignments' source folders.

        The worker overrides root and db_url with this folder itself (see
        :func:`grading_engine.batch.worker.private_config_args`), whatever the
        configuration file says.
        """
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True)
        if self.course.config_file.exists():
            shutil.copy2(self.course.config_file, self.dir / "nbgrader_config.py")
        for a in assignments:
            src = self.course.source(a)
            shutil.copytree(src, self.dir / src.relative_to(self.course.root),
                            ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))

    def start(self, assignments: list[str]) -> None:
        self.make_private_course(assignments)
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "grading_engine.batch.worker"], cwd=self.dir,
                                         env=self.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err,
                                         start_new_session=True)
        self.send(self.run)
        self.buf = b""

    def send(self, msg: dict) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(msg).encode() + b"\n")
        self.proc.stdin.flush()

    def messages(self, chunk: bytes) -> list[dict]:
        """The complete JSON lines in what the worker wrote so far."""
        self.buf += chunk
        *lines, self.buf = self.buf.split(b"\n")
        return [json.loads(line) for line in lines if line.strip()]

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


# --------------------------------------------------------------------------- the pool of workers

class WorkerRefused(RuntimeError):
    """The course's nbgrader configuration refused to autograde (e.g. no sandbox)."""


class Pool:
    """The worker processes: start, replace, read their messages, stop. No policy (see the scheduler)."""

    def __init__(self, course: Course, run: dict, env: dict[str, str], size: int, assignments: list[str]):
        self.workers = [Worker(k, course, run, env) for k in range(size)]
        self.assignments = assignments
        self.sel = selectors.DefaultSelector()
        self.ready: set[int] = set()

    def start(self) -> None:
        for w in self.workers:
            self._start(w)

    def _start(self, w: Worker) -> None:
        w.start(self.assignments)
        self.sel.register(w.proc.stdout, selectors.EVENT_READ, w)

    def replace(self, w: Worker, start_again: bool) -> None:
        """Kill ``w``; start a fresh one in its place if there is work left."""
        if w.proc is not None:
            self.sel.unregister(w.proc.stdout)
        w.kill()
        self.ready.discard(w.k)
        if start_again:
            self._start(w)

    def idle(self) -> list[Worker]:
        """Workers that said they are ready (whether they have a job is the scheduler's business)."""
        return [w for w in self.workers if w.k in self.ready]

    def poll(self, timeout: float) -> list[tuple[Worker, dict | None]]:
        """Messages from the workers, in order; ``None`` when a worker's channel closed (it exited)."""
        events: list[tuple[Worker, dict | None]] = []
        for key, _ in self.sel.select(timeout=timeout):
            w: Worker = key.data
            chunk = os.read(key.fd, 1 << 20)
            if not chunk:
                events.append((w, None))
                continue
            for msg in w.messages(chunk):
                if "fatal" in msg:
                    raise WorkerRefused(msg["fatal"])
                if msg.get("ready"):
                    self.ready.add(w.k)
                events.append((w, msg))
        return events

    def exited(self) -> list[Worker]:
        return [w for w in self.workers if w.proc is not None and w.proc.poll() is not None]

    def close(self, now: bool) -> None:
        """Stop every worker: at once (``now``: Ctrl-C, an error) or after its current job."""
        for w in self.workers:
            if now:
                w.kill()
            else:
                w.stop()


# --------------------------------------------------------------------------- the merge

def existing_rows(db, job: Job) -> Any:
    """The student's earlier gradebook rows for this assignment (manual grades survive a regrade), as JSON."""
    from grading_engine.batch import gradebook as gbm

    with db.connect() as conn:
        rows = gbm.submission_rows(conn, job.assignment, job.student)
    return gbm.rows_to_json(rows) if rows["submitted_assignment"] or rows["student"] else None


def _swap_in(new: Path, dest: Path) -> None:
    """Replace folder ``dest`` by ``new`` (or remove it if ``new`` is missing), by rename where possible."""
    parent = dest.parent
    parent.mkdir(parents=True, exist_ok=True)
    old = parent / f".{dest.name}.batch-old"
    if old.exists():
        shutil.rmtree(old)
    if dest.exists():
        dest.rename(old)
    if new.exists():
        tmp = parent / f".{dest.name}.batch-new"
        if tmp.exists():
            shutil.rmtree(tmp)
        try:
            new.rename(tmp)
        except OSError:
            shutil.copytree(new, tmp)
        tmp.rename(dest)
    if old.exists():
        shutil.rmtree(old)


def merge(course: Course, db, out: Path, job: Job, msg: dict) -> None:
    """Put one finished submission (the worker's ``out`` folder) into the instructor's course.

    Files, gradebook rows, integrity record, log, and the journal entry last.
    """
    from grading_engine.batch import gradebook as gbm

    a, s = job.assignment, job.student
    # 1. the autograded folder, swapped in by rename (same file system: .batch/ is inside the course)
    _swap_in(out / "autograded", course.autograded(s, a))
    # 2. the gradebook rows, in one transaction
    rows = gbm.rows_from_json(msg.get("rows"))
    if rows is not None:
        gbm.replace_submission(db, a, s, rows)
    # 2b. per-submission records of the course's preprocessors (integrity flags)
    for k, pattern in enumerate(SIDE_FILES):
        src = out / "side" / str(k)
        if src.exists():
            dst = course.root / pattern.format(assignment=a, student=s)
            dst.parent.mkdir(parents=True, exist_ok=True)
            tmp = dst.with_name(f".{dst.name}.batch-new")
            shutil.copyfile(src, tmp)
            os.replace(tmp, dst)
    # 3. the log and the journal entry, last
    log = out / "autograde.log"
    if log.exists():
        dst = course.state / "logs" / a / f"{s}.log"
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(log, dst)
    _atomic_write(journal_path(course, a, s), json.dumps(
        {"fingerprint": job.fingerprint, "status": "ok" if msg.get("ok") else "failed",
         "error": msg.get("error"), "graded_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
         "timings": msg.get("timings")}))


def record_failure(course: Course, job: Job, why: str) -> None:
    """The journal entry of a submission that got no verdict (its worker died twice): nothing is merged."""
    _atomic_write(journal_path(course, job.assignment, job.student), json.dumps(
        {"fingerprint": job.fingerprint, "status": "failed", "error": why, "infrastructure": True}))


# --------------------------------------------------------------------------- planning

def discover(course: Course, assignment: str) -> list[str]:
    """Students with a submitted folder for ``assignment`` (nbgrader's directory structure)."""
    parts = course.directory_structure.split("/")
    if "{student_id}" not in parts:
        raise ValueError(f"CourseDirectory.directory_structure {course.directory_structure!r} has no "
                         "{student_id} folder of its own; the batch grader cannot find the submissions")
    at = parts.index("{student_id}")
    pattern = course.directory_structure.format(nbgrader_step=course.submitted_directory, student_id="*",
                                                assignment_id=assignment)
    return sorted({p.relative_to(course.root).parts[at] for p in course.root.glob(pattern) if p.is_dir()})


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
                n = len(list(course.submitted(s, a).glob("*.ipynb"))) or 1
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


def prepare_run(course: Course, db, assignments: list[str], warm: bool, fast_shutdown: bool,
                workers_here: int | None = None) -> dict:
    """What every worker gets once: the template gradebook, the assignments' definitions, the warm-up modules,
    and how many grading processes share this machine's cores (``workers_here``; see worker.share_cores)."""
    from grading_engine.batch import gradebook as gbm

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
        preload = setup_imports(sorted(p for a in assignments for p in course.source(a).glob("*.ipynb")))
    return {"course_root": str(course.root), "template_db": str(template), "definitions": definitions,
            "preload": preload, "fast_shutdown": fast_shutdown, "workers_here": workers_here}


def worker_env() -> dict[str, str]:
    """The workers' environment: this one, with the engine importable and no gradebook of the course's."""
    env = dict(os.environ)
    env.pop("COURSE_DB_URL", None)  # a worker grades against its private gradebook, never the course's
    # the workers run this very engine package, installed or not; the
    # kernels get the environment unchanged (the worker restores it)
    here = str(Path(__file__).resolve().parents[2])
    env["BATCH_ORIG_PYTHONPATH"] = json.dumps(os.environ.get("PYTHONPATH"))
    env["BATCH_EXTRA_PATH"] = here
    env["PYTHONPATH"] = here + (os.pathsep + os.environ["PYTHONPATH"] if os.environ.get("PYTHONPATH") else "")
    env.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
    return env


# --------------------------------------------------------------------------- progress

class Progress:
    """The progress bar (notebooks graded, time left) and one line per notable event; silent when off."""

    def __init__(self, enabled: bool, total: int, skipped: int, todo: int):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="nb", desc="grading", dynamic_ncols=True, file=sys.stderr,
                            smoothing=0.1)
            if skipped:
                self.bar.write(f"resuming: {skipped} submission(s) already graded, {todo} to go")

    def note(self, what: str, job: Job, why: str | None) -> None:
        if self.bar is not None:
            last = (why or "").strip().splitlines()[-1:] or [""]
            self.bar.write(f"{what} {job.assignment}/{job.student}: {last[0][:200]}")

    def advance(self, job: Job, failed: int) -> None:
        if self.bar is not None:
            self.bar.update(job.notebooks)
            self.bar.set_postfix(failed=failed, refresh=False)

    def say(self, line: str) -> None:
        """One line for the person running the batch (above the bar, or on stderr without one)."""
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------- the batch

class BatchLocked(RuntimeError):
    pass


class Batch:
    """One run: the scheduler decides, the pool carries out, the merge puts results in the course."""

    def __init__(self, course: Course, db, sched: Scheduler, pool: Pool, summary: Summary, progress: Progress):
        self.course, self.db, self.sched, self.pool = course, db, sched, pool
        self.summary, self.progress = summary, progress

    def run(self, job_timeout: float, stop_after: int | None = None) -> None:
        while not self.sched.done and not (stop_after is not None and self.sched.finished >= stop_after):
            for w in self.pool.idle():
                self.dispatch(w)
            for w, msg in self.pool.poll(timeout=1.0):
                if msg is None:
                    self.on_exit(w, "exited")
                else:
                    self.on_message(w, msg)
            self.check_workers(job_timeout)
        if not self.sched.done:
            self.summary.interrupted = True

    def dispatch(self, w: Worker) -> None:
        job = self.sched.next_job(w.k)
        if job is None:
            return
        w.started = time.monotonic()
        w.send({"job": self.sched.dispatched, "assignment": job.assignment, "student": job.student,
                "submission": str(self.course.submitted(job.student, job.assignment)),
                "existing": existing_rows(self.db, job)})

    def on_message(self, w: Worker, msg: dict) -> None:
        if msg.get("ready"):
            self.summary.zygote = msg.get("zygote", {})
            return
        self.summary.zygote_restarts += bool(msg.get("zygote_restarted"))
        decision = self.sched.on_result(w.k, before_student_code=bool(msg.get("infra")), reason=msg.get("error") or "")
        if decision is None:
            return
        if decision.action is Action.RETRY:
            # the worker could not set up, or a kernel never answered: no student code ran and
            # nothing is merged; the submission is graded again in this run
            job = decision.job
            self.summary.retried.append((job.assignment, job.student, decision.reason))
            self.progress.note("again", job, decision.reason)
        else:
            self.merge(w, decision.job, msg)
        self.dispatch(w)

    def merge(self, w: Worker, job: Job, msg: dict) -> None:
        t0 = time.perf_counter()
        merge(self.course, self.db, w.out, job, msg)
        timings = dict(msg.get("timings") or {})
        timings["merge"] = time.perf_counter() - t0
        self.summary.timings.append(timings)
        self.summary.notebooks += job.notebooks
        if msg.get("ok"):
            self.summary.graded.append(job.key)
        else:
            self.summary.failed[job.key] = msg.get("error") or "failed"
            self.progress.note("FAILED", job, msg.get("error"))
        self.progress.advance(job, len(self.summary.failed))

    def on_exit(self, w: Worker, why: str) -> None:
        """``w`` died or was given up on: replace it; the scheduler says what becomes of its job."""
        try:
            decision = self.sched.on_crash(w.k, why)
        except WorkersKeepDying as exc:
            raise WorkersKeepDying(f"{exc}; see {self.course.state / 'logs'}") from None
        self.pool.replace(w, start_again=self.sched.pending > 0)
        if decision is not None and decision.action is Action.FAIL:
            job = decision.job
            self.summary.failed[job.key] = decision.reason
            record_failure(self.course, job, decision.reason)
            self.progress.note("FAILED", job, decision.reason)
            self.progress.advance(job, len(self.summary.failed))

    def check_workers(self, job_timeout: float) -> None:
        """Give up on a worker whose job takes too long, or that exited while it had a job."""
        now = time.monotonic()
        for w in self.pool.workers:
            if self.sched.running(w.k) is None:
                continue
            if now - w.started > job_timeout:
                self.on_exit(w, f"no result after {job_timeout:.0f} s")
            elif w.proc is not None and w.proc.poll() is not None:
                self.on_exit(w, f"exit code {w.proc.returncode}")


@contextmanager
def batch_lock(course: Course):
    """One batch run per course at a time."""
    course.state.mkdir(parents=True, exist_ok=True)
    with open(course.state / "lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise BatchLocked(f"another batch grading run is using {course.root}") from None
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def grade(assignments: list[str], course_dir: Path | str | None = None, workers: int | None = None,
          warm: bool = True, fast_shutdown: bool = True, regrade: bool = False, retry_failed: bool = False,
          students: list[str] | None = None, progress: bool = True, job_timeout: float = 3600.0,
          stop_after: int | None = None, scheduler: str | None = None, engine: str | None = None) -> Summary:
    """Grade every submission of ``assignments`` that is not graded yet. See the module docstring.

    ``scheduler``: a Dask scheduler's address (default: ``GradingEngine.dask_scheduler``, else a LocalCluster);
    ``engine``: "dask" or "processes" (default: ``GradingEngine.batch_engine``).
    """
    from grading_engine.batch import gradebook as gbm

    t_start = time.perf_counter()
    course = load_course(course_dir)
    summary = Summary()
    with batch_lock(course):
        db = gbm.engine(course.db_url)
        try:
            missing = [a for a in assignments if not gbm.assignment_exists(db, a)]
            if missing:
                raise SystemExit(f"not in the gradebook: {missing}; run `nbgrader generate_assignment` for them first")
            jobs, summary.skipped = plan(course, assignments, students, regrade, retry_failed)
            engine = engine or course.batch_engine
            if engine not in ("dask", "processes"):
                raise SystemExit(f"GradingEngine.batch_engine is {engine!r}: it is 'dask' or 'processes'")
            if jobs and engine == "dask":
                _run_dask(course, db, assignments, jobs, summary, workers, warm, fast_shutdown, progress,
                          job_timeout, stop_after, course.dask_scheduler if scheduler is None else scheduler)
            elif jobs:
                _run(course, db, assignments, jobs, summary, workers, warm, fast_shutdown, progress, job_timeout,
                     stop_after)
        except KeyboardInterrupt:
            summary.interrupted = True
        finally:
            db.dispose()
            summary.seconds = time.perf_counter() - t_start
    return summary


def _run(course: Course, db, assignments: list[str], jobs: list[Job], summary: Summary, workers: int | None,
         warm: bool, fast_shutdown: bool, progress: bool, job_timeout: float, stop_after: int | None) -> None:
    """Grade ``jobs`` with a pool of workers; on Ctrl-C, stop at once and leave the journal to resume from."""
    size = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    pool = Pool(course, prepare_run(course, db, assignments, warm, fast_shutdown, workers_here=size), worker_env(),
                size, assignments)
    bar = Progress(progress, sum(j.notebooks for j in jobs), summary.skipped, len(jobs))
    sched = Scheduler(jobs, crash_budget=3 * size + 2 * len(jobs))
    try:
        pool.start()
        Batch(course, db, sched, pool, summary, bar).run(job_timeout, stop_after)
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        bar.close()
        pool.close(now=summary.interrupted)
        if not summary.interrupted:
            shutil.rmtree(course.state / "workers", ignore_errors=True)


def _run_dask(course: Course, db, assignments: list[str], jobs: list[Job], summary: Summary, workers: int | None,
              warm: bool, fast_shutdown: bool, progress: bool, job_timeout: float, stop_after: int | None,
              address: str) -> None:
    """Grade ``jobs`` on Dask: a LocalCluster of ``workers`` workers, or the cluster at ``address``."""
    from grading_engine.batch import cluster

    size = max(1, min(workers or os.cpu_count() or 1, len(jobs)))
    bar = Progress(progress, sum(j.notebooks for j in jobs), summary.skipped, len(jobs))
    try:
        cluster.run(course, db, assignments, jobs, summary, bar, address=address, workers=size,
                    allowed_failures=course.dask_allowed_failures, warm=warm, fast_shutdown=fast_shutdown,
                    job_timeout=job_timeout, stop_after=stop_after)
    finally:
        bar.close()
