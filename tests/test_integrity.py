"""Evidence-based scoring, the static scan, the guard, feedback and the report (grading_engine).

Most tests run the instrumentation and the in-kernel recorder in this process
(no kernel): the instrumented test cell is executed here, its records are
judged exactly as the grader judges them. The last tests read the integrity
records that the harness's real ``nbgrader autograde`` run wrote for every
notebook's reference solution and release.
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import textwrap

import nbformat
import pytest
import torch
from grading_engine.evidence import judge as judge_module
from grading_engine.evidence.instrument import instrument_cell, notebook_taint, plan_cell
from grading_engine.evidence.judge import judge_cell, same_value
from grading_engine.evidence.reference import assert_plans, role
from grading_engine.evidence.scan import scan_code
from grading_engine.kernel import probe
from grading_engine.preprocessors.feedback import SanitizeFeedback, strip_hidden
from grading_engine.protocol import EVIDENCE_MIME

from course_tools.paths import REPO_ROOT, SOURCE_DIR, source_notebooks

TEST_CELL = textwrap.dedent('''\
    W = torch.arange(12.0).reshape(4, 3)
    out = pick(W, torch.tensor([2, 0]))
    assert isinstance(out, torch.Tensor), "pick must return a tensor"
    assert out.shape == (2, 3), f"got {tuple(out.shape)}"
    ### BEGIN HIDDEN TESTS
    g = torch.Generator().manual_seed(5)
    W = torch.randn(9, 4, generator=g)
    ids = torch.randint(0, 9, (2, 3), generator=g)
    assert torch.equal(pick(W, ids), W[ids]), "rows differ"
    assert torch.allclose(pick(W, ids) * 2, W[ids] * 2, atol=1e-6)
    for i in range(3):
        assert (pick(W, ids)[0, i] >= -10).all()
    assert kind in ("a", "b") and kind == {"IndexError": "b"}["IndexError"]
    ### END HIDDEN TESTS
    ''')


def correct_pick(W, ids):
    return W[ids]


def run_instrumented(answer, kind="b", nonce="n1", patch=None, seed=0, src=TEST_CELL):
    """Execute the instrumented test cell here; return (records, error)."""
    tainted = notebook_taint([("other", "import torch"), ("answer", "def pick(W, ids):\n    pass\nkind = 'b'"),
                              ("test", src)])
    code, plan = instrument_cell("t", src, tainted, nonce, {"torch"})
    records = []
    saved = probe._publish
    probe._publish = lambda data, metadata=None: records.extend(data[EVIDENCE_MIME])
    probe.capture()
    ns = {"torch": torch, "pick": answer, "kind": kind}
    old = {}
    try:
        if patch:
            for name, fn in patch.items():
                old[name] = getattr(torch, name)
                setattr(torch, name, fn)
        torch.manual_seed(seed)
        exec(compile(code, "<test cell>", "exec"), ns)
        err = None
    except AssertionError as exc:
        err = exc
    finally:
        probe._flush()  # what the kernel's post_run_cell callback publishes after a cell that raised
        probe._publish = saved
        for name, fn in old.items():
            setattr(torch, name, fn)
    return records, err, plan


def plans_of(plan):
    return assert_plans({"t": plan})


def judge(student_records, ref_records, plan, nonce="n2", ref_b=None):
    return judge_cell("t", plans_of(plan), student_records, ref_records,
                      ref_b if ref_b is not None else ref_records, nonce, ("n1", "n1"))


@pytest.fixture(scope="module")
def reference():
    recs, err, plan = run_instrumented(correct_pick)
    assert err is None
    return recs, plan


def test_instrumented_cell_behaves_like_the_original():
    records, err, _ = run_instrumented(correct_pick, nonce="n2")
    assert err is None
    kinds = [r["k"] for r in records]
    assert kinds[0] == "begin" and kinds[-1] == "done"
    assert kinds.count("a") == 8, kinds  # 6 asserts, one of them three times in a loop


def test_failing_assert_raises_with_its_message():
    _, err, _ = run_instrumented(lambda W, ids: W[ids] + 1, nonce="n2")
    assert isinstance(err, AssertionError) and str(err) == "rows differ"


def test_the_reference_judges_itself_correct(reference):
    recs, plan = reference
    v = judge(recs, recs, plan, nonce="n1")
    assert v.ok, v.why
    assert v.recomputed == 8


def test_an_honest_different_implementation_passes(reference):
    ref, plan = reference
    student, err, _ = run_instrumented(lambda W, ids: torch.stack([W[i] for i in ids.flatten()]).reshape(
        *ids.shape, W.shape[1]) if ids.dim() else W[ids], nonce="n2", seed=123)
    assert err is None
    v = judge(student, ref, plan)
    assert v.ok, v.why


def test_a_crash_in_the_recomputation_fails_closed(reference, monkeypatch):
    """A bug in the grader's own recomputation scores the cell zero and says so; it never falls back to the
    kernel's verdict (which the student's process wrote)."""
    ref, plan = reference
    student, err, _ = run_instrumented(correct_pick, nonce="n2")
    assert err is None and judge(student, ref, plan).ok  # honest and correct: full marks when the grader works

    def broken(self, tree):
        raise KeyError("a node type this grader does not know")

    monkeypatch.setattr(judge_module.Evaluator, "run", broken)
    v = judge(student, ref, plan)
    assert not v.ok and "could not judge" in v.why
    assert [f["kind"] for f in v.flags] == ["grader_error"]
    assert "KeyError" in v.flags[0]["detail"] and v.flags[0]["source"] == "evidence"


def test_evidence_of_an_unknown_shape_fails_closed(reference):
    """Evidence the grader cannot read (a summary of a type it does not know) is no evidence of success."""
    ref, plan = reference
    student, err, _ = run_instrumented(correct_pick, nonce="n2")
    broken = [dict(r, v={path: {"t": "zz"} for path in r["v"]}) if r.get("k") == "a" else r for r in student]
    v = judge(broken, ref, plan)
    assert not v.ok
    assert any(f["kind"] in ("grader_error", "test_values_differ") for f in v.flags), v


PARTIAL_CREDIT_CELL = textwrap.dedent('''\
    score = 0
    for n, want in [(1, 1), (2, 5), (3, 14)]:
        try:
            if pick(n, None) == want:
                score += 1
        except Exception:
            pass
    ''')


def _pyramid(n, _):
    return n * (n + 1) * (2 * n + 1) // 6


def _notebook_class(source: str, name: str):
    """A class defined as a notebook cell defines it (the probe knows notebook code by its file name)."""
    ns: dict = {"__name__": "__main__"}
    exec(compile(source, "<ipython-input-7-0>", "exec"), ns)
    return ns[name]


def _partial(answer, nonce):
    records, err, plan = run_instrumented(answer, nonce=nonce, src=PARTIAL_CREDIT_CELL)
    assert err is None
    return records, plan


def test_a_partial_credit_cell_reports_its_conditions():
    records, plan = _partial(_pyramid, "n1")
    assert [r["b"] for r in records if r["k"] == "b"] == [True, True, True]
    assert judge(records, records, plan, nonce="n1").ok


def test_partial_credit_of_an_honest_partly_wrong_answer_stands():
    ref, plan = _partial(_pyramid, "n1")
    student, _ = _partial(lambda n, _: n * n, "n2")
    assert [r["b"] for r in student if r["k"] == "b"] == [True, False, False]
    v = judge(student, ref, plan)
    assert v.ok and not v.flags, v  # the cell keeps the number it computed (1 of 3)


def test_partial_credit_from_an_answer_equal_to_everything_is_refused():
    """``if f(n) == want: score += 1`` is not an assert: stock nbgrader gives every point to an answer
    whose ``__eq__`` is always true; the grader checks each branch against the reported values."""
    anything = _notebook_class("class Anything:\n    def __eq__(self, other):\n        return True\n", "Anything")
    ref, plan = _partial(_pyramid, "n1")
    student, _ = _partial(lambda n, _: anything(), "n2")
    v = judge(student, ref, plan)
    assert not v.ok and [f["kind"] for f in v.flags] == ["comparison_forged"], v


def test_a_branch_reported_against_its_own_values_is_refused():
    ref, plan = _partial(_pyramid, "n1")
    student, _ = _partial(lambda n, _: -1, "n2")
    forged = [dict(r, b=True) if r["k"] == "b" else r for r in student]
    v = judge(forged, ref, plan)
    assert not v.ok and [f["kind"] for f in v.flags] == ["comparison_forged"], v
    assert judge(student, ref, plan).ok  # unforged, the same wrong answer is judged normally


def test_a_wrong_answer_fails(reference):
    ref, plan = reference
    student, err, _ = run_instrumented(lambda W, ids: W[ids] * 0, nonce="n2")
    assert err is not None
    v = judge(student, ref, plan)
    assert not v.ok


def test_patched_comparisons_do_not_earn_points(reference):
    """torch.equal and torch.allclose patched to say True: the grader recomputes them."""
    ref, plan = reference
    wrong = lambda W, ids: W[ids] * 0 + 3.0  # noqa: E731
    student, err, _ = run_instrumented(wrong, nonce="n2",
                                       patch={"equal": lambda *a, **k: True, "allclose": lambda *a, **k: True})
    assert err is None, "with the patches the kernel itself sees every check pass"
    v = judge(student, ref, plan)
    assert not v.ok
    assert any(f["kind"] == "comparison_forged" for f in v.flags)


def test_a_hidden_failure_is_no_success(reference):
    """Records stop where the failing assert raised: a handler that hides the error cannot add the rest."""
    ref, plan = reference
    student, err, _ = run_instrumented(lambda W, ids: W[ids] + 1, nonce="n2")
    assert err is not None
    v = judge(student, ref, plan)
    assert not v.ok and "stopped" in v.why


def test_no_evidence_no_points(reference):
    ref, plan = reference
    assert not judge([], ref, plan).ok
    only_begin = [{"k": "begin", "n": "n2", "g": "t"}]
    assert not judge(only_begin, ref, plan).ok


def test_evidence_with_a_foreign_nonce_is_rejected(reference):
    ref, plan = reference
    replay = json.loads(json.dumps(ref))  # the reference's own records, replayed
    v = judge(replay, ref, plan, nonce="n2")
    assert not v.ok
    assert any(f["kind"] == "forged_evidence" for f in v.flags)


def test_the_tests_own_values_are_anchored_to_the_reference(reference):
    """A quiz answer checked against a value the test computes: forging that value is seen."""
    ref, plan = reference
    student, err, _ = run_instrumented(correct_pick, nonce="n2", kind="a")
    assert err is not None  # 'a' is wrong
    forged = json.loads(json.dumps(student))
    for r in forged:  # a process-controlling student rewrites the record of the failing check
        if r.get("k") == "a" and r["i"] == len([1 for x in plan.asserts]) - 1:
            r["ok"] = True
            r["v"]["0.1.0"] = {"t": "s", "v": "a", "n": 1}
            r["v"]["0.1.1"] = {"t": "s", "v": "a", "n": 1}
    forged.append({"k": "done", "n": "n2", "g": "t"})
    v = judge(forged, ref, plan)
    assert not v.ok
    assert any(f["kind"] == "test_values_differ" for f in v.flags)


def test_unstable_values_are_not_anchored():
    """A value drawn without a seed differs between the reference runs A and B, so it is not anchored."""
    src = "x = torch.randn(3)\nassert x.abs().sum() < 100\n"
    ref_a, _, plan = run_instrumented(correct_pick, src=src, seed=1)
    ref_b, _, _ = run_instrumented(correct_pick, src=src, seed=2)
    student, err, _ = run_instrumented(correct_pick, nonce="n2", src=src, seed=3)
    assert err is None
    assert judge(student, ref_a, plan, ref_b=ref_b).ok
    # were it stable (B equal to A), the student's other draw would be a changed test value
    v = judge(student, ref_a, plan, ref_b=ref_a)
    assert not v.ok and v.flags[0]["kind"] == "test_values_differ"


def test_taint_follows_the_students_values():
    tainted = notebook_taint([("answer", "def f(x):\n    return x\nq = 1"), ("other", "y = f(2)\nz = 3"),
                              ("test", "w = torch.ones(2)\nv = f(w)\nassert v.sum() == 2")])
    assert {"f", "q", "y", "w", "v"} <= tainted
    assert "z" not in tainted and "torch" not in tainted
    plan, _ = plan_cell("t", "assert f(3) == z + 1", tainted)
    leaves = plan.asserts[0].leaves
    assert leaves["0.0"]["taint"] and not leaves["0.1"]["taint"]


def test_an_exception_the_students_code_raised_is_the_students():
    """``except ValueError as err`` after a call into the answer: the message is the student's wording, so it is
    compared in the student's run, not anchored to the reference run's own message."""
    tainted = notebook_taint([("answer", "def f(x):\n    raise ValueError(x)"), ("other", "z = 3")])
    cell = "try:\n    f(-1)\nexcept ValueError as err:\n    msg = str(err)\nassert 'rows' in msg"
    plan, _ = plan_cell("t", cell, tainted)
    assert plan.asserts[0].leaves["0.1"]["taint"]
    other = "try:\n    int('x')\nexcept ValueError as err:\n    msg = str(err)\nassert 'x' in msg"
    plan, _ = plan_cell("t", other, tainted)
    assert not plan.asserts[0].leaves["0.1"]["taint"]  # the library's own message stays the test's


def test_every_test_cell_of_the_course_can_be_instrumented():
    for path in [p for a in sorted(x.name for x in SOURCE_DIR.iterdir() if x.is_dir()) for p in source_notebooks(a)]:
        nb = nbformat.read(str(path), as_version=4)
        tainted = notebook_taint([(role(c), c.source) for c in nb.cells if c.cell_type == "code"])
        for c in nb.cells:
            if role(c) == "test":
                gid = c.metadata["nbgrader"]["grade_id"]
                code, plan = instrument_cell(gid, c.source, tainted, "n")
                ast.parse(code)
                assert plan.parsed, f"{path.name}/{gid} cannot be parsed"


def test_same_value_tolerates_float_noise_only():
    a = probe.summarize(torch.tensor([1.0, 2.0, 3.0]))
    b = probe.summarize(torch.tensor([1.0, 2.0, 3.0]) * (1 + 1e-9))
    c = probe.summarize(torch.tensor([1.0, 2.0, 3.1]))
    assert same_value(a, b) and not same_value(a, c)
    big = torch.arange(probe.FULL + 10000.0)
    assert same_value(probe.summarize(big), probe.summarize(big.clone()))
    assert not same_value(probe.summarize(big), probe.summarize(big + 1))


# ------------------------------------------------------------------ scan


@pytest.mark.parametrize("code,kind", [
    ("get_ipython().input_transformers_cleanup.append(lambda l: [])", "ipython_hook"),
    ("get_ipython().set_custom_exc((Exception,), h)", "ipython_hook"),
    ("import sys\nsys.settrace(f)", "interpreter_hook"),
    ("import torch\ntorch.allclose = lambda *a, **k: True", "patched_function"),
    ("torch.Tensor.__eq__ = lambda a, b: True", "patched_function"),
    ("setattr(torch, 'equal', f)", "patched_function"),
    ("import sys\nrep = sys.modules.get('grading_' + 'engine.kernel.probe')\nrep.report = f", "patched_function"),
    ("import importlib\nm = importlib.import_module(name)\nm.check = f", "patched_function"),
    ("open('../../../source/a/n.ipynb').read()", "file_access"),
    ("import sqlite3", "file_access"),
    ("pathlib.Path.cwd().parent.parent / 'gradebook.db'", "file_access"),
    ("import socket", "network"),
    ("import subprocess", "process"),
    ("import os\nos.kill(os.getpid(), 9)", "process"),
    ("exec('x = 1')", "dynamic_code"),
    ("__import__('o' + 's')", "dynamic_code"),
])
def test_the_scan_finds(code, kind):
    assert kind in {f["kind"] for f in scan_code(code, "cell")}


def test_the_scan_is_silent_on_every_reference_answer():
    """No reference answer or demonstration of any notebook looks like interference."""
    found = []
    for a in sorted(x.name for x in SOURCE_DIR.iterdir() if x.is_dir()):
        for path in source_notebooks(a):
            nb = nbformat.read(str(path), as_version=4)
            for c in nb.cells:
                if role(c) == "answer":
                    found += [f"{path.name}/{c.metadata['nbgrader']['grade_id']}: {f['detail']}"
                              for f in scan_code(c.source, "cell")]
    assert not found, "\n".join(found)


# -------------------------------------------------------------- feedback


def test_feedback_hides_hidden_tests_and_tracebacks():
    cell = nbformat.v4.new_code_cell(TEST_CELL, metadata={"nbgrader": {
        "grade": True, "solution": False, "grade_id": "t", "locked": True, "points": 1, "schema_version": 3}})
    cell.outputs = [
        nbformat.v4.new_output("stream", name="stdout", text="g = torch.Generator().manual_seed(5)\n"),
        nbformat.v4.new_output("error", ename="AssertionError", evalue="rows differ",
                               traceback=["---", "assert torch.equal(pick(W, ids), W[ids]), \"rows differ\""]),
        nbformat.v4.new_output("display_data", data={EVIDENCE_MIME: [{"k": "a"}]}),
    ]
    nb = nbformat.v4.new_notebook(cells=[cell])
    out, _ = SanitizeFeedback().preprocess(nb, {})
    text = json.dumps(out)
    assert "manual_seed(5)" not in text and "torch.equal(pick" not in text
    assert out.cells[0].outputs[1]["traceback"] == ["AssertionError: rows differ"]
    assert len(out.cells[0].outputs) == 2
    assert "pick must return a tensor" in out.cells[0].source  # visible tests stay


def test_strip_hidden_keeps_indentation():
    src = "for i in range(2):\n    ### BEGIN HIDDEN TESTS\n    assert i < 2\n    ### END HIDDEN TESTS\n    pass"
    assert "assert" not in strip_hidden(src)
    assert strip_hidden(src).splitlines()[1].startswith("    # (hidden tests")


# ----------------------------------------------------------------- audit


def test_audit_events_leave_the_process_as_they_happen(tmp_path):
    """In a child interpreter: the hook reports an open outside the allowed places, and keeps reporting."""
    code = textwrap.dedent(f"""
        import os, sys
        r, w = os.pipe()
        from grading_engine.kernel import audit
        audit.install(w)
        audit.emit("kernel.ready")
        try:
            open("/definitely/not/here")
        except OSError:
            pass
        open({str(tmp_path / 'inside.txt')!r}, "w").close()
        os.close(w)
        sys.stdout.write(os.read(r, 65536).decode())
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    events = [json.loads(line) for line in out.stdout.splitlines()]
    opened = [e for e in events if e["e"] == "open"]
    assert [e["p"] for e in opened] == [["/definitely/not/here"]], out.stdout + out.stderr


