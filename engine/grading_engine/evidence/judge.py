"""Judge a test cell from its evidence, in the grader's process.

For each test cell the grader has

* the plan of its asserts (:mod:`grading_engine.evidence.instrument`): the tree of
  each assert and, for every leaf, whether it is *tainted* (may depend on the
  student's work);
* the records of the reference run (run A) and of the perturbed reference run
  (run B, every random generator moved before each cell): a leaf whose value
  is the same in A and B is *stable*;
* the records of the student's run.

A test cell earns its points only if its records are complete (``begin``,
one record per assert in the reference's order, ``done``) and every assert
holds when the grader redoes it: comparisons, ``torch.equal``,
``torch.allclose``, ``isinstance``, ``.all()``, ... are recomputed here with
numpy and plain Python on the reported values, never with a function the
student's code could have replaced. An untainted, stable leaf (a value the
test computes from its own inputs) must equal the reference run's value;
otherwise the test's own values were changed (a patched library function, a
redefined name) and the cell fails with a flag.

A *sliced* cell (:func:`_judge_sliced`; see
:func:`grading_engine.evidence.reference.slice_plans`) has no verdict of the
kernel at all: the kernel reported only the student's side of each check, the
grader takes the test's own values from run A, checks that the inputs the test
handed to the student's code are unchanged (the guards), redoes every check,
and writes the failure message itself. Whatever it cannot decide fails.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass, field

import numpy as np

from grading_engine.evidence.instrument import GUARD
from grading_engine.protocol import Flag, FlagKind, FlagSource, ValueTag

FLOAT_RTOL = 1e-6
FLOAT_ATOL = 1e-9


# ------------------------------------------------------------------ values


class Uncertain(Exception):
    """The grader cannot recompute this from the reported values."""


class Untrusted(Exception):
    """The check compares an object whose comparison methods the notebook defines."""


class LeafRaised(Exception):
    """The check reached a value whose evaluation raised in the kernel (the assert would have raised)."""

    def __init__(self, raised: Raised):
        super().__init__(f"{raised.ty.rsplit('.', 1)[-1]}: {raised.msg}" if raised.msg else raised.ty.rsplit(".", 1)[-1])
        self.raised = raised


@dataclass
class Arr:
    dt: str
    shape: tuple
    n: int
    kind: str
    h: str
    vals: np.ndarray | None
    full: bool
    st: list
    lib: str
    bases: list
    id: int | None = None

    @property
    def is_float(self) -> bool:
        return self.kind == "f"

    def item(self):
        if self.n != 1 or self.vals is None:
            raise Uncertain("not a one-element array")
        v = self.vals.reshape(-1)[0]
        return bool(v) if self.kind == "b" else (float(v) if self.kind == "f" else int(v))


@dataclass
class Elem:
    """An elementwise result (boolean array) computed by the grader."""

    vals: np.ndarray
    full: bool
    n: int


@dataclass(frozen=True)
class Const:
    v: str  # torch.dtype:torch.float32, ...


@dataclass
class TypeVal:
    q: str
    bases: list
    abc: bool
    main: bool


@dataclass
class Opaque:
    ty: str
    bases: list
    id: int | None
    truth: bool | None
    main: bool


@dataclass
class Raised:
    ty: str
    msg: str


@dataclass
class Seq:
    kind: str
    items: list
    n: int
    complete: bool
    bases: list = field(default_factory=list)
    id: int | None = None


@dataclass
class SetVal:
    items: list
    n: int
    complete: bool
    bases: list = field(default_factory=list)
    id: int | None = None


@dataclass
class DictVal:
    items: list
    n: int
    complete: bool
    bases: list = field(default_factory=list)
    id: int | None = None


PY_MRO = {bool: ["builtins.bool", "builtins.int", "builtins.object"], int: ["builtins.int", "builtins.object"],
          float: ["builtins.float", "builtins.object"], str: ["builtins.str", "builtins.object"],
          type(None): ["builtins.NoneType", "builtins.object"], complex: ["builtins.complex", "builtins.object"]}


def decode(s: dict):
    """The grader's reading of a value summary (:class:`grading_engine.protocol.ValueTag`); a summary of
    another shape raises ``ValueError`` (and the cell fails closed)."""
    t = s.get("t")
    if t == ValueTag.CONST:
        return s["v"]
    if t == ValueTag.INT:
        return int(s["v"])
    if t == ValueTag.FLOAT:
        return float(s["v"])
    if t == ValueTag.COMPLEX:
        v = s["v"]
        return complex(v[0], v[1]) if isinstance(v, list) else complex(v)
    if t == ValueTag.STR:
        if s.get("n", 0) > len(s["v"]):
            raise Uncertain("long string")
        return s["v"]
    if t == ValueTag.ARRAY:
        vals = None
        if "v" in s:
            raw = base64.b64decode(s["v"])
            dt = {"f": np.float64, "b": np.uint8}.get(s["k"], np.int64)
            vals = np.frombuffer(raw, dtype=dt)
            if s["k"] == "b":
                vals = vals.astype(bool)
            if s.get("full"):
                vals = vals.reshape(s["sh"])
        return Arr(s["dt"], tuple(s["sh"]), s["n"], s["k"], s["h"], vals, bool(s.get("full")), s.get("st", []),
                   s.get("lib", ""), s.get("mro", []), s.get("id"))
    if t == ValueTag.SEQUENCE:
        items = [decode(v) for v in s["v"]]
        return Seq(s["k"], items, s["n"], s["n"] == len(items), s.get("mro", []), s.get("id"))
    if t == ValueTag.SET:
        return SetVal([decode(v) for v in s["v"]], s["n"], s["n"] == len(s["v"]), s.get("mro", []), s.get("id"))
    if t == ValueTag.DICT:
        return DictVal([(decode(k), decode(v)) for k, v in s["v"]], s["n"], s["n"] == len(s["v"]), s.get("mro", []),
                       s.get("id"))
    if t == ValueTag.KEY:
        return Const(s["v"])
    if t == ValueTag.TYPE:
        return TypeVal(s["q"], s.get("mro", []), bool(s.get("abc")), bool(s.get("main")))
    if t == ValueTag.RAISED:
        return Raised(str(s.get("e", "?")), str(s.get("m", "")))
    if t == ValueTag.OPAQUE:
        return Opaque(s.get("ty", "?"), s.get("mro", []), s.get("id"), s.get("truth"), bool(s.get("main")))
    raise ValueError(f"a value summary of unknown type {t!r}")


def py(v):
    """A plain Python value for comparisons, or Uncertain."""
    if isinstance(v, (bool, int, float, str, complex)) or v is None:
        return v
    if isinstance(v, Arr):
        return v.item()
    if isinstance(v, Seq):
        if not v.complete:
            raise Uncertain("long sequence")
        items = tuple(py(x) for x in v.items)
        return list(items) if v.kind == "list" else items
    if isinstance(v, SetVal):
        if not v.complete:
            raise Uncertain("long set")
        return frozenset(py(x) for x in v.items)
    if isinstance(v, DictVal):
        if not v.complete:
            raise Uncertain("long dict")
        return {py(k): py(x) for k, x in v.items}
    if isinstance(v, (Const, TypeVal)):
        return v
    if isinstance(v, Elem):
        raise Uncertain("elementwise result used as a value")
    raise Uncertain(f"cannot compare {type(v).__name__}")


def truth(v) -> bool:
    if isinstance(v, Arr):
        if v.n == 1:
            return bool(v.item())
        raise Uncertain("truth value of an array with several elements")
    if isinstance(v, Elem):
        if v.n == 1:
            return bool(v.vals.reshape(-1)[0])
        raise Uncertain("truth value of an array with several elements")
    if isinstance(v, Opaque):
        if v.truth is None:
            raise Uncertain("truth value of an opaque object")
        return v.truth
    if isinstance(v, (TypeVal, Const)):
        return True
    if isinstance(v, (Seq, SetVal, DictVal)):
        return v.n > 0
    return bool(v)


def mro_of(v) -> list:
    if isinstance(v, (Arr, Opaque, Seq, SetVal, DictVal)):
        if not v.bases:
            raise Uncertain("type not reported")
        return v.bases
    if isinstance(v, TypeVal):
        return ["builtins.type", "builtins.object"]
    if isinstance(v, Const):
        return [v.v.split(":")[0], "builtins.object"]
    return PY_MRO.get(type(v)) or (_ for _ in ()).throw(Uncertain("type"))


# ----------------------------------------------------------- recomputation


def _arr_values(a) -> tuple[np.ndarray, bool]:
    if isinstance(a, Arr):
        if a.vals is None:
            raise Uncertain("array without values")
        return a.vals, a.full
    if isinstance(a, Elem):
        return a.vals, a.full
    return np.asarray(py(a)), True


def _elementwise(op: str, a, b) -> Elem:
    av, af = _arr_values(a)
    bv, bf = _arr_values(b)
    sa = a.shape if isinstance(a, Arr) else None
    sb = b.shape if isinstance(b, Arr) else None
    if not (af and bf):
        # samples line up only between arrays of one shape, or an array and a scalar
        if not ((sa is not None and sb is not None and sa == sb) or np.ndim(av) == 0 or np.ndim(bv) == 0
                or (isinstance(a, Arr) and a.n == 1) or (isinstance(b, Arr) and b.n == 1)):
            raise Uncertain("sampled arrays of different shapes")
    f = {"Eq": np.equal, "NotEq": np.not_equal, "Lt": np.less, "LtE": np.less_equal, "Gt": np.greater,
         "GtE": np.greater_equal}[op]
    with np.errstate(all="ignore"):
        r = np.asarray(f(av, bv), dtype=bool)
    n = int(max(a.n if isinstance(a, Arr) else r.size, b.n if isinstance(b, Arr) else r.size))
    return Elem(r, af and bf, n)


def identical(a, b) -> bool:
    """``a is b`` from the identities the kernel reported (both values from the same run)."""
    if isinstance(a, (TypeVal,)) and isinstance(b, TypeVal):
        return a.q == b.q
    if isinstance(a, Const) and isinstance(b, Const):
        return a.v == b.v
    if a is None or b is None or isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    ia, ib = getattr(a, "id", None), getattr(b, "id", None)
    if ia is None or ib is None:
        if isinstance(a, (int, float, str)) and isinstance(b, (int, float, str)):
            raise Uncertain("identity of plain values")
        return False
    return ia == ib


def compare(op: str, a, b):
    """``a op b`` with Python / torch semantics, on decoded values."""
    if op in ("Is", "IsNot"):
        same = identical(a, b)
        return same if op == "Is" else not same
    if isinstance(a, (Arr, Elem)) or isinstance(b, (Arr, Elem)):
        if op in ("In", "NotIn"):
            if isinstance(b, Arr):
                hit = _elementwise("Eq", a, b)
                found = bool(hit.vals.any())
                if not found and not hit.full:
                    raise Uncertain("membership in a sampled array")
                return found if op == "In" else not found
            raise Uncertain("array in a container")
        if (isinstance(a, Arr) and a.n == 1 and not isinstance(b, (Arr, Elem))) or (
                isinstance(b, Arr) and b.n == 1 and not isinstance(a, (Arr, Elem))):
            pass  # a one-element tensor against a number still gives a tensor: elementwise below
        return _elementwise(op, a, b)
    if isinstance(a, Opaque) or isinstance(b, Opaque):
        if (isinstance(a, Opaque) and a.main) or (isinstance(b, Opaque) and b.main):
            raise Untrusted("comparison of an object of a class defined in the notebook")
        raise Uncertain("comparison of opaque objects")
    pa, pb = py(a), py(b)
    if isinstance(pa, Const) or isinstance(pb, Const):
        if op in ("Eq", "NotEq"):
            eq = isinstance(pa, Const) and isinstance(pb, Const) and pa.v == pb.v
            if not eq and isinstance(pa, Const) != isinstance(pb, Const):
                other = pb if isinstance(pa, Const) else pa
                c = pa if isinstance(pa, Const) else pb
                if isinstance(other, str) and c.v.startswith("numpy.dtype:"):
                    eq = c.v.split(":", 1)[1] == other
            return eq if op == "Eq" else not eq
        if op in ("In", "NotIn") and isinstance(pb, (tuple, list, frozenset)):
            found = any(isinstance(x, Const) and isinstance(pa, Const) and x.v == pa.v for x in pb)
            return found if op == "In" else not found
        raise Uncertain("ordering of constants")
    if isinstance(pa, TypeVal) or isinstance(pb, TypeVal):
        if op in ("Eq", "NotEq"):
            eq = isinstance(pa, TypeVal) and isinstance(pb, TypeVal) and pa.q == pb.q
            return eq if op == "Eq" else not eq
        if op in ("In", "NotIn") and isinstance(pb, (tuple, list, frozenset)):
            found = any(isinstance(x, TypeVal) and isinstance(pa, TypeVal) and x.q == pa.q for x in pb)
            return found if op == "In" else not found
        raise Uncertain("ordering of types")
    if isinstance(b, DictVal) and op in ("In", "NotIn"):
        found = pa in pb
        return found if op == "In" else not found
    fn = {"Eq": lambda x, y: x == y, "NotEq": lambda x, y: x != y, "Lt": lambda x, y: x < y,
          "LtE": lambda x, y: x <= y, "Gt": lambda x, y: x > y, "GtE": lambda x, y: x >= y,
          "In": lambda x, y: x in y, "NotIn": lambda x, y: x not in y}[op]
    try:
        return fn(pa, pb)
    except TypeError as exc:
        raise Uncertain(str(exc)) from None


def _kw(kws: dict, name: str, default):
    v = kws.get(name, default)
    return float(py(v)) if not isinstance(v, bool) else v


def _close(a, b, rtol, atol, equal_nan=False, shapes_must_match=False) -> bool:
    if isinstance(a, Arr) and isinstance(b, Arr):
        if shapes_must_match and a.shape != b.shape:
            return False
        if not (a.full and b.full):
            if a.shape != b.shape:
                raise Uncertain("sampled arrays of different shapes")
            if a.dt == b.dt and a.h == b.h and a.st and b.st:
                return equal_nan or not (a.kind == "f" and (a.st[4] or b.st[4]))  # the same bytes
            av, bv = a.vals, b.vals
            if not np.allclose(av, bv, rtol=rtol, atol=atol, equal_nan=equal_nan):
                return False
            # necessary condition on the whole arrays: |sum(a) - sum(b)| <= n*atol + rtol*sum|b|
            if a.st and b.st and a.kind == b.kind == "f":
                if (a.st[4] or b.st[4]) and not equal_nan:
                    return False
                if abs(a.st[0] - b.st[0]) > a.n * atol + rtol * b.st[1] + 1e-9 * max(1.0, b.st[1]):
                    return False
            raise Uncertain("sampled arrays agree on the sample")
    av, _ = _arr_values(a)
    bv, _ = _arr_values(b)
    try:
        np.broadcast_shapes(np.shape(av), np.shape(bv))
    except ValueError:
        raise Uncertain("shapes do not broadcast") from None
    return bool(np.allclose(av, bv, rtol=rtol, atol=atol, equal_nan=equal_nan))


def _equal(a, b) -> bool:
    """torch.equal: same shape and same values (dtype may differ)."""
    if not (isinstance(a, Arr) and isinstance(b, Arr)):
        raise Uncertain("torch.equal on non-tensors")
    if a.shape != b.shape:
        return False
    if a.full and b.full:
        with np.errstate(all="ignore"):
            return bool(np.array_equal(a.vals, b.vals))
    if a.dt == b.dt and a.h == b.h:
        if a.kind == "f" and (a.st[4] or b.st[4]):
            return False  # NaN != NaN
        return True
    if not np.array_equal(a.vals, b.vals):
        return False
    if a.dt == b.dt:
        # same dtype, different bytes: different values, except -0.0 against 0.0
        raise Uncertain("sampled arrays differ only outside the sample (or in the sign of zeros)")
    raise Uncertain("sampled arrays of different dtypes agree on the sample")


def _reduce(kind: str, v) -> bool:
    if isinstance(v, Arr):
        if v.kind == "b" and v.st:
            count = v.st[0]
            return count == v.n if kind == "all" else count > 0
        if v.vals is None:
            raise Uncertain("array without values")
        vals, full = v.vals, v.full
    elif isinstance(v, Elem):
        vals, full = v.vals, v.full
    else:
        raise Uncertain(f".{kind}() of a non-array")
    r = bool(np.all(vals)) if kind == "all" else bool(np.any(vals))
    if full or (kind == "all" and not r) or (kind == "any" and r):
        return r
    raise Uncertain(f".{kind}() decided only on a sample")


def _isfinite(v):
    if isinstance(v, Arr):
        if v.kind != "f":
            return Elem(np.ones(max(1, v.n) if v.full else 1, dtype=bool), True, v.n)
        if not v.full:
            finite = (v.st[4] == 0 and math.isfinite(v.st[2]) and math.isfinite(v.st[3]))
            return Elem(np.array([finite]), True, 1) if finite else Elem(np.array([False]), True, 1)
        return Elem(np.isfinite(v.vals), True, v.n)
    x = py(v)
    return math.isfinite(x)


def call(name: str, args: list, kws: dict):
    if name == "isinstance":
        x, T = args
        types = T.items if isinstance(T, Seq) else [T]
        if not all(isinstance(t, TypeVal) for t in types):
            raise Uncertain("isinstance with a non-type")
        if any(t.abc for t in types):
            raise Uncertain("isinstance with an abstract base class")
        m = mro_of(x)
        return any(t.q in m for t in types)
    if name == "torch.equal":
        return _equal(*args)
    if name in ("np.array_equal", "numpy.array_equal"):
        a, b = args
        if isinstance(a, Arr) and isinstance(b, Arr):
            return _equal(a, b)
        return bool(np.array_equal(_arr_values(a)[0], _arr_values(b)[0]))
    if name in ("torch.allclose",):
        a, b = args[:2]
        rtol = _kw(kws, "rtol", args[2] if len(args) > 2 else 1e-5)
        atol = _kw(kws, "atol", args[3] if len(args) > 3 else 1e-8)
        equal_nan = bool(py(kws.get("equal_nan", args[4] if len(args) > 4 else False)))
        if not (isinstance(a, Arr) and isinstance(b, Arr)):
            raise Uncertain("allclose on non-tensors")
        return _close(a, b, rtol, atol, equal_nan)
    if name in ("np.allclose", "numpy.allclose"):
        a, b = args[:2]
        rtol = _kw(kws, "rtol", args[2] if len(args) > 2 else 1e-5)
        atol = _kw(kws, "atol", args[3] if len(args) > 3 else 1e-8)
        equal_nan = bool(py(kws.get("equal_nan", args[4] if len(args) > 4 else False)))
        return _close(a, b, rtol, atol, equal_nan)
    if name in ("torch.isclose", "np.isclose"):
        a, b = args[:2]
        rtol = _kw(kws, "rtol", args[2] if len(args) > 2 else 1e-5)
        atol = _kw(kws, "atol", args[3] if len(args) > 3 else 1e-8)
        av, af = _arr_values(a)
        bv, bf = _arr_values(b)
        if not (af and bf) and not (isinstance(a, Arr) and isinstance(b, Arr) and a.shape == b.shape):
            raise Uncertain("isclose of sampled arrays")
        with np.errstate(all="ignore"):
            r = np.isclose(av, bv, rtol=rtol, atol=atol)
        return Elem(np.asarray(r, dtype=bool), af and bf, max(getattr(a, "n", 1), getattr(b, "n", 1)))
    if name == "math.isclose":
        a, b = (float(py(x)) for x in args[:2])
        return math.isclose(a, b, rel_tol=_kw(kws, "rel_tol", 1e-9), abs_tol=_kw(kws, "abs_tol", 0.0))
    if name == "math.isfinite":
        return math.isfinite(float(py(args[0])))
    if name == "torch.isfinite":
        return _isfinite(args[0])
    if name in ("torch.all", "torch.any"):
        if len(args) != 1 or kws:
            raise Uncertain(f"{name} with a dim")
        return _reduce(name.split(".")[1], args[0])
    if name == "bool":
        if not args:
            return False
        return truth(args[0])
    raise Uncertain(f"unknown call {name}")


class Evaluator:
    """Redo one assert on values: ``values[path]`` is the decoded value of a leaf (missing: not evaluated)."""

    def __init__(self, values: dict):
        self.values = values
        self.uncertain: list[str] = []

    def run(self, tree: dict):
        k = tree["k"]
        if k == "v":
            if tree["p"] not in self.values:
                raise Uncertain(f"leaf {tree['p']} was not reported")
            value = self.values[tree["p"]]
            if isinstance(value, Raised):
                raise LeafRaised(value)
            return value
        if k == "not":
            return not truth(self.run(tree["x"]))
        if k in ("and", "or"):
            val = None
            for sub in tree["x"]:
                val = self.run(sub)
                t = truth(val)
                if (k == "and" and not t) or (k == "or" and t):
                    return val
            return val
        if k == "cmp":
            left = self.run(tree["x"][0])
            res = True
            ops = tree["ops"]
            for i, (op, leaf) in enumerate(zip(ops, tree["x"][1:])):
                right = self.run(leaf)
                res = compare(op, left, right)
                if i < len(ops) - 1 and not truth(res):
                    return res
                left = right
            return res
        if k == "call":
            args = [self.run(a) for a in tree["x"]]
            kws = {name: self.run(a) for name, a in tree.get("kw", [])}
            return call(tree["f"], args, kws)
        if k == "meth":
            return _reduce(tree["m"], self.run(tree["r"]))
        raise Uncertain(f"unknown node {k}")


# --------------------------------------------------------------- matching


def _strip(s):
    if isinstance(s, dict):
        return {k: _strip(v) for k, v in s.items() if k not in ("id", "mro", "main", "rg")}
    if isinstance(s, list):
        return [_strip(v) for v in s]
    return s


def same_value(a: dict, b: dict) -> bool:
    """Two leaf summaries hold the same value (floats within a tight tolerance)."""
    if a.get("t") != b.get("t"):
        if {a.get("t"), b.get("t")} <= {"i", "f"}:
            return math.isclose(float(a["v"]), float(b["v"]), rel_tol=FLOAT_RTOL, abs_tol=FLOAT_ATOL)
        return False
    t = a["t"]
    if t == "f":
        x, y = a["v"], b["v"]
        if isinstance(x, str) or isinstance(y, str):
            return x == y
        return math.isclose(x, y, rel_tol=FLOAT_RTOL, abs_tol=FLOAT_ATOL)
    if t == "a":
        if a["dt"] != b["dt"] or a["sh"] != b["sh"]:
            return False
        if a["h"] == b["h"]:
            return True
        try:
            da, db = decode(a), decode(b)
            if da.kind == "f" and da.vals is not None:
                if not np.allclose(da.vals, db.vals, rtol=FLOAT_RTOL, atol=FLOAT_ATOL, equal_nan=True):
                    return False
                return all(math.isclose(x, y, rel_tol=1e-5, abs_tol=1e-7) for x, y in zip(da.st, db.st))
        except Exception:
            return False
        return False
    if t in ("q", "set", "d"):
        va, vb = a.get("v", []), b.get("v", [])
        if a.get("n") != b.get("n") or len(va) != len(vb) or a.get("k") != b.get("k"):
            return False
        if t == "d":
            return all(same_value(x[0], y[0]) and same_value(x[1], y[1]) for x, y in zip(va, vb))
        return all(same_value(x, y) for x, y in zip(va, vb))
    if t == "o":
        return a.get("ty") == b.get("ty")  # objects: only their type can be compared across processes
    return json.dumps(_strip(a), sort_keys=True) == json.dumps(_strip(b), sort_keys=True)


def exact(s: dict) -> bool:
    """Does a summary stand for its whole value (so that two equal summaries are the same value)?"""
    t = s.get("t")
    if t in ("c", "i", "f", "x", "k", "type"):
        return True
    if t == "s":
        return s.get("n", 0) <= len(s.get("v", ""))
    if t == "a":
        return bool(s.get("h"))
    if t in ("q", "set", "d"):
        items = [x for pair in s.get("v", []) for x in pair] if t == "d" else s.get("v", [])
        return s.get("n") == len(s.get("v", [])) and all(exact(x) for x in items)
    return False


def same_exactly(a: dict, b: dict) -> bool:
    """Two exact summaries of the same value, to the bit."""
    if a.get("t") != b.get("t"):
        return False
    if a.get("t") == "a":
        return a.get("dt") == b.get("dt") and a.get("sh") == b.get("sh") and a.get("h") == b.get("h")
    if a.get("t") in ("q", "set", "d"):
        va, vb = a.get("v", []), b.get("v", [])
        if a.get("n") != b.get("n") or a.get("k") != b.get("k") or len(va) != len(vb):
            return False
        if a.get("t") == "d":
            return all(same_exactly(x[0], y[0]) and same_exactly(x[1], y[1]) for x, y in zip(va, vb))
        return all(same_exactly(x, y) for x, y in zip(va, vb))
    return json.dumps(_strip(a), sort_keys=True) == json.dumps(_strip(b), sort_keys=True)


@dataclass
class AssertVerdict:
    aid: int
    ok: bool
    why: str = ""
    recomputed: bool = False
    flags: list[str] = field(default_factory=list)


@dataclass
class CellVerdict:
    gid: str
    ok: bool
    why: str = ""
    checks: int = 0
    recomputed: int = 0
    flags: list[dict] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"gid": self.gid, "ok": self.ok, "why": self.why, "checks": self.checks,
                "recomputed": self.recomputed, "flags": self.flags}


def records_by_kind(records: list[dict], nonce: str) -> tuple[list[dict], bool, bool, list[dict]]:
    """(assert records, begin seen, done seen, records with a wrong nonce)."""
    asserts, begin, done, alien = [], False, False, []
    for r in records:
        if r.get("n") != nonce:
            alien.append(r)
            continue
        if r.get("k") == "begin":
            begin = True
        elif r.get("k") == "done":
            done = True
        elif r.get("k") == "a":
            asserts.append(r)
    return asserts, begin, done, alien


def branch_records(records: list[dict], nonce: str) -> dict[tuple, list[dict]]:
    """The reports of instrumented ``if``/``while`` conditions, by (grade_id, check id), in the order they ran."""
    out: dict[tuple, list[dict]] = {}
    for r in records:
        if r.get("n") == nonce and r.get("k") == "b":
            out.setdefault((r.get("g"), r.get("i")), []).append(r)
    return out


def _anchored(plan: dict, rec: dict, ref: dict | None, refb: dict | None) -> tuple[dict, str | None]:
    """Decoded leaf values of one report; a value the test computes itself comes from the reference run when
    both reference runs agree on it. Second item: the source of such a value that the student's run changed."""
    values = {}
    for path, leaf in plan["leaves"].items():
        sv = rec["v"].get(path)
        if sv is None:
            continue
        if not leaf["taint"] and ref is not None and refb is not None:
            ra, rb = ref["v"].get(path), refb["v"].get(path)
            if ra is not None and rb is not None and same_value(ra, rb):
                if not same_value(sv, ra):
                    return values, leaf["src"]
                sv = dict(ra, id=sv.get("id")) if "id" in sv else ra
        values[path] = decode(sv)
    return values, None


