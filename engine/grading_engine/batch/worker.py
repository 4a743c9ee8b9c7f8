"""One batch worker: grades one submission at a time with nbgrader's own autograde, in private.

Started by :mod:`grading_engine.batch.runner` as ``python -m grading_engine.batch.worker`` in
its private course directory (a copy of ``nbgrader_config.py`` and of
``source/<assignment>/``). It loads the course's nbgrader configuration once,
exactly as ``nbgrader autograde`` does, then reads jobs (JSON lines) on stdin.
For each job it:

1. copies the student's ``submitted/<student>/<assignment>/`` from the
   instructor's course into its own, and makes a fresh private SQLite
   gradebook holding the assignment's definition and the student's earlier
   rows (nothing of any other student);
2. runs nbgrader's ``Autograde`` converter for that one student (the same
   class, preprocessors and configuration that ``nbgrader autograde`` uses,
   including any the course adds in ``nbgrader_config.py``);
3. exports the student's rows from the private gradebook, moves the
   autograded folder to ``out/``, and answers with one JSON line on the
   protocol channel; the parent merges, then sends the next job.

Whatever a submission does, it can only make this one job fail: the worker
reports the failure and goes on; if the worker itself dies, the parent starts
a new one and retries the job.
"""

from __future__ import annotations

import json
import re
import logging
import os
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path


