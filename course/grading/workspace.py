"""Real nbgrader runs in a throw-away course directory.

A :class:`Workspace` is a temporary copy of the course (config and
``source/``) in which ``nbgrader generate_assignment`` and
``nbgrader autograde`` run as real subprocesses, never touching the
instructor's gradebook or folders. Submissions are split across worker
directories (each with its own copy of the gradebook) so that several
``nbgrader autograde`` processes run at once.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import nbformat

from course.paths import REPO_ROOT, SOURCE_DIR

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

    def create(self) -> "Workspace":
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

    def autograde(self, submissions: list[Submission], workers: int | None = None,
                  progress=None) -> list[NotebookScore]:
        """Grade submissions with real ``nbgrader autograde`` in parallel worker copies.

        ``progress`` is called with the number of submissions finished so far.
        """
        workers = max(1, min(workers or (os.cpu_count() or 1), len(submissions) or 1))
        groups: list[list[Submission]] = [[] for _ in range(workers)]
        for i, sub in enumerate(submissions):
            groups[i % workers].append(sub)
        done = [0]

        def grade_group(k: int, group: list[Submission]) -> list[NotebookScore]:
            wdir = self.root / "workers" / f"w{k}"
            if wdir.exists():
                shutil.rmtree(wdir)
            wdir.mkdir(parents=True)
            shutil.copy2(self.root / "nbgrader_config.py", wdir / "nbgrader_config.py")
            shutil.copy2(self.root / "gradebook.db", wdir / "gradebook.db")
            for a in {s.assignment for s in group}:
                shutil.copytree(self.root / "source" / a, wdir / "source" / a)
            for sub in group:
                sdir = wdir / "submitted" / sub.student / sub.assignment
                # assets and other files of the release travel with the submission
                shutil.copytree(self.release_dir(sub.assignment), sdir,
                                ignore=shutil.ignore_patterns("*.ipynb"))
                for stem, nb in sub.notebooks.items():
                    nbformat.write(nb, str(sdir / f"{stem}.ipynb"))
            results: list[NotebookScore] = []
            for a in sorted({s.assignment for s in group}):
                subs = [s for s in group if s.assignment == a]
                try:
                    # one nbgrader process grades all of this worker's students
                    run_nbgrader(["autograde", a, "--force"], wdir, wdir / "nbgrader.log")
                except RuntimeError:
                    # nbgrader itself stopped (not a cell error): grade one by one
                    # so that one broken submission cannot hide the others' results
                    for sub in subs:
                        try:
                            run_nbgrader(["autograde", a, "--student", sub.student, "--force"],
                                         wdir, wdir / "nbgrader.log")
                        except RuntimeError as exc:
                            self.errors[sub.student] = str(exc)
                for sub in subs:
                    results.extend(read_scores(wdir / "gradebook.db", sub))
                    done[0] += 1
                    if progress is not None:
                        progress(done[0])
            return results

        with ThreadPoolExecutor(max_workers=workers) as pool:
            futures = [pool.submit(grade_group, k, g) for k, g in enumerate(groups) if g]
            out: list[NotebookScore] = []
            for f in futures:
                out.extend(f.result())
        return out


def read_scores(db_path: Path, sub: Submission) -> list[NotebookScore]:
    """Autograded scores of one submission, per notebook and grade cell."""
    from nbgrader.api import Gradebook, MissingEntry

    results = []
    with Gradebook(f"sqlite:///{db_path}") as gb:
        for stem in sub.notebooks:
            ns = NotebookScore(sub.student, sub.assignment, stem)
            try:
                nb = gb.find_submission_notebook(stem, sub.assignment, sub.student)
            except MissingEntry:
                results.append(ns)
                continue
            for g in nb.grades:
                ns.scores[g.name] = (g.auto_score, g.max_score)
            results.append(ns)
    return results


class Timer:
    def __init__(self):
        self.t0 = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.t0
