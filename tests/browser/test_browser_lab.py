"""End to end, in a real browser: a student works on a notebook in JupyterLab, an instructor sees the grade.

One course in a temporary folder, with the real nbgrader exchange:

* instructor (command line): ``nbgrader generate_assignment`` and
  ``release_assignment`` for exercise 1 of ``04_hands_on_exercises``;
* student (JupyterLab, started with ``python -m course_tools.lab student``'s
  configuration, in Chromium): fetch the assignment in the Assignment List,
  open the notebook, *Run All Cells* and read where it stops, run a check and
  see it fail, type a wrong answer into the answer cell and read the check's
  message, type the right one, run all again and see both checks of the task
  pass, press *Validate* and read its report, then *Submit*;
* instructor (command line): ``nbgrader collect`` and ``autograde``;
* instructor (JupyterLab, ``python -m course_tools.lab instructor``): open the
  Formgrader and find the student's graded submission with its score.

Every step leaves a screenshot in ``build/browser-artifacts/``, next to the
servers' logs.
"""

from __future__ import annotations

import json
import re
import time
import urllib.request

import pytest
from labdriver import Lab, LabServer, copy_course
from playwright.sync_api import expect

from course_tools.grading.workspace import clean_env, run_nbgrader
from course_tools.paths import REPO_ROOT

pytestmark = pytest.mark.browser

ASSIGNMENT = "04_hands_on_exercises"
NOTEBOOK = "ex01_embedding_lookup"
STUDENT = "student1"
COURSE_ID = "lm-mechanics"

# Task 1 of the notebook: its answer cell, its two checks (1 + 2 points)
ANSWER_SIGNATURE = "def lookup(weight, token_ids):"
STUB = "raise NotImplementedError()"
CHECK_SHAPES = "out2 = lookup(W, torch.tensor([[1, 2], [3, 4], [5, 6]]))"
CHECK_VALUES = 'assert torch.equal(out, W[[3, 0, 9]])'
DEMO_AFTER_ANSWER = "W_demo = torch.arange(12.0).reshape(4, 3)"
WRONG_ANSWER = "return weight[token_ids].flatten()"  # a plausible slip: loses the embedding dimension
RIGHT_ANSWER = "return weight[token_ids]"
TASK1_POINTS = 3.0


@pytest.fixture
def course_dirs(tmp_path, artifacts):
    """Instructor folder, exchange, student home and the servers' environment."""
    instructor, exchange, home = tmp_path / "instructor", tmp_path / "exchange", tmp_path / "student"
    for d in (instructor, exchange, home):
        d.mkdir()
    copy_course(instructor, REPO_ROOT, ASSIGNMENT, [NOTEBOOK])
    env = clean_env()
    env["COURSE_EXCHANGE"] = str(exchange)
    # nothing from the user's own Jupyter setup: config, kernels, settings, workspaces
    for var, sub in (("JUPYTER_CONFIG_DIR", "jupyter-config"), ("JUPYTER_DATA_DIR", "jupyter-data"),
                     ("JUPYTER_RUNTIME_DIR", "jupyter-runtime"), ("JUPYTERLAB_SETTINGS_DIR", "lab-settings"),
                     ("JUPYTERLAB_WORKSPACES_DIR", "lab-workspaces"), ("IPYTHONDIR", "ipython")):
        (tmp_path / sub).mkdir()
        env[var] = str(tmp_path / sub)
    env.pop("JUPYTER_CONFIG_PATH", None)
    return {"tmp": tmp_path, "instructor": instructor, "exchange": exchange, "home": home, "env": env,
            "log": artifacts / "nbgrader.log"}


def _servers_started(dirs, artifacts):
    student = LabServer("student", dirs["home"], artifacts, dirs["env"], dirs["exchange"], STUDENT)
    instructor = LabServer("instructor", dirs["instructor"], artifacts, dirs["env"], dirs["exchange"])
    return student.start(), instructor.start()


def test_student_and_instructor_in_jupyterlab(course_dirs, artifacts, browser_context):
    t0 = time.perf_counter()
    timings: dict[str, float] = {}

    def lap(name: str) -> None:
        timings[name] = time.perf_counter() - t0

    # both servers boot while the instructor prepares the assignment
    student_server, instructor_server = _servers_started(course_dirs, artifacts)
    try:
        inst, env, log = course_dirs["instructor"], course_dirs["env"], course_dirs["log"]
        run_nbgrader(["generate_assignment", ASSIGNMENT, "--force"], inst, log, env)
        run_nbgrader(["release_assignment", ASSIGNMENT, "--force"], inst, log, env)
        lap("generate + release")
        student_server.wait_ready()
        instructor_server.wait_ready()
        lap("servers ready")
        for server in (student_server, instructor_server):
            with urllib.request.urlopen(server.url("api/kernelspecs"), timeout=30) as r:
                kernels = sorted(json.load(r)["kernelspecs"])
            assert kernels == ["python3"], f"{server.role}'s JupyterLab offers the kernels {kernels}"

        page = browser_context.new_page()
        lab = Lab(page, student_server, artifacts)
        with lab.on_failure_screenshot():
            _student_session(lab, course_dirs)
        lap("student session")

        run_nbgrader(["collect", ASSIGNMENT, "--update"], inst, log, env)
        run_nbgrader(["autograde", ASSIGNMENT, "--force"], inst, log, env)
        lap("collect + autograde")

        lab = Lab(page, instructor_server, artifacts, first_shot=len(lab.shots) + 1)
        with lab.on_failure_screenshot():
            _instructor_session(lab)
        lap("instructor session")
    finally:
        student_server.stop()
        instructor_server.stop()
        (artifacts / "timings.txt").write_text("".join(f"{v:6.1f} s  after {k}\n" for k, v in timings.items()))
    shots = sorted(p.name for p in artifacts.glob("*.png"))
    assert len(shots) >= 10, shots


