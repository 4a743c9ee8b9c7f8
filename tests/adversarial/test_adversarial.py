"""Attacks on grading (attacks.toml), graded by real nbgrader autograde: the course's configuration must
give no attack a point it did not earn, flag it, finish the batch, keep other students' grades and the
instructor's files as they were. With ``COURSE_ADVERSARIAL_STOCK=1`` the same batch graded by stock
nbgrader is reported beside it (``python tests/adversarial/suite.py`` grades and prints both columns): no
test reads that column, which costs about 95 s of one core."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import background
import pytest
from suite import BLANK, HONEST_FIRST, HONEST_LAST, MAX_POINTS, grade_both, load_attacks, outcome, student_of

ATTACKS = load_attacks()
pytestmark = pytest.mark.grading
_RESULTS: list = []


@background.session_fixture(turn=2)
def adversarial(config):
    """Every attack, and the honest and blank students around them, graded by the course (and by stock
    nbgrader with ``COURSE_ADVERSARIAL_STOCK=1``)."""
    work = Path(tempfile.mkdtemp(prefix="course-adversarial-"))
    modes = ("course", "stock") if os.environ.get("COURSE_ADVERSARIAL_STOCK", "0") == "1" else ("course",)
    try:
        results = grade_both(work, modes)
        _RESULTS.append(results)
        yield results
    finally:
        if not os.environ.get("COURSE_KEEP_WORKSPACE"):
            shutil.rmtree(work, ignore_errors=True)


@pytest.mark.parametrize("i,attack", [
    pytest.param(i, a, marks=pytest.mark.xfail(strict=True, reason=a.gap)) if a.gap else (i, a)
    for i, a in enumerate(ATTACKS)], ids=[a.name for a in ATTACKS])
def test_attack_is_defended(adversarial, i, attack):
    ok, text = outcome(adversarial["course"], attack, student_of(i, attack))
    assert ok, f"{attack.name} ({attack.why}): {text}\n" + "\n".join(
        adversarial["course"].students[student_of(i, attack)].flag_details)


def test_honest_students_keep_full_marks_and_no_flag(adversarial):
    res = adversarial["course"]
    for st in (HONEST_FIRST, HONEST_LAST):
        r = res.students[st]
        assert r.score == MAX_POINTS, f"{st}: {r.score}"
        assert not r.flags, f"{st}: {r.flag_details}"
    assert res.honest_before == MAX_POINTS
    assert res.students[BLANK].score == 0 and not res.students[BLANK].flags


def test_the_batch_finishes(adversarial):
    assert adversarial["course"].stopped_at is None


def test_instructor_files_are_byte_for_byte_the_same(adversarial):
    assert adversarial["course"].changed_files() == []


def test_feedback_shows_no_hidden_test(adversarial):
    assert adversarial["course"].students[HONEST_FIRST].feedback_leak is False


def test_the_report_shows_flags_beside_grades(adversarial):
    import subprocess
    import sys

    res = adversarial["course"]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    p = subprocess.run([sys.executable, "-m", "grading_engine", "report", "adv", "--brief"], cwd=res.course,
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    lines = {ln.split()[0]: ln for ln in p.stdout.splitlines() if ln.startswith(("a000", "b", "z999"))}
    assert "5.0 / 5.0  ok" in lines[HONEST_FIRST]
    first = lines[student_of(0, ATTACKS[0])]
    assert "0.0 / 5.0  FLAGS:" in first and "ipython_hook" in first
    assert (res.course / "integrity" / "adv.csv").exists()
    import sqlite3

    con = sqlite3.connect(str(res.course / "gradebook.db"))
    flagged = dict(con.execute("SELECT sa.student_id, sn.flagged FROM submitted_notebook sn "
                               "JOIN submitted_assignment sa ON sn.assignment_id = sa.id").fetchall())
    con.close()
    assert flagged[HONEST_FIRST] == 0 and flagged[student_of(0, ATTACKS[0])] == 1  # the formgrader's own flag


def test_autograded_notebooks_keep_the_original_tests(adversarial):
    import nbformat

    res = adversarial["course"]
    src = nbformat.read(str(res.course / "source" / "adv" / "adv_lookup.ipynb"), as_version=4)
    got = nbformat.read(str(res.course / "autograded" / HONEST_FIRST / "adv" / "adv_lookup.ipynb"), as_version=4)
    tests = lambda nb: [c.source for c in nb.cells if c.get("metadata", {}).get("nbgrader", {}).get("grade")]  # noqa
    assert tests(got) == tests(src)
    assert len(got.cells) == len(src.cells)
    assert "application/vnd.course.evidence+json" not in json_dump(got)


def json_dump(nb) -> str:
    import json

    return json.dumps(nb)
