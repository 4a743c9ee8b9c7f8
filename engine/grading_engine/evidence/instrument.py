"""Rewrite test cells so that every ``assert`` reports what it observed.

``assert E, msg`` becomes a call to :func:`grading_engine.kernel.probe.check` with
``E`` split into a small tree the kernel evaluates in Python's own order:
boolean operators, ``not``, comparisons (also chained), and calls the grader
knows how to recompute (``torch.equal``, ``torch.allclose``, ``isinstance``,
``torch.all``, ``.all()``, ...). Every other sub-expression is a *leaf*: the
kernel evaluates it once (as a ``lambda``), summarises its value and hands it
to the original comparison, so the test behaves as before and the grader can
redo the comparison on the reported values.

Each leaf is *tainted* when it may depend on the student's work: it mentions a
name that an answer cell defines, or a name that took its value from one (by
assignment, a ``for`` loop, a ``with``, or by being passed to a call together
with one: a tensor handed to the student's function may be changed by it).
The analysis is syntactic and conservative: when in doubt a leaf is tainted.
An untainted leaf that the reference run reports stably (see
:mod:`grading_engine.evidence.reference`) is *anchored*: the grader uses the
reference run's value for it, never the student's process.

Everything here is plain Python (``ast``), run by the grader.
"""

from __future__ import annotations

import ast
import copy
import functools
import json
from dataclasses import dataclass, field

EV = "__course_ev__"
LAST = "__course_ev_last__"

# calls whose result the grader recomputes: name -> which arguments are sub-trees (elementwise)
RECOGNIZED = {
    "isinstance": "leaves",
    "torch.equal": "leaves",
    "torch.allclose": "leaves",
    "torch.isclose": "leaves",
    "torch.isfinite": "leaves",
    "np.allclose": "leaves",
    "numpy.allclose": "leaves",
    "np.array_equal": "leaves",
    "numpy.array_equal": "leaves",
    "np.isclose": "leaves",
    "math.isclose": "leaves",
    "math.isfinite": "leaves",
    "torch.all": "tree",
    "torch.any": "tree",
    "bool": "tree",
}
REDUCING_METHODS = {"all", "any"}


def dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def names_in(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name)}


def bound_names(tree: ast.AST, include_imports: bool = False) -> set[str]:
    """Names a block of code binds at its top level (functions and classes count by name)."""
    out: set[str] = set()

    def targets(t):
        for n in ast.walk(t):
            if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store):
                out.add(n.id)

    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                targets(t)
        elif isinstance(node, (ast.For, ast.AsyncFor)):
            targets(node.target)
        elif isinstance(node, (ast.With, ast.AsyncWith)):
            for item in node.items:
                if item.optional_vars is not None:
                    targets(item.optional_vars)
        elif isinstance(node, ast.NamedExpr):
            targets(node.target)
        elif isinstance(node, ast.Global):
            out.update(node.names)
        elif include_imports and isinstance(node, (ast.Import, ast.ImportFrom)):
            for a in node.names:
                out.add((a.asname or a.name).split(".")[0])
    return out


def parse_cell(source: str) -> ast.Module | None:
    """Parse a cell, turning IPython magics into Python first when needed."""
    try:
        return ast.parse(source)
    except SyntaxError:
        pass
    try:
        from IPython.core.inputtransformer2 import TransformerManager

        return ast.parse(TransformerManager().transform_cell(source))
    except Exception:
        return None


def module_names(trees: list[ast.AST]) -> set[str]:
    """Names bound by import statements: modules and library objects, never the student's values."""
    out: set[str] = set()
    for tree in trees:
        for n in ast.walk(tree):
            if isinstance(n, (ast.Import, ast.ImportFrom)):
                for a in n.names:
                    out.add((a.asname or a.name).split(".")[0])
    return out


