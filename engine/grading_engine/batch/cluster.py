"""The batch on Dask distributed: one task per submission, files in and results out, no shared file system.

* The client (:func:`run`, in the ``grade`` command) plans as before, then
  submits one :class:`GradeTask` per submission to a Dask cluster (a
  ``LocalCluster`` on this machine by default, or the scheduler at
  ``--scheduler`` / ``c.GradingEngine.dask_scheduler``) and merges each
  :class:`GradeResult` as it completes: only the client writes the course's
  gradebook, ``autograded/``, the integrity records and the journal.
* Each Dask worker hosts one grading process (``python -m
  grading_engine.batch.worker``, with its private course, nbgrader app and
  warm-kernel fork server) through :class:`GradingPlugin`, set up once per
  worker. What the worker needs of the course travels in the plugin
  (:class:`CourseBundle`: the course's ``nbgrader_config.py``, the
  assignments' ``source/``, the gradebook template and definitions); a task
  carries the submission's files in and the autograded folder, the gradebook
  rows, the side records and the log out, all as bytes.
* Failures: a Dask worker that dies mid-task is replaced (by its nanny) and
  Dask runs the task again (``distributed.scheduler.allowed-failures``); a
  grading process that dies or hangs is restarted by the plugin and the job
  retried once, as is a kernel that never started (the batch's
  :class:`~grading_engine.batch.scheduler.Scheduler` decides).
"""

from __future__ import annotations

import hashlib
import io
import itertools
import json
import logging
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from distributed.diagnostics.plugin import WorkerPlugin

from grading_engine.batch.runner import WorkerRefused, worker_env
from grading_engine.batch.scheduler import Action, Job, Scheduler, WorkersKeepDying

PLUGIN_PREFIX = "grading-engine-batch-"
CONNECT_TIMEOUT = 10  # seconds to reach an existing scheduler
READY_TIMEOUT = 600.0  # seconds for a grading process to load nbgrader and the course's configuration
LOG_CHUNK = 16 << 20  # bytes of a grading process's log sent back with one result (the tail beyond that)


class SchedulerUnreachable(RuntimeError):
    """The Dask scheduler named by --scheduler (or dask_scheduler) did not answer."""


# --------------------------------------------------------------------------- messages

@dataclass(frozen=True)
class CourseBundle:
    """What every worker needs of the course, sent once per worker with the plugin."""

    name: str  # the plugin's name: the course and its sources' fingerprint
    files: bytes  # a tar (see pack): nbgrader_config.py and source/<assignment>/, laid out as in the course
    template_db: bytes  # an empty gradebook with nbgrader's schema and the course row
    definitions: dict[str, Any]  # assignment -> its gradebook definition rows (JSON)
    preload: list[str] | None  # the warm kernels' setup imports (None: cold kernels)
    fast_shutdown: bool
    job_timeout: float
    workers_here: int | None = None  # grading processes sharing a worker's machine (a LocalCluster's size)
    compress: bool = True  # gzip the folders a task carries (False on a LocalCluster: the bytes stay in memory)


@dataclass(frozen=True)
class GradeTask:
    """One submission to grade: the files come along, the course stays with the client."""

    plugin: str
    assignment: str
    student: str
    files: bytes  # a tar (see pack) of submitted/<student>/<assignment>/
    existing: Any  # the student's earlier rows (manual grades survive a regrade), JSON


@dataclass
class GradeResult:
    """What grading one submission gave: everything the client merges, as data."""

    assignment: str
    student: str
    ok: bool = False
    error: str | None = None
    infra: bool = False  # failed before any of the student's code ran: graded again, once
    crashed: bool = False  # the grading process died or hung: restarted, the job graded again, once
    rows: Any = None
    timings: dict = field(default_factory=dict)
    out: bytes = b""  # a tar (see pack) of autograded/, side/ and autograde.log
    log: bytes = b""  # what the grading process wrote to its log while grading this submission
    worker: str = ""
    zygote: dict = field(default_factory=dict)
    zygote_restarted: bool = False

    def message(self) -> dict:
        """The worker-protocol answer :func:`grading_engine.batch.runner.merge` reads."""
        return {k: v for k, v in asdict(self).items() if k not in ("out", "log")}


# --------------------------------------------------------------------------- folders as bytes

