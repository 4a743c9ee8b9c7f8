"""Batch grading (grading_engine.batch): same grades as stock nbgrader autograde, resumable, robust, LMS import, reports.

Every test builds a tiny course in a temporary folder (one or two one-task
notebooks whose setup cell imports only ``math``), so the real
``nbgrader generate_assignment``/``autograde``/``zip_collect`` and the batch
workers run in seconds. The comparison with stock autograde runs under the
course's full configuration (sandbox kernel and integrity checks, as an
instructor has it); the tests of the batch machinery itself (resume, LMS
import, PostgreSQL) switch both off (``FAST``) and so also exercise the
batch's own warm kernels.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import nbformat
import pytest
from grading_engine.batch.gradebook import dump
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

from course_tools.paths import REPO_ROOT

ASSIGNMENT = "tiny"
FAST = {"COURSE_SANDBOX": "off", "COURSE_INTEGRITY": "off"}

ANSWERS = {
    "correct": "def double(x):\n    return 2 * x",
    "partial": "def double(x):\n    return 2.0 * x",  # right values, wrong type: loses test_double_type
    "blank": None,
    "slow": "import time\ntime.sleep(1.5)\ndef double(x):\n    return 2 * x",
    "crash": "import os\nos._exit(1)",  # the kernel dies
    "invalid": "",  # not JSON at all
    # output that bypasses the kernel's own streams (C extensions, os.write) goes to the process's fd 1 and 2
    "noisy": "import os\nos.write(1, b'x' * (1 << 20))\nos.write(2, b'y' * (1 << 16))\n"
             "def double(x):\n    return 2 * x",
}


def _meta(**nbg):
    return {"nbgrader": dict(schema_version=3, task=False, **nbg)}


def _code(cid, src, **nbg):
    c = new_code_cell(src, id=cid)
    c.metadata.update(_meta(**nbg))
    return c


def tiny_notebook(name: str):
    cells = [
        new_markdown_cell(f"# {name}", id="title"),
        _code("setup", "import math", grade=False, solution=False, locked=True, grade_id="setup"),
        _code("double", "def double(x):\n    ### BEGIN SOLUTION\n    return 2 * x\n    ### END SOLUTION",
              grade=False, solution=True, locked=False, grade_id="double"),
        _code("test_double", "assert double(2) == 4, 'double(2) should be 4'\n"
                             "### BEGIN HIDDEN TESTS\nassert double(-3) == -6\n### END HIDDEN TESTS",
              grade=True, solution=False, locked=True, grade_id="test_double", points=2),
        _code("test_double_type", "assert isinstance(double(3), int), 'double of an int is an int'",
              grade=True, solution=False, locked=True, grade_id="test_double_type", points=1),
    ]
    written = new_markdown_cell("Why?\n\n### BEGIN SOLUTION\nBecause.\n### END SOLUTION", id="written")
    written.metadata.update(_meta(grade=True, solution=True, locked=False, grade_id="written", points=1))
    cells.append(written)
    return new_notebook(cells=cells, metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"}})


def env(**extra) -> dict[str, str]:
    e = dict(os.environ)
    for k in ("COURSE_DB_URL", "COURSE_EXCHANGE", "JUPYTER_CONFIG_DIR"):
        e.pop(k, None)
    e["PYTHONPATH"] = str(REPO_ROOT) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e.update(extra)
    return e


def nbgrader(args: list[str], cwd: Path, check: bool = True, **extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nbgrader", *args], cwd=cwd, env=env(**extra),
                          capture_output=True, text=True, check=check)


def make_course(root: Path, notebooks=("tiny",), **extra_env) -> Path:
    """A course directory with the course's nbgrader_config.py and a generated tiny assignment."""
    root.mkdir(parents=True)
    shutil.copy2(REPO_ROOT / "nbgrader_config.py", root / "nbgrader_config.py")
    src = root / "source" / ASSIGNMENT
    src.mkdir(parents=True)
    for n in notebooks:
        nbformat.write(tiny_notebook(n), str(src / f"{n}.ipynb"))
    nbgrader(["generate_assignment", ASSIGNMENT, "--force"], root, **extra_env)
    return root