# ------------------------------------------- the harness's real grading run


def _records(course_report, student):
    out = {}
    for f in course_report.workspace.glob(f"integrity/*/{student}.json"):
        data = json.loads(f.read_text())
        for nb, info in data.get("notebooks", {}).items():
            out[f"{data['assignment']}/{nb}"] = info
        if data.get("submission", {}).get("flags"):
            out[f"{data['assignment']} (files)"] = {"flags": data["submission"]["flags"]}
    return out


@pytest.mark.grading
@pytest.mark.parametrize("student", ["reference", "blank"])
def test_honest_submissions_raise_no_flag(course_report, student):
    """The reference answers and the untouched release of every notebook: graded with evidence, no flag."""
    if os.environ.get("COURSE_INTEGRITY", "on") == "off":
        pytest.skip("COURSE_INTEGRITY=off")
    recs = _records(course_report, student)
    assert recs, "the harness wrote no integrity record (is the course's nbgrader_config.py section active?)"
    flagged = {k: [f"[{f['source']}] {f['kind']}: {f['detail']}" for f in v.get("flags", [])]
               for k, v in recs.items() if v.get("flags")}
    assert not flagged, json.dumps(flagged, indent=1)
    if student == "reference":
        for k, v in recs.items():
            assert v.get("sandbox") == "on" or os.environ.get("COURSE_SANDBOX") == "off", k
            bad = {g: c["why"] for g, c in v.get("cells", {}).items() if not c["ok"]}
            assert not bad, f"{k}: {bad}"


