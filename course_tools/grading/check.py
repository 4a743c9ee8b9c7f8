"""Grade the reference, the release and every mutant of each notebook.

This is the harness behind ``python -m course_tools.grading check`` and the pytest
suite: one real ``nbgrader generate_assignment`` and one batch of
real nbgrader autograde runs (``grading_engine.batch``, in parallel) answer every
question the tests ask: the reference, the release and the stored wrong
answers, all under the course's full grading configuration (warm sandboxed
kernels and the evidence-based scoring), as a class's submissions are graded
(with an installation under /tmp, where warm sandboxed kernels cannot be had,
the stored wrong answers run with the same scoring in plain warm kernels).
"""

from __future__ import annotations

import filecmp
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from course_tools.grading.mutants import Mutant, apply_mutant, load_mutants
from course_tools.grading.notebooks import answer_cells, read_notebook, test_cells
from course_tools.grading.workspace import NotebookScore, Submission, Timer, Workspace
from course_tools.paths import RELEASE_DIR, SOURCE_DIR, source_notebooks

SOLUTION = "reference"
RELEASE = "blank"


@dataclass
class NotebookReport:
    assignment: str
    notebook: str
    autograded_max: float
    test_ids: list[str]
    answer_ids: list[str]
    reference: NotebookScore | None = None
    release: NotebookScore | None = None
    mutants: list[tuple[Mutant, NotebookScore | None]] = field(default_factory=list)

    def judged_by(self, mutant: Mutant) -> set[str]:
        """Test cells whose loss counts against ``mutant``: its own test cell for a quiz item, else all."""
        own = f"test_{mutant.cell}"
        return {own} if is_quiz(mutant.cell) and own in self.test_ids else set(self.test_ids)

    def mutant_caught(self, mutant: Mutant, score: NotebookScore | None) -> bool:
        ids = self.judged_by(mutant)
        if score is None or not ids.issubset(score.scores):
            return False  # not graded (nbgrader could not grade it): nothing shows that the tests catch it
        return score.auto_total(ids) < score.max_total(ids) - 1e-9

    def lost_in(self, score: NotebookScore) -> list[str]:
        """Test cells that did not earn their points."""
        return [g for g in self.test_ids if (score.scores.get(g, (None, 0))[0] or 0) < score.scores.get(g, (0, 0))[1]]


@dataclass
class CourseReport:
    notebooks: list[NotebookReport]
    seconds: float
    workspace: Path
    errors: dict[str, str]

    def find(self, assignment: str, notebook: str) -> NotebookReport:
        for r in self.notebooks:
            if (r.assignment, r.notebook) == (assignment, notebook):
                return r
        raise KeyError(f"{assignment}/{notebook}")

    def render(self) -> str:
        lines = [f"Grading report ({len(self.notebooks)} notebooks, {self.seconds:.0f} s)"]
        for r in self.notebooks:
            ids = set(r.test_ids)
            ref = r.reference.auto_total(ids) if r.reference else float("nan")
            rel = r.release.auto_total(ids) if r.release else float("nan")
            lines.append(f"\n{r.assignment}/{r.notebook}.ipynb")
            lines.append(f"  reference  {ref:5.1f} / {r.autograded_max:.1f}"
                         + ("" if ref == r.autograded_max else "   <-- must be full marks: lost in "
                            + ", ".join(r.lost_in(r.reference) if r.reference else ["(not graded)"])))
            lines.append(f"  release    {rel:5.1f} / {r.autograded_max:.1f}"
                         + ("" if rel == 0 else "   <-- must be zero"))
            for cell in r.answer_ids:
                ms = [(m, s) for m, s in r.mutants if m.cell == cell]
                caught = sum(r.mutant_caught(m, s) for m, s in ms)
                flag = "" if ms and caught == len(ms) else ("   <-- no mutant" if not ms else "   <-- survivors")
                lines.append(f"  answer cell {cell:<32} mutants caught {caught}/{len(ms)}{flag}")
                for m, s in ms:
                    if not r.mutant_caught(m, s):
                        lines.append(f"      survived: {m.name} ({m.why})")
        if self.errors:
            lines.append("\nnbgrader could not grade: " + ", ".join(sorted(self.errors)))
        return "\n".join(lines)


def is_quiz(cell: str) -> bool:
    return re.fullmatch(r"quiz_\d+", cell) is not None


