"""What crosses the sandbox wall, written once (grading_engine.protocol) and read back the same way.

Every value type the kernel's probe summarises goes through JSON, as it does on the wire, and the
grader's decoder gives back the value (or, for objects, what can honestly be said of them); every flag
kind has its report sentence and survives the record's JSON.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from grading_engine.evidence.judge import Arr, Const, Opaque, Raised, Seq, SetVal, TypeVal, decode, py
from grading_engine.kernel import probe
from grading_engine.protocol import EVIDENCE_MIME, Flag, FlagKind, FlagSource, ValueTag
from grading_engine.record import KIND_TEXT

pytestmark = pytest.mark.evidence


class Widget:
    """An object the grader can only know by its type."""


def wire(x):
    probe.capture()
    return json.loads(json.dumps(probe.summarize(x)))


PLAIN = {  # value -> what the grader must read back, as a plain Python value
    "none": (None, None),
    "true": (True, True),
    "int": (42, 42),
    "big_int": (2 ** 70 + 1, 2 ** 70 + 1),
    "float": (0.1 + 0.2, 0.1 + 0.2),
    "text": ("héllo", "héllo"),
    "complex": (1.5 - 2j, 1.5 - 2j),
    "list": ([1, 2.5, "a"], [1, 2.5, "a"]),
    "tuple": ((1, (2, 3)), (1, (2, 3))),
    "set": ({3, 1, 2}, frozenset({1, 2, 3})),
    "dict": ({"a": 1, "b": [2]}, {"a": 1, "b": (2,)}),
    "numpy_scalar": (np.float32(0.5), 0.5),
}


@pytest.mark.parametrize("name", sorted(PLAIN))
def test_plain_values_round_trip(name):
    value, expected = PLAIN[name]
    got = py(decode(wire(value)))
    if name == "dict":
        assert {k: (tuple(v) if isinstance(v, list) else v) for k, v in got.items()} == expected
    else:
        assert got == expected and type(got) is type(expected)


def test_non_finite_floats_round_trip():
    assert math.isnan(decode(wire(float("nan"))))
    assert decode(wire(float("-inf"))) == float("-inf")


@pytest.mark.parametrize("value", [
    torch.arange(12, dtype=torch.float32).reshape(3, 4) / 7,
    torch.tensor([[True, False]]),
    torch.arange(6, dtype=torch.int64),
    torch.ones(2, 3, dtype=torch.bfloat16) * 1.5,
    np.linspace(0.0, 1.0, 9).reshape(3, 3),
], ids=["float32", "bool", "int64", "bfloat16", "numpy"])
def test_arrays_round_trip_whole(value):
    arr = decode(wire(value))
    as_np = value.float().numpy() if isinstance(value, torch.Tensor) and value.dtype == torch.bfloat16 else (
        value.numpy() if isinstance(value, torch.Tensor) else value)
    assert isinstance(arr, Arr) and arr.full and arr.shape == tuple(value.shape)
    assert np.array_equal(arr.vals, as_np.astype(arr.vals.dtype))
    assert arr.dt == str(value.dtype) if isinstance(value, torch.Tensor) else arr.dt == f"numpy.{value.dtype}"


def test_a_large_tensor_is_sampled_with_exact_statistics():
    value = torch.arange(probe.FULL + 10_000, dtype=torch.float64)
    arr = decode(wire(value))
    assert not arr.full and arr.n == probe.FULL + 10_000 and len(arr.vals) == probe.SAMPLE
    assert arr.st[0] == float(value.sum()) and arr.st[2] == 0.0 and arr.st[3] == probe.FULL + 9999.0
    assert arr.vals[0] == 0.0 and arr.vals[-1] == probe.FULL + 9999.0


def test_sizes_types_keys_and_objects_round_trip():
    size = decode(wire(torch.Size([2, 3])))
    assert isinstance(size, Seq) and size.kind == "size" and py(size) == (2, 3)
    assert isinstance(decode(wire(frozenset({"x"}))), SetVal)
    assert decode(wire(torch.float16)) == Const("torch.dtype:torch.float16")
    assert decode(wire(torch.device("cpu"))) == Const("torch.device:cpu")
    klass = decode(wire(torch.nn.Linear))
    assert isinstance(klass, TypeVal) and klass.q == "torch.nn.modules.linear.Linear"
    assert "torch.nn.modules.module.Module" in klass.bases
    obj = decode(wire(Widget()))
    assert isinstance(obj, Opaque) and obj.ty.endswith("Widget") and obj.truth is True


def raised_leaf():
    """The kernel's report of a value whose evaluation raised (a sliced cell's leaf)."""
    def boom():
        raise KeyError("no such row")

    return json.loads(json.dumps(probe._leaves({}, [("0.0", boom)])["0.0"]))


def test_every_value_tag_is_written_by_the_kernel_and_read_by_the_grader():
    samples = [None, 1, 1.0, "s", 1j, torch.zeros(1), [1], {1}, {1: 2}, int, torch.float32, Widget()]
    seen = {wire(x)["t"] for x in samples} | {raised_leaf()["t"]}
    assert seen == {tag.value for tag in ValueTag}, f"tags without a round trip: {set(ValueTag) - seen}"
    for s in [wire(x) for x in samples] + [raised_leaf()]:
        decode(s)


def test_a_value_that_raised_reads_back_as_its_exception():
    r = decode(raised_leaf())
    assert isinstance(r, Raised) and r.ty == "builtins.KeyError" and "no such row" in r.msg


def test_a_summary_of_unknown_type_is_refused():
    with pytest.raises(ValueError, match="unknown type"):
        decode({"t": "forged"})


def test_flag_kinds_have_their_sentences_and_survive_json():
    assert set(KIND_TEXT) == {k.value for k in FlagKind} and all(KIND_TEXT.values())
    for kind in FlagKind:
        flag = Flag(kind, FlagSource.EVIDENCE, "detail", "cell 3")
        assert Flag.from_json(json.loads(json.dumps(flag.to_json()))) == flag
    assert EVIDENCE_MIME.startswith("application/") and EVIDENCE_MIME.endswith("+json")


def test_the_records_of_a_cell_reach_the_grader_in_order_in_few_outputs(monkeypatch):
    """The probe's records, published in batches as display outputs, read back by the grader in order."""
    from grading_engine.evidence.reference import evidence_of

    outputs = []
    monkeypatch.setattr(probe, "_publish", lambda data, metadata=None: outputs.append(
        {"output_type": "display_data", "data": json.loads(json.dumps(data)), "metadata": metadata}))
    probe.begin("n", "g")
    for i in range(probe.FLUSH_RECORDS + 10):
        probe._emit({"k": "b", "n": "n", "g": "g", "i": 0, "b": i % 2 == 0, "v": {"0": wire(i)}})
    assert len(outputs) == 1  # one full batch so far; the rest waits for the cell's end
    probe.done("n", "g")
    assert len(outputs) == 2 and not probe._pending
    recs = evidence_of({"outputs": outputs})
    assert [r["k"] for r in recs] == ["begin"] + ["b"] * (probe.FLUSH_RECORDS + 10) + ["done"]
    assert [py(decode(r["v"]["0"])) for r in recs[1:-1]] == list(range(probe.FLUSH_RECORDS + 10))