def _student_session(lab: Lab, dirs) -> None:
    page = lab.page
    lab.open("lab")
    menu_items = _menu_items(lab, "Nbgrader")
    assert "Assignment List" in menu_items
    assert "Formgrader" not in menu_items, "a student's JupyterLab must not offer the Formgrader"

    # -- fetch ---------------------------------------------------------------
    lab.menu("Nbgrader", "Assignment List")
    released = page.locator("#released_assignments_list .list_item", has_text=ASSIGNMENT)
    released.get_by_role("button", name="Fetch").click()
    fetched = page.locator("#fetched_assignments_list .list_item", has_text=ASSIGNMENT).first
    fetched.wait_for()
    fetched_notebook = dirs["home"] / COURSE_ID / ASSIGNMENT / f"{NOTEBOOK}.ipynb"
    assert fetched_notebook.exists()
    page.locator("#fetched_assignments_list a.assignment-notebooks-link", has_text=ASSIGNMENT).click()
    notebook_link = page.locator("#fetched_assignments_list a", has_text=NOTEBOOK)
    notebook_link.wait_for()
    lab.shot("assignment_list_fetched")

    # -- open the notebook: equations, locked cells ----------------------------
    notebook_link.click()
    page.locator(".jp-NotebookPanel .jp-CodeCell").first.wait_for()
    lab.wait_kernel_idle()
    math = lab.notebook.locator(".jp-MarkdownCell mjx-container").first
    math.wait_for()  # MathJax typeset the theory's equations (bundled with JupyterLab: no CDN)
    setup = lab.code_cell("torch.manual_seed(0)")
    assert setup.locator(".cm-editor.jp-mod-readOnly").count() == 1, "the setup cell must be read-only"
    answer = lab.code_cell(ANSWER_SIGNATURE)
    assert answer.locator(".cm-editor.jp-mod-readOnly").count() == 0, "the answer cell must be editable"
    label = setup.locator(".jp-InputArea-editor").evaluate("e => getComputedStyle(e, '::after').content")
    assert "read-only" in label, f"locked cells should be labelled read-only (course_tools.lab's CSS), got {label!r}"
    lab.shot("notebook_opened_setup_locked")
    lab.shot("theory_equations", lab.notebook.locator(".jp-MarkdownCell", has_text="A table of vectors"))

    # a student who types into a locked cell changes nothing
    before, n_cells = setup.locator(".cm-content").text_content(), lab.notebook.locator(".jp-Cell").count()
    setup.locator(".cm-line").first.click()
    assert "Edit" in page.locator(".jp-StatusBar-Widget", has_text="Mode:").first.text_content()
    page.keyboard.type("x = 1")
    page.keyboard.press("Escape")
    assert setup.locator(".cm-content").text_content() == before, "a locked cell accepted typing"
    assert lab.notebook.locator(".jp-Cell").count() == n_cells

    # -- Run All on the blank notebook ----------------------------------------
    lab.run_all()
    demo = lab.code_cell(DEMO_AFTER_ANSWER)
    err = lab.error_text(demo)
    assert "NotImplementedError" in err, f"Run All should stop at the first unanswered task:\n{err}"
    check_shapes, check_values = lab.code_cell(CHECK_SHAPES), lab.code_cell(CHECK_VALUES)
    assert lab.prompt(check_shapes) == "[ ]:", "Run All stopped at the error: the checks below did not run"
    lab.shot("run_all_stops_at_unanswered_task", demo)

    # the student runs the task's first check: it fails
    lab.run_from(check_shapes)
    err = lab.error_text(check_shapes)
    assert "NotImplementedError" in err, err
    lab.shot("check_fails_before_answering", check_shapes)

    # -- a wrong answer: the check says what is wrong ----------------------------
    lab.replace_line(answer, STUB, WRONG_ANSWER)
    lab.run_from(answer)
    err = lab.error_text(check_shapes)
    assert "AssertionError" in err and "should give shape (3, 4), got (12,)" in err, (
        f"the visible check should name the expected and the actual shape:\n{err}")
    lab.shot("wrong_answer_check_message", check_shapes)

    # -- the right answer: both checks of the task pass --------------------------
    lab.replace_line(answer, WRONG_ANSWER, RIGHT_ANSWER)
    lab.run_all()
    for check in (check_shapes, check_values):
        assert re.fullmatch(r"\[\d+\]:", lab.prompt(check)), f"check did not run: {lab.prompt(check)}"
        assert lab.error_text(check) == "", f"check failed:\n{lab.error_text(check)}"
    assert "tensor([[6., 7., 8.]," in lab.output_text(demo)
    stop = lab.code_cell("validate_token_ids(torch.tensor([5, 2000, 7]), vocab_size)")
    assert "NotImplementedError" in lab.error_text(stop), "Run All should now stop at task 2"
    lab.shot("task1_answered_checks_pass", top=answer)

    # -- Validate (the toolbar button saves the notebook first) ------------------
    page.locator(".jp-NotebookPanel-toolbar").get_by_role("button", name="Validate").click()
    dialog = page.locator(".jp-Dialog")
    dialog.wait_for(timeout=180_000)
    body = dialog.locator(".jp-Dialog-body")
    page.wait_for_function(
        "() => { const d = document.querySelector('.jp-Dialog-body'); return d && d.innerText.trim().length > 0; }",
        timeout=180_000)
    report = body.inner_text()
    (lab.artifacts / "validate_report.txt").write_text(report)
    lab.shot("validate_report")
    for unfinished in ("validate_token_ids", "quiz_1", "You did not provide a response"):
        assert unfinished in report, f"Validate should report {unfinished!r} (task 2, quiz, questions):\n{report}"
    assert RIGHT_ANSWER in fetched_notebook.read_text(), "Validate did not save the notebook first"
    assert CHECK_SHAPES not in report and CHECK_VALUES not in report, (
        f"Validate should not report task 1's checks, which pass:\n{report}")
    dialog.get_by_role("button").last.click()
    dialog.wait_for(state="detached")

    # -- Submit ---------------------------------------------------------------------
    page.locator(".lm-DockPanel-tabBar .lm-TabBar-tab", has_text="Assignments").click()
    page.locator("#fetched_assignments_list .list_item", has_text=ASSIGNMENT).get_by_role(
        "button", name="Submit").first.click()
    submitted = page.locator("#submitted_assignments_list .list_item", has_text=ASSIGNMENT)
    submitted.first.wait_for(timeout=120_000)
    lab.shot("submitted")
    inbound = list((dirs["exchange"] / COURSE_ID / "inbound").glob(f"{STUDENT}+{ASSIGNMENT}+*"))
    assert inbound, "the submission did not reach the exchange"