def propagate(tainted: set[str], tree: ast.AST, modules: set[str] = frozenset(),
              handed: set[str] | None = None, args_rule: bool = True) -> set[str]:
    """Grow ``tainted`` with the names of ``tree`` whose value may come from a tainted name (fixpoint).

    Names in ``modules`` (imported modules) are never tainted: ``torch`` in
    ``lookup(W, torch.tensor(...))`` is not a value handed to the student.

    ``handed``, when given, receives the names tainted only because they were passed to the student's
    code (the inputs of a call into an answer), not because a value of the student's flowed into them.
    """
    tainted = set(tainted) - set(modules)
    by_args: set[str] = set()

    def hot(node) -> bool:
        return bool(names_in(node) & tainted)

    def base_names(t) -> set[str]:
        out = set()
        for n in ast.walk(t):
            if isinstance(n, ast.Name) and n.id not in modules:
                out.add(n.id)
        return out

    changed = True
    while changed:
        before = len(tainted)
        for node in ast.walk(tree):
            if isinstance(node, (ast.Assign, ast.AugAssign, ast.AnnAssign)):
                value = node.value
                tgts = node.targets if isinstance(node, ast.Assign) else [node.target]
                if value is not None and (hot(value) or (isinstance(node, ast.AugAssign) and hot(node.target))):
                    for t in tgts:
                        tainted |= base_names(t)
            elif isinstance(node, (ast.For, ast.AsyncFor, ast.comprehension)):
                if hot(node.iter):
                    tainted |= base_names(node.target)
            elif isinstance(node, (ast.With, ast.AsyncWith)):
                for item in node.items:
                    if item.optional_vars is not None and hot(item.context_expr):
                        tainted |= base_names(item.optional_vars)
            elif isinstance(node, ast.NamedExpr):
                if hot(node.value):
                    tainted |= base_names(node.target)
            elif isinstance(node, ast.Try | getattr(ast, "TryStar", ast.Try)):
                # `except E as err`: the exception a student's call raised (its message is the student's)
                if any(hot(n) for n in node.body):
                    tainted |= {h.name for h in node.handlers if h.name}
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                if isinstance(node, ast.Lambda):
                    continue
                if any(hot(n) for n in node.body) or any(hot(d) for d in getattr(node, "decorator_list", [])):
                    tainted.add(node.name)
            elif isinstance(node, ast.Call):
                args = list(node.args) + [k.value for k in node.keywords]
                receiver = node.func.value if isinstance(node.func, ast.Attribute) else None
                if hot(node.func):
                    if not args_rule:
                        continue
                    # a value handed to the student's code may be changed by it
                    for p in args + ([receiver] if receiver is not None else []):
                        by_args |= base_names(p) - tainted
                        tainted |= base_names(p)
                elif any(hot(p) for p in args):
                    # a library call stores a student's value only in its receiver (lst.append(v),
                    # w.copy_(v)), its out= argument, or the object of setattr
                    if receiver is not None:
                        tainted |= base_names(receiver)
                    for k in node.keywords:
                        if k.arg == "out":
                            tainted |= base_names(k.value)
                    if dotted(node.func) in ("setattr", "object.__setattr__", "np.copyto", "numpy.copyto") \
                            and node.args:
                        tainted |= base_names(node.args[0])
        changed = len(tainted) != before
    if handed is not None:
        handed |= by_args - _flow_names(tainted, tree, modules, by_args)
    return tainted


def _flow_names(tainted: set[str], tree: ast.AST, modules, by_args: set[str]) -> set[str]:
    """Of the names ``by_args`` (tainted as arguments of the student's code), those that a student's value
    also reaches in another way (assigned from one, a loop over one, ...): propagate again without the
    argument rule, from everything tainted except them."""
    seed = set(tainted) - set(by_args)
    return propagate(seed, tree, modules, args_rule=False) & by_args


@dataclass
class AssertPlan:
    aid: int
    lineno: int
    tree: dict  # the grader's description of the evaluation tree (see probe._Eval)
    leaves: dict[str, dict] = field(default_factory=dict)  # path -> {"src": ..., "taint": bool}
    instrumented: bool = True
    branch: bool = False  # the condition of an `if` or `while` (no assertion: the grader checks its truth)
    col: int = 0
    message: list | None = None  # the assert's message as the grader renders it (see :func:`message_template`)
    mleaves: dict[str, dict] = field(default_factory=dict)  # path -> {"src", "taint"}: values the message shows


@dataclass
class CellPlan:
    gid: str
    source: str
    asserts: list[AssertPlan]
    parsed: bool
    last_expr: bool = False

    def to_json(self) -> dict:
        return {"gid": self.gid, "parsed": self.parsed, "asserts": [
            {"aid": a.aid, "lineno": a.lineno, "tree": a.tree, "leaves": a.leaves, "instrumented": a.instrumented,
             "branch": a.branch, "message": a.message, "mleaves": a.mleaves} for a in self.asserts]}


def _lam(expr: ast.expr) -> ast.Lambda:
    return ast.Lambda(args=ast.arguments(posonlyargs=[], args=[], vararg=None, kwonlyargs=[], kw_defaults=[],
                                         kwarg=None, defaults=[]), body=copy.deepcopy(expr))


def _t(*elts) -> ast.Tuple:
    return ast.Tuple(elts=list(elts), ctx=ast.Load())


def _c(v) -> ast.Constant:
    return ast.Constant(v)