# ----------------------------------------------------------------- guard


def _guard_case():
    from grading_engine.evidence.reference import GradebookNotebook

    test_src = "assert f(1) == 2\n### BEGIN HIDDEN TESTS\nassert f(2) == 3\n### END HIDDEN TESTS"
    gb = GradebookNotebook(
        source={"f": {"cell_type": "code", "locked": False, "source": "def f(x): ...", "checksum": ""},
                "test_f": {"cell_type": "code", "locked": True, "source": test_src, "checksum": ""}},
        grade={"test_f": 1.0}, solution={"f"}, task={})
    meta = {"grade": False, "grade_id": "f", "locked": False, "schema_version": 3, "solution": True, "task": False}
    tmeta = {"grade": True, "grade_id": "test_f", "locked": True, "points": 1, "schema_version": 3,
             "solution": False, "task": False}
    return gb, meta, tmeta, test_src


def test_guard_repairs_metadata_that_would_stop_a_batch():
    from grading_engine.preprocessors.guard import GuardSubmission, released

    gb, meta, tmeta, test_src = _guard_case()
    cells = [nbformat.v4.new_code_cell("def f(x):\n    return x + 1", metadata={"nbgrader": dict(meta)}),
             nbformat.v4.new_code_cell(released(test_src), metadata={"nbgrader": {}}),  # as after a copy
             nbformat.v4.new_code_cell("x = 1", metadata={"nbgrader": {"grade_id": "test_f"}})]  # broken, known
    nb = nbformat.v4.new_notebook(cells=cells)
    g = GuardSubmission()
    flags = g._repair_metadata(nb, gb)
    assert "nbgrader" not in nb.cells[1].metadata
    assert nb.cells[2].metadata["nbgrader"] == gb.canonical_metadata("test_f")
    assert [f["kind"] for f in flags] == ["damaged_metadata", "damaged_metadata"]
    from nbgrader.nbgraderformat import MetadataValidator

    MetadataValidator().validate_nb(nb)  # what stopped stock nbgrader's batch now passes


