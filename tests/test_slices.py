"""Sliced test cells: the student's process runs only the student's side of each check.

The reference notebook of these tests is run here, in this process, the way
the grader runs it in a kernel: runs A and B (every random generator moved)
with every check whole, then the slices (:func:`slice_plans`), then run C of
the slices on the reference's own answer, then a student's run of the
slices, judged as the grader judges it.
"""

from __future__ import annotations

import json
import textwrap

import nbformat
import pytest
import torch
from grading_engine.evidence.instrument import instrument_cell, live_after_cells, message_template
from grading_engine.evidence.judge import judge_cell, render_message
from grading_engine.evidence.reference import _check_slices, assert_plans, plans_of, slice_plans, taint_of
from grading_engine.kernel import probe
from grading_engine.protocol import EVIDENCE_MIME

pytestmark = pytest.mark.evidence

ANSWER = "def pick(W, ids):\n    return W[ids]\n\nquiz = True\n"
TEST = textwrap.dedent('''\
    W = torch.arange(12.0).reshape(4, 3)
    out = pick(W, torch.tensor([2, 0]))
    assert out.shape == (2, 3), f"two ids give (2, 3), got {tuple(out.shape)}"
    ### BEGIN HIDDEN TESTS
    g = torch.Generator().manual_seed(5)
    V = torch.randn(9, 4, generator=g)
    ids = torch.randint(0, 9, (2, 3), generator=g)
    expected = V[ids].clone()
    secret_scale = 0.5 + 0.25
    assert torch.allclose(pick(V, ids) * secret_scale, expected * secret_scale), "rows differ from V[ids]"
    for i in range(2):
        assert torch.equal(pick(V, ids)[i], expected[i]), f"row {i} differs"
    assert quiz is (tuple(torch.nn.Embedding(7, 2).weight.shape) == (7, 2)), "quiz: think of the shape"
    ### END HIDDEN TESTS
    ''')
LATER = "print(ids.shape)\n"  # a later cell reads `ids`: its statement must stay


def notebook(test=TEST, later=LATER):
    nb = nbformat.v4.new_notebook()
    meta = lambda **m: {"nbgrader": {"schema_version": 3, "locked": False, "solution": False, "grade": False,  # noqa: E731
                                     "task": False, **m}}
    nb.cells = [nbformat.v4.new_code_cell("import torch", metadata=meta(grade_id="setup", locked=True)),
                nbformat.v4.new_code_cell(ANSWER, metadata=meta(grade_id="answer", solution=True)),
                nbformat.v4.new_code_cell(test, metadata=meta(grade_id="t", grade=True, locked=True, points=3)),
                nbformat.v4.new_code_cell(later, metadata=meta(grade_id="later"))]
    return nb


def execute(nb, nonce, cut=None, pick=None, quiz=True, seed=0, before=None):
    """Run the test cell of ``nb`` here, instrumented (sliced with ``cut``); its records."""
    src = nb.cells[2].source
    code, _ = instrument_cell("t", src, taint_of(nb), nonce, {"torch"}, cut)
    records = []
    saved = probe._publish
    probe._publish = lambda data, metadata=None: records.extend(data[EVIDENCE_MIME])
    probe.capture()
    ns = {"torch": torch, "pick": pick or (lambda W, ids: W[ids]), "quiz": quiz}
    try:
        if before:
            before(ns)
        torch.manual_seed(seed)
        exec(compile(code, "<test cell>", "exec"), ns)
    except AssertionError:
        pass
    finally:
        probe._flush()  # what the kernel's post_run_cell callback publishes after a cell that raised
        probe._publish = saved
    return records, code


@pytest.fixture(scope="module")
def reference():
    nb = notebook()
    a, _ = execute(nb, "na", seed=0)
    b, _ = execute(nb, "nb", seed=99)
    runs = ({"t": a}, {"t": b})
    slices = slice_plans(nb, runs[0], runs[1], ["na", "nb"])
    return nb, runs, slices


def grade(fixture, records, nonce="ns", hidden=range(4, 16)):
    """Judge ``records`` of the test cell of ``fixture`` (notebook, reference runs, slices) as the grader does."""
    nb, runs, slices = fixture
    return judge_cell("t", assert_plans(plans_of(nb)), records, runs[0]["t"], runs[1]["t"], nonce, ("na", "nb"),
                      {"t": set(hidden)}, slices["t"])