class _Builder:
    def __init__(self, tainted: set[str]):
        self.tainted = tainted
        self.leaves: dict[str, dict] = {}
        self.exprs: dict[str, ast.expr] = {}

    def leaf(self, e: ast.expr, path: str):
        self.leaves[path] = {"src": ast.unparse(e), "taint": bool(names_in(e) & self.tainted)}
        self.exprs[path] = e
        return _t(_c("v"), _c(path), _lam(e)), {"k": "v", "p": path}

    def node(self, e: ast.expr, path: str):
        if isinstance(e, ast.BoolOp):
            kind = "and" if isinstance(e.op, ast.And) else "or"
            built = [self.node(v, f"{path}.{i}") for i, v in enumerate(e.values)]
            return (_t(_c(kind), ast.List(elts=[b[0] for b in built], ctx=ast.Load())),
                    {"k": kind, "x": [b[1] for b in built]})
        if isinstance(e, ast.UnaryOp) and isinstance(e.op, ast.Not):
            sub = self.node(e.operand, f"{path}.0")
            return _t(_c("not"), sub[0]), {"k": "not", "x": sub[1]}
        if isinstance(e, ast.Compare):
            ops = [type(o).__name__ for o in e.ops]
            built = [self.leaf(v, f"{path}.{i}") for i, v in enumerate([e.left, *e.comparators])]
            return (_t(_c("cmp"), ast.List(elts=[_c(o) for o in ops], ctx=ast.Load()),
                       ast.List(elts=[b[0] for b in built], ctx=ast.Load())),
                    {"k": "cmp", "ops": ops, "x": [b[1] for b in built]})
        if isinstance(e, ast.Call) and not any(isinstance(a, ast.Starred) for a in e.args) and all(
                k.arg is not None for k in e.keywords):
            name = dotted(e.func)
            if name in RECOGNIZED:
                sub = self.node if RECOGNIZED[name] == "tree" else self.leaf
                args = [sub(a, f"{path}.{i}") for i, a in enumerate(e.args)]
                kws = [(k.arg, self.leaf(k.value, f"{path}.{k.arg}")) for k in e.keywords]
                return (_t(_c("call"), _c(name), _lam(e.func), ast.List(elts=[a[0] for a in args], ctx=ast.Load()),
                           ast.List(elts=[_t(_c(k), b[0]) for k, b in kws], ctx=ast.Load())),
                        {"k": "call", "f": name, "x": [a[1] for a in args], "kw": [[k, b[1]] for k, b in kws]})
            if (isinstance(e.func, ast.Attribute) and e.func.attr in REDUCING_METHODS and not e.args
                    and not e.keywords):
                recv = self.node(e.func.value, f"{path}.r")
                return (_t(_c("meth"), _c(e.func.attr), recv[0], ast.List(elts=[], ctx=ast.Load())),
                        {"k": "meth", "m": e.func.attr, "r": recv[1]})
        return self.leaf(e, path)


def _instrumentable(test: ast.expr) -> bool:
    for n in ast.walk(test):
        if isinstance(n, (ast.NamedExpr, ast.Yield, ast.YieldFrom, ast.Await)):
            return False
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == "super" and not n.args:
            return False
    return True


def message_template(msg: ast.expr | None, tainted: set[str]) -> tuple[list | None, dict, dict]:
    """How the grader writes an assert's message without the kernel: ``(template, leaves, expressions)``.

    The template is a list of parts: ``{"s": text}`` (literal text, which stays with the grader) or
    ``{"p": path, "c": conversion, "f": format_spec}`` (a value the message shows, a leaf ``m0``, ``m1``,
    ...). An f-string gives one leaf per replacement field; any other expression is one leaf ``m``.
    """
    if msg is None:
        return None, {}, {}
    if isinstance(msg, ast.Constant):
        return [{"s": str(msg.value)}], {}, {}
    parts: list = []
    leaves: dict = {}
    exprs: dict = {}

    def leaf(path, e, conv=115, spec=None):
        leaves[path] = {"src": ast.unparse(e), "taint": bool(names_in(e) & tainted)}
        exprs[path] = e
        parts.append({"p": path, "c": conv, "f": spec})

    if isinstance(msg, ast.JoinedStr) and all(
            isinstance(v, ast.Constant) or (isinstance(v, ast.FormattedValue) and (
                v.format_spec is None or all(isinstance(x, ast.Constant) for x in v.format_spec.values)))
            for v in msg.values):
        for i, v in enumerate(msg.values):
            if isinstance(v, ast.Constant):
                parts.append({"s": str(v.value)})
            else:
                spec = "".join(str(x.value) for x in v.format_spec.values) if v.format_spec is not None else None
                leaf(f"m{i}", v.value, v.conversion, spec)
        return parts, leaves, exprs
    leaf("m", msg)
    return parts, leaves, exprs


