"""Real nbgrader runs in a throw-away course directory.

A :class:`Workspace` is a temporary copy of the course (config and
``source/``) in which ``nbgrader generate_assignment`` and the course's batch
grader (nbgrader's own autograde, in parallel workers) run as real
subprocesses, never touching the instructor's gradebook or folders.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from course_tools.paths import REPO_ROOT, SOURCE_DIR

NBGRADER = [sys.executable, "-m", "nbgrader"]


@dataclass
class Submission:
    """The notebooks one (possibly synthetic) student hands in for one assignment."""

    student: str
    assignment: str
    notebooks: dict[str, nbformat.NotebookNode]  # notebook stem -> notebook
    label: str = ""


@dataclass
class NotebookScore:
    """Autograded result of one notebook of one submission."""

    student: str
    assignment: str
    notebook: str
    scores: dict[str, tuple[float | None, float]] = field(default_factory=dict)  # grade_id -> (auto, max)

    def auto_total(self, grade_ids: set[str] | None = None) -> float:
        return sum((auto or 0.0) for gid, (auto, _) in self.scores.items() if grade_ids is None or gid in grade_ids)

    def max_total(self, grade_ids: set[str] | None = None) -> float:
        return sum(mx for gid, (_, mx) in self.scores.items() if grade_ids is None or gid in grade_ids)


def clean_env() -> dict[str, str]:
    """Environment for nbgrader subprocesses: no inherited course overrides."""
    env = dict(os.environ)
    for key in ("COURSE_DB_URL", "COURSE_EXCHANGE", "JUPYTER_CONFIG_DIR"):
        env.pop(key, None)
    # nbgrader runs `alembic` from PATH: the environment's own, even when its bin/ is not on PATH
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("PYTHONHASHSEED", "0")
    env["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"
    return env


def run_nbgrader(args: list[str], cwd: Path, log: Path | None = None, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run one nbgrader command; raise with its output when it fails."""
    proc = subprocess.run(
        NBGRADER + args, cwd=cwd, env=env or clean_env(), capture_output=True, text=True
    )
    if log is not None:
        with log.open("a") as fh:
            fh.write(f"$ nbgrader {' '.join(args)}\n{proc.stdout}{proc.stderr}\n")
    if proc.returncode != 0:
        raise RuntimeError(
            f"nbgrader {' '.join(args)} failed with exit code {proc.returncode} in {cwd}:\n"
            f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc


class Workspace:
    """A temporary course directory with generated assignments and a gradebook."""

    def __init__(self, root: Path, assignments: list[str]):
        self.root = Path(root)
        self.assignments = list(assignments)
        self.log = self.root / "nbgrader.log"
        self.errors: dict[str, str] = {}  # student -> why nbgrader could not grade it

    def create(self) -> Workspace:
        """Copy the course and run ``nbgrader generate_assignment`` for each assignment."""
        self.root.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / "nbgrader_config.py", self.root / "nbgrader_config.py")
        for a in self.assignments:
            shutil.copytree(SOURCE_DIR / a, self.root / "source" / a, dirs_exist_ok=True,
                            ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
            run_nbgrader(["generate_assignment", a, "--force"], self.root, self.log)
        return self

    def release_dir(self, assignment: str) -> Path:
        return self.root / "release" / assignment

    def write_submissions(self, submissions: list[Submission]) -> None:
        """Put each submission in ``submitted/<student>/<assignment>/``, with the release's other files."""
        for sub in submissions:
            sdir = self.root / "submitted" / sub.student / sub.assignment
            if sdir.exists():
                shutil.rmtree(sdir)
            # assets and other files of the release travel with the submission
            shutil.copytree(self.release_dir(sub.assignment), sdir, ignore=shutil.ignore_patterns("*.ipynb"))
            for stem, nb in sub.notebooks.items():
                nbformat.write(nb, str(sdir / f"{stem}.ipynb"))

    def batch(self, submissions: list[Submission], trusted: bool = False, workers: int | None = None,
              quiet: bool = True) -> list[NotebookScore]:
        """Grade written submissions with the course's batch grader (``python -m grading_engine.batch grade``).

        Each notebook goes through nbgrader's own autograde with this
        workspace's copy of the course configuration, in parallel workers:
        the path a class's submissions take (the sandbox's warm kernels and
        the evidence-based scoring). ``trusted=True``, for the instructor's
        own notebooks only (the stored wrong answers) where warm sandboxed
        kernels cannot be had: the same scoring without the sandbox
        (``COURSE_SANDBOX=off``), in plain ``python3`` kernels that the batch
        forks warm, rather than a fresh sandbox per notebook.
        """
        if not submissions:
            return []
        config = self.root / "nbgrader_config.py"
        text = config.read_text()
        line = f'\nc.SandboxedExecute.kernel_name = "python3"  {TRUSTED_MARK}\n'
        config.write_text(text + line if trusted and TRUSTED_MARK not in text
                          else text.replace(line, "") if not trusted else text)
        env = clean_env()
        if trusted:
            env["COURSE_SANDBOX"] = "off"
        students = sorted({s.student for s in submissions})
        assignments = sorted({s.assignment for s in submissions})
        cmd = [sys.executable, "-m", "grading_engine.batch", "grade", *assignments, "--course-dir", str(self.root)]
        cmd += ["--workers", str(workers)] if workers else []
        cmd += ["--no-progress"] if quiet else []
        for st in students:
            cmd += ["--student", st]
        with self.log.open("a") as fh:
            fh.write(f"$ {' '.join(cmd[:8])} ... ({len(students)} students{', trusted' if trusted else ''})\n")
            fh.flush()
            proc = subprocess.run(cmd, cwd=self.root, env=env, stdout=fh,
                                  stderr=None if not quiet else fh, text=True)
        if proc.returncode not in (0, 1):  # 1: some submission failed, reported per student below
            raise RuntimeError(f"the batch grader stopped with exit code {proc.returncode}; see {self.log}")
        for sub in submissions:
            journal = self.root / ".batch" / "journal" / sub.assignment / f"{sub.student}.json"
            try:
                entry = json.loads(journal.read_text())
            except (OSError, ValueError):
                entry = {"status": "missing", "error": "the batch grader wrote no result"}
            if entry.get("status") != "ok":
                self.errors[sub.student] = str(entry.get("error") or entry.get("status"))
        return read_scores(self.root / "gradebook.db", submissions)


TRUSTED_MARK = "# course_tools.grading: trusted notebooks, plain kernel"


def read_scores(db_path: Path, submissions: list[Submission]) -> list[NotebookScore]:
    """Autograded scores of the submissions, per notebook and grade cell (one gradebook session for all)."""
    from nbgrader.api import Gradebook, MissingEntry

    results = []
    with Gradebook(f"sqlite:///{db_path}") as gb:
        for sub in submissions:
            for stem in sub.notebooks:
                ns = NotebookScore(sub.student, sub.assignment, stem)
                try:
                    nb = gb.find_submission_notebook(stem, sub.assignment, sub.student)
                except MissingEntry:
                    pass  # not graded: no scores
                else:
                    ns.scores = {g.name: (g.auto_score, g.max_score) for g in nb.grades}
                results.append(ns)
    return results


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0
