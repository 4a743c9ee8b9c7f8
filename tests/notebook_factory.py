"""A minimal notebook that follows docs/authoring.md, for testing the harness's own checks."""

from __future__ import annotations

from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook


def _meta(**nbg):
    return {"nbgrader": dict(schema_version=3, task=False, **nbg)}


def md(cell_id: str, source: str, **nbg):
    cell = new_markdown_cell(source, id=cell_id)
    if nbg:
        cell.metadata.update(_meta(**nbg))
    return cell


def code(cell_id: str, source: str, **nbg):
    cell = new_code_cell(source, id=cell_id)
    if nbg:
        cell.metadata.update(_meta(**nbg))
    return cell


def good_notebook():
    cells = [
        md("title", "# Doubling\n\n**Learning objectives:** double a number.\n\n"
                    "**Prerequisites:** none.\n\n**Estimated time:** 1 minute."),
        md("h-setup", "## Setup"),
        code("setup", "import math", grade=False, solution=False, locked=True, grade_id="setup"),
        md("h-theory", "## Theory\n\nTwice x is x + x."),
        md("h-tasks", "## Tasks"),
        code("double", "def double(x):\n    ### BEGIN SOLUTION\n    return 2 * x\n    ### END SOLUTION",
             grade=False, solution=True, locked=False, grade_id="double"),
        code("test_double", "assert double(2) == 4, 'double(2) should be 4'\n"
                            "### BEGIN HIDDEN TESTS\nassert double(-3) == -6, 'negative numbers'\n### END HIDDEN TESTS",
             grade=True, solution=False, locked=True, grade_id="test_double", points=2),
        md("h-questions", "## Theory questions"),
        md("written_why", "Why?\n\n### BEGIN SOLUTION\nBecause doubling is adding a number to itself.\n### END SOLUTION",
           grade=True, solution=True, locked=False, grade_id="written_why", points=1),
        md("h-quiz", "## Quiz"),
        code("quiz_1", "quiz_1 = None\n### BEGIN SOLUTION\nquiz_1 = 'b'\n### END SOLUTION",
             grade=False, solution=True, locked=False, grade_id="quiz_1"),
        code("test_quiz_1", "assert quiz_1 in {'a', 'b', 'c'}, 'quiz_1 must be a, b or c'\n"
                            "### BEGIN HIDDEN TESTS\nassert quiz_1 == 'b'\n### END HIDDEN TESTS",
             grade=True, solution=False, locked=True, grade_id="test_quiz_1", points=1),
        md("h-summary", "## Summary\n\nDoubling is easy."),
    ]
    return new_notebook(cells=cells, metadata={
        "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
        "language_info": {"name": "python"},
    })