def test_guard_keeps_only_the_last_duplicate_and_flags_structure():
    from grading_engine.preprocessors.guard import GuardSubmission, released

    gb, meta, tmeta, test_src = _guard_case()
    cells = [nbformat.v4.new_code_cell("def f(x):\n    return x + 1", metadata={"nbgrader": dict(meta)}),
             nbformat.v4.new_code_cell(released(test_src), metadata={"nbgrader": dict(tmeta)}),
             nbformat.v4.new_code_cell("assert True", metadata={"nbgrader": dict(tmeta)})]
    nb = nbformat.v4.new_notebook(cells=cells)
    g = GuardSubmission()
    flags = g._repair_metadata(nb, gb) + g._structure(nb, gb, None)
    kinds = [f["kind"] for f in flags]
    assert "nbgrader" not in nb.cells[1].metadata and nb.cells[2].metadata["nbgrader"]["grade_id"] == "test_f"
    assert kinds == ["duplicate_cell", "changed_locked_cell"]

    stripped = nbformat.v4.new_notebook(cells=[cells[0], nbformat.v4.new_code_cell(released(test_src))])
    assert [f["kind"] for f in g._structure(stripped, gb, None)] == ["test_cell_without_metadata"]


def test_random_draws_after_a_call_into_the_answer_are_not_anchored():
    """Run B moves the random generators after every call into the student's code: a draw the test makes
    after such a call, without seeding again, is not a fixed value, since an honest answer may draw random
    numbers of its own."""
    src = ("torch.manual_seed(0)\nw = pick(torch.ones(3, 2), torch.tensor([0]))\nnoise = torch.randn(2)\n"
           "assert torch.allclose(w[0] + noise, torch.ones(2) + noise)\n")
    ref_a, _, plan = run_instrumented(correct_pick, src=src)
    b_ns = {"pick": correct_pick}
    probe.wrap_student(b_ns, ["pick"], 77)
    ref_b, _, _ = run_instrumented(b_ns["pick"], src=src)

    def honest_but_random(W, ids):
        torch.randn(5)  # an honest answer that also draws random numbers
        return W[ids]

    student, err, _ = run_instrumented(honest_but_random, nonce="n2", src=src)
    assert err is None
    assert judge(student, ref_a, plan, ref_b=ref_b).ok
    assert not judge(student, ref_a, plan, ref_b=ref_a).ok  # what happened before run B moved the generators