def _pairs(paths, exprs) -> ast.Tuple:
    return _t(*[_t(_c(p), _lam(exprs[p])) for p in paths])


GUARD = "g:"  # the path of a guard: the value of one input of the student's code, as the check saw it


def _guards(names) -> ast.Tuple:
    return _t(*[_t(_c(GUARD + n), _lam(ast.Name(n, ast.Load()))) for n in names])


class _Rewriter(ast.NodeTransformer):
    """Rewrite the asserts (and scoring conditions) of a test cell.

    With a slice (``anchored``: check id -> leaf paths the grader takes from the reference run), an assert
    becomes a report of its other leaves only: the kernel never computes the anchored values, never runs
    the comparison and never raises; the grader does all three.
    """

    def __init__(self, gid: str, nonce_name: str, tainted: set[str], anchored: dict | None = None,
                 guards: dict | None = None):
        self.gid = gid
        self.nonce_name = nonce_name
        self.tainted = tainted
        self.anchored = anchored
        self.guards = guards or {}
        self.plans: list[AssertPlan] = []
        self.class_depth = 0

    def visit_ClassDef(self, node):
        self.class_depth += 1
        self.generic_visit(node)
        self.class_depth -= 1
        return node

    def visit_Assert(self, node: ast.Assert):
        aid = len(self.plans)
        if self.class_depth or not _instrumentable(node.test):
            self.plans.append(AssertPlan(aid, node.lineno, {"k": "v", "p": "0"}, {}, instrumented=False,
                                         col=node.col_offset))
            return node
        b = _Builder(self.tainted)
        spec, tree = b.node(node.test, "0")
        template, mleaves, mexprs = message_template(node.msg, self.tainted)
        self.plans.append(AssertPlan(aid, node.lineno, tree, b.leaves, col=node.col_offset, message=template,
                                     mleaves=mleaves))
        ev = ast.Name(EV, ast.Load())
        nonce = ast.Name(self.nonce_name, ast.Load())
        if self.anchored is not None:
            skip = set(self.anchored.get(str(aid), ()))
            call = ast.Call(func=ast.Attribute(value=ev, attr="report", ctx=ast.Load()),
                            args=[nonce, _c(self.gid), _c(aid),
                                  _pairs([p for p in b.exprs if p not in skip], b.exprs),
                                  _pairs([p for p in mexprs if p not in skip], mexprs),
                                  _guards(self.guards.get(str(aid), ()))], keywords=[])
            return ast.copy_location(ast.Expr(call), node)
        msg = _lam(node.msg) if node.msg is not None else _c(None)
        # every tainted name the check reads, as it is after the check: the inputs a slice may need unchanged
        inputs = sorted(set().union(*[names_in(e) for e in b.exprs.values()]) & self.tainted)
        call = ast.Call(func=ast.Attribute(value=ev, attr="check", ctx=ast.Load()),
                        args=[nonce, _c(self.gid), _c(aid), spec, msg, _pairs(list(mexprs), mexprs),
                              _guards(inputs)], keywords=[])
        return ast.copy_location(ast.Expr(call), node)

    def _branch(self, node: ast.If | ast.While):
        """A test that scores by branching (``if f(x) == 4: score += 1``) reports its condition too, so
        that the grader can check the branch the kernel took against the values it reported."""
        self.generic_visit(node)
        if self.class_depth or not _instrumentable(node.test) or not _compares(node.test):
            return node
        aid = len(self.plans)
        b = _Builder(self.tainted)
        spec, tree = b.node(node.test, "0")
        self.plans.append(AssertPlan(aid, node.lineno, tree, b.leaves, branch=True, col=node.col_offset))
        node.test = ast.copy_location(
            ast.Call(func=ast.Attribute(value=ast.Name(EV, ast.Load()), attr="branch", ctx=ast.Load()),
                     args=[ast.Name(self.nonce_name, ast.Load()), _c(self.gid), _c(aid), spec], keywords=[]),
            node.test)
        return node

    visit_If = _branch
    visit_While = _branch


def _compares(test: ast.expr) -> bool:
    """A condition worth reporting: one that compares or calls (not a bare flag such as ``while True``)."""
    return any(isinstance(n, (ast.Compare, ast.Call)) for n in ast.walk(test))