def test_big_records_are_published_before_their_batch_grows_past_its_byte_budget(monkeypatch):
    outputs = []
    monkeypatch.setattr(probe, "_publish", lambda data, metadata=None: outputs.append(data[EVIDENCE_MIME]))
    big = wire(torch.arange(16384, dtype=torch.float64))
    for _ in range(12):
        probe._emit({"k": "a", "n": "n", "g": "g", "i": 0, "v": {"0": big}})
    probe._flush()
    assert sum(len(o) for o in outputs) == 12 and len(outputs) > 1
    assert all(len(json.dumps(o)) < 2 * probe.FLUSH_BYTES for o in outputs)


@pytest.mark.parametrize("payload", [{"k": "a", "n": "n"}, "not json", 3, None, ["text", 4]])
def test_evidence_data_that_is_not_a_list_of_records_holds_none(payload):
    from grading_engine.protocol import evidence_records

    assert evidence_records(payload) == []
    assert evidence_records(json.dumps([{"k": "a"}, "x"])) == [{"k": "a"}]


# ------------------------------------------------------------------ warm kernels: launcher <-> fork server

def _request(**changes):
    from grading_engine.protocol import WarmRequest

    fields = dict(kernel_id="123-ab_c", workdir_name="ex01", env={"HOME": "/home/student"},
                  rlimits={"RLIMIT_AS": (2**32, 2**32)}, tmp_mb=512, kernel_args=["-f", "/run/kernel/c.json"],
                  preload=["numpy", "torch"], watch=[], uid=200_123)
    fields.update(changes)
    return WarmRequest(**fields)


