"""The harness's static checks catch each kind of broken notebook (and pass a good one)."""

from __future__ import annotations

import copy

import nbformat
import pytest
from notebook_factory import good_notebook

from course_tools.grading.lint import lint_release, lint_source
from course_tools.grading.notebooks import checks_after, protected_regions, visible_text


def _write(tmp_path, nb, name="nb.ipynb"):
    path = tmp_path / name
    nbformat.write(nb, str(path))
    return path


def _cell(nb, grade_id):
    return next(c for c in nb.cells if c.metadata.get("nbgrader", {}).get("grade_id") == grade_id)


def test_a_good_notebook_has_no_problem(tmp_path):
    assert lint_source(_write(tmp_path, good_notebook())) == []


def _break_outputs(nb):
    _cell(nb, "setup").outputs = [nbformat.v4.new_output("stream", text="hi")]


def _break_exec_count(nb):
    _cell(nb, "setup").execution_count = 3


def _break_kernel(nb):
    nb.metadata.kernelspec.name = "ir"


def _break_unlocked_test(nb):
    _cell(nb, "test_double").metadata.nbgrader["locked"] = False


def _break_duplicate_id(nb):
    _cell(nb, "test_quiz_1").metadata.nbgrader["grade_id"] = "test_double"


def _break_no_points(nb):
    _cell(nb, "test_double").metadata.nbgrader["points"] = 0


def _break_no_delimiters(nb):
    _cell(nb, "double").source = "def double(x):\n    return 2 * x"


def _break_trailing_expression(nb):
    _cell(nb, "test_double").source += "\ndouble(2) / 4"


def _break_section_order(nb):
    nb.cells[3], nb.cells[7] = nb.cells[7], nb.cells[3]


def _break_title(nb):
    nb.cells[0].source = "# Doubling"


def _break_schema(nb):
    _cell(nb, "double").metadata.nbgrader["schema_version"] = 1


def _break_hidden_outside_test(nb):
    _cell(nb, "double").source += "\n### BEGIN HIDDEN TESTS\nx = 1\n### END HIDDEN TESTS"


def _break_hidden_only_test(nb):
    _cell(nb, "test_double").source = "# comments are not checks\n### BEGIN HIDDEN TESTS\nassert double(3) == 6\n### END HIDDEN TESTS"


def _break_quiz_without_default(nb):
    _cell(nb, "quiz_1").source = "### BEGIN SOLUTION\nquiz_1 = 'b'\n### END SOLUTION"


def _break_setup_unlocked(nb):
    _cell(nb, "setup").metadata.nbgrader["locked"] = False


BREAKS = [_break_outputs, _break_exec_count, _break_kernel, _break_unlocked_test, _break_duplicate_id,
          _break_no_points, _break_no_delimiters, _break_trailing_expression, _break_section_order,
          _break_title, _break_schema, _break_hidden_outside_test, _break_setup_unlocked,
          _break_hidden_only_test, _break_quiz_without_default]


@pytest.mark.parametrize("breaker", BREAKS, ids=[b.__name__[7:] for b in BREAKS])
def test_each_broken_rule_is_reported(tmp_path, breaker):
    nb = good_notebook()
    breaker(nb)
    assert lint_source(_write(tmp_path, nb)), f"{breaker.__name__} went unnoticed"


def test_a_cell_without_id_is_reported(tmp_path):
    import json

    path = _write(tmp_path, good_notebook())
    raw = json.loads(path.read_text())
    del raw["cells"][2]["id"]
    path.write_text(json.dumps(raw))
    assert any("id" in p for p in lint_source(path))


def _release_of(nb):
    rel = copy.deepcopy(nb)
    for c in rel.cells:
        c.source = visible_text(c.source)
    return rel


def test_a_clean_release_passes(tmp_path):
    src = _write(tmp_path, good_notebook(), "src.ipynb")
    rel = _write(tmp_path, _release_of(good_notebook()), "rel.ipynb")
    assert lint_release(src, rel) == []


def test_a_leaked_solution_line_is_reported(tmp_path):
    src = _write(tmp_path, good_notebook(), "src.ipynb")
    rel_nb = _release_of(good_notebook())
    _cell(rel_nb, "setup").source += "\nreturn 2 * x"
    rel = _write(tmp_path, rel_nb, "rel.ipynb")
    assert any("leaks" in p for p in lint_release(src, rel))


def test_a_leaked_hidden_test_is_reported(tmp_path):
    src = _write(tmp_path, good_notebook(), "src.ipynb")
    rel = _write(tmp_path, good_notebook(), "rel.ipynb")
    problems = lint_release(src, rel)
    assert any("HIDDEN" in p for p in problems) and any("hidden test line" in p for p in problems)


def test_regions_and_checks_after():
    nb = good_notebook()
    assert checks_after(nb, "double") == ["test_double"]
    assert checks_after(nb, "quiz_1") == ["test_quiz_1"]
    kinds = [k for k, _ in protected_regions(_cell(nb, "test_double").source)]
    assert kinds == ["HIDDEN TESTS"]
