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


def propagate(tainted: set[str], tree: ast.AST, modules: set[str] = frozenset()) -> set[str]:
    """Grow ``tainted`` with the names of ``tree`` whose value may come from a tainted name (fixpoint).

    Names in ``modules`` (imported modules) are never tainted: ``torch`` in
    ``lookup(W, torch.tensor(...))`` is not a value handed to the student.
    """
    tainted = set(tainted) - set(modules)

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
                    # a value handed to the student's code may be changed by it
                    for p in args + ([receiver] if receiver is not None else []):
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
    return tainted


@dataclass
class AssertPlan:
    aid: int
    lineno: int
    tree: dict  # the grader's description of the evaluation tree (see probe._Eval)
    leaves: dict[str, dict] = field(default_factory=dict)  # path -> {"src": ..., "taint": bool}
    instrumented: bool = True
    branch: bool = False  # the condition of an `if` or `while` (no assertion: the grader checks its truth)


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
             "branch": a.branch} for a in self.asserts]}


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

    def leaf(self, e: ast.expr, path: str):
        self.leaves[path] = {"src": ast.unparse(e), "taint": bool(names_in(e) & self.tainted)}
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


class _Rewriter(ast.NodeTransformer):
    def __init__(self, gid: str, nonce_name: str, tainted: set[str]):
        self.gid = gid
        self.nonce_name = nonce_name
        self.tainted = tainted
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
            self.plans.append(AssertPlan(aid, node.lineno, {"k": "v", "p": "0"}, {}, instrumented=False))
            return node
        b = _Builder(self.tainted)
        spec, tree = b.node(node.test, "0")
        self.plans.append(AssertPlan(aid, node.lineno, tree, b.leaves))
        msg = _lam(node.msg) if node.msg is not None else _c(None)
        call = ast.Call(func=ast.Attribute(value=ast.Name(EV, ast.Load()), attr="check", ctx=ast.Load()),
                        args=[ast.Name(self.nonce_name, ast.Load()), _c(self.gid), _c(aid), spec, msg], keywords=[])
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
        self.plans.append(AssertPlan(aid, node.lineno, tree, b.leaves, branch=True))
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


def plan_cell(gid: str, source: str, tainted: set[str],
              modules: frozenset[str] | set[str] = frozenset()) -> tuple[CellPlan, ast.Module | None]:
    """The plan of one test cell and its rewritten tree (``None`` when it cannot be parsed)."""
    tree = parse_cell(source)
    if tree is None:
        return CellPlan(gid, source, [], parsed=False), None
    local = propagate(tainted, tree, modules)
    rw = _Rewriter(gid, "__course_ev_nonce__", local)
    last = bool(tree.body) and isinstance(tree.body[-1], ast.Expr)
    new = rw.visit(copy.deepcopy(tree))
    return CellPlan(gid, source, rw.plans, parsed=True, last_expr=last), new


def instrument_cell(gid: str, source: str, tainted: set[str], nonce: str,
                    modules: frozenset[str] | set[str] = frozenset()) -> tuple[str, CellPlan]:
    """The source sent to the kernel instead of a test cell, and the plan the grader checks it against."""
    text, plan = _instrumented(gid, source, frozenset(tainted), frozenset(modules))
    return text.replace(repr(_NONCE), repr(nonce)), plan


# the rewriting does not depend on the nonce: done once per process and cell, with this in its place (a
# reserved name, as every name of the instrumentation is)
_NONCE = "__course_ev_nonce_here__"


@functools.lru_cache(maxsize=512)
def _instrumented(gid: str, source: str, tainted: frozenset[str], modules: frozenset[str]) -> tuple[str, CellPlan]:
    nonce = _NONCE
    plan, tree = plan_cell(gid, source, set(tainted), modules)
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