def pack(folder: Path, ignore: tuple[str, ...] = (".ipynb_checkpoints", "__pycache__"), compress: bool = True) -> bytes:
    """``folder``'s files as a tar, gzipped if ``compress`` (no symbolic links followed out of it).

    Uncompressed where the bytes never cross a network (a LocalCluster's workers are threads of the
    batch's process): gzip then only costs time, most on the course's assets (images and sound,
    compressed already): 114 ms to pack the exercises' 4 MB folder, against a few without it."""
    buf = io.BytesIO()
    with (tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) if compress
          else tarfile.open(fileobj=buf, mode="w")) as tar:
        if folder.exists():
            for p in sorted(folder.rglob("*")):
                rel = p.relative_to(folder)
                if any(part in ignore for part in rel.parts) or p.is_symlink():
                    continue
                tar.add(p, arcname=str(rel), recursive=False)
    return buf.getvalue()


def unpack(data: bytes, dest: Path) -> None:
    """The inverse of :func:`pack` into a fresh ``dest``: folders and regular files only, none out of ``dest``.

    Checked here, member by member, rather than with ``extractall(filter="data")``, which Python 3.11
    has only from 3.11.4 (Debian 12's python3 is 3.11.2)."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    root = dest.resolve()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:  # gzipped or not (see pack)
        for member in tar:
            target = (root / member.name).resolve()
            if not (member.isfile() or member.isdir()) or not target.is_relative_to(root) or target == root:
                raise ValueError(f"refused in a packed folder: {member.name!r} (only files and folders inside it)")
            if member.isdir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            src = tar.extractfile(member)
            with open(target, "wb") as fh:
                shutil.copyfileobj(src, fh)
            os.chmod(target, member.mode & 0o755)  # as tarfile's data filter: no setuid, no group or other write
            os.utime(target, (member.mtime, member.mtime))


# --------------------------------------------------------------------------- the worker side

class GradingPlugin(WorkerPlugin):
    """One grading process per Dask worker, with the private course it grades in; see the module docstring."""

    def __init__(self, bundle: CourseBundle):
        self.bundle = bundle
        self.name = bundle.name

    # ------------------------------------------------------------------ set-up and teardown

    def setup(self, worker) -> None:
        b = self.bundle
        self.worker = str(worker.name)
        self.home = Path(tempfile.mkdtemp(prefix="grading-"))  # short: the fork server's socket lives here
        self.course = self.home / "course"
        unpack(b.files, self.course)
        run = self.home / "run"
        run.mkdir()
        (run / "template.db").write_bytes(b.template_db)
        definitions = {}
        for a, rows in b.definitions.items():
            definitions[a] = str(run / f"definitions-{a}.json")
            Path(definitions[a]).write_text(json.dumps(rows))
        self.setup_msg = {"course_root": str(self.course), "template_db": str(run / "template.db"),
                          "definitions": definitions, "preload": b.preload, "fast_shutdown": b.fast_shutdown,
                          "workers_here": b.workers_here}
        self.log_path = self.home / "worker.log"
        self.log_pos = 0
        self.lock = threading.Lock()
        self.proc: subprocess.Popen | None = None
        self.buf = b""
        self.zygote: dict = {}
        self.jobs = itertools.count(1)
        self._start()  # here, in the worker's main thread: the grading process follows this thread's life

    def teardown(self, worker) -> None:
        self._kill()
        shutil.rmtree(getattr(self, "home", ""), ignore_errors=True)

    def _start(self) -> None:
        with open(self.log_path, "ab") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "grading_engine.batch.worker"], cwd=self.course,
                                         env=worker_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=err, start_new_session=True)
        self.buf = b""
        self.ready = False
        self._send(self.setup_msg)

    def _kill(self) -> None:
        """Stop the grading process now; it kills its kernels on SIGTERM (SIGKILL after 3 s)."""
        proc, self.proc = getattr(self, "proc", None), None
        if proc is None:
            return
        if proc.poll() is None:
            try:
                proc.terminate()
                proc.wait(timeout=3)
            except (OSError, subprocess.TimeoutExpired):
                pass
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
        proc.wait()

    def _exit_code(self) -> int | None:
        try:
            return self.proc.wait(timeout=5) if self.proc is not None else None
        except subprocess.TimeoutExpired:
            return None

    def _send(self, msg: dict) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(msg).encode() + b"\n")
        self.proc.stdin.flush()

    def _read(self, timeout: float) -> dict | None:
        """The grading process's next message; None if it exited; TimeoutError after ``timeout`` s."""
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while b"\n" not in self.buf:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                if not sel.select(timeout=min(left, 5.0)):
                    continue
                chunk = os.read(self.proc.stdout.fileno(), 1 << 20)
                if not chunk:
                    return None
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line) if line.strip() else self._read(max(deadline - time.monotonic(), 0.1))

    def _ensure_ready(self) -> None:
        """A grading process that said it is ready; WorkerRefused if the course's configuration refuses.

        One that dies before it says anything (killed, say) is started again, once."""
        for _ in range(2):
            if self.proc is None or self.proc.poll() is not None:
                self._kill()
                self._start()
            if self.ready:
                return
            msg = self._read(READY_TIMEOUT)
            if msg is not None and not msg.get("ready"):
                raise WorkerRefused(msg.get("fatal") or f"the grading process refused to start: {msg}")
            if msg is not None:
                self.ready = True
                self.zygote = msg.get("zygote", {})
                return
            self._kill()
        tail = self.log_path.read_text(errors="replace").strip().splitlines()[-5:] if self.log_path.exists() else []
        raise WorkerRefused(f"the grading process on Dask worker {self.worker} exited twice at start"
                            + (": " + " | ".join(tail) if tail else ""))

    # ------------------------------------------------------------------ one task

    def grade(self, task: GradeTask) -> GradeResult:
        """Grade one submission in the private course (one at a time per worker)."""
        with self.lock:
            res = GradeResult(task.assignment, task.student, worker=self.worker)
            self._ensure_ready()
            incoming = self.home / "incoming" / task.student / task.assignment
            unpack(task.files, incoming)
            self._send({"job": next(self.jobs), "assignment": task.assignment, "student": task.student,
                        "submission": str(incoming), "existing": task.existing})
            try:
                msg = self._read(self.bundle.job_timeout)
            except TimeoutError:
                msg, why = None, f"no result after {self.bundle.job_timeout:.0f} s"
            else:
                why = "" if msg is not None else f"the grading process exited (code {self._exit_code()})"
            if msg is None:  # died or hung: a fresh grading process for the next job
                self._kill()
                self._start()
                res.crashed, res.error = True, why
            else:
                res.ok, res.error, res.infra = bool(msg.get("ok")), msg.get("error"), bool(msg.get("infra"))
                res.rows, res.timings = msg.get("rows"), msg.get("timings") or {}
                res.zygote_restarted = bool(msg.get("zygote_restarted"))
                res.out = pack(self.course / "out", compress=self.bundle.compress)
            res.zygote = self.zygote
            res.log = self._log_since_last()
            shutil.rmtree(incoming, ignore_errors=True)
            return res

    def _log_since_last(self) -> bytes:
        try:
            with open(self.log_path, "rb") as fh:
                size = fh.seek(0, os.SEEK_END)
                fh.seek(max(self.log_pos, size - LOG_CHUNK) if size >= self.log_pos else 0)
                data = fh.read()
        except OSError:
            return b""
        self.log_pos = size
        return data