def judge_branches(gid: str, plans: dict, student: list[dict], ref_a: list[dict], ref_b: list[dict] | None,
                   nonce: str, ref_nonces: tuple[str, str | None]) -> CellVerdict | None:
    """Check every branch the kernel reports it took against the values it reported; a verdict when one
    does not hold (the cell scores zero), else None."""
    mine = branch_records(student, nonce)
    ref_runs = (branch_records(ref_a, ref_nonces[0]),
                branch_records(ref_b or [], ref_nonces[1] or "") if ref_b is not None else {})
    for key, recs in mine.items():
        plan = plans.get(key)
        if plan is None or not plan.get("branch"):
            v = CellVerdict(gid, False, why="evidence for a check that is not in the test")
            v.flags.append(_flag(FlagKind.FORGED_EVIDENCE, f"evidence for an unknown condition {key[1]}"))
            return v
        ra, rb = ref_runs[0].get(key, []), ref_runs[1].get(key, [])
        for j, rec in enumerate(recs):
            if rec.get("b") is None:
                continue  # the condition raised: the test's own flow decides what follows
            try:
                values, changed = _anchored(plan, rec, ra[j] if j < len(ra) else None,
                                            rb[j] if j < len(rb) else None)
            except Uncertain:
                continue  # a value the grader cannot read back whole (a long string): no recomputation
            line = plan.get("lineno")
            if changed is not None:
                v = CellVerdict(gid, False, why=f"a condition of the test (line {line}) uses a value the test "
                                                "computes itself that differs from the reference run")
                v.flags.append(_flag(FlagKind.TEST_VALUES_DIFFER, f"{gid}, condition on line {line}: "
                                                                  f"`{_clip(changed)}` differs from the reference run"))
                return v
            try:
                res = truth(Evaluator(values).run(plan["tree"]))
            except Uncertain:
                continue
            except Untrusted as exc:
                v = CellVerdict(gid, False, why=f"a condition of the test (line {line}) cannot be trusted: {exc}")
                v.flags.append(_flag(FlagKind.COMPARISON_FORGED, f"{gid}, condition on line {line}: {exc} (its "
                                                                 "__eq__ and friends are the student's)"))
                return v
            if res != rec["b"]:
                v = CellVerdict(gid, False, why=f"the test took a branch (line {line}) that the values it reported "
                                                "contradict")
                v.flags.append(_flag(FlagKind.COMPARISON_FORGED, f"{gid}, condition on line {line}: the kernel "
                                                                 f"reported {rec['b']}, its values give {res}"))
                return v
    return None