def submit(root: Path, students: dict[str, str]) -> None:
    """Hand in the release, with each student's kind of answer written into the answer cell."""
    for student, kind in students.items():
        d = root / "submitted" / student / ASSIGNMENT
        d.mkdir(parents=True)
        (d / "timestamp.txt").write_text("2026-01-10 10:00:00.000000 UTC")
        for rel in sorted((root / "release" / ASSIGNMENT).glob("*.ipynb")):
            if kind == "invalid":
                (d / rel.name).write_text("{ this is not a notebook")
                continue
            nb = nbformat.read(str(rel), as_version=4)
            if ANSWERS[kind] is not None:
                for c in nb.cells:
                    if c.metadata.get("nbgrader", {}).get("grade_id") == "double":
                        c.source = ANSWERS[kind]
            nbformat.write(nb, str(d / rel.name))


def batch(root: Path, *args: str, **extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "grading_engine.batch", *args], cwd=root, env=env(**extra),
                          capture_output=True, text=True, timeout=600)


def _sigint_as_at_a_terminal() -> None:
    # a test run started in the background (`cmd &` in a script) inherits SIGINT ignored, and Python
    # keeps it ignored; the batch under test must see Ctrl-C as it would at a terminal
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start_batch(root: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "grading_engine.batch", "grade", ASSIGNMENT, "--no-progress", *args],
                            cwd=root, env=env(**FAST), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=_sigint_as_at_a_terminal)


def journal(root: Path) -> dict[str, dict]:
    d = root / ".batch" / "journal" / ASSIGNMENT
    return {p.stem: json.loads(p.read_text()) for p in d.glob("*.json")} if d.exists() else {}


def wait_for(cond, timeout=300.0, proc: subprocess.Popen | None = None) -> None:
    t0 = time.monotonic()
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"batch ended early:\n{proc.stdout.read()}")
        if time.monotonic() - t0 > timeout:
            raise AssertionError("timed out")
        time.sleep(0.1)


def workers_of(pid: int) -> list[int]:
    """The grading processes under the batch process ``pid`` (one per worker of its LocalCluster)."""
    children: dict[int, list[int]] = {}
    cmds: dict[int, str] = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
            cmds[int(p.name)] = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(p.name))
    out, todo = [], list(children.get(pid, []))
    while todo:
        q = todo.pop()
        if "grading_engine.batch.worker" in cmds.get(q, ""):
            out.append(q)
        else:
            todo += children.get(q, [])
    return sorted(out)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    try:  # a zombie is not alive
        return (Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]) != "Z"
    except OSError:
        return False


def autograded_files(root: Path) -> set[str]:
    base = root / "autograded"
    return {str(p.relative_to(base)) for p in base.rglob("*") if p.is_file()}


CLASS = {"ann": "correct", "ben": "partial", "cat": "blank", "dan": "crash", "eve": "invalid", "fay": "correct"}


@pytest.fixture(scope="module")
def graded_class(tmp_path_factory):
    """One tiny class graded twice: by stock ``nbgrader autograde`` and by the batch command."""
    base = tmp_path_factory.mktemp("batch")
    stock = make_course(base / "stock")
    submit(stock, CLASS)
    shutil.copytree(stock, base / "batch")
    ours = base / "batch"
    stock_run = nbgrader(["autograde", ASSIGNMENT, "--force"], stock, check=False)
    run = batch(ours, "grade", ASSIGNMENT, "--workers", "2", "--no-progress", "--report", str(ours / "reports"))
    return {"stock": stock, "batch": ours, "stock_run": stock_run, "run": run}


def auto_scores(grades: dict, student: str) -> dict[str, float | None]:
    nb = grades[f"{ASSIGNMENT}/{student}"]["notebooks"]["tiny"]["grades"]
    return {k: v[0] for k, v in nb.items() if k.startswith("test_")}


