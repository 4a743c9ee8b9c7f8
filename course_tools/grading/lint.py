"""Static checks of source and release notebooks (docs/authoring.md).

Each check returns a list of human-readable problems; an empty list means the
notebook follows the contract.
"""

from __future__ import annotations

import ast
import json
import re
import warnings
from pathlib import Path

import nbformat

from course_tools.grading.notebooks import (
    HIDDEN_BEGIN,
    HIDDEN_END,
    SOLUTION_BEGIN,
    SOLUTION_END,
    cells_of,
    protected_regions,
    visible_text,
)

SECTIONS = ["## Setup", "## Theory", "## Tasks", "## Theory questions", "## Quiz", "## Advanced task", "## Summary"]
OPTIONAL_SECTIONS = {"## Advanced task"}
GRADE_ID = re.compile(r"^[a-z][a-z0-9_]*$")


def lint_source(path: Path) -> list[str]:
    """Problems of one instructor notebook."""
    problems: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        raw = nbformat.read(str(path), as_version=nbformat.NO_CONVERT)
    try:
        nbformat.validate(raw)
    except nbformat.ValidationError as exc:
        problems.append(f"not valid nbformat: {exc.message}")
    if (raw.nbformat, raw.nbformat_minor) < (4, 5):
        problems.append(f"nbformat {raw.nbformat}.{raw.nbformat_minor}; need 4.5 (cell ids)")
    ks = raw.metadata.get("kernelspec", {})
    if ks.get("name") != "python3":
        problems.append(f"kernelspec is {ks.get('name')!r}, not 'python3'")

    # nbformat.read fills in missing ids, so look at the file itself
    ids = [c.get("id") for c in json.loads(Path(path).read_text()).get("cells", [])]
    if any(not i for i in ids):
        problems.append("a cell has no id")
    if len(set(ids)) != len(ids):
        problems.append("cell ids are not unique")

    for i, c in enumerate(raw.cells):
        if c.cell_type == "code":
            if c.get("outputs"):
                problems.append(f"cell {i} stores outputs")
            if c.get("execution_count") is not None:
                problems.append(f"cell {i} stores an execution count")

    cells = cells_of(raw)
    grade_ids = [c.grade_id for c in cells if c.nbgrader]
    seen: set[str] = set()
    for c in cells:
        if not c.nbgrader:
            continue
        where = f"cell {c.index} ({c.grade_id or 'no grade_id'})"
        nbm = c.nbgrader
        if nbm.get("schema_version") != 3:
            problems.append(f"{where}: nbgrader schema_version is {nbm.get('schema_version')!r}, not 3")
        gid = c.grade_id
        if not gid:
            problems.append(f"{where}: no grade_id")
            continue
        if not GRADE_ID.match(gid):
            problems.append(f"{where}: grade_id {gid!r} is not lowercase_with_underscores")
        if gid in seen:
            problems.append(f"{where}: grade_id {gid!r} is used twice")
        seen.add(gid)
        if (nbm.get("grade") or nbm.get("task")) and not c.points > 0:
            problems.append(f"{where}: graded cell without points")
        if c.is_test:
            if not nbm.get("locked"):
                problems.append(f"{where}: test cell is not locked")
            problems.extend(f"{where}: {p}" for p in _test_cell_problems(c.source))
        if nbm.get("solution"):
            if SOLUTION_BEGIN not in c.source or SOLUTION_END not in c.source:
                problems.append(f"{where}: answer cell without {SOLUTION_BEGIN} / {SOLUTION_END}")
            if c.cell_type == "code" and re.fullmatch(r"quiz_\d+", gid or "") and not re.search(
                    rf"^{gid} = None\b", c.source.split(SOLUTION_BEGIN)[0], re.M):
                problems.append(f"{where}: quiz answer cell must set {gid} = None before {SOLUTION_BEGIN} "
                                "(else a blank answer reads as a NameError)")
        if nbm.get("task") and c.cell_type != "markdown":
            problems.append(f"{where}: task cells must be markdown")
        if (HIDDEN_BEGIN in c.source) != (HIDDEN_END in c.source):
            problems.append(f"{where}: unbalanced hidden-test markers")
        if HIDDEN_BEGIN in c.source and not c.is_test:
            problems.append(f"{where}: hidden tests outside a test cell")
    del grade_ids

    for c in cells:
        if not c.nbgrader and (SOLUTION_BEGIN in c.source or HIDDEN_BEGIN in c.source):
            problems.append(f"cell {c.index}: solution or hidden-test markers in a cell nbgrader does not manage")

    code = [c for c in cells if c.cell_type == "code"]
    if not code or not (code[0].nbgrader.get("locked") and not code[0].nbgrader.get("solution")):
        problems.append("the first code cell (setup) must be a locked, non-answer cell")
    if not any(c.is_test for c in cells):
        problems.append("no autograded test cell")

    problems.extend(_structure_problems(cells))
    return problems


