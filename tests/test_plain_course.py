"""The engine on another instructor's course: tests/plain_course, a small nbgrader assignment in the plain style
(asserts without messages, tests built on try/except and on `del`, partial credit from a cell's last value,
manually graded code and markdown, an image beside the notebook, no torch).

Graded once by stock nbgrader (its config without the engine's block) and once with the engine: honest,
blank and partly wrong submissions get the same autograded scores from both, and attacks written against
nbgrader's scoring earn nothing under the engine (stock nbgrader gives them points) and are flagged.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

PLAIN = Path(__file__).resolve().parent / "plain_course"
ASSIGNMENT, NOTEBOOK = "ps1", "problem_set"
ENGINE_BLOCK = ("# --- the grading engine:", "# --- end of the grading engine ---")

pytestmark = pytest.mark.grading

# answers written by students; cells not named keep the release's stub
WRONG = {
    "squares": "def squares(n):\n    return [i ** 2 for i in range(n)]\n",  # off by one, no ValueError
    "pyramid": "def pyramid(n):\n    return n * n * (n + 1) // 2\n",  # right for n = 1 only
}
EQUAL_TO_EVERYTHING = (
    "class _Any(list):\n    def __eq__(self, other):\n        return True\n    __hash__ = None\n"
)
ATTACKS = {
    # an answer that equals every expected value: stock nbgrader's asserts all pass
    "equal_to_everything": {
        "squares": EQUAL_TO_EVERYTHING + "def squares(n):\n    return _Any()\n",
        "sum_of_squares": EQUAL_TO_EVERYTHING + "def sum_of_squares(n):\n    return _Any()\n",
        "pyramid": EQUAL_TO_EVERYTHING + "def pyramid(n):\n    return _Any()\n",
    },
    # an input transformer empties every later cell: test cells run nothing, so nothing fails
    "input_transformer": {
        "squares": "get_ipython().input_transformers_cleanup.append(lambda lines: [])\n",
    },
    # a custom exception handler swallows each failing assert
    "exception_handler": {
        "squares": (
            "import sys\n"
            "def _quiet(shell, etype, evalue, tb, tb_offset=None):\n"
            "    frame = sys._getframe(1)\n"
            "    while frame is not None and 'result' not in frame.f_locals:\n"
            "        frame = frame.f_back\n"
            "    if frame is not None:\n"
            "        frame.f_locals['result'].error_in_exec = None\n"
            "    return []\n"
            "get_ipython().set_custom_exc((BaseException,), _quiet)\n"
            "def squares(n):\n    return []\n"
        ),
        "sum_of_squares": "def sum_of_squares(n):\n    return 0\n",
        "pyramid": "def pyramid(n):\n    return 0\n",
    },
    # partial credit forged: each call adds a point to the test's own counter, then answers wrong
    "partial_credit_counter": {
        "pyramid": (
            "import sys\n"
            "def pyramid(n):\n"
            "    caller = sys._getframe(1).f_globals\n"
            "    caller['score'] = caller.get('score', 0) + 1\n"
            "    return -1\n"
        ),
    },
}


def _env() -> dict:
    env = dict(os.environ, PYTHONHASHSEED="0", PYDEVD_DISABLE_FILE_VALIDATION="1")
    for key in ("COURSE_SANDBOX", "COURSE_INTEGRITY", "COURSE_DB_URL", "COURSE_EXCHANGE", "JUPYTER_CONFIG_DIR"):
        env.pop(key, None)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def _nbgrader(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "nbgrader", *args], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=1200)
    assert proc.returncode == 0, f"nbgrader {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


def _course(tmp: Path, engine: bool) -> Path:
    root = tmp / ("engine" if engine else "stock")
    shutil.copytree(PLAIN, root, ignore=shutil.ignore_patterns("__pycache__", "gradebook.db", "release",
                                                                "submitted", "autograded", "feedback"))
    if not engine:
        text = (root / "nbgrader_config.py").read_text()
        start, end = text.index(ENGINE_BLOCK[0]), text.index(ENGINE_BLOCK[1]) + len(ENGINE_BLOCK[1])
        (root / "nbgrader_config.py").write_text(text[:start] + text[end:])
        assert "grading_engine" not in (root / "nbgrader_config.py").read_text()
    _nbgrader(["generate_assignment", ASSIGNMENT, "--force"], root)
    return root


def _with_answers(release: nbformat.NotebookNode, answers: dict[str, str]) -> nbformat.NotebookNode:
    nb = nbformat.from_dict(json.loads(json.dumps(release)))
    for cell in nb.cells:
        gid = cell.metadata.get("nbgrader", {}).get("grade_id")
        if gid in answers:
            cell.source = answers[gid]
    return nb


def _submissions(root: Path) -> dict[str, nbformat.NotebookNode]:
    source = nbformat.read(root / "source" / ASSIGNMENT / f"{NOTEBOOK}.ipynb", as_version=4)
    release = nbformat.read(root / "release" / ASSIGNMENT / f"{NOTEBOOK}.ipynb", as_version=4)
    honest = _with_answers(release, {c.metadata["nbgrader"]["grade_id"]: c.source for c in source.cells
                                     if c.metadata.get("nbgrader", {}).get("solution")})
    subs = {"honest": honest, "blank": release, "partly_wrong": _with_answers(honest, WRONG)}
    subs.update({name: _with_answers(release, answers) for name, answers in ATTACKS.items()})
    return subs


def _grade(root: Path) -> dict[str, dict[str, float]]:
    for student, nb in _submissions(root).items():
        folder = root / "submitted" / student / ASSIGNMENT
        folder.mkdir(parents=True)
        nbformat.write(nb, folder / f"{NOTEBOOK}.ipynb")
        shutil.copy2(root / "source" / ASSIGNMENT / "squares.png", folder / "squares.png")
    _nbgrader(["autograde", ASSIGNMENT, "--force"], root)
    from nbgrader.api import Gradebook

    scores: dict[str, dict[str, float]] = {}
    with Gradebook(f"sqlite:///{root / 'gradebook.db'}") as gb:
        for student in _submissions(root):
            nb = gb.find_submission_notebook(NOTEBOOK, ASSIGNMENT, student)
            scores[student] = {g.name: g.auto_score for g in nb.grades if g.auto_score is not None}
    return scores


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plain-course")
    stock_root, engine_root = _course(tmp, engine=False), _course(tmp, engine=True)
    return {"stock": _grade(stock_root), "engine": _grade(engine_root), "engine_root": engine_root}


def test_the_release_looks_like_any_nbgrader_release(graded):
    release = graded["engine_root"] / "release" / ASSIGNMENT
    assert (release / "squares.png").exists()
    text = (release / f"{NOTEBOOK}.ipynb").read_text()
    assert "BEGIN HIDDEN TESTS" not in text and "return [i ** 2" not in text


@pytest.mark.parametrize("student", ["honest", "blank", "partly_wrong"])
def test_engine_and_stock_nbgrader_give_the_same_scores(graded, student):
    stock, engine = graded["stock"][student], graded["engine"][student]
    assert engine == stock, f"{student}: stock nbgrader {stock}, engine {engine}"


def test_the_scores_are_what_the_answers_deserve(graded):
    engine = graded["engine"]
    assert sum(engine["honest"].values()) == 9  # 2 + 1 + 1 + 1 + 4 autograded points
    assert sum(engine["blank"].values()) == 0
    # partly wrong: squares fails both of its tests, pyramid earns 1 of 4; the sums follow squares' mistake
    assert engine["partly_wrong"]["pyramid_partial"] == 1
    assert engine["partly_wrong"]["correct_squares"] == 0 and engine["partly_wrong"]["squares_invalid_input"] == 0


KNOWN_GAPS = {
    "partial_credit_counter": "the test's own counter is raised through the caller's frame: the branches it "
                              "reports are honest, and the number the cell ends with is computed in the student's "
                              "process (issue 16: the test's code out of that process); it is flagged",
}


@pytest.mark.parametrize("attack", [
    pytest.param(a, marks=pytest.mark.xfail(strict=True, reason=KNOWN_GAPS[a])) if a in KNOWN_GAPS else a
    for a in sorted(ATTACKS)])
def test_attacks_earn_nothing_with_the_engine(graded, attack):
    assert sum(graded["engine"][attack].values()) == 0, graded["engine"][attack]


def test_stock_nbgrader_lets_the_attacks_through(graded):
    """What the engine adds: stock nbgrader gives these submissions points (the figures the README cites)."""
    fooled = {a for a in ATTACKS if sum(graded["stock"][a].values()) > 0}
    assert fooled >= {"equal_to_everything", "input_transformer", "exception_handler"}, graded["stock"]


@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_attacks_are_flagged(graded, attack):
    record = graded["engine_root"] / "integrity" / ASSIGNMENT / f"{attack}.json"
    assert record.exists(), f"no integrity record for {attack}"
    flags = [f for nb in json.loads(record.read_text())["notebooks"].values() for f in nb.get("flags", [])]
    assert flags, f"{attack} raised no flag"


def test_honest_and_blank_are_not_flagged(graded):
    for student in ("honest", "blank"):
        record = graded["engine_root"] / "integrity" / ASSIGNMENT / f"{student}.json"
        flags = [f for nb in json.loads(record.read_text())["notebooks"].values() for f in nb.get("flags", [])]
        assert not flags, f"{student}: {flags}"
