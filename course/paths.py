"""Where the course's folders are, wherever the repository is cloned."""

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
SOURCE_DIR = REPO_ROOT / "source"
RELEASE_DIR = REPO_ROOT / "release"

HANDS_ON_ASSIGNMENT = "04_hands_on_exercises"
HANDS_ON_ASSETS = SOURCE_DIR / HANDS_ON_ASSIGNMENT / "assets"


def assignments() -> list[str]:
    """Assignment ids (folders of ``source/``), in teaching order."""
    return sorted(p.name for p in SOURCE_DIR.iterdir() if p.is_dir() and not p.name.startswith("."))


def source_notebooks(assignment: str) -> list[Path]:
    """Instructor notebooks of one assignment, in teaching order."""
    return sorted((SOURCE_DIR / assignment).glob("*.ipynb"))