def test_batch_gradebook_equals_stock_autograde(graded_class):
    run = graded_class["run"]
    j = journal(graded_class["batch"])
    failed = sorted(s for s, e in j.items() if e["status"] == "failed")
    assert run.returncode == (1 if failed else 0), run.stdout + run.stderr
    assert f"graded {len(CLASS) - len(failed)}, failed {len(failed)}" in run.stdout, run.stdout
    ours = dump(f"sqlite:///{graded_class['batch'] / 'gradebook.db'}")
    stock = dump(f"sqlite:///{graded_class['stock'] / 'gradebook.db'}")
    assert set(ours) == {f"{ASSIGNMENT}/{s}" for s in CLASS}
    assert ours == stock
    assert autograded_files(graded_class["batch"]) == autograded_files(graded_class["stock"])
    # the integrity records of grading_engine (when it is on) come back from the workers too
    for sub in ("integrity",):
        if (graded_class["stock"] / sub).exists():
            names = {p.name for p in (graded_class["stock"] / sub / ASSIGNMENT).glob("*.json")}
            assert names == {p.name for p in (graded_class["batch"] / sub / ASSIGNMENT).glob("*.json")}


def test_broken_submissions_do_not_stop_the_batch_or_touch_other_grades(graded_class):
    j = journal(graded_class["batch"])
    assert set(j) == set(CLASS), "every submission has a verdict: the batch went to the end"
    for s in ("ann", "ben", "cat", "fay"):
        assert j[s]["status"] == "ok", j[s]
    assert j["eve"]["status"] == "failed" and "JSON" in j["eve"]["error"]
    grades = dump(f"sqlite:///{graded_class['batch'] / 'gradebook.db'}")
    assert auto_scores(grades, "ann") == auto_scores(grades, "fay") == {"test_double": 2.0, "test_double_type": 1.0}
    assert auto_scores(grades, "ben") == {"test_double": 2.0, "test_double_type": 0.0}
    assert auto_scores(grades, "cat") == {"test_double": 0.0, "test_double_type": 0.0}
    # the kernel that died earns nothing, whether nbgrader calls it a failure (stock Execute)
    # or grades what ran (the course's sandboxed Execute)
    assert all(not v for v in auto_scores(grades, "dan").values())


def test_nbgrader_export_and_feedback_work_after_a_batch(graded_class):
    ours = graded_class["batch"]
    nbgrader(["export", "--to", str(ours / "export.csv")], ours)
    with (ours / "export.csv").open() as fh:
        rows = {r["student_id"]: r for r in csv.DictReader(fh)}
    assert set(rows) == set(CLASS)
    assert float(rows["ann"]["raw_score"]) == 3.0
    nbgrader(["generate_feedback", ASSIGNMENT, "--student", "ann", "--force"], ours)
    assert (ours / "feedback" / "ann" / ASSIGNMENT / "tiny.html").exists()