def test_the_expected_values_and_hidden_messages_never_reach_the_kernel(reference):
    nb, _, slices = reference
    cut = slices["t"]
    _, code = execute(nb, "ns", cut)
    for secret in ("expected", "rows differ", "think of the shape", "Embedding(7, 2)",
                   "== (2, 3)", "two ids give"):
        assert secret not in code, f"{secret!r} is in the student's process:\n{code}"
    assert "pick(V, ids)" in code and "ids = torch.randint" in code  # the student's side and its inputs stay
    assert len(cut["dropped"]) == 1  # `expected = ...`


def test_the_slice_of_the_reference_earns_every_check(reference):
    nb, runs, slices = reference
    c, _ = execute(nb, "nc", slices["t"], seed=3)
    assert _check_slices(nb, slices, {"t": c}, "nc", runs[0], runs[1], ["na", "nb"]) == {}
    v = grade(reference, c, nonce="nc")
    assert v.ok and v.recomputed == 5, v.why


def test_an_honest_other_implementation_passes(reference):
    records, _ = execute(reference[0], "ns", reference[2]["t"],
                         pick=lambda W, ids: torch.stack([W[int(i)] for i in ids.reshape(-1)]).reshape(*ids.shape, -1))
    v = grade(reference, records)
    assert v.ok, v.why


def test_a_wrong_answer_fails_with_the_message_the_grader_writes(reference):
    records, _ = execute(reference[0], "ns", reference[2]["t"], pick=lambda W, ids: W[ids] + 1)
    v = grade(reference, records)
    assert not v.ok and v.why == "a hidden check failed: rows differ from V[ids]"
    records, _ = execute(reference[0], "ns", reference[2]["t"], pick=lambda W, ids: W[:1])
    v = grade(reference, records)
    assert v.why == "the check on line 3 failed: two ids give (2, 3), got (1, 3)"


def test_a_wrong_quiz_answer_fails(reference):
    records, _ = execute(reference[0], "ns", reference[2]["t"], quiz=False)
    assert grade(reference, records).why == "a hidden check failed: quiz: think of the shape"


def test_a_value_that_raises_fails_its_check_and_the_cell_goes_on(reference):
    def crash(W, ids):
        if ids.dim() == 2:
            raise IndexError("no 2-d ids")
        return W[ids]

    records, _ = execute(reference[0], "ns", reference[2]["t"], pick=crash)
    assert records[-1]["k"] == "done"  # nothing raised in the kernel
    v = grade(reference, records)
    assert not v.ok and v.why == "a hidden check raised IndexError: no 2-d ids"


def test_a_reporter_that_copies_the_other_operand_has_nothing_to_copy(reference):
    """The forged_reporter attack, in this process: the student's reporter replaces each reported value by
    the one reported next to it, or by any value of the kernel's namespace of the same shape."""
    real = probe.report

    def forged(nonce, gid, aid, leaves, *rest):
        if len(leaves) >= 2:
            leaves = [(leaves[0][0], leaves[1][1])] + list(leaves[1:])
        return real(nonce, gid, aid, leaves, *rest)

    probe.report = forged
    try:
        records, _ = execute(reference[0], "ns", reference[2]["t"], pick=lambda W, ids: W[ids] * 0, quiz=False)
    finally:
        probe.report = real
    v = grade(reference, records)
    assert not v.ok and v.flags[0]["kind"] == "patched_function"
    for r in records:  # a reporter that also hides that it was replaced gains nothing either
        r.pop("x", None)
    v = grade(reference, records)
    assert not v.ok and v.why == "a hidden check failed: rows differ from V[ids]", v.why


def test_records_for_a_check_of_another_cell_are_refused(reference):
    records, _ = execute(reference[0], "ns", reference[2]["t"])
    forged = json.loads(json.dumps(records))
    forged.insert(1, dict(forged[1], g="other"))
    v = grade(reference, forged)
    assert not v.ok and v.flags[0]["kind"] == "forged_evidence"


def test_a_slice_that_changes_the_tests_inputs_is_refused():
    """A dropped statement that drew from the global generator moves the draws after it: the run of the
    slice on the reference's answer fails, and the cell is graded unsliced."""
    test = textwrap.dedent('''\
        ### BEGIN HIDDEN TESTS
        torch.manual_seed(1)
        unused = torch.randn(5)
        x = torch.randn(4)
        want = x[1:2] * 1
        assert torch.equal(pick(x, torch.tensor([1])), want)
        ### END HIDDEN TESTS
        ''')
    nb = notebook(test, later="pass")
    a, _ = execute(nb, "na", seed=0)
    b, _ = execute(nb, "nb", seed=7)
    slices = slice_plans(nb, {"t": a}, {"t": b}, ["na", "nb"])
    assert slices["t"]["dropped"] == [3, 5]
    c, _ = execute(nb, "nc", slices["t"])
    bad = _check_slices(nb, slices, {"t": c}, "nc", {"t": a}, {"t": b}, ["na", "nb"])
    assert set(bad) == {"t"}


