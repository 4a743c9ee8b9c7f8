"""The harness: every notebook in source/ follows the contract and grades as it should.

For each notebook: the lint rules of docs/authoring.md, a release/ that is
exactly what ``nbgrader generate_assignment`` makes today, no leak of
solutions or hidden tests, full marks for the reference under real
``nbgrader autograde``, zero for the release, and a loss of points for every
mutant in tests/mutants/.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import background
import pytest

from course_tools.grading.check import all_assignments, release_differences
from course_tools.grading.lint import lint_assignment_files, lint_release, lint_source
from course_tools.grading.mutants import load_mutants
from course_tools.grading.notebooks import answer_cells, read_notebook
from course_tools.grading.workspace import clean_env
from course_tools.paths import RELEASE_DIR, SOURCE_DIR, source_notebooks

ASSIGNMENTS = all_assignments()
NOTEBOOKS = [(a, p.stem) for a in ASSIGNMENTS for p in source_notebooks(a)]
NB_IDS = [f"{a}/{n}" for a, n in NOTEBOOKS]
MUTANTS = [m for a, n in NOTEBOOKS for m in load_mutants(a, n)]

grading = pytest.mark.grading


def test_there_are_notebooks():
    assert NOTEBOOKS, "source/ holds no notebook"


@pytest.mark.parametrize("assignment,notebook", NOTEBOOKS, ids=NB_IDS)
def test_source_notebook_follows_the_contract(assignment, notebook):
    problems = lint_source(SOURCE_DIR / assignment / f"{notebook}.ipynb")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_assignment_folder_releases_no_solution(assignment):
    problems = lint_assignment_files(SOURCE_DIR / assignment)
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("assignment,notebook", NOTEBOOKS, ids=NB_IDS)
def test_release_leaks_no_solution_or_hidden_test(assignment, notebook):
    problems = lint_release(SOURCE_DIR / assignment / f"{notebook}.ipynb", RELEASE_DIR / assignment / f"{notebook}.ipynb")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("assignment,notebook", NOTEBOOKS, ids=NB_IDS)
def test_every_answer_cell_has_a_mutant(assignment, notebook):
    nb = read_notebook(SOURCE_DIR / assignment / f"{notebook}.ipynb")
    cells = {c.grade_id for c in answer_cells(nb)}
    covered = {m.cell for m in load_mutants(assignment, notebook)}
    assert not (covered - cells), f"mutants name cells that are not answer cells: {sorted(covered - cells)}"
    assert cells <= covered, f"answer cells without a mutant: {sorted(cells - covered)}"


@pytest.mark.parametrize("assignment,notebook", NOTEBOOKS, ids=NB_IDS)
def test_mutant_names_are_unique(assignment, notebook):
    names = [(m.cell, m.name) for m in load_mutants(assignment, notebook)]
    assert len(names) == len(set(names)), "two mutants of one cell share a name"


@grading
@pytest.mark.parametrize("assignment", ASSIGNMENTS)
def test_release_is_what_generate_assignment_makes_today(course_report, assignment):
    diffs = release_differences(course_report.workspace / "release" / assignment, RELEASE_DIR / assignment)
    assert not diffs, (f"release/{assignment} is stale in {diffs}; "
                       f"run: python -m course_tools.grading release {assignment}")


@grading
def test_nbgrader_graded_every_submission(course_report):
    assert not course_report.errors, f"nbgrader autograde itself failed for: {sorted(course_report.errors)}"


@grading
@pytest.mark.parametrize("assignment,notebook", NOTEBOOKS, ids=NB_IDS)
def test_reference_earns_full_marks(course_report, assignment, notebook):
    r = course_report.find(assignment, notebook)
    assert r.reference is not None, "reference was not graded"
    got = r.reference.auto_total(set(r.test_ids))
    assert got == r.autograded_max, f"reference earns {got}/{r.autograded_max}; lost in {r.lost_in(r.reference)}"


@grading
@pytest.mark.parametrize("assignment,notebook", NOTEBOOKS, ids=NB_IDS)
def test_release_earns_zero(course_report, assignment, notebook):
    r = course_report.find(assignment, notebook)
    assert r.release is not None, "release was not graded"
    got = r.release.auto_total(set(r.test_ids))
    passing = [g for g in r.test_ids if g not in r.lost_in(r.release)]
    assert got == 0, f"the unanswered release earns {got} points, in {passing}"


@grading
@pytest.mark.parametrize("mutant", MUTANTS, ids=[m.key for m in MUTANTS])
def test_mutant_loses_points(course_report, mutant):
    r = course_report.find(mutant.assignment, mutant.notebook)
    score = next((s for m, s in r.mutants if m == mutant), None)
    assert score is not None, "mutant was not graded"
    ids = r.judged_by(mutant)
    assert r.mutant_caught(mutant, score), (
        f"mutant {mutant.name!r} ({mutant.why}) earns full marks "
        f"{score.auto_total(ids)}/{score.max_total(ids)} in {sorted(ids)}")


VALIDATE_AT_ONCE = 2  # nbgrader validate runs, each with its own kernel
_VALIDATING = re.compile(r"^\[ValidateApp \| INFO\] Validating '(.+)'$", re.M)


def _validate_all(paths: list[Path], invert: bool) -> dict[Path, str]:
    """``nbgrader validate`` as a student runs it (the ordinary kernel, no course configuration), on
    several notebooks in one run (nbgrader's start-up paid once): each notebook's part of the output,
    which starts at nbgrader's "Validating" line. A notebook whose part is missing (the run stopped
    early) is validated again on its own.

    The runs at once share the cores: each kernel's numerical libraries get their share of threads,
    as the batch grader's kernels do (``grading_engine.batch.worker.share_cores``)."""
    from grading_engine.batch.worker import THREAD_VARIABLES, threads_per_kernel

    if not paths:
        return {}
    env = {**clean_env(), **dict.fromkeys(THREAD_VARIABLES, str(threads_per_kernel(VALIDATE_AT_ONCE))),
           "PYTHONUNBUFFERED": "1"}  # nbgrader's log (stderr) and its report (stdout) in the order written
    args = [sys.executable, "-m", "nbgrader", "validate", *map(str, paths)] + (["--invert"] if invert else [])
    proc = subprocess.run(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                          cwd=paths[0].parent)
    starts = [(m.start(), Path(m.group(1))) for m in _VALIDATING.finditer(proc.stdout)]
    parts = {path: proc.stdout[at:nxt] for (at, path), nxt in zip(starts, [s for s, _ in starts[1:]] + [None])}
    out = {}
    for path in paths:
        part = parts.get(Path(os.path.abspath(path)))
        if part is None:  # the run stopped before this notebook (or nbgrader failed before any)
            part = proc.stdout if len(paths) == 1 else _validate_all([path], invert)[path]
        out[path] = part
    return out