def _flag(kind: FlagKind, detail: str) -> dict:
    return Flag(kind, FlagSource.EVIDENCE, detail).to_json()


def judge_cell(gid: str, plans: dict, student: list[dict], ref_a: list[dict], ref_b: list[dict] | None,
               nonce: str, ref_nonces: tuple[str, str | None], hidden: dict | None = None,
               cut: dict | None = None) -> CellVerdict:
    """Verdict on one test cell. ``plans`` maps (gid, aid) -> assert plan dict (all cells of the notebook).

    ``hidden`` maps a grade_id to the line numbers of its hidden-test region: the reason given for a
    failure (which the student sees in the feedback) never quotes a hidden line.

    Fails closed: an unexpected exception while judging (a bug in the grader, evidence of a shape it does
    not know) scores the cell zero and raises a ``grader_error`` flag naming the exception.

    ``cut`` is the cell's slice when the kernel ran only the student's side of it (see
    :mod:`grading_engine.evidence.reference`): then no verdict of the kernel exists to consult.
    """
    try:
        replaced = sorted({k for r in student if r.get("n") == nonce for k in (r.get("x") or [])})
        if replaced:
            v = CellVerdict(gid, False, why="the grader's reporter in the kernel was replaced")
            v.flags.append(_flag(FlagKind.PATCHED_FUNCTION, f"{gid}: the notebook replaced the grader's "
                                                            f"{', '.join(map(str, replaced))[:120]} in the kernel"))
            return v
        own = sorted({s.get("ty", "?") for r in student if r.get("n") == nonce and r.get("k") in ("a", "b")
                      for s in (r.get("v") or {}).values() if isinstance(s, dict) and s.get("t") == ValueTag.ARRAY
                      and s.get("main")})
        if own:
            # a tensor or array of a class the notebook defines: its comparisons are the student's to write
            v = CellVerdict(gid, False, why=f"a check compares a tensor of a class your notebook defines ({own[0]})")
            v.flags.append(_flag(FlagKind.COMPARISON_FORGED, f"{gid}: a tensor of a class defined in the notebook "
                                                             f"({', '.join(own)[:120]})"))
            return v
        if cut is not None:
            return _judge_sliced(gid, plans, student, ref_a, ref_b, nonce, ref_nonces, hidden or {}, cut)
        return _judge_cell(gid, plans, student, ref_a, ref_b, nonce, ref_nonces, hidden or {})
    except Exception as exc:  # noqa: BLE001  (fail closed: whatever went wrong, no points without a verdict)
        return grader_error(gid, exc)