def grade_task(task: GradeTask) -> GradeResult:
    """The Dask task: grade ``task`` with this worker's :class:`GradingPlugin`."""
    from distributed import get_worker

    worker = get_worker()
    plugin = worker.plugins.get(task.plugin)
    if plugin is None:
        raise RuntimeError(f"Dask worker {worker.name} has no batch plugin {task.plugin!r}")
    return plugin.grade(task)


# --------------------------------------------------------------------------- the client side

def bundle(course, db, assignments: list[str], warm: bool, fast_shutdown: bool, job_timeout: float,
           workers_here: int | None = None, compress: bool = True) -> CourseBundle:
    """The course as the workers need it: configuration, sources, template gradebook, definitions."""
    from grading_engine.batch import gradebook as gbm
    from grading_engine.batch.runner import setup_imports

    staging = Path(tempfile.mkdtemp(prefix="bundle-", dir=course.state))
    try:
        if course.config_file.exists():
            shutil.copy2(course.config_file, staging / "nbgrader_config.py")
        for a in assignments:
            src = course.source(a)
            shutil.copytree(src, staging / src.relative_to(course.root),
                            ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
        files = pack(staging, compress=compress)
        gbm.make_template(staging / "template.db", db, course.course_id)
        template = (staging / "template.db").read_bytes()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    with db.connect() as conn:
        definitions = {a: gbm.rows_to_json(gbm.definition_rows(conn, a)) for a in assignments}
    preload = setup_imports(sorted(p for a in assignments for p in course.source(a).glob("*.ipynb"))) if warm else None
    digest = hashlib.sha256(str(course.root).encode() + b"\0" + files + template).hexdigest()
    return CourseBundle(name=PLUGIN_PREFIX + digest[:16], files=files, template_db=template,
                        definitions=definitions, preload=preload, fast_shutdown=fast_shutdown, workers_here=workers_here,
                        job_timeout=job_timeout, compress=compress)


def dashboard_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("bokeh") is not None


@dataclass
class Cluster:
    """The Dask client, and the LocalCluster when the batch started one."""

    client: Any
    local: Any = None

    def describe(self) -> str:
        n = len(self.client.scheduler_info().get("workers", {}))
        where = "a LocalCluster" if self.local is not None else f"the Dask scheduler {self.client.scheduler.address}"
        services = self.client.scheduler_info().get("services", {})
        if self.local is not None and not dashboard_available():  # its page would only say bokeh is missing
            board = "dashboard off (it needs bokeh in this environment: pip install 'bokeh>=3.1.0')"
        elif "dashboard" in services:
            board = f"dashboard {self.client.dashboard_link}"
        else:
            board = "dashboard off (the scheduler serves none)"
        return f"grading on {where} with {n} worker(s); {board}"

    def close(self, timeout: float = 20) -> None:
        try:
            self.client.close(timeout=timeout)
        finally:
            if self.local is not None:
                self.local.close(timeout=timeout)


# A LocalCluster's processes share the cores with the kernels they grade, and a grading task's thread only
# waits on its grading process's pipe: no statistical profiler every 10 ms, no GIL monitor, the event-loop
# and system monitors at a slower pace. Measured here, idle, two workers used 2.4 CPU-seconds per 30 s as
# worker processes with Dask's defaults, 0.5 as worker processes with these, 0.3 as the threads connect()
# starts. Workers started by hand take the same through DASK_* variables (docs/batch-cluster.md).
LOCAL_WORKER_CONFIG = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.system-monitor.gil.enabled": False,
    "distributed.admin.system-monitor.interval": "5s",
    "distributed.admin.tick.interval": "200ms",
    "distributed.worker.memory.monitor-interval": "1s",
}