def plan_cell(gid: str, source: str, tainted: set[str], modules: frozenset[str] | set[str] = frozenset(),
              cut: dict | None = None) -> tuple[CellPlan, ast.Module | None]:
    """The plan of one test cell and its rewritten tree (``None`` when it cannot be parsed).

    ``cut`` is the cell's slice (see :func:`slice_statements` and :mod:`grading_engine.evidence.reference`):
    ``{"anchored": {check id: [leaf paths]}, "dropped": [line numbers of top-level statements]}``.
    """
    tree = parse_cell(source)
    if tree is None:
        return CellPlan(gid, source, [], parsed=False), None
    local = propagate(tainted, tree, modules)
    rw = _Rewriter(gid, "__course_ev_nonce__", local, None if cut is None else cut.get("anchored", {}),
                   None if cut is None else cut.get("guards", {}))
    last = bool(tree.body) and isinstance(tree.body[-1], ast.Expr)
    new = rw.visit(copy.deepcopy(tree))
    if cut is not None and cut.get("dropped"):
        drop = set(cut["dropped"])
        new.body = [st for st in new.body if st.lineno not in drop]
        last = last and bool(new.body) and new.body[-1].lineno == tree.body[-1].lineno
    return CellPlan(gid, source, rw.plans, parsed=True, last_expr=last), new


def instrument_cell(gid: str, source: str, tainted: set[str], nonce: str,
                    modules: frozenset[str] | set[str] = frozenset(), cut: dict | None = None) -> tuple[str, CellPlan]:
    """The source sent to the kernel instead of a test cell, and the plan the grader checks it against.

    With a ``cut`` (the cell's slice), only the student's side of the cell is sent."""
    key = json.dumps(cut, sort_keys=True) if cut is not None else ""
    text, plan = _instrumented(gid, source, frozenset(tainted), frozenset(modules), key)
    return text.replace(repr(_NONCE), repr(nonce)), plan


# the rewriting does not depend on the nonce: done once per process and cell, with this in its place (a
# reserved name, as every name of the instrumentation is)
_NONCE = "__course_ev_nonce_here__"


@functools.lru_cache(maxsize=1024)
def _instrumented(gid: str, source: str, tainted: frozenset[str], modules: frozenset[str],
                  cut: str) -> tuple[str, CellPlan]:
    nonce = _NONCE
    plan, tree = plan_cell(gid, source, set(tainted), modules, json.loads(cut) if cut else None)
    if tree is None:
        # cannot parse even with IPython's transformers: only completion is recorded
        body = source
        return (f"import grading_engine.kernel.probe as {EV}\n{EV}.begin({nonce!r}, {gid!r})\n{body}\n"
                f"{EV}.done({nonce!r}, {gid!r})\n"), plan
    head = ast.parse(f"import grading_engine.kernel.probe as {EV}\n__course_ev_nonce__ = {nonce!r}\n"
                     f"{EV}.begin({nonce!r}, {gid!r})\n").body
    tail = ast.parse(f"{EV}.done({nonce!r}, {gid!r})\n").body
    body = list(tree.body)
    if plan.last_expr:
        last = body.pop()
        body += ast.parse(f"{LAST} = None").body
        body[-1].value = last.value
        tail += [ast.Expr(ast.Name(LAST, ast.Load()))]
    module = ast.Module(body=head + body + tail, type_ignores=[])
    ast.fix_missing_locations(module)
    return ast.unparse(module) + "\n", plan


def hidden_line_numbers(source: str) -> set[int]:
    """1-based numbers of the lines of a cell's hidden-test regions (markers included)."""
    out, inside = set(), False
    for n, line in enumerate(source.splitlines(), start=1):
        if "BEGIN HIDDEN TESTS" in line:
            inside = True
        if inside:
            out.add(n)
        if "END HIDDEN TESTS" in line:
            inside = False
    return out


def _loads(node: ast.AST) -> set[str]:
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Store)}


def live_after_cells(sources: list[str]) -> list[set[str] | None]:
    """For each cell, the names a later cell may read before it binds them itself (a backward liveness
    over whole top-level statements); ``None`` where a later cell cannot be parsed (anything may be read)."""
    out: list[set[str] | None] = [None] * len(sources)
    live: set[str] | None = set()
    for i in reversed(range(len(sources))):
        out[i] = None if live is None else set(live)
        tree = parse_cell(sources[i])
        if tree is None:
            live = None
        if live is None:
            continue
        defined: set[str] = set()
        exposed: set[str] = set()
        for st in tree.body:
            exposed |= _loads(st) - defined
            if isinstance(st, ast.Assign) or (isinstance(st, ast.AnnAssign) and st.value is not None):
                defined |= bound_names(st)
            elif isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Import, ast.ImportFrom)):
                defined |= bound_names(st, include_imports=True) if not isinstance(
                    st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) else {st.name}
        live = exposed | (live - defined)
    return out


