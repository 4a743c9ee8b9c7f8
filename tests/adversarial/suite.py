"""The adversarial suite: grade attack submissions with real ``nbgrader autograde``, twice.

Mode ``course``: the course's nbgrader_config.py as it is (sandbox and
integrity on). Mode ``stock``: the same file with ``COURSE_SANDBOX=off`` and
``COURSE_INTEGRITY=off``, which is stock nbgrader. Each mode grades one batch
in a temporary course directory: an honest student first, every attack in
``attacks.toml``, a blank submission, and an honest student last. Then it
looks at what each submission earned, what the integrity report says, whether
the batch went on after it, whether the instructor's files (source/,
release/, exchange/) are byte for byte the same, whether anything reached a
local server, and whether the feedback shows hidden tests.

    python tests/adversarial/suite.py [--keep] [--mode course|stock|both]

prints the report with both columns (pytest prints it too).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
ASSIGNMENT = "adv"
NOTEBOOK = "adv_lookup"
FIXTURE = HERE / "adv_fixture.ipynb"
MAX_POINTS = 5.0
HONEST_FIRST, BLANK, HONEST_LAST = "a000_honest", "y000_blank", "z999_honest"
HIDDEN_MARKER = "manual_seed(5)"  # a line of a hidden test of the fixture
# nbgrader errors that end a whole batch, not just one submission (converters/base.py)
BATCH_FATAL = __import__("re").compile(r"old version \s*of the nbgrader metadata|newer version \s*of the nbgrader "
                                       r"metadata|error accessing the nbgrader database")

# short limits so that the attacks end quickly; everything else is the course's own configuration
SUITE_CONFIG = """
# --- adversarial suite: short limits ---
c.Execute.timeout = 10
"""
SUITE_ENV = {
    "COURSE_SANDBOX_MEMORY_MB": "2048",
    "COURSE_SANDBOX_CPU_S": "120",
    "COURSE_SANDBOX_WALL_S": "240",
    "COURSE_SANDBOX_NPROC": "128",
}


@dataclass
class Attack:
    name: str
    why: str
    answers: dict = field(default_factory=dict)
    ops: list = field(default_factory=list)
    files: dict = field(default_factory=dict)
    earned: float = 0.0
    flags: list = field(default_factory=list)
    unsafe: bool = False
    harms: list = field(default_factory=list)
    marker: str = ""
    links: dict = field(default_factory=dict)
    gap: str = ""  # an attack not defended yet: why (its test is a strict expected failure)


def load_attacks() -> list[Attack]:
    with (HERE / "attacks.toml").open("rb") as fh:
        data = tomllib.load(fh)
    return [Attack(**a) for a in data["attack"]]


def student_of(i: int, attack: Attack) -> str:
    """The student id of an attack: its position in attacks.toml (``i`` is ignored), so ids sort in file order."""
    names = [a.name for a in load_attacks()]
    return f"b{names.index(attack.name):02d}_{attack.name}"


# ------------------------------------------------------------ submissions


def _gid(cell) -> str | None:
    return cell.get("metadata", {}).get("nbgrader", {}).get("grade_id")


def _is_test(cell) -> bool:
    m = cell.get("metadata", {}).get("nbgrader", {})
    return cell.get("cell_type") == "code" and m.get("grade") and not m.get("solution")


def reference_answers() -> dict[str, str]:
    nb = nbformat.read(str(FIXTURE), as_version=4)
    return {_gid(c): c.source for c in nb.cells
            if c.get("metadata", {}).get("nbgrader", {}).get("solution")}


def _op_reorder(nb):
    cells = list(nb.cells)
    out = []
    for c in cells:
        if _is_test(c):
            # put the test cell before the most recent answer cell
            k = max(i for i, o in enumerate(out) if o.get("metadata", {}).get("nbgrader", {}).get("solution")) \
                if any(o.get("metadata", {}).get("nbgrader", {}).get("solution") for o in out) else 0
            out.insert(k, c)
        else:
            out.append(c)
    nb.cells = out
    return nb


def _op_duplicate(nb):
    out = []
    for c in nb.cells:
        out.append(c)
        if _gid(c) and c.get("metadata", {}).get("nbgrader", {}).get("grade_id") not in ("setup",):
            dup = copy.deepcopy(c)
            dup["id"] = (c.get("id") or "cell") + "-copy"
            out.append(dup)
    nb.cells = out
    return nb


def _op_strip(nb, empty: bool):
    for c in nb.cells:
        if _is_test(c):
            if empty:
                c.metadata["nbgrader"] = {}
            else:
                del c.metadata["nbgrader"]
    return nb


def _op_markdown(nb):
    for c in nb.cells:
        if _is_test(c):
            c["cell_type"] = "markdown"
            c.pop("outputs", None)
            c.pop("execution_count", None)
    return nb


OPS = {
    "delete_tests": lambda nb: (setattr(nb, "cells", [c for c in nb.cells if not _is_test(c)]), nb)[1],
    "duplicate_cells": _op_duplicate,
    "reorder": _op_reorder,
    "strip_test_metadata": lambda nb: _op_strip(nb, empty=False),
    "empty_test_metadata": lambda nb: _op_strip(nb, empty=True),
    "tests_to_markdown": _op_markdown,
}


def write_submission(course: Path, student: str, release_nb, attack: Attack | None, answers: dict | None,
                     port: int | None = None) -> None:
    """One student's submitted folder: the release's files and the (attacked) notebook."""
    sub = course / "submitted" / student / ASSIGNMENT
    shutil.copytree(course / "release" / ASSIGNMENT, sub, ignore=shutil.ignore_patterns("*.ipynb"))
    (sub.parent / "timestamp.txt").write_text("2030-01-01 00:00:00.000000 UTC")
    nb = copy.deepcopy(release_nb)
    answers = dict(answers or {})
    ops = list(attack.ops) if attack else []
    if "reference_answers" in ops:
        answers = {**reference_answers(), **answers}
    if attack:
        answers.update(attack.answers)
    for c in nb.cells:
        gid = _gid(c)
        if gid in answers and c.get("metadata", {}).get("nbgrader", {}).get("solution"):
            src = answers[gid]
            c.source = src.replace("{port}", str(port)) if port else src
    for op in ops:
        if op in OPS:
            nb = OPS[op](nb)
    name = f"{NOTEBOOK}.ipynb"
    if "missing" in ops:
        return
    if "rename" in ops:
        name = f"{NOTEBOOK}_final.ipynb"
    text = nbformat.writes(nb)
    if "invalid_json" in ops:
        text = text[: len(text) // 2]
    (sub / name).write_text(text)
    for fname, content in (attack.files if attack else {}).items():
        (sub / fname).write_text(content)
    for fname, target in (attack.links if attack else {}).items():
        (sub / fname).symlink_to(target)


# ------------------------------------------------------------------ grading


def run(cmd: list[str], cwd: Path, env: dict, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def mode_env(mode: str, course: Path) -> dict:
    env = dict(os.environ)
    for k in ("COURSE_DB_URL", "JUPYTER_CONFIG_DIR"):
        env.pop(k, None)
    env.update(SUITE_ENV)
    env["COURSE_EXCHANGE"] = str(course / "exchange")
    env["PYTHONHASHSEED"] = "0"
    env["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if mode == "stock":
        env["COURSE_SANDBOX"] = "off"
        env["COURSE_INTEGRITY"] = "off"
    else:
        env.pop("COURSE_SANDBOX", None)
        env.pop("COURSE_INTEGRITY", None)
    return env


def tree_hash(root: Path) -> dict[str, str]:
    out = {}
    if root.exists():
        for p in sorted(root.rglob("*")):
            if p.is_file():
                out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def instructor_files(course: Path) -> dict[str, dict]:
    return {d: tree_hash(course / d) for d in ("source", "release", "exchange")}


def scores(course: Path) -> dict[str, float | None]:
    """Autograded score per student (manual score where one was written), None: not graded."""
    con = sqlite3.connect(str(course / "gradebook.db"))
    rows = con.execute(
        "SELECT sa.student_id, g.auto_score, g.manual_score, gc.max_score FROM grade g "
        "JOIN submitted_notebook sn ON g.notebook_id = sn.id "
        "JOIN submitted_assignment sa ON sn.assignment_id = sa.id "
        "JOIN grade_cells gc ON gc.id = g.cell_id WHERE gc.cell_type = 'code'").fetchall()
    con.close()
    out: dict[str, float | None] = {}
    for student, auto, manual, _ in rows:
        val = manual if manual is not None else auto
        if val is None:
            out.setdefault(student, None)
            continue
        out[student] = (out.get(student) or 0.0) + val
    return out


class Listener(threading.Thread):
    """A local TCP server: what a submission manages to send out."""

    def __init__(self):
        super().__init__(daemon=True)
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.5)
        self.port = self.sock.getsockname()[1]
        self.received = b""
        self.stop = False

    def run(self):
        while not self.stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(2)
                try:
                    while chunk := conn.recv(4096):
                        self.received += chunk
                except OSError:
                    pass

    def close(self):
        self.stop = True
        self.sock.close()


@dataclass
class StudentResult:
    student: str
    score: float | None
    graded: bool  # nbgrader wrote an autograded notebook
    reached: bool  # nbgrader started on this submission
    flags: list[str]
    flag_details: list[str]
    network: bytes = b""
    feedback_leak: bool | None = None


@dataclass
class ModeResult:
    mode: str
    course: Path
    rc: int
    seconds: float
    students: dict[str, StudentResult]
    order: list[str]
    files_before: dict
    files_after: dict
    log: str
    skipped: dict[str, str]
    honest_before: float | None = None  # the first honest student's score before the attackers ran
    stopped_at: str | None = None  # the submission at which nbgrader stopped the batch (None: it went through)
    fatal: set = field(default_factory=set)  # submissions that stop a batch (graded one by one after the stop)

    def changed_files(self) -> list[str]:
        out = []
        for d in self.files_before:
            b, a = self.files_before[d], self.files_after[d]
            out += [f"{d}/{k}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        return out


def grade_mode(mode: str, workdir: Path, attacks: list[Attack]) -> ModeResult:
    course = workdir / mode
    course.mkdir(parents=True)
    env = mode_env(mode, course)
    shutil.copy2(REPO / "nbgrader_config.py", course / "nbgrader_config.py")
    with (course / "nbgrader_config.py").open("a") as fh:
        fh.write(SUITE_CONFIG)
    (course / "source" / ASSIGNMENT).mkdir(parents=True)
    shutil.copy2(FIXTURE, course / "source" / ASSIGNMENT / f"{NOTEBOOK}.ipynb")
    (course / "exchange").mkdir()
    nbg = [sys.executable, "-m", "nbgrader"]
    for step in (["generate_assignment", ASSIGNMENT, "--force"], ["release_assignment", ASSIGNMENT, "--force"]):
        p = run(nbg + step, course, env)
        if p.returncode != 0:
            raise RuntimeError(f"nbgrader {step[0]} failed:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    release_nb = nbformat.read(str(course / "release" / ASSIGNMENT / f"{NOTEBOOK}.ipynb"), as_version=4)
    listener = Listener()
    listener.start()
    order = [HONEST_FIRST]
    write_submission(course, HONEST_FIRST, release_nb, None, reference_answers())
    skipped = {}
    by_student: dict[str, Attack] = {}
    for i, attack in enumerate(attacks):
        st = student_of(i, attack)
        if attack.unsafe and mode == "stock" and not os.environ.get("COURSE_ADVERSARIAL_UNSAFE"):
            skipped[attack.name] = "not run: without a sandbox it would harm the machine (stock nbgrader has no limit)"
            continue
        write_submission(course, st, release_nb, attack, None, port=listener.port)
        order.append(st)
        by_student[st] = attack
    write_submission(course, BLANK, release_nb, None, None)
    write_submission(course, HONEST_LAST, release_nb, None, reference_answers())
    order += [BLANK, HONEST_LAST]
    before = instructor_files(course)
    t0 = time.perf_counter()
    # the first honest student alone first: their grade before any attacker ran
    p0 = run(nbg + ["autograde", ASSIGNMENT, "--student", HONEST_FIRST, "--force"], course, env, timeout=900)
    honest_before = scores(course).get(HONEST_FIRST)
    p = run(nbg + ["autograde", ASSIGNMENT], course, env, timeout=1500)
    seconds = time.perf_counter() - t0
    log = p0.stdout + p0.stderr + p.stdout + p.stderr
    import re

    reached = set(re.findall(r"Creating/updating student with ID '([^']+)'", log))
    batch_reached = set(reached)
    # where a batch stopped, an instructor grades the rest one by one: so does the suite, to see what each does
    fatal: set[str] = set()
    stopper = None if HONEST_LAST in batch_reached else max(batch_reached)
    if stopper is not None:
        fatal.add(stopper)
        for st in sorted(order):
            if st > stopper and (course / "submitted" / st).exists():
                q = run(nbg + ["autograde", ASSIGNMENT, "--student", st], course, env, timeout=600)
                one = q.stdout + q.stderr
                log += one
                reached |= set(re.findall(r"Creating/updating student with ID '([^']+)'", one))
                if BATCH_FATAL.search(one):
                    fatal.add(st)
    listener.close()
    after = instructor_files(course)
    sc = scores(course)
    records = {}
    if mode == "course":
        d = course / "integrity" / ASSIGNMENT
        for f in d.glob("*.json") if d.exists() else []:
            records[f.stem] = json.loads(f.read_text())
    students = {}
    for st in order:
        rec = records.get(st, {})
        flags = list(rec.get("submission", {}).get("flags", []))
        for nb in rec.get("notebooks", {}).values():
            flags += nb.get("flags", [])
        graded = (course / "autograded" / st / ASSIGNMENT).exists()
        students[st] = StudentResult(st, sc.get(st), graded, st in reached, sorted({f["kind"] for f in flags}),
                                     [f"[{f.get('source')}] {f['kind']}: {f['detail']}" for f in flags])
    net_student = next((s for s, a in by_student.items() if "network" in a.harms), None)
    if net_student:
        students[net_student].network = listener.received
    for st, attack in by_student.items():
        if "feedback" in attack.harms and students[st].graded:
            fb = run(nbg + ["generate_feedback", ASSIGNMENT, "--student", st, "--force"], course, env)
            html = course / "feedback" / st / ASSIGNMENT / f"{NOTEBOOK}.html"
            students[st].feedback_leak = HIDDEN_MARKER in html.read_text() if html.exists() else None
            if fb.returncode != 0:
                log += fb.stdout + fb.stderr
    # the honest student's feedback must not show hidden tests either (course mode)
    fb = run(nbg + ["generate_feedback", ASSIGNMENT, "--student", HONEST_FIRST, "--force"], course, env)
    html = course / "feedback" / HONEST_FIRST / ASSIGNMENT / f"{NOTEBOOK}.html"
    students[HONEST_FIRST].feedback_leak = HIDDEN_MARKER in html.read_text() if html.exists() else None
    return ModeResult(mode, course, p.returncode, seconds, students, order, before, after, log, skipped,
                      honest_before, stopper, fatal)


def grade_both(workdir: Path, modes=("course", "stock"), only: list[str] | None = None) -> dict[str, ModeResult]:
    attacks = [a for a in load_attacks() if not only or a.name in only]
    with ThreadPoolExecutor(max_workers=len(modes)) as pool:
        futures = {m: pool.submit(grade_mode, m, workdir, attacks) for m in modes}
        return {m: f.result() for m, f in futures.items()}


# ------------------------------------------------------------------- verdicts


def outcome(res: ModeResult, attack: Attack, student: str) -> tuple[bool, str]:
    """(defended, text) for one attack in one mode."""
    if attack.name in res.skipped:
        return True, "skipped: " + res.skipped[attack.name].split(":")[0]
    r = res.students[student]
    problems = []
    got = r.score or 0.0
    if got > attack.earned + 1e-9:
        problems.append(f"earned {got:g} (honestly {attack.earned:g})")
    if attack.earned and got < attack.earned - 1e-9:
        problems.append(f"lost honest points ({got:g} of {attack.earned:g})")
    if student in res.fatal:
        problems.append("stops the whole batch" + (" (here)" if res.stopped_at == student else ""))
    if "network" in attack.harms and r.network:
        problems.append(f"sent {len(r.network)} bytes out")
    if "feedback" in attack.harms and r.feedback_leak:
        problems.append("hidden tests in feedback")
    if "grades" in attack.harms:
        after = res.students[HONEST_FIRST].score
        if res.honest_before is not None and after != res.honest_before:
            problems.append(f"another student's grade {res.honest_before:g} -> {after:g}")
    changed = [f for f in res.changed_files() if not attack.marker or f.startswith(attack.marker)]
    if "files" in attack.harms and changed:
        problems.append(f"changed {', '.join(changed[:2])}")
    if res.mode == "course":
        missing = [k for k in attack.flags if k not in r.flags]
        if missing:
            problems.append(f"missing flags {missing}")
    score = f"{got:g}/{MAX_POINTS:g}" if r.graded or r.score is not None else "not graded"
    if problems:
        return False, f"{score} LET THROUGH: " + "; ".join(problems)
    flags = f" flags: {', '.join(r.flags)}" if r.flags else ""
    return True, f"{score} ok{flags}"


def report(results: dict[str, ModeResult], only: list[str] | None = None) -> str:
    every = load_attacks()
    index = {a.name: i for i, a in enumerate(every)}
    attacks = [a for a in every if not only or a.name in only]
    modes = [m for m in ("stock", "course") if m in results]
    title = {"stock": "stock nbgrader 0.9.6", "course": "this course (sandbox + integrity)"}
    w, col = 34, 62
    lines = ["Adversarial suite: what each submission earned (of 5 points) and what it did", ""]
    head = f"{'submission':<{w}}" + "".join(f"  {title[m]:<{col}}" for m in modes)
    lines += [head, "-" * len(head)]
    details = []
    for label, st in (("honest (graded first)", HONEST_FIRST), ("blank", BLANK), ("honest (graded last)", HONEST_LAST)):
        row = f"{label:<{w}}"
        for m in modes:
            r = results[m].students[st]
            txt = "not graded" if r.score is None else f"{r.score:g}/{MAX_POINTS:g}"
            if r.flags:
                txt += f" flags: {', '.join(r.flags)}"
            if st == HONEST_FIRST and r.feedback_leak:
                txt += " (hidden tests in feedback)"
            row += f"  {txt[:col]:<{col}}"
        lines.append(row)
    for a in attacks:
        row = f"{a.name:<{w}}"
        for m in modes:
            ok, txt = outcome(results[m], a, student_of(index[a.name], a))
            row += f"  {txt[:col]:<{col}}"
            if len(txt) > col:
                details.append(f"  {m:<6} {a.name}: {txt}")
        lines.append(row)
    lines.append("")
    for m in modes:
        res = results[m]
        let = sum(1 for a in attacks if not outcome(res, a, student_of(index[a.name], a))[0])
        changed = res.changed_files()
        stop = f"stopped at {res.stopped_at}" if res.stopped_at else "went through"
        lines.append(f"{m}: {let} of {len(attacks)} attacks let through; the batch of {len(res.order)} "
                     f"submissions {stop} ({res.seconds:.0f} s, exit code {res.rc}); instructor files changed: "
                     f"{', '.join(changed[:4]) if changed else 'none'}")
    if details:
        lines += ["", "in full:"] + details
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--mode", choices=["course", "stock", "both"], default="both")
    ap.add_argument("--only", nargs="*", help="attack names (default: all)")
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="course-adversarial-"))
    modes = ("course", "stock") if args.mode == "both" else (args.mode,)
    try:
        results = grade_both(work, modes, args.only)
        print(report(results, args.only))
        for m, res in results.items():
            print(f"\n{m}: course directory {res.course}" if args.keep else "")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