def grader_error(gid: str, exc: BaseException, where: str = "") -> CellVerdict:
    """The verdict when the grader could not judge a cell: zero, with a flag that names the exception."""
    what = f"{type(exc).__name__}: {_clip(str(exc), 200)}"
    v = CellVerdict(gid, False, why="the grader could not judge this test cell (scored zero); "
                                    "your instructor has been told")
    v.flags.append(_flag(FlagKind.GRADER_ERROR, f"{gid}{' ' + where if where else ''}: {what}"))
    return v


def _judge_cell(gid: str, plans: dict, student: list[dict], ref_a: list[dict], ref_b: list[dict] | None,
                nonce: str, ref_nonces: tuple[str, str | None], hidden: dict) -> CellVerdict:

    def where(rec) -> str:
        plan = plans.get((rec["g"], rec["i"])) or {}
        line = plan.get("lineno")
        if line is None or line in hidden.get(rec["g"], ()):
            return "a hidden check"
        return f"the check on line {line}" + ("" if rec["g"] == gid else f" of {rec['g']}")

    s_asserts, s_begin, s_done, alien = records_by_kind(student, nonce)
    a_asserts, a_begin, a_done, _ = records_by_kind(ref_a, ref_nonces[0])
    b_asserts, _, b_done, _ = records_by_kind(ref_b or [], ref_nonces[1] or "") if ref_b is not None else ([], 0, 0, [])
    v = CellVerdict(gid, False)
    if alien:
        v.flags.append(_flag(FlagKind.FORGED_EVIDENCE, f"{len(alien)} evidence record(s) that the grader "
                                                       "did not ask for"))
    if not (a_begin and a_done):
        # the reference itself did not complete this cell: nothing to compare against
        v.ok = s_done
        v.why = "reference run did not complete this cell; graded by completion only"
        return v
    if not s_begin:
        v.why = "the test cell did not run"
        return v
    if not s_done:
        v.why = "the test cell stopped before its end"
        return v
    ref_seq = [(r["g"], r["i"]) for r in a_asserts]
    stu_seq = [(r["g"], r["i"]) for r in s_asserts]
    b_seq = [(r["g"], r["i"]) for r in b_asserts]
    seq_stable = ref_b is not None and b_done and b_seq == ref_seq
    v.checks = len(s_asserts)
    if seq_stable and stu_seq != ref_seq:
        v.why = (f"the test cell ran {len(stu_seq)} check(s) where the reference ran {len(ref_seq)}"
                 if len(stu_seq) != len(ref_seq) else "the test cell's checks ran in another order")
        return v
    for k, rec in enumerate(s_asserts):
        plan = plans.get((rec["g"], rec["i"]))
        if plan is None:
            v.why = "evidence for a check that is not in the test"
            v.flags.append(_flag(FlagKind.FORGED_EVIDENCE, f"evidence for an unknown check {rec.get('i')}"))
            return v
        if rec.get("ok") is not True:
            v.why = f"{where(rec)} failed"
            return v
        if not plan.get("instrumented", True):
            continue
        ref = a_asserts[k] if seq_stable or (k < len(a_asserts) and ref_seq[k] == stu_seq[k]) else None
        refb = b_asserts[k] if seq_stable else None
        try:
            values, changed = _anchored(plan, rec, ref, refb)
            if changed is not None:
                shown = "" if where(rec) == "a hidden check" else f" `{_clip(changed)}`"
                v.why = f"{where(rec)}: a value the test computes itself{shown} differs from the reference run"
                v.flags.append(_flag(FlagKind.TEST_VALUES_DIFFER,
                                     f"{gid}, check {k + 1} (line {plan.get('lineno')}): `{_clip(changed)}` differs "
                                     "from the reference run (patched library function, redefined name, or inputs "
                                     "changed by the answer)"))
                return v
        except Uncertain:
            values = None
        if values is None:
            continue
        ev = Evaluator(values)
        try:
            res = truth(ev.run(plan["tree"]))
        except Untrusted as exc:
            v.why = f"{where(rec)} cannot be trusted: {exc}"
            v.flags.append(_flag(FlagKind.COMPARISON_FORGED,
                                 f"{gid}, check {k + 1} (line {plan.get('lineno')}): {exc} (its __eq__ and "
                                 "friends are the student's)"))
            return v
        except Uncertain:
            continue
        except Exception as exc:  # noqa: BLE001  (fail closed: a recomputation that crashes is no verdict)
            return grader_error(gid, exc, f"check {k + 1} (line {plan.get('lineno')})")
        v.recomputed += 1
        if not res:
            v.why = f"{where(rec)} does not hold when the grader recomputes it"
            v.flags.append(_flag(FlagKind.COMPARISON_FORGED,
                                 f"{gid}, check {k + 1} (line {plan.get('lineno')}): the kernel reported "
                                 "success but the values it reported fail the check (patched comparison or "
                                 "hidden failure)"))
            return v
    return _unless_a_branch_is_forged(v, gid, plans, student, ref_a, ref_b, nonce, ref_nonces)