def _droppable(st: ast.stmt) -> bool:
    """A statement that only computes values: an assignment to plain names, or an expression without a call."""
    if isinstance(st, ast.Assign):
        return all(isinstance(n, (ast.Name, ast.Tuple, ast.List, ast.Starred)) and all(
            isinstance(x, (ast.Name, ast.Tuple, ast.List, ast.Starred)) or isinstance(x, ast.expr_context)
            for x in ast.walk(n)) for n in st.targets)
    if isinstance(st, ast.AnnAssign):
        return st.value is not None and isinstance(st.target, ast.Name)
    if isinstance(st, ast.Expr):
        return not any(isinstance(n, (ast.Call, ast.Await, ast.Yield, ast.YieldFrom)) for n in ast.walk(st))
    return False


def slice_statements(source: str, tainted: tuple[set[str], dict], modules: set[str], anchored: dict,
                     live_after: set[str] | None) -> list[int]:
    """Line numbers of the top-level statements of a test cell's hidden region that the kernel need not run:
    they compute only values the grader takes from the reference run (``anchored``: check id -> leaf
    paths), and no later statement or cell reads what they bind. A statement that touches the student's
    values (``tainted``: the cell's entry taint and alias groups, :func:`notebook_entry_taint`) is always kept. (Whether leaving them out changes anything else, a random generator's state for
    instance, is for a run of the reference's own slice to show.)"""
    tree = parse_cell(source)
    if tree is None or live_after is None:
        return []
    states = [student | handed for student, handed in statement_taint(tree, tainted, modules)]
    plan, _ = plan_cell("_", source, set(tainted[0]), modules)
    kernel: dict[tuple[int, int], set[str]] = {}
    for a in plan.asserts:
        if a.branch or not a.instrumented:
            continue
        skip = set(anchored.get(str(a.aid), ()))
        names: set[str] = set()
        for path, leaf in list(a.leaves.items()) + list(a.mleaves.items()):
            if path not in skip:
                names |= names_in(ast.parse(leaf["src"], mode="eval"))
        kernel[(a.lineno, a.col)] = names

    def uses(node: ast.AST, out: set[str]) -> set[str]:
        if isinstance(node, ast.Assert):
            k = kernel.get((node.lineno, node.col_offset))
            out |= names_in(node) if k is None else k
            return out
        if isinstance(node, ast.Name):
            out.add(node.id)
        for child in ast.iter_child_nodes(node):
            uses(child, out)
        return out

    hidden = hidden_line_numbers(source)
    needed = set(live_after)
    dropped = []
    for idx in reversed(range(len(tree.body))):
        st = tree.body[idx]
        last_expr = idx == len(tree.body) - 1 and isinstance(st, ast.Expr)
        if (st.lineno in hidden and not last_expr and _droppable(st) and not (names_in(st) & states[idx])
                and not (bound_names(st) & needed)):
            dropped.append(st.lineno)
            continue
        needed |= uses(st, set())
    return sorted(dropped)


def student_names(answer_sources: list[str]) -> set[str]:
    """Names the answer cells of the reference notebook define (not the modules they import)."""
    out: set[str] = set()
    for src in answer_sources:
        tree = parse_cell(src)
        if tree is not None:
            out |= bound_names(tree)
    return out


def notebook_taint(cells: list[tuple[str, str]]) -> set[str]:
    """Tainted names after the notebook's non-test code, given ``(role, source)`` in order.

    ``role`` is ``"answer"``, ``"test"`` or ``"other"``; answer cells seed the
    taint, other cells propagate it; test cells are planned one by one.
    """
    trees = [(r, parse_cell(s)) for r, s in cells]
    modules = module_names([t for _, t in trees if t is not None])
    tainted = student_names([s for r, s in cells if r == "answer"]) - modules
    # one fixpoint over every non-answer cell (tests included): flow-insensitive, so conservative
    body = [stmt for r, t in trees if r != "answer" and t is not None for stmt in t.body]
    return propagate(tainted, ast.Module(body=body, type_ignores=[]), modules)


def notebook_modules(sources: list[str]) -> set[str]:
    return module_names([t for t in (parse_cell(s) for s in sources) if t is not None])


# Leaves that read the state around the kernel (files, the environment, global settings) can depend on
# what the student's code did without naming it: their values always come from the student's process.
AMBIENT = frozenset({
    "open", "os", "sys", "io", "glob", "shutil", "pathlib", "Path", "exists", "is_file", "is_dir", "read_text",
    "read_bytes", "stat", "listdir", "iterdir", "environ", "getenv", "getcwd", "globals", "locals", "vars", "dir",
    "get_default_dtype", "is_grad_enabled", "is_inference_mode_enabled", "get_num_threads", "initial_seed",
    "get_rng_state", "are_deterministic_algorithms_enabled", "is_anomaly_enabled", "get_printoptions",
    "get_ipython", "In", "Out", "_ih", "_oh"})