def connect(address: str, workers: int, allowed_failures: int) -> Cluster:
    """A client of the scheduler at ``address``, or of a new LocalCluster of ``workers`` single-threaded workers.

    The LocalCluster's workers are threads of this process (``processes=False``): a task only sends a
    submission to the worker's grading process (:class:`GradingPlugin`) and waits on its pipe, so worker
    processes and their nannies would only add memory and wake-ups. A grading process that dies is
    restarted by its plugin, as on any cluster."""
    import dask
    from distributed import Client, LocalCluster

    if address:
        try:
            return Cluster(Client(address, timeout=CONNECT_TIMEOUT, set_as_default=False))
        except (OSError, TimeoutError, ValueError) as exc:
            raise SchedulerUnreachable(f"cannot reach the Dask scheduler at {address}: "
                                       f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    dask.config.set({"distributed.scheduler.allowed-failures": allowed_failures, **LOCAL_WORKER_CONFIG})
    local = LocalCluster(n_workers=workers, threads_per_worker=1, processes=False, silence_logs=logging.ERROR,
                         dashboard_address=":0")  # any free port: never a clash with another run's 8787
    try:
        return Cluster(Client(local, set_as_default=False), local)
    except BaseException:
        local.close()
        raise


class DaskBatch:
    """One run on a Dask cluster: the scheduler decides, Dask carries out, the merge puts results in the course."""

    def __init__(self, course, db, cluster: Cluster, sent: CourseBundle, sched: Scheduler, summary, progress):
        from distributed import as_completed

        self.course, self.db, self.cluster = course, db, cluster
        self.plugin, self.compress = sent.name, sent.compress  # the plugin to call; tasks packed as its files
        self.sched, self.summary, self.progress = sched, summary, progress
        self.running: dict[Any, tuple[int, Job]] = {}
        self.tokens = itertools.count()
        self.done = as_completed(loop=cluster.client.loop)

    def window(self) -> int:
        """Tasks in flight: two per worker thread, so no worker waits and few submissions sit in memory."""
        return max(2, 2 * sum(self.cluster.client.nthreads().values()))

    def fill(self) -> None:
        from grading_engine.batch.runner import existing_rows

        limit = self.window()
        while len(self.running) < limit and self.sched.pending:
            token = next(self.tokens)
            job = self.sched.next_job(token)
            task = GradeTask(self.plugin, job.assignment, job.student,
                             pack(self.course.submitted(job.student, job.assignment), ignore=(), compress=self.compress),
                             existing_rows(self.db, job))
            fut = self.cluster.client.submit(grade_task, task, key=f"grade-{job.assignment}-{job.student}-{token}",
                                             pure=False, retries=0)
            self.running[fut] = (token, job)
            self.done.add(fut)

    def run(self, stop_after: int | None = None) -> None:
        self.fill()
        for fut in self.done:
            self.on_done(fut)
            if stop_after is not None and self.sched.finished >= stop_after:
                break
            self.fill()
        if not self.sched.done:
            self.summary.interrupted = True

    def cancel(self) -> None:
        if self.running:
            self.cluster.client.cancel(list(self.running))
        self.running.clear()

    def on_done(self, fut) -> None:
        from distributed import KilledWorker

        token, job = self.running.pop(fut)
        if fut.status == "error":
            exc = fut.exception()
            fut.release()
            if isinstance(exc, WorkerRefused):
                raise WorkerRefused(str(exc)) from None
            if isinstance(exc, KilledWorker):
                self.fail(self.sched.on_lost(token, f"every Dask worker grading it died ({exc})"))
            else:
                self.crash(token, f"{type(exc).__name__}: {exc}")
            return
        res: GradeResult = fut.result()
        fut.release()
        self.keep_log(res)
        if res.zygote:
            self.summary.zygote = res.zygote
        if res.crashed:
            self.crash(token, res.error or "the grading process died")
            return
        self.summary.zygote_restarts += res.zygote_restarted
        decision = self.sched.on_result(token, before_student_code=res.infra, reason=res.error or "")
        if decision is None:
            return
        if decision.action is Action.RETRY:
            self.summary.retried.append((job.assignment, job.student, decision.reason))
            self.progress.note("again", job, decision.reason)
        else:
            self.merge(job, res)

    def crash(self, token: int, why: str) -> None:
        try:
            decision = self.sched.on_crash(token, why)
        except WorkersKeepDying as exc:
            raise WorkersKeepDying(f"{exc}; see {self.course.state / 'logs'}") from None
        if decision is not None and decision.action is Action.FAIL:
            self.fail(decision)

    def fail(self, decision) -> None:
        from grading_engine.batch.runner import record_failure

        if decision is None:
            return
        job = decision.job
        self.summary.failed[job.key] = decision.reason
        record_failure(self.course, job, decision.reason)
        self.progress.note("FAILED", job, decision.reason)
        self.progress.advance(job, len(self.summary.failed))

    def merge(self, job: Job, res: GradeResult) -> None:
        from grading_engine.batch.runner import merge

        t0 = time.perf_counter()
        out = self.course.state / "incoming" / f"{job.assignment}-{job.student}"
        unpack(res.out, out)
        try:
            merge(self.course, self.db, out, job, res.message())
        finally:
            shutil.rmtree(out, ignore_errors=True)
        timings = dict(res.timings)
        timings["merge"] = time.perf_counter() - t0
        self.summary.timings.append(timings)
        self.summary.notebooks += job.notebooks
        if res.ok:
            self.summary.graded.append(job.key)
        else:
            self.summary.failed[job.key] = res.error or "failed"
            self.progress.note("FAILED", job, res.error)
        self.progress.advance(job, len(self.summary.failed))

    def keep_log(self, res: GradeResult) -> None:
        """The grading process's log, back on the client: ``.batch/logs/worker<name>.log``."""
        if not res.log:
            return
        name = re.sub(r"[^\w.-]+", "_", res.worker) or "unknown"
        path = self.course.state / "logs" / f"worker{name}.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab") as fh:
            fh.write(res.log)