def test_reports_show_scores_and_pass_rates(graded_class):
    out = graded_class["batch"] / "reports"
    with (out / "grades.csv").open() as fh:
        rows = {r["student_id"]: r for r in csv.DictReader(fh)}
    assert rows["ann"]["auto_score"] == "3.0" and rows["ann"]["auto_max"] == "3.0"
    assert rows["eve"]["status"] == "failed" and "JSON" in rows["eve"]["error"]
    rates = json.loads((out / "summary.json").read_text())[ASSIGNMENT]
    grades = dump(f"sqlite:///{graded_class['batch'] / 'gradebook.db'}")
    ok = [s for s, e in journal(graded_class["batch"]).items() if e["status"] == "ok"]
    for q, pts in (("test_double", 2.0), ("test_double_type", 1.0)):
        expected = sum(auto_scores(grades, s)[q] == pts for s in ok) / len(ok)
        assert rates[f"tiny: {q}"] == pytest.approx(expected)
    assert rates["tiny: test_double_type"] < rates["tiny: test_double"]
    html = (out / f"{ASSIGNMENT}.html").read_text()
    assert "data:image/png;base64," in html and "test_double_type" in html
    for name in (f"{ASSIGNMENT}_scores.png", f"{ASSIGNMENT}_questions.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_rerun_grades_only_what_is_missing(graded_class):
    ours = graded_class["batch"]
    before = dump(f"sqlite:///{ours / 'gradebook.db'}")
    run = batch(ours, "grade", ASSIGNMENT, "--no-progress")
    assert "graded 0, failed 0, already done 6" in run.stdout, run.stdout + run.stderr
    assert dump(f"sqlite:///{ours / 'gradebook.db'}") == before
    # a resubmission is graded again, and only it
    sub = ours / "submitted" / "cat" / ASSIGNMENT / "tiny.ipynb"
    nb = nbformat.read(str(sub), as_version=4)
    next(c for c in nb.cells if c.get("id") == "double").source = ANSWERS["correct"]
    nbformat.write(nb, str(sub))
    run = batch(ours, "grade", ASSIGNMENT, "--no-progress")
    assert "graded 1, failed 0, already done 5" in run.stdout, run.stdout


def test_resume_after_ctrl_c_crash_and_killed_worker_gives_the_same_gradebook(tmp_path):
    """Stopped three ways (Ctrl-C, the batch process killed, one worker killed), then finished: same results."""
    students = {f"s{i:02d}": ("slow" if i % 3 else "partial") for i in range(8)}
    ref = make_course(tmp_path / "ref", **FAST)
    submit(ref, students)
    shutil.copytree(ref, tmp_path / "cut")
    cut = tmp_path / "cut"

    run = batch(ref, "grade", ASSIGNMENT, "--workers", "2", "--no-progress", **FAST)
    assert run.returncode == 0, run.stdout + run.stderr

    # 1. Ctrl-C once the first submission is in
    p = start_batch(cut, "--workers", "2")
    wait_for(lambda: len(journal(cut)) >= 1, proc=p)
    p.send_signal(signal.SIGINT)
    out = p.communicate(timeout=60)[0]
    assert p.returncode == 130, out
    n1 = len(journal(cut))
    assert 1 <= n1 < len(students), out

    # 2. the batch process dies (SIGKILL) while its workers are busy; they go with it
    p = start_batch(cut, "--workers", "2")
    wait_for(lambda: len(workers_of(p.pid)) == 2 and len(journal(cut)) >= n1 + 1, proc=p)
    orphans = workers_of(p.pid)
    p.kill()
    p.wait()
    wait_for(lambda: not any(alive(w) for w in orphans), timeout=30)
    n2 = len(journal(cut))
    assert n2 < len(students)

    # 3. a worker is killed mid-job: it is replaced, its job retried
    p = start_batch(cut, "--workers", "2")
    wait_for(lambda: len(workers_of(p.pid)) == 2, proc=p)
    time.sleep(1.0)
    os.kill(workers_of(p.pid)[0], signal.SIGKILL)
    out = p.communicate(timeout=600)[0]
    assert p.returncode == 0, out
    assert f"already done {n2}" in out, out

    assert {s: e["status"] for s, e in journal(cut).items()} == {s: "ok" for s in students}
    assert dump(f"sqlite:///{cut / 'gradebook.db'}") == dump(f"sqlite:///{ref / 'gradebook.db'}")
    assert autograded_files(cut) == autograded_files(ref)
    leftovers = [p.name for p in (cut / "autograded").rglob(".*batch-*")]
    assert not leftovers


def test_kernels_that_write_to_their_process_output_do_not_block(tmp_path):
    """A warm kernel's fd 1 and 2 lead to the worker's log, never to a pipe nobody reads.

    Every kernel logs its connection at start; a forked kernel that inherited
    an unread pipe would block in that write once some 64 KiB had gone by.
    """
    root = make_course(tmp_path / "course", **FAST)
    submit(root, {"ann": "noisy", "ben": "noisy", "cat": "correct"})
    run = batch(root, "grade", ASSIGNMENT, "--workers", "1", "--no-progress", **FAST)
    assert run.returncode == 0 and "graded 3, failed 0" in run.stdout, run.stdout + run.stderr
    scores = dump(f"sqlite:///{root / 'gradebook.db'}")
    for s in ("ann", "ben", "cat"):
        assert auto_scores(scores, s)["test_double"] == 2.0, s
    log = (root / ".batch" / "logs" / "worker0.log").read_bytes()
    assert b"x" * (1 << 20) in log and b"y" * (1 << 16) in log


HANGING_KERNEL = """\
import os, sys, time
count = sys.argv[1]
n = int(open(count).read()) if os.path.exists(count) else 0
open(count, "w").write(str(n + 1))
if n < int(sys.argv[2]):
    time.sleep(3600)  # a kernel that never answers
os.execv(sys.executable, [sys.executable, "-m", "ipykernel_launcher", *sys.argv[3:]])
"""


def hanging_python3(tmp_path: Path, hangs: int) -> dict[str, str]:
    """A ``python3`` kernelspec whose first ``hangs`` kernels never answer; the env that puts it first."""
    spec = tmp_path / "jupyter" / "kernels" / "python3"
    spec.mkdir(parents=True)
    script = tmp_path / "hanging_kernel.py"
    script.write_text(HANGING_KERNEL)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, str(script), str(tmp_path / "launches"), str(hangs), "-f", "{connection_file}"],
        "display_name": "Python 3", "language": "python"}))
    return {"JUPYTER_PATH": str(tmp_path / "jupyter")}