def test_a_warm_request_survives_the_wire():
    from grading_engine.protocol import WarmRequest

    for req in (_request(), _request(uid=None, preload=None, watch=["course"])):
        assert WarmRequest.from_bytes(req.to_bytes()) == req


@pytest.mark.parametrize("change", [
    {"kernel_id": "../other"}, {"kernel_id": ""}, {"workdir_name": ".."}, {"workdir_name": "a/b"},
    {"rlimits": {"AS": (1, 1)}}, {"rlimits": {"RLIMIT_AS": (1.5, 2)}}, {"uid": "0"}, {"env": {"A": 1}},
    {"kernel_args": "-f x"}, {"tmp_mb": True},
])
def test_the_server_refuses_a_malformed_request(change):
    from grading_engine.protocol import WarmRequest

    with pytest.raises(ValueError):
        WarmRequest.from_bytes(_request(**change).to_bytes())
    d = json.loads(_request().to_bytes())
    d["extra"] = 1
    with pytest.raises(ValueError):
        WarmRequest.from_bytes(json.dumps(d).encode())


def test_warm_replies_survive_the_wire():
    from grading_engine.protocol import WarmEvent, WarmReply

    for event in WarmEvent:
        reply = WarmReply(event, 3, "why")
        assert WarmReply.from_bytes(reply.to_bytes()) == reply
    for bad in (b'{"event": "done", "code": 0, "detail": ""}', b'{"event": "exited", "code": "0", "detail": ""}',
                b"[]"):
        with pytest.raises(ValueError):
            WarmReply.from_bytes(bad)


def test_a_preload_entry_imports_a_module_or_reads_a_name_as_from_import_does(tmp_path, monkeypatch):
    """``module:name`` does what ``from module import name`` does: it reads the name (a lazy package loads
    the submodule behind it then, as transformers does for its classes) or imports the submodule."""
    import sys

    from grading_engine.protocol import import_preload

    pkg = tmp_path / "lazypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(
        "import importlib\n"
        "def __getattr__(name):\n"
        "    if name == 'Heavy':\n"
        "        return importlib.import_module('lazypkg.heavy').Heavy\n"
        "    raise AttributeError(name)\n")
    (pkg / "heavy.py").write_text("class Heavy: pass\n")
    (pkg / "sub.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for m in ("lazypkg", "lazypkg.heavy", "lazypkg.sub"):
        monkeypatch.delitem(sys.modules, m, raising=False)
    import_preload("lazypkg")
    assert "lazypkg" in sys.modules and "lazypkg.heavy" not in sys.modules
    import_preload("lazypkg:Heavy")
    assert "lazypkg.heavy" in sys.modules
    import_preload("lazypkg:sub")
    assert sys.modules["lazypkg.sub"].X == 1
    with pytest.raises(ImportError):
        import_preload("lazypkg:nothing_of_that_name")
    with pytest.raises(ImportError):
        import_preload("no_such_module_here")