def _test_cell_problems(source: str) -> list[str]:
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        return [f"test cell does not parse: {exc}"]
    if not tree.body:
        return ["empty test cell"]
    visible = source.split(HIDDEN_BEGIN)[0]
    try:
        has_visible_check = bool(ast.parse(visible).body)
    except SyntaxError:
        has_visible_check = True  # the whole cell parsed: a marker inside a string, not a region
    if not has_visible_check:
        return ["test cell has no visible check before its hidden tests (in the release it is empty, "
                "so nbgrader validate counts it as passed)"]
    last = tree.body[-1]
    if isinstance(last, ast.Expr) and not (
        isinstance(last.value, ast.Call) and isinstance(last.value.func, ast.Name) and last.value.func.id == "print"
    ):
        return ["test cell ends with an expression (nbgrader would read its value as partial credit)"]
    return []


def _structure_problems(cells) -> list[str]:
    problems = []
    first = cells[0] if cells else None
    if first is None or first.cell_type != "markdown" or not first.source.lstrip().startswith("# "):
        problems.append("the first cell must be a markdown title ('# ...')")
    else:
        for word in ("Learning objectives", "Prerequisites", "Estimated time"):
            if word.lower() not in first.source.lower():
                problems.append(f"the title cell does not state '{word}'")
    found = []
    for c in cells:
        if c.cell_type != "markdown":
            continue
        for line in c.source.splitlines():
            if line.strip() in SECTIONS:
                found.append(line.strip())
    expected = [s for s in SECTIONS if s in found or s not in OPTIONAL_SECTIONS]
    if found != expected:
        problems.append(f"section headings are {found}; expected, in this order, {expected}")
    return problems


def lint_release(source_path: Path, release_path: Path) -> list[str]:
    """Problems of a release notebook: leaks of solutions or hidden tests."""
    problems: list[str] = []
    if not release_path.exists():
        return [f"{release_path} is missing"]
    src = nbformat.read(str(source_path), as_version=4)
    rel = nbformat.read(str(release_path), as_version=4)
    rel_text = "\n".join(c.source for c in rel.cells)
    for marker in (SOLUTION_BEGIN, SOLUTION_END, HIDDEN_BEGIN, HIDDEN_END):
        if marker in rel_text:
            problems.append(f"release contains {marker!r}")
    # lines anyone may see: everything outside solution and hidden regions
    visible = {ln.strip() for c in src.cells for ln in visible_text(c.source).splitlines()}
    rel_lines = {ln.strip() for ln in rel_text.splitlines()}
    for c in src.cells:
        for kind, body in protected_regions(c.source):
            for ln in body.splitlines():
                s = ln.strip()
                if len(s) >= 8 and not s.startswith("#") and s not in visible and s in rel_lines:
                    what = "solution" if kind == "SOLUTION" else "hidden test"
                    problems.append(f"{what} line leaks into the release: {s[:80]!r}")
    for c in rel.cells:
        if c.outputs if c.cell_type == "code" else False:
            problems.append("release stores outputs")
    return problems


def lint_assignment_files(assignment_dir: Path) -> list[str]:
    """Non-notebook files are released as they are: none may hold solutions."""
    problems = []
    for p in sorted(assignment_dir.rglob("*")):
        if p.is_file() and p.suffix not in {".ipynb", ".pt", ".png", ".wav", ".model"}:
            try:
                text = p.read_text()
            except UnicodeDecodeError:
                continue
            for marker in (SOLUTION_BEGIN, HIDDEN_BEGIN):
                if marker in text:
                    problems.append(f"{p.relative_to(assignment_dir)} contains {marker!r} and would be released")
    return problems