@background.session_fixture(turn=1)
def validate_reports(config):
    """``nbgrader validate`` on each selected source notebook and ``--invert`` on its release notebook."""
    selected = getattr(config, "_validate_notebooks", None)
    wanted = [nb for nb in NOTEBOOKS if selected is None or nb in selected]
    groups = [([SOURCE_DIR / a / f"{n}.ipynb" for a, n in wanted], False),
              ([RELEASE_DIR / a / f"{n}.ipynb" for a, n in wanted], True)]
    with ThreadPoolExecutor(max_workers=VALIDATE_AT_ONCE) as pool:
        outs = list(pool.map(lambda g: _validate_all(*g), groups))
    yield {(a, n, inv): out[path] for (paths, inv), out in zip(groups, outs) for (a, n), path in zip(wanted, paths)}


@grading
@pytest.mark.parametrize("assignment,notebook", NOTEBOOKS, ids=NB_IDS)
def test_nbgrader_validate_passes_on_source(validate_reports, assignment, notebook):
    out = validate_reports[(assignment, notebook, False)]
    assert "Success! Your notebook passes all the tests." in out, out[-3000:]


@grading
@pytest.mark.parametrize("assignment,notebook", NOTEBOOKS, ids=NB_IDS)
def test_nbgrader_validate_invert_passes_on_release(validate_reports, assignment, notebook):
    out = validate_reports[(assignment, notebook, True)]
    assert "Success! The notebook does not pass any tests." in out, out[-3000:]