def ambient(src: str) -> bool:
    """Does a leaf read the state around the kernel (see :data:`AMBIENT`)?"""
    try:
        tree = ast.parse(src, mode="eval")
    except SyntaxError:
        return True
    return any(isinstance(n, ast.Name) and n.id in AMBIENT or isinstance(n, ast.Attribute) and n.attr in AMBIENT
               for n in ast.walk(tree))


def _global_loads(tree: ast.AST) -> set[str]:
    """Names a cell reads at its top level, or declares ``global`` in a function (not a function's locals)."""
    out: set[str] = set()

    def walk(node):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            out.update(_global_loads_of_function(node))  # the globals it reads or declares
            for n in ast.walk(node):
                if isinstance(n, ast.Global):
                    out.update(n.names)
            args = node.args
            for d in list(args.defaults) + [d for d in args.kw_defaults if d is not None] + list(
                    getattr(node, "decorator_list", [])):
                walk(d)
            return
        if isinstance(node, ast.Name):
            out.add(node.id)
        for child in ast.iter_child_nodes(node):
            walk(child)

    walk(tree)
    return out


FRESH_CALLS = frozenset({"clone", "copy", "deepcopy", "item", "tolist", "sum", "mean", "std", "var", "norm", "numel",
                         "dim", "len", "int", "float", "str", "bool", "repr", "isinstance", "hasattr", "allclose",
                         "equal", "tensor", "randn", "rand", "randint", "zeros", "ones", "full", "arange", "empty"})


def _fresh(value: ast.AST) -> bool:
    """An expression whose value is a new object, sharing nothing with the names it reads."""
    if isinstance(value, (ast.Constant, ast.JoinedStr, ast.BinOp, ast.UnaryOp, ast.Compare)):
        return True
    return isinstance(value, ast.Call) and _callee(value) in FRESH_CALLS


def _callee(call: ast.Call) -> str | None:
    """The last name of what a call calls: ``seed`` for ``np.random.seed(...)``, ``len`` for ``len(...)``."""
    f = call.func
    return f.attr if isinstance(f, ast.Attribute) else f.id if isinstance(f, ast.Name) else None


def alias_groups(trees: list[ast.AST], modules: set[str]) -> dict[str, set[str]]:
    """name -> the names that may share an object with it anywhere in the notebook (``e = model.embed``,
    ``held.append(w)``, ``model.head = e``, a function or lambda that reads it), one flow-insensitive union."""
    parent: dict[str, str] = {}

    def find(x):
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    def union(names):
        names = [n for n in names if n not in modules]
        for a, b in zip(names, names[1:]):
            parent[find(a)] = find(b)

    def bases(node):
        """The names whose objects ``node``'s value may share (not the functions it calls)."""
        callees = {id(n.func) for n in ast.walk(node) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
        return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and id(n) not in callees}

    for tree in trees:
        for node in ast.walk(tree):
            if isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)) and node.value is not None:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                if not _fresh(node.value) or not all(isinstance(t, ast.Name) for t in targets):
                    union(sorted(set().union(*(bases(t) for t in targets)) | bases(node.value)))
            elif isinstance(node, (ast.For, ast.AsyncFor, ast.comprehension)):
                union(sorted(bases(node.target) | bases(node.iter)))
            elif isinstance(node, (ast.With, ast.AsyncWith)):
                for item in node.items:
                    if item.optional_vars is not None:
                        union(sorted(bases(item.optional_vars) | bases(item.context_expr)))
            elif isinstance(node, ast.NamedExpr):
                union(sorted(bases(node.target) | bases(node.value)))
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                union(sorted({node.name} | _global_loads_of_function(node)))
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and isinstance(
                    node.func.value, ast.Name) and node.func.value.id not in modules:
                union(sorted({node.func.value.id}.union(*(bases(a) for a in node.args),
                                                         *(bases(k.value) for k in node.keywords))))
    groups: dict[str, set[str]] = {}
    for x in list(parent):
        groups.setdefault(find(x), set()).add(x)
    return {x: groups[find(x)] for x in parent}


def _global_loads_of_function(node) -> set[str]:
    local = {a.arg for a in node.args.args + node.args.kwonlyargs + node.args.posonlyargs}
    local |= {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    return {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)} - local


def _close(names: set[str], groups: dict[str, set[str]]) -> set[str]:
    out = set(names)
    for n in names:
        out |= groups.get(n, set())
    return out