def _short_startup(root: Path) -> None:
    with open(root / "nbgrader_config.py", "a") as fh:
        fh.write("\nc.Execute.startup_timeout = 5\n")


def test_a_kernel_that_never_answers_is_retried_not_held_against_the_student(tmp_path):
    """A kernel start failure happens before any student code runs: the submission is graded again."""
    root = make_course(tmp_path / "course", **FAST)
    _short_startup(root)
    submit(root, {"ann": "correct", "ben": "partial"})
    extra = hanging_python3(tmp_path, hangs=1)
    run = batch(root, "grade", ASSIGNMENT, "--workers", "1", "--no-progress", **FAST, **extra)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "graded 2, failed 0" in run.stdout, run.stdout + run.stderr
    assert "graded again after an infrastructure failure" in run.stdout and ": 1;" in run.stdout, run.stdout
    assert (tmp_path / "launches").read_text() == "3"  # one hung, then one kernel per submission
    scores = dump(f"sqlite:///{root / 'gradebook.db'}")
    assert auto_scores(scores, "ann")["test_double"] == 2.0
    assert {s: e["status"] for s, e in journal(root).items()} == {"ann": "ok", "ben": "ok"}


def test_a_kernel_that_never_starts_fails_the_submission_with_a_clear_message(tmp_path):
    """Retried once, then reported as a kernel that did not start (the batch goes on and says so)."""
    root = make_course(tmp_path / "course", **FAST)
    _short_startup(root)
    submit(root, {"ann": "correct"})
    extra = hanging_python3(tmp_path, hangs=100)
    run = batch(root, "grade", ASSIGNMENT, "--workers", "1", "--no-progress", **FAST, **extra)
    assert run.returncode != 0, run.stdout + run.stderr
    assert "graded 0, failed 1" in run.stdout, run.stdout + run.stderr
    assert "FAILED tiny/ann: a kernel did not start" in run.stdout, run.stdout
    assert (tmp_path / "launches").read_text() == "2"
    assert journal(root)["ann"]["status"] == "failed"


def test_zip_collect_of_an_lms_zip_feeds_the_batch(tmp_path):
    """Files named <student_id>__<notebook>.ipynb in a zip, as nbgrader_config.py expects, reach submitted/."""
    root = make_course(tmp_path / "course", **FAST)
    release = (root / "release" / ASSIGNMENT / "tiny.ipynb").read_text()
    nb = nbformat.reads(release, as_version=4)
    next(c for c in nb.cells if c.get("id") == "double").source = ANSWERS["correct"]
    archive = root / "downloaded" / ASSIGNMENT / "archive"
    archive.mkdir(parents=True)
    with zipfile.ZipFile(archive / "lms_download.zip", "w") as z:
        z.writestr("ann__tiny.ipynb", nbformat.writes(nb))
        z.writestr("ben.smith__tiny.ipynb", release)
        z.writestr("week 3/cat_2__tiny.ipynb", release)  # folders inside the zip are fine
        z.writestr("index.html", "<html></html>")  # LMS extras are skipped
        z.writestr("no-student-here.ipynb", release)  # names without a student id are skipped
    run = nbgrader(["zip_collect", ASSIGNMENT], root, check=False, **FAST)
    assert run.returncode == 0, run.stdout + run.stderr
    got = sorted(str(p.relative_to(root / "submitted")) for p in (root / "submitted").rglob("*.ipynb"))
    assert got == [f"ann/{ASSIGNMENT}/tiny.ipynb", f"ben.smith/{ASSIGNMENT}/tiny.ipynb",
                   f"cat_2/{ASSIGNMENT}/tiny.ipynb"]
    run = batch(root, "grade", ASSIGNMENT, "--workers", "2", "--no-progress", **FAST)
    assert run.returncode == 0 and "graded 3, failed 0" in run.stdout, run.stdout + run.stderr
    scores = dump(f"sqlite:///{root / 'gradebook.db'}")
    assert auto_scores(scores, "ann")["test_double"] == 2.0
    assert auto_scores(scores, "ben.smith")["test_double"] == 0.0