def build_submissions(assignments: list[str], ws: Workspace, notebooks: set[tuple[str, str]] | None = None
                      ) -> tuple[list[Submission], dict[str, list[Mutant]]]:
    """Reference, release and mutant submissions; ``by_student`` names the mutants each synthetic student carries.

    A mutant of an ordinary answer cell is graded alone, in an otherwise
    correct notebook, and is caught when the notebook loses any point. Quiz
    items are independent of everything else (one variable, read only by
    its own test cell), so one wrong quiz answer per item shares a notebook
    with the wrong answers to the other items, and each is judged by its own
    test cell alone.
    """
    subs: list[Submission] = []
    by_student: dict[str, list[Mutant]] = {}
    k = 0

    def add(a: str, stem: str, nb, ms: list[Mutant]) -> None:
        nonlocal k
        k += 1
        student = f"mutant{k:04d}"
        by_student[student] = ms
        for m in ms:
            nb = apply_mutant(nb, m)
        subs.append(Submission(student, a, {stem: nb}, " + ".join(m.key for m in ms)))

    def wanted(a: str, stem: str) -> bool:
        return notebooks is None or (a, stem) in notebooks

    for a in assignments:
        ref = {p.stem: read_notebook(p) for p in source_notebooks(a) if wanted(a, p.stem)}
        blank = {p.stem: read_notebook(p) for p in sorted(ws.release_dir(a).glob("*.ipynb")) if wanted(a, p.stem)}
        if not ref:
            continue
        subs.append(Submission(SOLUTION, a, ref, "reference"))
        subs.append(Submission(RELEASE, a, blank, "release"))
        for stem, nb in ref.items():
            quiz: dict[str, list[Mutant]] = {}
            tests = {c.grade_id for c in test_cells(nb)}
            for m in load_mutants(a, stem):
                if is_quiz(m.cell) and f"test_{m.cell}" in tests:
                    quiz.setdefault(m.cell, []).append(m)
                else:
                    add(a, stem, nb, [m])
            for r in range(max((len(v) for v in quiz.values()), default=0)):
                add(a, stem, nb, [v[r] for v in quiz.values() if r < len(v)])
    return subs, by_student


def grade(assignments: list[str], workdir: Path, workers: int | None = None, quiet: bool = False,
          notebooks: set[tuple[str, str]] | None = None) -> CourseReport:
    """Generate, then autograde reference, release and mutants of the assignments.

    ``notebooks`` ((assignment, notebook stem) pairs) limits the grading to those notebooks; every
    assignment is still generated whole.
    """
    timer = Timer()
    ws = Workspace(workdir, assignments).create()
    subs, by_student = build_submissions(assignments, ws, notebooks)
    reports: dict[tuple[str, str], NotebookReport] = {}
    for a in assignments:
        for p in source_notebooks(a):
            if notebooks is not None and (a, p.stem) not in notebooks:
                continue
            nb = read_notebook(p)
            tids = [c.grade_id for c in test_cells(nb)]
            reports[(a, p.stem)] = NotebookReport(
                a, p.stem, sum(c.points for c in test_cells(nb)), tids, [c.grade_id for c in answer_cells(nb)]
            )
    ws.write_submissions(subs)
    # one batch (warm sandboxed kernels, evidence-based scoring): the reference and the release first, then
    # the stored wrong answers; where warm sandboxed kernels cannot be had (an installation under /tmp), the
    # wrong answers go in a second batch with the same scoring in plain warm kernels, rather than in a fresh
    # sandbox each
    from grading_engine.sandbox.warm import unavailable_here

    own = [s for s in subs if s.student in (SOLUTION, RELEASE)]
    wrong = [s for s in subs if s.student not in (SOLUTION, RELEASE)]
    if unavailable_here(["course"]):
        scores = ws.batch(own, workers=workers, quiet=quiet) + ws.batch(wrong, workers=workers, quiet=quiet,
                                                                        trusted=True)
    else:
        scores = ws.batch(own + wrong, workers=workers, quiet=quiet)
    for s in scores:
        r = reports[(s.assignment, s.notebook)]
        if s.student == SOLUTION:
            r.reference = s
        elif s.student == RELEASE:
            r.release = s
        else:
            r.mutants.extend((m, s) for m in by_student[s.student])
    return CourseReport(list(reports.values()), timer.seconds, workdir, dict(ws.errors))


def sync_release(ws_root: Path, assignment: str) -> list[str]:
    """Copy a workspace's generated release of one assignment into ``release/``; return changed files."""
    src = ws_root / "release" / assignment
    dst = RELEASE_DIR / assignment
    changed = release_differences(src, dst)
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)
    return changed


def release_differences(generated: Path, committed: Path) -> list[str]:
    """Files that differ between a freshly generated release and the committed one."""
    def files(root: Path) -> set[str]:
        if not root.exists():
            return set()
        return {str(p.relative_to(root)) for p in root.rglob("*")
                if p.is_file() and p.suffix != ".pt" and "__pycache__" not in p.parts}

    g, c = files(generated), files(committed)
    diffs = sorted(g ^ c)
    for name in sorted(g & c):
        if not filecmp.cmp(generated / name, committed / name, shallow=False):
            diffs.append(name)
    return diffs


def all_assignments() -> list[str]:
    return sorted(p.name for p in SOURCE_DIR.iterdir() if p.is_dir() and any(p.glob("*.ipynb")))
