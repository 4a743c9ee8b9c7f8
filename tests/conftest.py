"""Shared fixtures: one real nbgrader run answers every grading question."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from course_tools.grading.check import CourseReport, all_assignments, grade

_REPORT: list[CourseReport] = []


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors run faster on one thread, and a busy machine cannot slow them down."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def course_report() -> CourseReport:
    """Reference, release and every mutant of every notebook, graded by real nbgrader autograde."""
    workdir = Path(tempfile.mkdtemp(prefix="course-harness-"))
    report = grade(all_assignments(), workdir, workers=int(os.environ.get("COURSE_WORKERS", "0")) or None,
                   quiet=True)
    _REPORT.append(report)
    yield report
    if not os.environ.get("COURSE_KEEP_WORKSPACE"):
        shutil.rmtree(workdir, ignore_errors=True)


def pytest_terminal_summary(terminalreporter):
    for report in _REPORT:
        terminalreporter.section("grading report: reference, release and mutants per notebook")
        terminalreporter.write_line(report.render())