def test_a_fork_server_that_does_not_answer_is_replaced(tmp_path, monkeypatch):
    """Zygote.fork gives up after FORK_TIMEOUT and stops the server, so the next kernel gets a new one."""
    import socket

    from grading_engine.batch import kernels

    monkeypatch.setattr(kernels, "FORK_TIMEOUT", 0.5)
    z = kernels.Zygote(tmp_path, [], dict(os.environ))
    z.proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # a server that is stuck
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    mute.bind(str(z.sock))
    mute.listen(1)  # accepts connections, never answers
    try:
        t0 = time.monotonic()
        with pytest.raises(OSError):
            z.fork(["-f", "x.json"], str(tmp_path), {})
        assert time.monotonic() - t0 < 10
        assert z.proc is None and z.restarts == 1  # stopped: the next fork starts a fresh server
    finally:
        mute.close()
        z.stop()


def _set_course_root(root: Path, setting: str) -> None:
    """The instructor's nbgrader_config.py names the course root: an absolute path (JupyterHub, as in nbgrader's
    docs, with the gradebook beside it) or a relative one (resolved where nbgrader runs, the course folder)."""
    if setting == "absolute":
        lines = [f"c.CourseDirectory.root = {str(root)!r}",
                 f"c.CourseDirectory.db_url = {'sqlite:///' + str(root / 'gradebook.db')!r}"]
    else:
        lines = ['c.CourseDirectory.root = "."']
    with open(root / "nbgrader_config.py", "a") as fh:
        fh.write("\n" + "\n".join(lines) + "\n")


@pytest.mark.parametrize("setting, extra", [("absolute", {}), ("relative", FAST)], ids=["absolute", "relative"])
def test_the_batch_honours_the_course_root_of_nbgrader_config(tmp_path, setting, extra):
    """Workers grade in their private copies whatever root the config names; only the merge writes the course.

    The absolute root runs in the course's full configuration (sandbox and integrity checks), whose
    integrity records are written under the root too.
    """
    root = tmp_path / "course"
    make_course(root, **extra)
    _set_course_root(root, setting)
    students = {"ann": "correct", "ben": "partial", "cat": "blank"}
    submit(root, students)
    run = batch(root, "grade", ASSIGNMENT, "--workers", "2", "--no-progress", **extra)
    assert run.returncode == 0 and "graded 3, failed 0" in run.stdout, run.stdout + run.stderr
    assert autograded_files(root) >= {f"{s}/{ASSIGNMENT}/tiny.ipynb" for s in students}
    grades = dump(f"sqlite:///{root / 'gradebook.db'}")
    assert set(grades) == {f"{ASSIGNMENT}/{s}" for s in students}
    assert auto_scores(grades, "ann") == {"test_double": 2.0, "test_double_type": 1.0}
    assert auto_scores(grades, "ben") == {"test_double": 2.0, "test_double_type": 0.0}
    assert auto_scores(grades, "cat") == {"test_double": 0.0, "test_double_type": 0.0}
    if not extra:  # the integrity records come back through the merge as well
        assert {p.stem for p in (root / "integrity" / ASSIGNMENT).glob("*.json")} == set(students)
    assert not (root / ".batch" / "workers").exists()
    for s in students:
        nbgrader(["generate_feedback", ASSIGNMENT, "--student", s, "--force"], root, **extra)
        assert (root / "feedback" / s / ASSIGNMENT / "tiny.html").exists(), s