def _protocol_channel():
    """Keep the real stdout for the protocol; everything else printed goes to stderr (the worker log)."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    return out


from grading_engine.batch.runner import SIDE_FILES  # noqa: E402


def _chain(first, second):
    if first is None:
        return second

    def both(**kw):
        first(**kw)
        second(**kw)

    return both


def main() -> int:
    proto = _protocol_channel()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    from grading_engine.batch.zygote import PR_SET_PDEATHSIG, prctl

    prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

    def stop(signum, frame):  # the parent stops us (or died): take our kernels along
        from grading_engine.batch import kernels

        kernels.kill_all()
        kernels.kill_now()  # no waiting in a signal handler: the interrupted code may hold Popen's lock
        os._exit(143)

    signal.signal(signal.SIGTERM, stop)
    extra = os.environ.pop("BATCH_EXTRA_PATH", None)
    orig = json.loads(os.environ.pop("BATCH_ORIG_PYTHONPATH", "null"))
    if orig is None:
        os.environ.pop("PYTHONPATH", None)
    else:
        os.environ["PYTHONPATH"] = orig
    setup = json.loads(sys.stdin.readline())
    workdir = Path.cwd()
    course_root = Path(setup["course_root"])

    from grading_engine.batch import kernels, timing
    from grading_engine.batch.gradebook import rows_from_json, rows_to_json, seed_worker_gradebook, submission_rows, engine

    kernels.install(workdir, setup.get("preload"), dict(os.environ), extra_path=extra)

    from nbgrader.apps.autogradeapp import AutogradeApp
    from nbgrader.converters import Autograde
    from nbgrader.utils import capture_log
    from traitlets.config import Config

    # load the configuration exactly as `nbgrader autograde` does: a course
    # config that checks its command (the sandbox refusing to run without
    # bubblewrap, say) sees "autograde", and a refusal stops the batch loudly
    argv0 = sys.argv[0]
    sys.argv = [argv0, "autograde"]
    try:
        app = AutogradeApp()
        app.initialize([])
    except BaseException as exc:  # noqa: BLE001 - SystemExit from the config included
        msg = str(exc) if isinstance(exc, SystemExit) else traceback.format_exc()
        proto.write(json.dumps({"ready": False, "fatal": msg or repr(exc)}) + "\n")
        return 3
    finally:
        sys.argv = [argv0]
    overlay = Config()
    for name, hook in timing.HOOKS.items():
        existing = app.config.Execute.get(name) if "Execute" in app.config else None
        overlay.Execute[name] = _chain(existing if callable(existing) else None, hook)
    if setup.get("fast_shutdown", True):
        overlay.Execute.shutdown_kernel = "immediate"
    app.update_config(overlay)
    for h in list(app.log.handlers):
        app.log.removeHandler(h)
    app.log.addHandler(logging.StreamHandler(sys.stderr))
    app.log.setLevel(logging.INFO)
    course_id = app.coursedir.course_id
    definitions: dict[str, dict] = {}

    proto.write(json.dumps({"ready": True, "pid": os.getpid(), "zygote": kernels.zygote_state()}) + "\n")

    for line in sys.stdin:
        if not line.strip():
            continue
        job = json.loads(line)
        if job.get("stop"):
            break
        t0 = time.perf_counter()
        a, s = job["assignment"], job["student"]
        out = workdir / "out"
        for d in (workdir / "submitted", workdir / "autograded", workdir / "integrity", out):
            shutil.rmtree(d, ignore_errors=True)
        db_path = workdir / "gradebook.db"
        for p in workdir.glob("gradebook.db*"):
            p.unlink()
        out.mkdir()
        result: dict = {"job": job["job"], "assignment": a, "student": s}
        try:
            shutil.copytree(course_root / "submitted" / s / a, workdir / "submitted" / s / a, symlinks=False)
            shutil.copy2(setup["template_db"], db_path)
            if a not in definitions:
                definitions[a] = rows_from_json(json.loads(Path(setup["definitions"][a]).read_text()))
            seed_worker_gradebook(db_path, course_id, definitions[a], rows_from_json(job.get("existing")))
            t1 = time.perf_counter()
            timing.EVENTS.clear()
            app.coursedir.assignment_id = a
            app.coursedir.student_id = s
            converter = Autograde(coursedir=app.coursedir, parent=app)
            converter.force = True
            res = capture_log(converter)
            t2 = time.perf_counter()
            db = engine(f"sqlite:///{db_path}")
            try:
                with db.connect() as conn:
                    rows = submission_rows(conn, a, s)
            finally:
                db.dispose()
            graded = workdir / "autograded" / s / a
            if graded.exists():
                graded.rename(out / "autograded")
            for k, pattern in enumerate(SIDE_FILES):  # per-submission records of the course's own preprocessors
                side = workdir / pattern.format(assignment=a, student=s)
                if side.is_file():
                    (out / "side").mkdir(exist_ok=True)
                    side.rename(out / "side" / str(k))
            (out / "autograde.log").write_text(res.get("log", "") + ("\n" + res["error"] if "error" in res else ""))
            notebooks = timing.split(timing.EVENTS)
            result.update(ok=bool(res.get("success")), error=_short_error(res), rows=rows_to_json(rows),
                          timings={"prepare": t1 - t0, "autograde": t2 - t1, "export": time.perf_counter() - t2,
                                   "notebooks": notebooks})
            if not res.get("success") and timing.kernel_start_failed(timing.EVENTS):
                # no student code ran: not a verdict on the submission; the batch grades it again,
                # and the next kernel comes from a fresh fork server in case this one is to blame
                result.update(infra=True, error=f"a kernel did not start ({result['error']})",
                              zygote_restarted=kernels.restart_zygote())
        except Exception:  # noqa: BLE001 - report, never stop
            result.update(ok=False, error=traceback.format_exc()[-3000:], rows=None, timings={}, infra=True)
        _reap_orphans()
        proto.write(json.dumps(result) + "\n")
    kernels.shutdown()
    return 0


_EXC = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt)(: .*)?$")


def _short_error(res: dict) -> str | None:
    """The informative part of nbgrader's error log: its specific messages and the exception."""
    if res.get("success"):
        return None
    log = res.get("log", "") + "\n" + (res.get("error") or "")
    generic = ("There was an error processing assignment", "Please see the", "Traceback")
    msgs = []
    for ln in log.splitlines():
        if ln.startswith("[ERROR]"):
            text = ln[len("[ERROR]"):].strip()
            if text and not text.startswith(generic) and text not in msgs:
                msgs.append(text)
    exc = [ln.strip() for ln in log.splitlines()
           if _EXC.match(ln.strip()) and not ln.strip().startswith("nbgrader.converters.base.NbGraderException")]
    if exc and exc[-1] not in msgs:
        msgs.append(exc[-1])
    return "; ".join(msgs[:4])[:1500] or "nbgrader autograde failed (see the log)"


def _reap_orphans() -> None:
    """Collect exited processes re-parented to this worker (it is a child subreaper)."""
    from grading_engine.batch import kernels

    keep = set()
    if kernels._ZYGOTE is not None and kernels._ZYGOTE.proc is not None:
        keep.add(kernels._ZYGOTE.proc.pid)
    for _ in range(1000):
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if info is None or info.si_pid in keep:
            return
        try:
            os.waitpid(info.si_pid, os.WNOHANG)
        except ChildProcessError:
            return


if __name__ == "__main__":
    sys.exit(main())