def test_a_reference_another_process_is_building_is_left_to_it(tmp_path):
    """A batch worker builds, before grading, the reference runs no other process holds (``wait=False``): a
    notebook whose lock another worker holds is skipped at once, not waited for; with the lock free it is
    built and cached, and asked again it comes from the cache."""
    import fcntl
    import time

    from grading_engine.config import GradingEngine
    from grading_engine.evidence.reference import cache_key, reference_runs
    from grading_engine.preprocessors.execute import SandboxedExecute
    from traitlets.config import Config

    c = Config()
    c.GradingEngine.reference_cache = str(tmp_path / "cache")
    c.GradingEngine.sandbox = False
    c.SandboxedExecute.kernel_name = "python3"
    ref = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("x = 2", metadata={"nbgrader": {"grade_id": "ans", "solution": True}}),
        nbformat.v4.new_code_cell("assert x * 3 == 6", metadata={"nbgrader": {
            "grade_id": "t", "grade": True, "locked": True, "points": 1}}),
    ])
    folder = tmp_path / "a"
    folder.mkdir()
    s = GradingEngine(config=c)
    lock_path = s.reference_cache_dir() / f"{cache_key(ref, folder, s.sandbox, s.threads, s.input_seed)}.lock"
    lock_path.parent.mkdir(parents=True)
    with open(lock_path, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        t0 = time.monotonic()
        assert reference_runs(ref, folder, SandboxedExecute, c, wait=False) is None
        assert time.monotonic() - t0 < 2
    built = reference_runs(ref, folder, SandboxedExecute, c, wait=False)
    assert built is not None and len(built["runs"]) == 2 and set(built["slices"]) == {"t"}
    assert reference_runs(ref, folder, SandboxedExecute, c, wait=False) == built


def test_cached_runs_are_parsed_once_per_process_each_caller_gets_its_own_copy_and_a_new_file_is_read(
        tmp_path, monkeypatch):
    """A worker asks for a notebook's reference runs three times per student: the cache file is parsed once,
    every caller gets a copy of its own, and a file written again (another process rebuilt it) is read again."""
    import json

    from grading_engine.config import GradingEngine
    from grading_engine.evidence import reference
    from grading_engine.preprocessors.execute import SandboxedExecute
    from traitlets.config import Config

    c = Config()
    c.GradingEngine.reference_cache = str(tmp_path / "cache")
    c.GradingEngine.sandbox = False
    ref = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("assert 1", metadata={"nbgrader": {
        "grade_id": "t", "grade": True, "locked": True, "points": 1}})])
    folder = tmp_path / "a"
    folder.mkdir()
    s = GradingEngine(config=c)
    key = reference.cache_key(ref, folder, s.sandbox, s.threads, s.input_seed)
    path = s.reference_cache_dir() / f"{key}.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"key": key, "runs": [{"t": []}, {"t": []}], "seed": 0, "slices": {}}))
    reads = []
    loads = json.loads
    monkeypatch.setattr(reference.json, "loads", lambda text, *a, **k: reads.append(1) or loads(text, *a, **k))

    first = reference.reference_runs(ref, folder, SandboxedExecute, c)
    first["runs"].clear()
    again = reference.reference_runs(ref, folder, SandboxedExecute, c)
    assert again["runs"] == [{"t": []}, {"t": []}] and again is not first
    assert len(reads) == 1
    rebuilt = path.with_suffix(".tmp")  # as the cache is written: a new file in the old one's place
    rebuilt.write_text(json.dumps({"key": key, "runs": [{"t": []}, {"t": []}], "seed": 7, "slices": {}}))
    os.replace(rebuilt, path)
    assert reference.reference_runs(ref, folder, SandboxedExecute, c)["seed"] == 7
    assert len(reads) == 2


