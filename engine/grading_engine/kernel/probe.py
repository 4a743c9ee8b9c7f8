"""Runs inside the grading kernel: test evidence and a report on interpreter hooks.

Instrumented test cells (see :mod:`grading_engine.evidence.instrument`) call
:func:`begin`, :func:`check` for each ``assert`` and :func:`done`. Each call
makes one record of what the assert observed: a summary of every operand
(type, shape, dtype, values or a sample of them, a hash of the exact bytes)
and the kernel's own outcome. The records of a cell travel together, as the
list of a display output of MIME type ``application/vnd.course.evidence+json``
(:data:`grading_engine.protocol.EVIDENCE_MIME`), published at the cell's
:func:`done`, when IPython has run the cell (one that raised before its
``done``), and every :data:`FLUSH_RECORDS` records or :data:`FLUSH_BYTES`
bytes. A loop that checks as it goes makes thousands of records: one message
each cost the kernel and the grader more than the checks themselves. The
grader decides from these, in its own process; nothing here decides a grade.

:func:`final` (a cell the grader appends to the notebook) reports what
changed in the interpreter since the kernel started: IPython input and AST
transformers, custom exception handlers, trace and profile functions,
``sys.excepthook``, import hooks, builtins, signal handlers, and any
replaced function or method of ``torch``, ``torch.nn.functional``,
``torch.Tensor``, ``numpy``, ``math`` and ``operator``.

Everything here runs in a process the student's code controls: it can be
fooled by code written against it. The grader never trusts an outcome it can
recompute, and the static scan and the audit stream report the tampering
such code needs.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import operator
import signal
import sys
import threading

from grading_engine.protocol import EVIDENCE_MIME

FULL = 16384  # arrays up to this many elements are sent whole (a sliced check needs them whole to be decided)
SAMPLE = 1024  # larger arrays: this many elements at fixed positions, plus statistics and a hash
MAX_ITEMS = 64
MAX_TEXT = 4000
FLUSH_RECORDS = 256  # records per display output at most
FLUSH_BYTES = 1 << 20  # and about this many bytes of JSON

_orig: dict = {}
_snap: dict = {}
_final_state: dict = {}
_shell = None
_publish = None
_pending: list[dict] = []  # records not published yet
_pending_bytes = [0]
_b64 = base64.b64encode
_sha = hashlib.sha256
_dumps = json.dumps
_ops = {
    "Eq": operator.eq, "NotEq": operator.ne, "Lt": operator.lt, "LtE": operator.le, "Gt": operator.gt,
    "GtE": operator.ge, "Is": operator.is_, "IsNot": operator.is_not,
    "In": lambda a, b: a in b, "NotIn": lambda a, b: a not in b,
}
WATCH_MODULES = ("torch", "torch.nn.functional", "torch.testing", "numpy", "numpy.testing", "math", "operator",
                 "builtins", "torch.linalg")
BUILTINS = ("isinstance", "issubclass", "len", "abs", "all", "any", "bool", "int", "float", "str", "repr", "print",
            "open", "__import__", "__build_class__", "getattr", "setattr", "hasattr", "delattr", "type", "sum", "min",
            "max", "sorted", "round", "id", "hash", "iter", "next", "exec", "eval", "compile", "range", "list",
            "tuple", "dict", "set", "frozenset", "zip", "map", "filter", "enumerate", "callable", "object", "super",
            "vars", "dir", "globals", "locals", "AssertionError", "Exception", "BaseException", "KeyboardInterrupt",
            "SystemExit")
WATCH_CLASSES = (("torch", "Tensor"), ("torch.nn", "Module"), ("torch.nn", "Parameter"))


# ----------------------------------------------------------------- start-up


def preload() -> None:
    """Import numpy and torch (the course's notebooks all do) and keep the functions we use."""
    for name in ("numpy", "torch"):
        try:
            __import__(name)
        except Exception:
            pass
    capture()


def capture() -> None:
    np = sys.modules.get("numpy")
    torch = sys.modules.get("torch")
    if np is not None:
        _orig["np"] = np
        _orig["ndarray"] = np.ndarray
        _orig["generic"] = np.generic
        _orig["np.asarray"] = np.asarray
        _orig["np.ascontiguousarray"] = np.ascontiguousarray
        _orig["np.linspace"] = np.linspace
        _orig["np.isnan"] = np.isnan
    if torch is not None:
        base = torch._C.TensorBase
        _orig["torch"] = torch
        _orig["Tensor"] = torch.Tensor
        _orig["Size"] = torch.Size
        _orig["dtype"] = torch.dtype
        _orig["device"] = torch.device
        for m in ("detach", "cpu", "numpy", "contiguous", "to", "numel", "dim", "is_complex",
                  "is_floating_point", "resolve_conj", "resolve_neg"):
            _orig["T." + m] = getattr(base, m)
        _orig["float32"] = torch.float32
        _orig["float64"] = torch.float64
        _orig["bfloat16"] = torch.bfloat16
        _orig["float16"] = torch.float16
        _orig["no_torch_function"] = getattr(torch._C, "DisableTorchFunctionSubclass", None)
        _orig["no_grad"] = torch.no_grad


def attach(shell) -> None:
    """Remember the interpreter's state once IPython is set up; mark cell boundaries in the audit stream."""
    global _shell, _publish
    _shell = shell
    from IPython.display import publish_display_data

    _publish = publish_display_data
    capture()
    from grading_engine.kernel import audit

    def pre_run_cell(info=None):
        # IPython swaps excepthook, displayhook, SIGINT and a few builtins around a cell's code: both states
        # are taken at this same moment, the first before the first cell (no student code can run earlier),
        # the last before the grader's final cell
        if "lists" not in _snap:
            _snap.update(_state(shell))
            _snap["callbacks"] = {k: list(v) for k, v in shell.events.callbacks.items()}
        elif f"{'__course_ev__'}.final(" in (getattr(info, "raw_cell", "") or ""):
            _final_state.clear()
            _final_state.update(_state(shell))
        audit.emit("cell", getattr(shell, "execution_count", None))

    def post_run_cell(result=None):
        _flush()  # the records of a cell that raised before its done()

    _snap["marker"] = pre_run_cell
    _snap["flusher"] = post_run_cell
    shell.events.register("pre_run_cell", pre_run_cell)
    shell.events.register("post_run_cell", post_run_cell)


def _qual(obj) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', getattr(obj, '__name__', '?'))}"


def _state(shell) -> dict:
    st: dict = {}
    tm = getattr(shell, "input_transformer_manager", None)
    lists = {
        "input_transformers_cleanup": getattr(shell, "input_transformers_cleanup", None),
        "input_transformers_post": getattr(shell, "input_transformers_post", None),
        "ast_transformers": getattr(shell, "ast_transformers", None),
        "transformer_manager.cleanup_transforms": getattr(tm, "cleanup_transforms", None),
        "transformer_manager.line_transforms": getattr(tm, "line_transforms", None),
        "transformer_manager.token_transformers": getattr(tm, "token_transformers", None),
        "sys.meta_path": sys.meta_path,
        "sys.path_hooks": sys.path_hooks,
    }
    st["lists"] = {k: [id(x) for x in v] if isinstance(v, list) else None for k, v in lists.items()}
    st["objs"] = {
        "shell.custom_exceptions": getattr(shell, "custom_exceptions", ()),
        "shell.CustomTB": getattr(shell, "CustomTB", None),
        "shell.showtraceback": shell.__dict__.get("showtraceback"),
        "shell._showtraceback": shell.__dict__.get("_showtraceback"),
        "shell.run_cell": shell.__dict__.get("run_cell"),
        "shell.run_code": shell.__dict__.get("run_code"),
        "shell.run_ast_nodes": shell.__dict__.get("run_ast_nodes"),
        "shell.transform_cell": shell.__dict__.get("transform_cell"),
        "shell.display_pub": getattr(shell, "display_pub", None),
        "shell.compile": getattr(shell, "compile", None),
        "shell.input_transformer_manager": tm,
        "sys.excepthook": sys.excepthook,
        "sys.displayhook": sys.displayhook,
        "sys.breakpointhook": sys.breakpointhook,
        "sys.unraisablehook": sys.unraisablehook,
        "sys.stdout": sys.stdout,
        "sys.stderr": sys.stderr,
        "SIGINT handler": signal.getsignal(signal.SIGINT),
        "SIGTERM handler": signal.getsignal(signal.SIGTERM),
        "SIGALRM handler": signal.getsignal(signal.SIGALRM),
    }
    st["trace"] = (sys.gettrace(), sys.getprofile(), getattr(threading, "_trace_hook", None),
                   getattr(threading, "_profile_hook", None))
    watched = {}
    for modname in WATCH_MODULES:
        mod = sys.modules.get(modname)
        if mod is None:
            continue
        for k, v in list(vars(mod).items()):
            if modname == "builtins":
                if k in BUILTINS:
                    watched[f"builtins.{k}"] = v
            elif not k.startswith("__") and callable(v):
                watched[f"{modname}.{k}"] = v
    for modname, clsname in WATCH_CLASSES:
        cls = getattr(sys.modules.get(modname), clsname, None)
        if cls is None:
            continue
        for k, v in list(vars(cls).items()):
            watched[f"{modname}.{clsname}.{k}"] = v
    st["watched"] = watched
    st["modules"] = {k: sys.modules.get(k) for k in ("torch", "numpy", "math", "builtins", "course",
                                                     "grading_engine.kernel.probe", "IPython")}
    st["threads"] = {t.ident for t in threading.enumerate()}
    return st


def state_report() -> list[dict]:
    """What changed in the interpreter since :func:`attach`: a list of findings."""
    if _shell is None:
        return [{"k": "probe", "d": "the probe was never attached to IPython"}]
    if "lists" not in _snap:
        return [{"k": "ipython_hook", "d": "the grader's pre_run_cell callback never ran"}]
    now = dict(_final_state) if _final_state else _state(_shell)
    out: list[dict] = []
    for k, ids in _snap["lists"].items():
        cur = now["lists"].get(k)
        if ids is None or cur is None:
            continue
        added = [i for i in cur if i not in ids]
        removed = [i for i in ids if i not in cur]
        if added or removed:
            if k in ("sys.meta_path", "sys.path_hooks"):
                # only hooks defined in the notebook count; libraries add finders of their own
                objs = sys.meta_path if k == "sys.meta_path" else sys.path_hooks
                mine = [_qual(o if isinstance(o, type) else type(o)) for o in objs
                        if id(o) in added and _from_notebook(o)]
                if not mine and not removed:
                    continue
                out.append({"k": "import_hook", "d": f"{k} changed: {mine or 'entries removed'}"})
                continue
            out.append({"k": "ipython_hook", "d": f"{k}: {len(added)} added, {len(removed)} removed"})
    for k, v in _snap["objs"].items():
        cur = now["objs"].get(k)
        if cur is not v and not _same_function(cur, v) and not (
                type(cur) is type(v) and not _from_notebook(type(cur)) and not callable(cur)
                or type(cur) is type(v) and getattr(cur, "__func__", None) is getattr(v, "__func__", 0)):
            kind = "signal_handler" if "handler" in k else ("ipython_hook" if k.startswith("shell.")
                                                            else "interpreter_hook")
            out.append({"k": kind, "d": f"{k} replaced by {_short(now['objs'].get(k))}"})
    names = ("sys.settrace", "sys.setprofile", "threading.settrace", "threading.setprofile")
    for name, before, after in zip(names, _snap["trace"], now["trace"]):
        if after is not before:
            out.append({"k": "trace_hook", "d": f"{name} set to {_short(after)}"})
    for k, v in _snap["watched"].items():
        cur = now["watched"].get(k, _MISSING)
        if cur is _MISSING:
            out.append({"k": "patched_function", "d": f"{k} deleted"})
        elif cur is not v and not _same_function(cur, v) and _from_notebook(cur):
            # libraries replace a few functions of their own (torch._dynamo wraps torch.manual_seed when an
            # optimizer is first built): only a replacement written in the notebook counts
            out.append({"k": "patched_function", "d": f"{k} replaced by {_short(cur)}"})
    for k, v in _snap["modules"].items():
        if v is not None and sys.modules.get(k) is not v:
            out.append({"k": "patched_function", "d": f"sys.modules[{k!r}] replaced"})
    cbs = getattr(_shell.events, "callbacks", {})
    for ev, own in (("pre_run_cell", _snap["marker"]), ("post_run_cell", _snap.get("flusher"))):
        if own is not None and own not in cbs.get(ev, []):
            out.append({"k": "ipython_hook", "d": f"the grader's {ev} callback was removed"})
    for ev, lst in cbs.items():
        new = [c for c in lst if c not in _snap["callbacks"].get(ev, []) and _from_notebook(c)]
        if new:
            out.append({"k": "ipython_hook", "d": f"IPython event callback on {ev!r}: {[_short(c) for c in new]}"})
    for t in threading.enumerate():
        if t.ident not in _snap["threads"] and _from_notebook(getattr(t, "_target", None) or type(t)):
            out.append({"k": "thread", "d": f"background thread {t.name!r} started by the notebook"})
    return out


_MISSING = object()


def _same_function(a, b) -> bool:
    # bound methods and similar wrappers are recreated on access; compare what they wrap
    return getattr(a, "__func__", a) is getattr(b, "__func__", b) and getattr(a, "__self__", None) is getattr(
        b, "__self__", None)


def _from_notebook(obj, depth: int = 0) -> bool:
    """Was ``obj`` (a function, a wrapper of one, a class or an instance of one) written in a notebook cell?"""
    if obj is None or depth > 4:
        return False
    code = getattr(obj, "__code__", None) or getattr(getattr(obj, "__call__", None), "__code__", None)  # noqa: B004  (the bound __call__, not callable())
    fn = getattr(code, "co_filename", "") or ""
    if "ipykernel_" in fn or fn.startswith("<ipython-input-"):
        return True
    try:
        mod = getattr(obj, "__module__", None) or getattr(type(obj), "__module__", None)
    except Exception:
        mod = None
    if mod == "__main__" or getattr(type(obj), "__module__", None) == "__main__":
        return True
    for attr in ("__wrapped__", "__func__", "func", "fget"):
        inner = getattr(obj, attr, None) if not isinstance(obj, type) else None
        if inner is not None and inner is not obj and _from_notebook(inner, depth + 1):
            return True
    return False


def _short(x) -> str:
    try:
        r = repr(x)
    except Exception:
        r = f"<{type(x).__name__}>"
    return r if len(r) <= 120 else r[:117] + "..."


# ---------------------------------------------------------------- summaries


def summarize(x, depth: int = 0) -> dict:
    """A JSON summary of a value, enough for the grader to compare it."""
    t = type(x)
    if x is None or t is bool:
        return {"t": "c", "v": x}
    if t is int:
        return {"t": "i", "v": x if abs(x) < 2 ** 53 else str(x)}
    if t is float:
        return {"t": "f", "v": x if math.isfinite(x) else repr(x)}
    if t is str:
        out = {"t": "s", "v": x[:MAX_TEXT], "n": len(x)}
        if len(x) > MAX_TEXT:
            out["h"] = _sha(x.encode("utf-8", "replace")).hexdigest()
        return out
    if t is complex:
        return {"t": "x", "v": [x.real, x.imag] if math.isfinite(abs(x)) else repr(x)}
    Tensor = _orig.get("Tensor")
    ndarray = _orig.get("ndarray")
    if Tensor is not None and isinstance(x, Tensor):
        return _tensor(x)
    if ndarray is not None and isinstance(x, ndarray):
        out = _array(x, f"numpy.{x.dtype}", "numpy", t)
        out["id"] = id(x)
        return out
    generic = _orig.get("generic")
    if generic is not None and isinstance(x, generic):
        try:
            v = x.item()
        except Exception:
            v = None
        if isinstance(v, (bool, int, float, complex)) and type(v) is not complex:
            s = summarize(v, depth)
            s["np"] = str(x.dtype)
            return s
    if t in (tuple, list) or (_orig.get("Size") is not None and t is _orig["Size"]):
        kind = "size" if t not in (tuple, list) else t.__name__
        if depth > 3:
            return _opaque(x)
        return {"t": "q", "k": kind, "n": len(x), "v": [summarize(v, depth + 1) for v in x[:MAX_ITEMS]],
                **_ident(x)}
    if t in (set, frozenset) or t.__name__ in ("dict_keys", "dict_values", "dict_items") and t.__module__ == "builtins":
        if depth > 3:
            return _opaque(x)
        items = [summarize(v, depth + 1) for v in list(x)[: MAX_ITEMS * 4]]
        kind = "set" if t.__name__ != "dict_values" else "values"
        return {"t": "set" if kind == "set" else "q", "k": kind, "n": len(x),
                "v": sorted(items, key=lambda s: _dumps(s, sort_keys=True)) if kind == "set" else items, **_ident(x)}
    if t is dict:
        if depth > 3:
            return _opaque(x)
        return {"t": "d", "n": len(x), "v": [[summarize(k, depth + 1), summarize(v, depth + 1)]
                                             for k, v in list(x.items())[:MAX_ITEMS]], **_ident(x)}
    if isinstance(x, type):
        # the class's own MRO and origin, not those of its metaclass (which _ident would give)
        return {**_ident(x), "t": "type", "q": _qual(x), "mro": [_qual(c) for c in x.__mro__],
                "main": _from_notebook(x), "abc": type(x).__instancecheck__ is not type.__instancecheck__}
    for key in ("dtype", "device"):
        cls = _orig.get(key)
        if cls is not None and t is cls:
            return {"t": "k", "v": f"torch.{key}:{x}", **_ident(x)}
    np = _orig.get("np")
    if np is not None and t.__module__.startswith("numpy") and t.__name__.endswith("DType") or (
            np is not None and t is getattr(np, "dtype", None)):
        return {"t": "k", "v": f"numpy.dtype:{x}", **_ident(x)}
    return _opaque(x)


def _ident(x) -> dict:
    t = type(x)
    return {"id": id(x), "ty": _qual(t), "mro": [_qual(c) for c in t.__mro__], "main": _from_notebook(t)}


def _opaque(x) -> dict:
    out = {"t": "o", **_ident(x)}
    try:
        out["truth"] = bool(x)
    except Exception:
        out["truth"] = None
    return out


def _tensor(x) -> dict:
    o = _orig
    ctx = o["no_torch_function"]() if o.get("no_torch_function") else None
    try:
        if ctx is not None:
            ctx.__enter__()
        with o["no_grad"]():
            t = o["T.detach"](x)
            dtype = str(t.dtype)
            rg = bool(x.requires_grad)
            if o["T.is_complex"](t):
                return _opaque(x)
            t = o["T.resolve_neg"](o["T.resolve_conj"](t))
            if t.dtype in (o["bfloat16"], o["float16"]):
                t = o["T.to"](t, o["float32"])
            a = o["T.numpy"](o["T.contiguous"](o["T.cpu"](t)))
        out = _array(a, dtype, "torch", type(x))
        out["rg"] = rg
        out["id"] = id(x)
        return out
    except Exception as exc:  # meta, sparse, ... tensors
        out = _opaque(x)
        out["err"] = type(exc).__name__
        return out
    finally:
        if ctx is not None:
            ctx.__exit__(None, None, None)


def _array(a, dtype: str, lib: str, cls) -> dict:
    np = _orig["np"]
    a = _orig["np.ascontiguousarray"](a)
    n = int(a.size)
    kind = a.dtype.kind
    flat = a.reshape(-1)
    out = {"t": "a", "lib": lib, "dt": dtype, "sh": list(a.shape), "n": n, "k": kind,
           "h": _sha(a.tobytes()).hexdigest(), "ty": _qual(cls), "mro": [_qual(c) for c in cls.__mro__],
           "main": _from_notebook(cls), "id": id(a)}
    if kind in "fiub":
        if n <= FULL:
            idx = None
            vals = flat
        else:
            idx = _orig["np.linspace"](0, n - 1, SAMPLE).astype(np.int64)
            vals = flat[idx]
        if kind == "f":
            vals64 = vals.astype(np.float64)
            f64 = flat.astype(np.float64)
            finite = f64[~_orig["np.isnan"](f64)]
            out["st"] = [float(finite.sum()) if finite.size else 0.0, float(abs(finite).sum()) if finite.size else 0.0,
                         float(finite.min()) if finite.size else 0.0, float(finite.max()) if finite.size else 0.0,
                         int(n - finite.size)]
            out["v"] = _b64(vals64.tobytes()).decode()
        elif kind == "b":
            out["v"] = _b64(vals.astype(np.uint8).tobytes()).decode()
            out["st"] = [float(flat.sum())]
        else:
            out["v"] = _b64(vals.astype(np.int64).tobytes()).decode()
            out["st"] = [float(flat.astype(np.float64).sum())]
        out["full"] = idx is None
    return out


# ------------------------------------------------------------ evaluation


def _emit(payload: dict) -> None:
    _pending.append(payload)
    try:
        _pending_bytes[0] += len(_dumps(payload, default=str))
    except Exception:
        _pending_bytes[0] = FLUSH_BYTES
    if payload.get("k") in ("done", "final") or len(_pending) >= FLUSH_RECORDS or _pending_bytes[0] >= FLUSH_BYTES:
        _flush()


def _flush() -> None:
    """Publish the records made since the last flush, as one display output."""
    if not _pending:
        return
    batch = list(_pending)
    _pending.clear()
    _pending_bytes[0] = 0
    pub = _publish
    if pub is None:
        from IPython.display import publish_display_data as pub
    pub({EVIDENCE_MIME: batch}, metadata={EVIDENCE_MIME: {"course": "evidence"}})


class _Eval:
    """Evaluates an instrumented assert's tree, recording every leaf once, in Python's order."""

    def __init__(self):
        self.values: dict[str, dict] = {}

    def leaf(self, pos: str, thunk):
        v = thunk()
        try:
            self.values[pos] = summarize(v)
        except Exception as exc:
            self.values[pos] = {"t": "o", "err": type(exc).__name__}
        return v

    def node(self, n):
        kind = n[0]
        if kind == "v":
            return self.leaf(n[1], n[2])
        if kind == "not":
            return not self.node(n[1])
        if kind in ("and", "or"):
            val = None
            for sub in n[1]:
                val = self.node(sub)
                if (kind == "and" and not val) or (kind == "or" and val):
                    return val
            return val
        if kind == "cmp":
            ops, leaves = n[1], n[2]
            left = self.node(leaves[0])
            res = True
            for i, (op, leaf) in enumerate(zip(ops, leaves[1:])):
                right = self.node(leaf)
                res = _ops[op](left, right)
                if i < len(ops) - 1 and not res:  # a chain goes on only while its links are true
                    return res
                left = right
            return res
        if kind == "call":
            func = n[2]()
            args = [self.node(a) for a in n[3]]
            kwargs = {k: self.node(a) for k, a in n[4]}
            return func(*args, **kwargs)
        if kind == "meth":
            recv = self.node(n[2])
            args = [self.node(a) for a in n[3]]
            return getattr(recv, n[1])(*args)
        raise ValueError(f"unknown evidence node {kind!r}")


def _tampered() -> list[str]:
    """The probe's own functions that the notebook replaced (this module's globals are its attributes)."""
    g = globals()
    return [k for k, v in _OWN.items() if g.get(k) is not v]


def _mark(rec: dict) -> dict:
    gone = _tampered()
    if gone:
        rec["x"] = gone
    return rec


def begin(nonce: str, gid: str) -> None:
    _emit(_mark({"k": "begin", "n": nonce, "g": gid}))


def check(nonce: str, gid: str, aid: int, tree, msg=None, mleaves=(), guards=()) -> None:
    """Evaluate one instrumented assert: publish what it observed, then raise like ``assert`` would.

    ``mleaves`` are the values its message shows (path, thunk), evaluated too (the reference runs record
    them, so that the grader can write the message of a check the kernel does not run); ``guards`` the
    inputs of the student's code the check reads, as they are after it."""
    ev = _Eval()
    ok = None
    try:
        result = ev.node(tree)
        ok = bool(result)
    finally:
        _leaves(_leaves(ev.values, mleaves), guards)
        _emit(_mark({"k": "a", "n": nonce, "g": gid, "i": aid, "ok": ok, "v": ev.values}))
    if not ok:
        if msg is None:
            raise AssertionError
        raise AssertionError(msg())


def _leaves(values: dict, leaves) -> dict:
    for path, thunk in leaves:
        try:
            v = thunk()
        except Exception as exc:
            try:
                text = str(exc)[:200]
            except Exception:
                text = ""
            values[path] = {"t": "r", "e": _qual(type(exc)), "m": text}
            continue
        try:
            values[path] = summarize(v)
        except Exception as exc:
            values[path] = {"t": "o", "err": type(exc).__name__}
    return values


def report(nonce: str, gid: str, aid: int, leaves, mleaves=(), guards=()) -> None:
    """The student's side of one assert of a sliced test cell: the values of the leaves that depend on
    the student's work (path, thunk), each evaluated once, in order, whatever the others gave. Nothing is
    compared and nothing raised here: the values the test expects are not in this process. ``guards``
    are the inputs the test handed to the student's code whose values the grader needs unchanged."""
    _emit(_mark({"k": "a", "n": nonce, "g": gid, "i": aid,
                 "v": _leaves(_leaves(_leaves({}, leaves), mleaves), guards)}))


MAX_BRANCH_REPORTS = 256  # reports per condition and cell: a loop's condition is reported this often at most
_branch_counts: dict[tuple, int] = {}


def branch(nonce: str, gid: str, aid: int, tree) -> bool:
    """Evaluate one instrumented ``if``/``while`` condition of a test cell: publish what it observed, return
    its truth. ``b`` is None when the condition raised (the exception goes on, as it would have)."""
    key = (nonce, gid, aid)
    _branch_counts[key] = n = _branch_counts.get(key, 0) + 1
    ev = _Eval()
    truth = None
    try:
        truth = bool(ev.node(tree))
    finally:
        if n <= MAX_BRANCH_REPORTS:
            _emit(_mark({"k": "b", "n": nonce, "g": gid, "i": aid, "b": truth, "v": ev.values}))
    return truth


def done(nonce: str, gid: str) -> None:
    _emit(_mark({"k": "done", "n": nonce, "g": gid}))


def final(nonce: str) -> None:
    """The grader's last cell: report interpreter changes."""
    try:
        findings = state_report()
    except Exception as exc:
        findings = [{"k": "probe", "d": f"the probe failed: {type(exc).__name__}: {exc}"}]
    _emit({"k": "final", "n": nonce, "s": findings})


def perturb(seed: int) -> None:
    """Reference run B: move every random generator, so values that depend on unseeded draws show up."""
    import random

    random.seed(seed)
    np = sys.modules.get("numpy")
    if np is not None:
        np.random.seed(seed % (2 ** 32))
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.manual_seed(seed)


def wrap_student(namespace: dict, names: list, seed: int) -> None:
    """Reference run B: after every call into the answer cells' code, move the random generators.

    A value the test draws after calling the student's code, without seeding again, then differs between
    runs A and B, so it is not taken as the test's own fixed value (an honest answer may draw random
    numbers in another order than the reference).
    """
    import functools
    import itertools

    counter = itertools.count(seed)

    def wrapped(fn):
        if getattr(fn, "__course_ev_wrapped__", False):
            return fn

        @functools.wraps(fn)
        def call(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            finally:
                perturb(next(counter))

        call.__course_ev_wrapped__ = True
        return call

    import types

    for name in names:
        obj = namespace.get(name)
        if isinstance(obj, types.FunctionType):
            namespace[name] = wrapped(obj)
        elif isinstance(obj, type):
            for attr, val in list(vars(obj).items()):
                if isinstance(val, types.FunctionType):
                    try:
                        setattr(obj, attr, wrapped(val))
                    except (AttributeError, TypeError):
                        pass


# the probe's own functions as this module defined them (see _tampered)
_OWN = {k: globals()[k] for k in ("begin", "check", "report", "branch", "done", "final", "summarize", "_emit",
                                   "_flush", "_leaves", "_Eval", "_mark", "_tampered")}