def _unless_a_branch_is_forged(v: CellVerdict, gid: str, plans: dict, student: list[dict], ref_a: list[dict],
                               ref_b: list[dict] | None, nonce: str, ref_nonces: tuple) -> CellVerdict:
    """The last step of judging a cell whose checks all held: it passes unless a branch it took is forged."""
    forged = judge_branches(gid, plans, student, ref_a, ref_b, nonce, ref_nonces)
    if forged is not None:
        forged.checks, forged.recomputed = v.checks, v.recomputed
        return forged
    v.ok = True
    v.why = ""
    return v


def render(v, conversion: int = 115, spec: str | None = None) -> str:
    """A reported value as an f-string's replacement field would show it (near enough for a message)."""
    if isinstance(v, Raised):
        return f"<{v.ty.rsplit('.', 1)[-1]} raised>"
    if isinstance(v, Arr):
        if v.vals is None or not v.full:
            return f"<{v.dt} of shape {tuple(v.shape)}>"
        if v.n == 1 and not v.shape:
            v = v.item()
        else:
            body = np.array2string(np.asarray(v.vals), separator=", ", threshold=64)
            return f"tensor({body})" if v.lib == "torch" else f"array({body})"
    if isinstance(v, Seq) and v.kind == "size" and v.complete:
        return f"torch.Size({[py(x) for x in v.items]})"
    if isinstance(v, Const):
        return v.v.split(":", 1)[1] if ":" in v.v else v.v
    if isinstance(v, TypeVal):
        return f"<class '{v.q.removeprefix('builtins.')}'>"
    if isinstance(v, Opaque):
        return f"<{v.ty.rsplit('.', 1)[-1]} object>"
    try:
        x = py(v)
    except Uncertain:
        return "<...>"
    if conversion == 114:
        x = repr(x)
    elif conversion == 97:
        x = ascii(x)
    try:
        return format(x, spec or "")
    except (TypeError, ValueError):
        return str(x)


