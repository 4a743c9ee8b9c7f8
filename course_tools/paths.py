"""Where this course's folders are in its repository (the authoring tools work on a checkout)."""

from course.paths import (
           HANDS_ON_ASSETS,
           HANDS_ON_ASSIGNMENT,
           RELEASE_DIR,
           REPO_ROOT,
           SOURCE_DIR,
           assignments,
           source_notebooks,
)

MUTANTS_DIR = REPO_ROOT / "tests" / "mutants"

__all__ = ["HANDS_ON_ASSETS", "HANDS_ON_ASSIGNMENT", "MUTANTS_DIR", "RELEASE_DIR", "REPO_ROOT", "SOURCE_DIR",
           "assignments", "source_notebooks"]