def _instructor_session(lab: Lab) -> None:
    page = lab.page
    lab.open("lab")
    items = _menu_items(lab, "Nbgrader")
    for tool in ("Formgrader", "Create assignment", "Assignment List"):
        assert tool in items, f"the instructor's Nbgrader menu lacks {tool}: {items}"
    lab.menu("Nbgrader", "Formgrader")
    frame = page.frame_locator("iframe").first
    assignment_row = frame.locator("tr", has_text=ASSIGNMENT).first
    assignment_row.wait_for()
    assert "released" in assignment_row.inner_text()
    lab.shot("formgrader_assignments")

    # the assignment's submissions: the student, graded, with the autograded score
    frame.locator(f"a[href$='manage_submissions/{ASSIGNMENT}']").first.click()
    student_row = frame.locator("tr", has_text=STUDENT).first
    student_row.wait_for()
    row = student_row.inner_text()
    lab.shot("formgrader_submission_graded")
    assert "graded" in row, row
    assert re.search(rf"\b{TASK1_POINTS:g} / \d+", row), f"expected task 1's {TASK1_POINTS:g} points in {row!r}"

    # the student's notebook: code score (autograded) and written score (waits for a person)
    frame.locator(f"a[href*='manage_students/{STUDENT}/{ASSIGNMENT}']").first.click()
    nb_row = frame.locator("tr", has_text=NOTEBOOK).first
    nb_row.wait_for()
    cells = [c.strip() for c in nb_row.locator("td").all_inner_texts()]
    lab.shot("formgrader_student_notebook_scores")
    assert cells[2].startswith(f"{TASK1_POINTS:g} /"), f"code score should be {TASK1_POINTS:g}: {cells}"

    # the graded notebook: each check with its points
    nb_row.locator("a").first.click()
    for grade_id, points in (("test_lookup_shapes", 1), ("test_lookup_values", 2),
                             ("test_validate_token_ids_valid", 0)):
        # the Formgrader's script fills in the autograded score as the field's placeholder
        score = frame.locator(f"input.score#{grade_id}")
        expect(score).to_have_attribute("placeholder", re.compile(r"^\d"), timeout=60_000)
        got = score.input_value() or score.get_attribute("placeholder")
        assert float(got) == points, f"{grade_id}: {got} points, expected {points}"
    lab.shot("formgrader_graded_checks",
             top=frame.locator(".nbgrader_cell", has=frame.locator("input.score#test_lookup_shapes")), margin=130)


def _menu_items(lab: Lab, top: str) -> list[str]:
    labels = lab.open_menu(top)
    items = [t.strip() for t in labels.all_inner_texts() if t.strip()]
    lab.close_menu()
    return items
