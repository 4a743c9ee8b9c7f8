"""Plausible wrong answers, stored as data, and how they enter a notebook.

``tests/mutants/<assignment>/<notebook>.toml`` holds a list of ``[[mutant]]``
tables with ``cell`` (grade_id of the answer cell), ``name``, ``why`` and
``source`` (the whole replacement source of that cell).
"""

from __future__ import annotations

import copy
import tomllib
from dataclasses import dataclass
from pathlib import Path

import nbformat

from course_tools.paths import MUTANTS_DIR


@dataclass(frozen=True)
class Mutant:
    assignment: str
    notebook: str  # stem
    cell: str  # grade_id of the answer cell it replaces
    name: str
    why: str
    source: str

    @property
    def key(self) -> str:
        return f"{self.assignment}/{self.notebook}/{self.cell}/{self.name}"


def mutants_file(assignment: str, notebook: str) -> Path:
    return MUTANTS_DIR / assignment / f"{notebook}.toml"


def load_mutants(assignment: str, notebook: str) -> list[Mutant]:
    """The mutants of one notebook; an absent file means none."""
    path = mutants_file(assignment, notebook)
    if not path.exists():
        return []
    with path.open("rb") as fh:
        data = tomllib.load(fh)
    out = []
    for i, entry in enumerate(data.get("mutant", [])):
        missing = {"cell", "name", "source"} - set(entry)
        if missing:
            raise ValueError(f"{path}: mutant #{i + 1} lacks {sorted(missing)}")
        out.append(Mutant(assignment, notebook, entry["cell"], entry["name"], entry.get("why", ""), entry["source"]))
    return out


def apply_mutant(nb: nbformat.NotebookNode, mutant: Mutant) -> nbformat.NotebookNode:
    """A copy of ``nb`` whose answer cell ``mutant.cell`` holds the mutant's source."""
    out = copy.deepcopy(nb)
    hits = [c for c in out.cells if c.get("metadata", {}).get("nbgrader", {}).get("grade_id") == mutant.cell]
    if len(hits) != 1:
        raise KeyError(f"mutant {mutant.key}: no single cell with grade_id {mutant.cell!r}")
    hits[0].source = mutant.source
    return out