def run(course, db, assignments: list[str], jobs: list[Job], summary, progress, *, address: str, workers: int,
        allowed_failures: int, warm: bool, fast_shutdown: bool, job_timeout: float, stop_after: int | None = None) -> None:
    """Grade ``jobs`` on Dask; on Ctrl-C stop at once, and leave the journal to resume from."""
    # on this machine's LocalCluster the workers share its cores; on a cluster's hosts, the course's setting
    # and gzip only what crosses a network
    b = bundle(course, db, assignments, warm, fast_shutdown, job_timeout, workers_here=None if address else workers,
               compress=bool(address))
    cluster = connect(address, workers, allowed_failures)
    batch = None
    try:
        progress.say(cluster.describe())
        cluster.client.register_plugin(GradingPlugin(b), name=b.name)
        batch = DaskBatch(course, db, cluster, b, Scheduler(jobs, crash_budget=3 * workers + 2 * len(jobs)),
                          summary, progress)
        batch.run(stop_after)
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        try:
            if batch is not None:
                batch.cancel()
            if cluster.local is None:  # an existing cluster: stop this batch's grading processes there
                try:
                    cluster.client.unregister_worker_plugin(b.name)
                except Exception:  # noqa: BLE001 - the workers may be gone; nothing to stop then
                    pass
        finally:
            cluster.close(timeout=5 if summary.interrupted else 20)
            shutil.rmtree(course.state / "incoming", ignore_errors=True)