def render_message(template: list | None, values: dict) -> str:
    """An assert's message, written by the grader from its literal text and the values it shows."""
    if not template:
        return ""
    out = []
    for part in template:
        if "s" in part:
            out.append(part["s"])
            continue
        v = values.get(part["p"])
        out.append("<?>" if v is None else render(v, part.get("c", 115), part.get("f")))
    return "".join(out)


def _unchanged(mine: dict | None, ref: dict | None) -> bool:
    return mine is not None and ref is not None and exact(ref) and same_exactly(mine, ref)


def _sliced_values(plan: dict, rec: dict, ref: dict | None, anchored: set) -> dict:
    """The values of one check of a sliced cell: the anchored ones from the reference run, the others as the
    student's kernel reported them."""
    values = {}
    for path in list(plan["leaves"]) + list(plan.get("mleaves") or {}):
        if path in anchored:
            sv = (ref or {}).get("v", {}).get(path)
        else:
            sv = rec.get("v", {}).get(path)
        if sv is not None:
            values[path] = decode(sv)
    return values


def _judge_sliced(gid: str, plans: dict, student: list[dict], ref_a: list[dict], ref_b: list[dict] | None,
                  nonce: str, ref_nonces: tuple[str, str | None], hidden: dict, cut: dict) -> CellVerdict:
    """A sliced cell: the kernel reported the student's side of each check; the grader puts the reference's
    values beside it, redoes every check, and decides alone. Whatever it cannot decide fails."""
    s_asserts, s_begin, s_done, alien = records_by_kind(student, nonce)
    a_asserts, a_begin, a_done, _ = records_by_kind(ref_a, ref_nonces[0])
    v = CellVerdict(gid, False)
    if alien:
        v.flags.append(_flag(FlagKind.FORGED_EVIDENCE, f"{len(alien)} evidence record(s) that the grader "
                                                       "did not ask for"))
    if not s_begin:
        v.why = "the test cell did not run"
        return v
    anchored = {int(k): set(p) for k, p in (cut.get("anchored") or {}).items()}
    ref_seq = [(r["g"], r["i"]) for r in a_asserts]
    v.checks = len(s_asserts)
    for k, rec in enumerate(s_asserts):
        key = (rec.get("g"), rec.get("i"))
        plan = plans.get(key)
        if plan is None or rec.get("g") != gid:
            v.why = "evidence for a check that is not in the test"
            v.flags.append(_flag(FlagKind.FORGED_EVIDENCE, f"evidence for an unknown check {rec.get('i')}"))
            return v
        line = plan.get("lineno")
        hidden_check = line is None or line in hidden.get(gid, ())
        where = "a hidden check" if hidden_check else f"the check on line {line}"
        if not plan.get("instrumented", True):
            continue  # an assert the grader cannot rewrite ran as written: it raised, or it held
        mine = anchored.get(rec["i"], set())
        ref = a_asserts[k] if k < len(ref_seq) and ref_seq[k] == key else None
        if mine and ref is None:
            v.why = f"{where}: the test ran its checks in another order than the reference"
            return v
        changed = [g for g in (cut.get("guards") or {}).get(str(rec["i"]), ())
                   if not _unchanged(rec.get("v", {}).get(GUARD + g), (ref or {}).get("v", {}).get(GUARD + g))]
        if changed:
            v.why = f"{where} failed: your code changed `{changed[0]}`, a value the test passed to it"
            return v
        try:
            values = _sliced_values(plan, rec, ref, mine)
            res = truth(Evaluator(values).run(plan["tree"]))
        except LeafRaised as exc:
            v.why = f"{where} raised {exc}"
            return v
        except Untrusted as exc:
            v.why = f"{where} cannot be trusted: {exc}"
            v.flags.append(_flag(FlagKind.COMPARISON_FORGED, f"{gid}, check {k + 1} (line {line}): {exc} (its "
                                                             "__eq__ and friends are the student's)"))
            return v
        except Uncertain as exc:
            v.why = f"{where} failed: the grader cannot compare the values your code gave ({exc})"
            return v
        except Exception as exc:  # noqa: BLE001  (fail closed)
            return grader_error(gid, exc, f"check {k + 1} (line {line})")
        v.recomputed += 1
        if not res:
            text = render_message(plan.get("message"), values)
            v.why = f"{where} failed" + (f": {text}" if text else "")
            return v
    stu_seq = [(r.get("g"), r.get("i")) for r in s_asserts]
    if len(stu_seq) > len(ref_seq) or (s_done and stu_seq != ref_seq):
        v.why = (f"the test cell ran {len(stu_seq)} check(s) where the reference ran {len(ref_seq)}"
                 if len(stu_seq) != len(ref_seq) else "the test cell's checks ran in another order")
        return v
    if not s_done:
        v.why = "the test cell stopped before its end"
        return v
    return _unless_a_branch_is_forged(v, gid, plans, student, ref_a, ref_b, nonce, ref_nonces)


def _clip(s: str, n: int = 60) -> str:
    return s if len(s) <= n else s[: n - 3] + "..."