def test_names_a_later_cell_reads_stay_and_overwritten_ones_do_not():
    live = live_after_cells(["a = 1\nb = 2", "print(a)\nb = 3\nprint(b)", "c = b"])
    assert live[0] == {"a", "print"} and live[1] == {"b"} and live[2] == set()
    assert live_after_cells(["x = 1", "%%bash\nnot python (", "y = x"])[0] is not None
    assert live_after_cells(["x = 1", "def (:", "y = x"])[0] is None


def test_messages_are_written_from_their_literal_text_and_values():
    import ast

    from grading_engine.evidence.judge import decode

    tree = ast.parse('assert ok, f"got {n!r:>4} of {total}, {x:.2f}"').body[0]
    template, leaves, _ = message_template(tree.msg, {"n"})
    assert [p.get("s") for p in template if "s" in p] == ["got ", " of ", ", "]
    assert leaves["m1"]["taint"] and not leaves["m3"]["taint"]
    probe.capture()
    values = {"m1": decode(probe.summarize(7)), "m3": decode(probe.summarize(9)), "m5": decode(probe.summarize(0.5))}
    assert render_message(template, values) == "got    7 of 9, 0.50"
    values["m1"] = decode(probe.summarize(torch.Size([2, 3])))
    assert "torch.Size([2, 3])" in render_message(template, values)


AFTER_THE_CALL = textwrap.dedent('''\
    ### BEGIN HIDDEN TESTS
    g = torch.Generator().manual_seed(2)
    V = torch.randn(6, 3, generator=g)
    ids = torch.tensor([[4, 1], [0, 0]])
    alias = V
    assert torch.equal(pick(V, ids), V[ids]), "rows differ"
    assert alias.shape == (6, 3)
    ### END HIDDEN TESTS
    ''')


@pytest.fixture(scope="module")
def after_the_call():
    nb = notebook(AFTER_THE_CALL, later="pass")
    a, _ = execute(nb, "na", seed=0)
    b, _ = execute(nb, "nb", seed=5)
    return nb, ({"t": a}, {"t": b}), slice_plans(nb, {"t": a}, {"t": b}, ["na", "nb"])


def grade_with(fixture, records):
    return grade(fixture, records, hidden=range(1, 10))


def test_a_value_computed_from_the_students_inputs_after_the_call_is_guarded(after_the_call):
    nb, _, slices = after_the_call
    cut = slices["t"]
    assert cut["anchored"]["0"] == ["0.1"] and cut["guards"]["0"] == ["V", "ids"]
    _, code = execute(nb, "ns", cut)
    assert "V[ids]" not in code and "'g:V', lambda: V" in code
    records, _ = execute(nb, "ns", cut)
    assert grade_with(after_the_call, records).ok


def test_an_answer_that_changes_its_input_in_place_fails_its_guard(after_the_call):
    def sneaky(W, ids):
        out = W[ids].clone()
        W.zero_()
        return out

    records, _ = execute(after_the_call[0], "ns", after_the_call[2]["t"], pick=sneaky)
    v = grade_with(after_the_call, records)
    assert not v.ok and v.why == "a hidden check failed: your code changed `V`, a value the test passed to it"


def test_an_alias_of_an_input_is_the_students(after_the_call):
    """`alias = V` before the call shares V's object: what the student's code does to V shows in it, so it is
    never taken from the reference run."""
    assert "1" not in after_the_call[2]["t"]["anchored"] or "0.0" not in after_the_call[2]["t"]["anchored"]["1"]