def notebook_entry_taint(cells: list[tuple[str, str]]) -> list[tuple[set[str], dict]]:
    """For each cell, the names that may hold the student's work when it starts (flow-sensitive, in cell
    order), and the notebook's alias groups. Answer cells add every name they bind or read (a top-level
    ``model.eval()`` in an answer makes ``model`` the student's), except modules and builtins; the other
    cells propagate what they receive; a name that may share an object with a tainted one is tainted."""
    import builtins

    trees = [(r, parse_cell(src)) for r, src in cells]
    modules = module_names([t for _, t in trees if t is not None])
    groups = alias_groups([t for r, t in trees if t is not None and r != "answer"], modules)
    plain = set(dir(builtins))
    state: set[str] = set()
    out = []
    for r, tree in trees:
        out.append((set(state), groups))
        if tree is None:
            continue
        if r == "answer":
            state |= (bound_names(tree) | (_global_loads(tree) - plain)) - modules
        else:
            state = propagate(state, tree, modules)
        state = _close(state, groups) - modules
    return out


def statement_taint(tree: ast.Module, entry: tuple[set[str], dict], modules: set[str]) -> list[tuple[set, set]]:
    """(student's names, handed names) at each top-level statement of a cell, that statement's own effects
    included (a call into the student's code taints its arguments for the rest of the statement too).
    Handed names are the inputs passed to the student's code and nothing else of the student's reached:
    a value the test computes from them is the test's own as long as they are unchanged."""
    student, groups = set(entry[0]), entry[1]
    handed: set[str] = set()
    out = []
    for st in tree.body:
        new_handed: set[str] = set()
        state = propagate(student | handed, ast.Module(body=[st], type_ignores=[]), modules, new_handed)
        handed = (handed | new_handed) & state
        student = state - handed
        # an alias of a handed or student name is the student's (it may see what their code changed)
        student |= _close(student | handed, groups) - handed
        student -= set(modules)
        handed -= student
        out.append((set(student), set(handed)))
    return out


def flow_leaf_taint(source: str, entry: tuple[set[str], dict], modules: set[str]) -> dict[tuple[int, str], object]:
    """(check id, leaf path) -> ``True`` when the leaf may hold the student's work where it is evaluated, a
    tuple of names when it reads the student's inputs only (the guards: the names that must be unchanged
    for the reference's value to hold), ``False`` when it is the test's own (:func:`statement_taint`)."""
    tree = parse_cell(source)
    if tree is None:
        return {}
    states = statement_taint(tree, entry, modules)
    rw = _Rewriter("_", "__course_ev_nonce__", set())
    out = {}
    for st, (student, handed) in zip(copy.deepcopy(tree).body, states):
        rw.tainted = student | handed
        first = len(rw.plans)
        # a function's checks run when it is called, with whatever its callers pass: always the student's
        deferred = {(n.lineno, n.col_offset) for f in ast.walk(st)
                    if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                    for n in ast.walk(f) if isinstance(n, (ast.Assert, ast.If, ast.While))}
        rw.visit(st)
        for a in rw.plans[first:]:
            for path, leaf in list(a.leaves.items()) + list(a.mleaves.items()):
                names = names_in(ast.parse(leaf["src"], mode="eval")) if leaf["taint"] else set()
                if (a.lineno, a.col) in deferred or ambient(leaf["src"]) or names & student:
                    out[(a.aid, path)] = True
                elif names & handed:
                    out[(a.aid, path)] = tuple(sorted(names & handed))
                else:
                    out[(a.aid, path)] = False
    return out


SEED_CALLS = frozenset({"manual_seed", "seed", "default_rng", "RandomState"})


def reseed(source: str, offset: int) -> str:
    """``source`` with each integer seed of its hidden region moved by ``offset`` (mod 2**31): the first
    argument of ``manual_seed``, ``seed``, ``default_rng`` or ``RandomState`` when it is written as a number.
    Only those characters change, so every line keeps its number."""
    if not offset:
        return source
    tree = parse_cell(source)
    if tree is None:
        return source
    hidden = hidden_line_numbers(source)
    spots = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Call) and n.args and n.lineno in hidden:
            a = n.args[0]
            if _callee(n) in SEED_CALLS and isinstance(a, ast.Constant) and type(a.value) is int \
                    and a.lineno == a.end_lineno:
                spots.append((a.lineno, a.col_offset, a.end_col_offset, (a.value + offset) % 2 ** 31))
    lines = source.splitlines(keepends=True)
    for lineno, start, end, value in sorted(spots, reverse=True):
        raw = lines[lineno - 1].encode()  # AST columns count UTF-8 bytes
        lines[lineno - 1] = (raw[:start] + str(value).encode() + raw[end:]).decode()
    return "".join(lines)
