"""The engine's settings: one traitlets ``Configurable``, set in ``nbgrader_config.py`` like nbgrader's own.

    c.GradingEngine.sandbox_packages = ["course"]   # packages the notebooks import, mounted read-only in the sandbox
"""

from __future__ import annotations

from traitlets import List, Unicode
from traitlets.config import Configurable


class GradingEngine(Configurable):
    """Settings of the sandbox, the evidence-based scoring and the batch grader."""

    sandbox_packages = List(
        Unicode(),
        default_value=[],
        help="Packages the notebooks import (beyond the Python environment's site-packages), mounted read-only "
             "into the grading sandbox; for example the course's own support package.",
    ).tag(config=True)