def test_a_worker_refuses_a_course_folder_outside_its_private_copy(tmp_path):
    """The worker's last guard: a folder setting that leads out of the private course stops the batch, loudly."""
    from grading_engine.batch.worker import check_private, private_config_args, private_db_url
    from nbgrader.coursedir import CourseDirectory

    assert private_config_args(tmp_path) == [f"--CourseDirectory.root={tmp_path}",
                                             f"--CourseDirectory.db_url=sqlite:///{tmp_path / 'gradebook.db'}"]
    check_private(CourseDirectory(root=str(tmp_path), db_url=private_db_url(tmp_path)), tmp_path)
    real = tmp_path.parent / "real-course"
    cases = {"CourseDirectory.root": dict(root=str(real), db_url=private_db_url(tmp_path)),
             "CourseDirectory.db_url": dict(root=str(tmp_path), db_url=f"sqlite:///{real / 'gradebook.db'}"),
             "CourseDirectory.autograded_directory": dict(root=str(tmp_path), db_url=private_db_url(tmp_path),
                                                          autograded_directory=str(real / "autograded"))}
    for name, traits in cases.items():
        with pytest.raises(SystemExit, match=name):
            check_private(CourseDirectory(**traits), tmp_path)


def test_discover_and_the_merge_follow_the_course_layout(tmp_path):
    """Submissions are found, and results put, where the course's directory_structure says (no processes)."""
    from grading_engine.batch.runner import Course, Job, discover, merge

    course = Course(root=tmp_path, db_url="", course_id="c", config_file=tmp_path / "nbgrader_config.py", ignore=[],
                    directory_structure="{student_id}/{nbgrader_step}/{assignment_id}",
                    submitted_directory="handed_in", autograded_directory="graded")
    for s in ("ann", "ben"):
        (tmp_path / s / "handed_in" / ASSIGNMENT).mkdir(parents=True)
    (tmp_path / "cat" / "handed_in" / "other").mkdir(parents=True)
    assert discover(course, ASSIGNMENT) == ["ann", "ben"]
    dest = tmp_path / "ann" / "graded" / ASSIGNMENT
    dest.mkdir(parents=True)
    (dest / "stale.ipynb").write_text("old")
    out = tmp_path / "out"
    (out / "autograded").mkdir(parents=True)
    (out / "autograded" / "tiny.ipynb").write_text("new")
    merge(course, None, out, Job(ASSIGNMENT, "ann", 1, "fp"), {"ok": True, "rows": None})
    assert sorted(p.name for p in dest.iterdir()) == ["tiny.ipynb"]
    assert not list(dest.parent.glob(".*batch-*")), "no half-swapped folder is left"
    assert journal(tmp_path)["ann"]["status"] == "ok" and journal(tmp_path)["ann"]["fingerprint"] == "fp"


def test_the_workers_metadata_validation_agrees_with_nbgraders(monkeypatch):
    """A worker validates nbgrader's cell metadata with one validator per schema: same verdicts, same errors."""
    import jsonschema
    from grading_engine.batch import worker
    from nbgrader.nbgraderformat import common
    from nbgrader.nbgraderformat.v3 import MetadataValidatorV3

    good = {"grade": True, "grade_id": "t1", "locked": True, "points": 2, "schema_version": 3, "solution": False}
    cases = [good, {**good, "points": "two"}, {**good, "grade_id": 3}, {k: v for k, v in good.items() if k != "locked"},
             {**good, "task": "yes"}, {**good, "solution": None}]

    def verdicts():
        out = []
        for meta in cases:
            try:
                MetadataValidatorV3().validate_cell(nbformat.from_dict(
                    {"cell_type": "code", "source": "", "metadata": {"nbgrader": dict(meta)}, "outputs": [],
                     "execution_count": None}))
                out.append("ok")
            except jsonschema.ValidationError as exc:
                out.append(exc.message)
        return out

    stock = verdicts()
    monkeypatch.setattr(common, "jsonschema", common.jsonschema)
    worker.validate_metadata_once_per_schema()
    assert isinstance(common.jsonschema, worker._SchemaOnce)
    assert verdicts() == stock and stock[0] == "ok" and all(v != "ok" for v in stock[1:])
    assert len(common.jsonschema._validators) == 1  # one schema, checked once, for every cell of every validator
