"""How the harness decides that a stored wrong answer was caught (no grading run needed)."""

from __future__ import annotations

from course_tools.grading.check import NotebookReport
from course_tools.grading.mutants import Mutant
from course_tools.grading.workspace import NotebookScore

TESTS = ["test_double", "test_quiz_1", "test_quiz_2"]


def _report() -> NotebookReport:
    return NotebookReport("a", "nb", 4.0, TESTS, ["double", "quiz_1", "quiz_2"])


def _score(**auto: float) -> NotebookScore:
    s = NotebookScore("mutant0001", "a", "nb")
    maxima = {"test_double": 2.0, "test_quiz_1": 1.0, "test_quiz_2": 1.0}
    s.scores = {g: (auto.get(g, mx), mx) for g, mx in maxima.items()}
    return s


def _mutant(cell: str) -> Mutant:
    return Mutant("a", "nb", cell, "wrong", "", "")


def test_an_ordinary_mutant_is_caught_by_any_lost_point():
    assert _report().mutant_caught(_mutant("double"), _score(test_quiz_2=0.0))
    assert not _report().mutant_caught(_mutant("double"), _score())


def test_a_quiz_mutant_is_judged_by_its_own_test_cell_only():
    """Quiz mutants share a notebook: another item's loss must not count for this one."""
    r = _report()
    assert r.mutant_caught(_mutant("quiz_1"), _score(test_quiz_1=0.0))
    assert not r.mutant_caught(_mutant("quiz_1"), _score(test_quiz_2=0.0, test_double=0.0))


def test_an_ungraded_notebook_catches_nothing():
    r = _report()
    empty = NotebookScore("mutant0001", "a", "nb")
    assert not r.mutant_caught(_mutant("double"), empty)
    assert not r.mutant_caught(_mutant("quiz_1"), empty)
    assert not r.mutant_caught(_mutant("double"), None)
