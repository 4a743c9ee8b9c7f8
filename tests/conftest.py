"""Shared fixtures: one real nbgrader run answers every grading question; markers per lesson and engine part.

Markers (``pytest -m NAME``; README "Running part of the suite"):

* one per notebook: ``lesson22`` (get and set input embeddings), ``lesson23`` (embedding initialisation),
  ``emb_vs_linear``, ``ex01`` ... ``ex10``: its lint, release, reference, release and mutant grading;
* one per engine part: ``sandbox``, ``evidence``, ``batch``, ``engine`` (config, layering, the plain
  course), ``adversarial``, ``browser``; ``package`` for the course's support package; ``grading`` for
  every test that runs real ``nbgrader autograde``.

The session's grading fixture grades only the notebooks the selected tests ask about. The slow session
fixtures (this grading, ``nbgrader validate``, the adversarial batch) are computed in the background from
the end of collection, while the other tests run; the tests that use them run last (``background``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import background
import pytest

from course_tools.grading.check import CourseReport, all_assignments, grade
from course_tools.paths import source_notebooks

_REPORT: list[CourseReport] = []

LESSON_MARKERS = {
    "get_set_input_embeddings": "lesson22",
    "embedding_init_weights": "lesson23",
    "embedding_vs_linear": "emb_vs_linear",
}

PART_MARKERS = {  # test file (or folder) -> engine part
    "test_sandbox.py": "sandbox",
    "test_integrity.py": "evidence",
    "test_batch.py": "batch",
    "test_postgres.py": "batch",
    "test_scheduler.py": "batch",
    "test_config.py": "engine",
    "test_code_quality.py": "engine",
    "test_plain_course.py": "engine",
    "adversarial": "adversarial",
    "browser": "browser",
    "test_thinker.py": "package",
    "test_tokenizer.py": "package",
    "test_training.py": "package",
    "test_toy_models.py": "package",
    "test_assets.py": "package",
}


def notebook_marker(notebook: str) -> str:
    """``ex05`` for ``ex05_generation``, the lesson's name for a lesson notebook."""
    return LESSON_MARKERS.get(notebook) or notebook.split("_", 1)[0]


def _notebooks_of(item) -> set[tuple[str, str]] | None:
    """The (assignment, notebook) pairs a test is about: its own, all of its assignment's, or None (not one)."""
    params = getattr(getattr(item, "callspec", None), "params", {})
    if "mutant" in params:
        m = params["mutant"]
        return {(m.assignment, m.notebook)}
    if "notebook" in params and "assignment" in params:
        return {(params["assignment"], params["notebook"])}
    if "assignment" in params:
        return {(params["assignment"], p.stem) for p in source_notebooks(params["assignment"])}
    return None


def pytest_configure(config):
    names = set(LESSON_MARKERS.values()) | {f"ex{k:02d}" for k in range(1, 11)}
    for name in sorted(names):
        config.addinivalue_line("markers", f"{name}: the tests of one notebook")
    for name in sorted(set(PART_MARKERS.values())):
        config.addinivalue_line("markers", f"{name}: one part of the grading engine or the course package")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        for nb in sorted(_notebooks_of(item) or ()):
            item.add_marker(notebook_marker(nb[1]))
        parts = Path(str(item.fspath)).parts
        for key, marker in PART_MARKERS.items():
            if key in parts:
                item.add_marker(marker)
    # the browser test's page waits run once the background fixtures are done, not against them for the cores
    background.order_items(items, alone=("browser",))


def selected_notebooks(items, fixture: str) -> set[tuple[str, str]] | None:
    """The notebooks the selected tests that use ``fixture`` are about; None: the whole course."""
    needed: set[tuple[str, str]] = set()
    for item in items:
        if fixture not in getattr(item, "fixturenames", ()):
            continue
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "assignment" in params and "notebook" not in params:
            continue  # a test of a whole assignment's generated release: generating it is enough
        nbs = _notebooks_of(item)
        if nbs is None:
            return None  # a test about the whole course
        needed |= nbs
    return needed


def pytest_collection_finish(session):
    """Which notebooks the grading and validation fixtures must run (those of the selected tests); start them."""
    session.config._course_notebooks = selected_notebooks(session.items, "course_report")
    session.config._validate_notebooks = selected_notebooks(session.items, "validate_reports")
    background.start(session.config, session.items)


def pytest_sessionfinish(session):
    background.stop()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors run faster on one thread, and a busy machine cannot slow them down."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@background.session_fixture(turn=3)
def course_report(config):
    """Reference, release and mutants of the selected notebooks, graded by real nbgrader autograde."""
    needed = getattr(config, "_course_notebooks", None)
    assignments = all_assignments() if not needed else sorted({a for a, _ in needed})
    workdir = Path(tempfile.mkdtemp(prefix="course-harness-"))
    try:
        report = grade(assignments, workdir, workers=int(os.environ.get("COURSE_WORKERS", "0")) or None,
                       quiet=True, notebooks=needed or None)
        _REPORT.append(report)
        yield report
    finally:
        if not os.environ.get("COURSE_KEEP_WORKSPACE"):
            shutil.rmtree(workdir, ignore_errors=True)


def pytest_terminal_summary(terminalreporter):
    lines = background.timeline()
    if lines:
        terminalreporter.section("background fixtures (seconds from the end of collection)")
        for line in lines:
            terminalreporter.write_line(line)
    for report in _REPORT:
        terminalreporter.section("grading report: reference, release and mutants per notebook")
        terminalreporter.write_line(report.render())