def test_the_checks_of_a_helper_function_are_judged_on_what_its_callers_pass():
    """A helper's checks run when it is called, on the student's values: none of its values is anchored
    (the wrong answer below would pass if `got` were taken from the reference run)."""
    test = textwrap.dedent('''\
        ### BEGIN HIDDEN TESTS
        def _same(got, want, what):
            assert got == want, f"{what}: got {got}"
        V = torch.arange(6.0).reshape(3, 2)
        got = pick(V, torch.tensor([2])).tolist()
        _same(got, [[4.0, 5.0]], "row 2")
        ### END HIDDEN TESTS
        ''')
    nb = notebook(test, later="pass")
    a, _ = execute(nb, "na", seed=0)
    b, _ = execute(nb, "nb", seed=4)
    slices = slice_plans(nb, {"t": a}, {"t": b}, ["na", "nb"])
    assert "0.0" not in slices["t"]["anchored"].get("0", [])
    records, _ = execute(nb, "ns", slices["t"], pick=lambda W, ids: W[ids] * 2)
    v = judge_cell("t", assert_plans(plans_of(nb)), records, a, b, "ns", ("na", "nb"), {"t": set(range(1, 9))},
                   slices["t"])
    assert not v.ok and v.why == "a hidden check failed: row 2: got [[8.0, 10.0]]"


def test_a_name_an_answer_function_reads_is_the_students():
    from grading_engine.evidence.instrument import notebook_entry_taint

    cells = [("other", "import torch\nmodel = torch.nn.Linear(2, 2)"),
             ("answer", "def freeze():\n    model.weight.requires_grad_(False)"),
             ("test", "freeze()\nassert model.weight.requires_grad is False")]
    assert "model" in notebook_entry_taint(cells)[2][0]


def test_a_check_the_grader_cannot_decide_alone_is_found_without_running_the_slice():
    """`isinstance` with an abstract class needs the kernel's own verdict: run A's records, judged as a
    sliced student run, show it before any run of the slice (the cell is then graded whole)."""
    test = "import collections.abc\nassert isinstance(pick(torch.arange(3.0), torch.tensor([0])).tolist(), " \
           "collections.abc.Sequence)\n"
    nb = notebook(test, later="pass")
    a, _ = execute(nb, "na", seed=0)
    b, _ = execute(nb, "nb", seed=4)
    slices = slice_plans(nb, {"t": a}, {"t": b}, ["na", "nb"])
    undecided = _check_slices(nb, slices, {"t": a}, "na", {"t": a}, {"t": b}, ["na", "nb"])
    assert "abstract base class" in undecided["t"]


def test_the_hidden_regions_seeds_move_with_the_grading_seed_and_nothing_else_does():
    from grading_engine.evidence.instrument import reseed

    src = textwrap.dedent('''\
        g = torch.Generator().manual_seed(5)
        ### BEGIN HIDDEN TESTS
        g = torch.Generator().manual_seed(5); torch.manual_seed(0)  # é
        rng = np.random.default_rng(3)
        x = torch.randn(3, generator=torch.Generator().manual_seed(2 ** 31 - 1))
        ### END HIDDEN TESTS
        ''')
    out = reseed(src, 1000)
    assert out.splitlines()[0] == "g = torch.Generator().manual_seed(5)"  # visible: the student's own checks
    assert "manual_seed(1005); torch.manual_seed(1000)  # é" in out and "default_rng(1003)" in out
    assert "manual_seed(2 ** 31 - 1)" in out  # not a number as written: left alone
    assert len(out.splitlines()) == len(src.splitlines()) and reseed(src, 0) == src


def test_a_reseeded_reference_and_student_agree(reference):
    nb, _, _ = reference
    nb = nbformat.from_dict(json.loads(json.dumps(nb)))
    from grading_engine.evidence.instrument import reseed

    nb.cells[2].source = reseed(nb.cells[2].source, 77)
    a, _ = execute(nb, "na", seed=0)
    b, _ = execute(nb, "nb", seed=9)
    slices = slice_plans(nb, {"t": a}, {"t": b}, ["na", "nb"])
    records, _ = execute(nb, "ns", slices["t"])
    v = judge_cell("t", assert_plans(plans_of(nb)), records, a, b, "ns", ("na", "nb"), {"t": set(range(4, 16))},
                   slices["t"])
    assert v.ok, v.why
    assert "manual_seed(82)" in nb.cells[2].source


def test_a_tensor_of_a_class_the_notebook_defines_is_refused_and_flagged(reference):
    """A `torch.Tensor` subclass written in the notebook decides what its comparisons say in the student's
    process: the check scores zero and is flagged, whatever the values."""
    records, _ = execute(reference[0], "ns", reference[2]["t"])
    forged = json.loads(json.dumps(records))
    for r in forged:
        for s in (r.get("v") or {}).values():
            if s.get("t") == "a":
                s["main"], s["ty"] = True, "__main__._Yes"
    v = grade(reference, forged)
    assert not v.ok and v.flags[0]["kind"] == "comparison_forged" and "_Yes" in v.flags[0]["detail"]
