"""What an nbgrader notebook of this course is made of.

Reads the nbgrader metadata of each cell and sorts cells into the roles that
docs/authoring.md defines: setup, answer (code, autograded through tests),
test, written answer, task, and plain content.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import nbformat

SOLUTION_BEGIN = "### BEGIN SOLUTION"
SOLUTION_END = "### END SOLUTION"
HIDDEN_BEGIN = "### BEGIN HIDDEN TESTS"
HIDDEN_END = "### END HIDDEN TESTS"


@dataclass(frozen=True)
class Cell:
    """One cell with its nbgrader role."""

    index: int
    cell_id: str
    cell_type: str  # "code" or "markdown" (or "raw")
    source: str
    nbgrader: dict

    @property
    def grade_id(self) -> str | None:
        return self.nbgrader.get("grade_id")

    @property
    def is_answer(self) -> bool:
        """A code cell the student fills in, graded through test cells."""
        return self.cell_type == "code" and self.nbgrader.get("solution", False) and not self.nbgrader.get("grade", False)

    @property
    def is_test(self) -> bool:
        """An autograded test cell: its points come from running without error."""
        return self.cell_type == "code" and self.nbgrader.get("grade", False) and not self.nbgrader.get("solution", False)

    @property
    def is_manual(self) -> bool:
        """A cell a person grades: a written answer or an open task."""
        nb = self.nbgrader
        return bool(nb.get("task", False)) or (nb.get("grade", False) and nb.get("solution", False))

    @property
    def points(self) -> float:
        return float(self.nbgrader.get("points", 0) or 0)


def read_notebook(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(str(path), as_version=4)


def cells_of(nb: nbformat.NotebookNode) -> list[Cell]:
    return [
        Cell(
            index=i,
            cell_id=c.get("id", ""),
            cell_type=c.cell_type,
            source=c.source,
            nbgrader=dict(c.get("metadata", {}).get("nbgrader", {})),
        )
        for i, c in enumerate(nb.cells)
    ]


def answer_cells(nb: nbformat.NotebookNode) -> list[Cell]:
    return [c for c in cells_of(nb) if c.is_answer]


def test_cells(nb: nbformat.NotebookNode) -> list[Cell]:
    return [c for c in cells_of(nb) if c.is_test]


def autograded_points(nb: nbformat.NotebookNode) -> float:
    return sum(c.points for c in test_cells(nb))


def checks_after(nb: nbformat.NotebookNode, answer_grade_id: str) -> list[str]:
    """grade_ids of the test cells between an answer cell and the next answer cell."""
    cells = cells_of(nb)
    out: list[str] = []
    seen = False
    for c in cells:
        if c.is_answer:
            if seen:
                break
            seen = c.grade_id == answer_grade_id
        elif seen and c.is_test:
            out.append(c.grade_id)
    return out


_REGION = re.compile(
    r"^[ \t]*(?P<begin>### BEGIN (?P<kind>SOLUTION|HIDDEN TESTS))[ \t]*$(?P<body>.*?)^[ \t]*### END (?P=kind)[ \t]*$",
    re.MULTILINE | re.DOTALL,
)


def protected_regions(source: str) -> list[tuple[str, str]]:
    """(kind, body) of every solution or hidden-test region in a cell source."""
    return [(m.group("kind"), m.group("body")) for m in _REGION.finditer(source)]


def visible_text(source: str) -> str:
    """A cell's source with its solution and hidden-test regions removed."""
    return _REGION.sub("", source)