def test_the_gradebook_definition_is_read_again_once_the_gradebook_changes(tmp_path):
    """The notebook definition autograde's steps share is read once per state of the gradebook's file."""
    from grading_engine.evidence.reference import gradebook_notebook
    from nbgrader.api import Gradebook

    url = f"sqlite:///{tmp_path / 'gradebook.db'}"
    with Gradebook(url) as gb:
        gb.add_assignment("a1")
        gb.add_notebook("nb", "a1")
        gb.update_or_create_source_cell("t1", "nb", "a1", cell_type="code", locked=True, source="assert 1",
                                        checksum="x")
    first = gradebook_notebook(url, "a1", "nb")
    assert first.source["t1"]["source"] == "assert 1"
    first.source["t1"]["source"] = "changed by a caller"
    assert gradebook_notebook(url, "a1", "nb").source["t1"]["source"] == "assert 1"
    with Gradebook(url) as gb:
        gb.update_or_create_source_cell("t1", "nb", "a1", cell_type="code", locked=True, source="assert 2",
                                        checksum="y")
    assert gradebook_notebook(url, "a1", "nb").source["t1"]["source"] == "assert 2"


PROBE_IN_A_SHELL = """
import json
from IPython.core.interactiveshell import InteractiveShell
from grading_engine.kernel import probe
shell = InteractiveShell.instance()
probe.attach(shell)
out = []
probe._publish = lambda data, metadata=None: out.append(data[probe.EVIDENCE_MIME])
shell.run_cell("import grading_engine.kernel.probe as p\\np.begin('n', 'g')\\n"
               "p._emit({'k': 'a', 'n': 'n', 'g': 'g', 'i': 0, 'v': {}})\\nraise ValueError('before done')")
after_raise = [[r["k"] for r in batch] for batch in out]
shell.run_cell("ip = get_ipython()\\nfor cb in list(ip.events.callbacks['post_run_cell']):\\n"
               "    ip.events.unregister('post_run_cell', cb)")
print(json.dumps({"after_raise": after_raise, "report": [f["d"] for f in probe.state_report()]}))
"""


def test_the_records_of_a_cell_that_raised_are_published_and_removing_that_is_reported():
    """The records of a test cell wait for its end: a cell that raised before its ``done`` still publishes
    them (IPython's post_run_cell), and a notebook that takes that callback away is reported."""
    out = subprocess.run([sys.executable, "-c", PROBE_IN_A_SHELL], capture_output=True, text=True, timeout=120)
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["after_raise"] == [["begin", "a"]]
    assert "the grader's post_run_cell callback was removed" in got["report"]
