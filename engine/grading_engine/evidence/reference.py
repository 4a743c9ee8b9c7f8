"""The reference: the source notebook, as graded, and what its tests observe.

:func:`reference_notebook` is the instructor's notebook with every locked
cell exactly as the gradebook stores it (so the reference tests are the tests
students are graded with, even if ``source/`` was edited since
``generate_assignment``).

:func:`reference_runs` executes it in the grading kernel, in a private copy of
the assignment folder: run A as is, run B with every random generator moved
before each cell and after every call into the answer cells' code (an honest
answer may draw random numbers in another order), then run C of its test cells
sliced (:func:`slice_plans`: the student's side of each check only), which
must earn every point of every sliced cell. The runs' evidence, audit events
and the slices are cached by a hash of everything they depend on (the
notebook, the assignment's other files, this package's instrumentation, the
library versions, the grading seed), in ``GradingEngine.reference_cache``
(default ``~/.cache/course-integrity``), so each notebook is run once per
change, not once per student.
"""

from __future__ import annotations

import copy
import fcntl
import functools
import hashlib
import json
import os
import pickle
import secrets
import shutil
import sys
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import nbformat
from nbformat import NotebookNode

from grading_engine.evidence.instrument import (
    EV,
    GUARD,
    flow_leaf_taint,
    hidden_line_numbers,
    instrument_cell,
    live_after_cells,
    notebook_entry_taint,
    notebook_modules,
    notebook_taint,
    plan_cell,
    reseed,
    slice_statements,
    student_names,
)
from grading_engine.protocol import EVIDENCE_MIME, evidence_records

CACHE_VERSION = "3"


def nbg(cell) -> dict:
    return cell.get("metadata", {}).get("nbgrader", {}) or {}


def role(cell) -> str:
    m = nbg(cell)
    if cell.get("cell_type") != "code":
        return "markdown"
    if m.get("grade") and not m.get("solution"):
        return "test"
    if m.get("solution") and not m.get("grade"):
        return "answer"
    return "other"


@dataclass
class GradebookNotebook:
    """What the gradebook knows about one notebook."""

    source: dict  # grade_id -> {"cell_type", "locked", "source", "checksum"}
    grade: dict  # grade_id -> max points (grade cells)
    solution: set
    task: dict  # grade_id -> max points

    def canonical_metadata(self, gid: str) -> dict:
        src = self.source[gid]
        meta = {"grade": gid in self.grade, "grade_id": gid, "locked": bool(src["locked"]),
                "schema_version": 3, "solution": gid in self.solution, "task": gid in self.task}
        if gid in self.grade:
            meta["points"] = self.grade[gid]
        elif gid in self.task:
            meta["points"] = self.task[gid]
        return meta


def gradebook_notebook(db_url: str, assignment: str, notebook: str) -> GradebookNotebook:
    """The notebook's definition in the gradebook (its cells' sources, points, kinds).

    Read once per state of a SQLite gradebook's file (autograde's steps each ask for it)."""
    state = _sqlite_state(db_url)
    if state is None:
        return _read_gradebook_notebook(db_url, assignment, notebook)
    return copy.deepcopy(_gradebook_notebook_at(db_url, assignment, notebook, state))


def _sqlite_state(db_url: str) -> tuple | None:
    """(inode, size, mtime) of the files of a ``sqlite:///`` gradebook (its write-ahead log too, if any); None
    for any other database."""
    if not db_url.startswith("sqlite:///") or db_url == "sqlite:///:memory:":
        return None
    path = Path(db_url[len("sqlite:///"):])
    state = _file_state(path)
    return None if state is None else (*state, _file_state(path.with_name(path.name + "-wal")))


def _file_state(path: Path) -> tuple | None:
    """(inode, size, mtime) of a file; None if it is missing."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


@functools.lru_cache(maxsize=32)
def _gradebook_notebook_at(db_url: str, assignment: str, notebook: str, state: tuple) -> GradebookNotebook:
    return _read_gradebook_notebook(db_url, assignment, notebook)


def _read_gradebook_notebook(db_url: str, assignment: str, notebook: str) -> GradebookNotebook:
    from nbgrader.api import Gradebook

    with Gradebook(db_url) as gb:
        nb = gb.find_notebook(notebook, assignment)
        source = {c.name: {"cell_type": c.cell_type, "locked": bool(c.locked), "source": c.source,
                           "checksum": c.checksum} for c in nb.source_cells}
        grade = {c.name: float(c.max_score) for c in nb.grade_cells}
        solution = {c.name for c in nb.solution_cells}
        task = {c.name: float(c.max_score) for c in nb.task_cells}
    return GradebookNotebook(source, grade, solution, task)


def reference_notebook(source_path: Path, gbnb: GradebookNotebook | None) -> NotebookNode:
    nb = nbformat.read(str(source_path), as_version=4)
    if gbnb is not None:
        for cell in nb.cells:
            gid = nbg(cell).get("grade_id")
            src = gbnb.source.get(gid) if gid else None
            if src is not None and src["locked"]:
                cell.source = src["source"]
    return nb


# The analyses below depend only on the reference's code cells, the same for every submission of a
# notebook: each is computed once per grading process (a batch worker grades a whole class).

def _code_cells(ref: NotebookNode) -> tuple[tuple[str, str, str | None], ...]:
    return tuple((role(c), c.source, nbg(c).get("grade_id")) for c in ref.cells if c.cell_type == "code")


@functools.lru_cache(maxsize=64)
def _taint(cells: tuple) -> frozenset[str]:
    return frozenset(notebook_taint([(r, src) for r, src, _ in cells]))


@functools.lru_cache(maxsize=64)
def _modules(cells: tuple) -> frozenset[str]:
    return frozenset(notebook_modules([src for _, src, _ in cells]))


@functools.lru_cache(maxsize=64)
def _plans(cells: tuple) -> dict:
    tainted, modules = _taint(cells), _modules(cells)
    return {gid: plan_cell(gid, src, set(tainted), modules)[0] for r, src, gid in cells if r == "test"}


def taint_of(ref: NotebookNode) -> set[str]:
    return set(_taint(_code_cells(ref)))


def modules_of(ref: NotebookNode) -> set[str]:
    return set(_modules(_code_cells(ref)))


def plans_of(ref: NotebookNode) -> dict:
    """grade_id -> CellPlan of every test cell of the reference notebook (shared: do not change them)."""
    return dict(_plans(_code_cells(ref)))


def assert_plans(plans: dict) -> dict:
    """(grade_id, assert id) -> assert plan as JSON, over every test cell."""
    return {(gid, a.aid): {"tree": a.tree, "leaves": a.leaves, "instrumented": a.instrumented, "lineno": a.lineno,
                           "branch": a.branch, "message": a.message, "mleaves": a.mleaves}
            for gid, p in plans.items() for a in p.asserts}


def instrumented(nb: NotebookNode, tainted: set[str], nonce: str, perturb: bool = False,
                 probe: bool = False, modules: set[str] = frozenset(),
                 slices: dict | None = None, seed: int = 0) -> tuple[NotebookNode, dict]:
    """A copy of ``nb`` with its test cells instrumented; returns it and {cell index: original source}.

    A test cell with a slice in ``slices`` (grade_id -> slice) becomes its student's side only; ``seed``
    moves the seeds of the hidden regions (:func:`~grading_engine.evidence.instrument.reseed`)."""
    out = copy.deepcopy(nb)
    originals = {}
    cells = []
    for i, c in enumerate(out.cells):
        if perturb and c.cell_type == "code":
            cells.append(nbformat.v4.new_code_cell(
                f"import grading_engine.kernel.probe as {EV}\n{EV}.perturb({1000 + 7919 * i})",
                metadata={"course_integrity": "perturb"}))
        if role(c) == "test":
            gid = nbg(c).get("grade_id")
            originals[len(cells)] = c.source
            c.source, _ = instrument_cell(gid, reseed(c.source, seed), tainted, nonce, modules,
                                          (slices or {}).get(gid))
        cells.append(c)
        if perturb and role(c) == "answer":
            names = sorted(student_names([c.source]))
            if names:
                cells.append(nbformat.v4.new_code_cell(
                    f"import grading_engine.kernel.probe as {EV}\n{EV}.wrap_student(globals(), {names!r}, {5000 + 7919 * i})",
                    metadata={"course_integrity": "perturb"}))
    if probe:
        cells.append(nbformat.v4.new_code_cell(f"import grading_engine.kernel.probe as {EV}\n{EV}.final({nonce!r})",
                                               metadata={"course_integrity": "probe"}))
    out.cells = cells
    return out, originals


def evidence_of(cell) -> list[dict]:
    recs = []
    for o in cell.get("outputs", []):
        data = o.get("data") or {}
        if o.get("output_type") in ("display_data", "update_display_data", "execute_result") and EVIDENCE_MIME in data:
            recs.extend(evidence_records(data[EVIDENCE_MIME]))
    return recs


def cache_dir(config=None) -> Path:
    """The reference-run cache of the configuration ``config`` (``GradingEngine.reference_cache``)."""
    from grading_engine.config import GradingEngine

    return GradingEngine(config=config).reference_cache_dir()


@functools.lru_cache(maxsize=1)
def _versions() -> str:
    parts = [sys.version]
    for mod in ("torch", "numpy", "transformers", "ipykernel", "IPython"):
        m = sys.modules.get(mod)
        if m is None:
            try:
                from importlib.metadata import version

                parts.append(f"{mod}={version(mod)}")
            except Exception:
                parts.append(f"{mod}=?")
        else:
            parts.append(f"{mod}={getattr(m, '__version__', '?')}")
    return "|".join(parts)


ENGINE = Path(__file__).resolve().parents[1]
# The instrumentation as this process imported it (read once, now): a long-lived grading process whose
# files are edited under it keeps running the old code, so it must keep filing evidence under the old key.
_INSTRUMENT = (ENGINE / "evidence" / "instrument.py").read_bytes()
KERNEL_PARTS = ("kernel/probe.py", "kernel/audit.py", "kernel/inner.py", "kernel/warm.py", "protocol.py")


def cache_key(ref: NotebookNode, assignment_dir: Path, sandboxed: bool | None = None, threads: int | None = None,
              seed: int = 0) -> str:
    h = hashlib.sha256()
    h.update(CACHE_VERSION.encode())
    h.update(_versions().encode())
    h.update(_INSTRUMENT)
    for part in KERNEL_PARTS:  # read by each kernel (or warm server) when it starts: as on disk now
        h.update((ENGINE / part).read_bytes())
    h.update(json.dumps([[c.cell_type, c.source, nbg(c)] for c in ref.cells], sort_keys=True).encode())
    if sandboxed is None:
        from grading_engine.config import GradingEngine

        sandboxed = GradingEngine().sandbox
    h.update(b"sandbox" if sandboxed else b"nosandbox")
    if threads is not None:  # a float reduction may round differently on another number of threads
        h.update(f"threads={threads}".encode())
    if seed:
        h.update(f"seed={seed}".encode())
    if assignment_dir.exists():
        for p in sorted(assignment_dir.rglob("*")):
            if p.is_file() and p.suffix != ".ipynb" and ".ipynb_checkpoints" not in p.parts \
                    and "__pycache__" not in p.parts:
                h.update(str(p.relative_to(assignment_dir)).encode())
                h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()[:32]


def _run(nb: NotebookNode, folder: Path, config, log, executor) -> tuple[NotebookNode, dict]:
    ep = executor(config=config, log=log) if log is not None else executor(config=config)
    res = {"metadata": {"path": str(folder)}}
    return ep.preprocess(nb, res)


def _records(nb: NotebookNode) -> dict:
    out: dict[str, list] = {}
    for c in nb.cells:
        gid = nbg(c).get("grade_id")
        if role(c) == "test" and gid:
            out[gid] = evidence_of(c)
    return out


def _identity_operands(tree: dict, out: set | None = None) -> set:
    """Paths of the leaves compared by ``is`` / ``is not`` (their identity only means something in one process)."""
    out = set() if out is None else out
    if tree.get("k") == "cmp":
        for i, op in enumerate(tree["ops"]):
            if op in ("Is", "IsNot"):
                for sub in (tree["x"][i], tree["x"][i + 1]):
                    if sub.get("k") == "v":
                        out.add(sub["p"])
    for key in ("x", "r"):
        sub = tree.get(key)
        for s in (sub if isinstance(sub, list) else [sub] if isinstance(sub, dict) else []):
            if isinstance(s, dict):
                _identity_operands(s, out)
    for _, s in tree.get("kw", []):
        _identity_operands(s, out)
    return out


VALUE_IDENTITY = ("c", "k", "type")  # None/True/False, dtypes and classes: `is` holds by value across processes


def slice_plans(ref: NotebookNode, run_a: dict, run_b: dict, nonces: list[str]) -> dict:
    """grade_id -> the slice of each test cell: which values of each check come from the reference run
    (the test's own values: untainted, the same in runs A and B; or computed from inputs the test handed
    to the student's code, which the kernel then reports as *guards* that must be unchanged), and which
    statements of its hidden region the kernel need not run
    (:func:`~grading_engine.evidence.instrument.slice_statements`)."""
    from grading_engine.evidence.judge import exact, records_by_kind, same_exactly, same_value

    cells = _code_cells(ref)
    modules, plans = _modules(cells), _plans(cells)
    entry = notebook_entry_taint([(r, src) for r, src, _ in cells])
    live = live_after_cells([src for _, src, _ in cells])
    # a helper with asserts that one test cell defines and another calls: neither cell is sliced (a check
    # is sliced by the cell that defines it, its records land in the cell that calls it)
    shared = set()
    for gid, recs in list(run_a.items()) + list(run_b.items()):
        foreign = {x.get("g") for x in recs if x.get("k") in ("a", "b") and x.get("g") != gid}
        if foreign:
            shared |= foreign | {gid}
    out = {}
    for idx, (r, src, gid) in enumerate(cells):
        plan = plans.get(gid) if r == "test" else None
        if plan is None or gid in shared or not plan.parsed or not any(
                a.instrumented and not a.branch for a in plan.asserts):
            continue
        a_recs, a_begin, a_done, _ = records_by_kind(run_a.get(gid, []), nonces[0])
        b_recs, b_begin, b_done, _ = records_by_kind(run_b.get(gid, []), nonces[1])
        if not (a_begin and a_done and b_begin and b_done) or \
                [(x["g"], x["i"]) for x in a_recs] != [(x["g"], x["i"]) for x in b_recs]:
            continue
        anchored, guarded = {}, {}
        student_side = flow_leaf_taint(src, entry[idx], set(modules))
        for a in plan.asserts:
            if a.branch or not a.instrumented:
                continue
            pairs = [(x, y) for x, y in zip(a_recs, b_recs) if x["g"] == gid and x["i"] == a.aid]
            if not pairs:
                continue
            identity = _identity_operands(a.tree)
            paths, inputs = [], set()
            for path in list(a.leaves) + list(a.mleaves):
                side = student_side.get((a.aid, path), True)
                if side is True:
                    continue
                guards = [GUARD + n for n in side] if side else []
                if all(path in x["v"] and path in y["v"] and x["v"][path].get("t") != "r"
                       and same_value(x["v"][path], y["v"][path])
                       and (path not in identity or x["v"][path].get("t") in VALUE_IDENTITY)
                       and all(g in x["v"] and g in y["v"] and exact(x["v"][g]) and same_exactly(x["v"][g], y["v"][g])
                               for g in guards) for x, y in pairs):
                    paths.append(path)
                    inputs |= set(side or ())
            if paths:
                anchored[str(a.aid)] = sorted(paths)
            if inputs:
                guarded[str(a.aid)] = sorted(inputs)
        out[gid] = {"anchored": anchored, "guards": guarded,
                    "dropped": slice_statements(src, entry[idx], set(modules), anchored, live[idx])}
    return out


def _check_slices(ref: NotebookNode, slices: dict, run_c: dict, nonce_c: str, run_a: dict, run_b: dict,
                  nonces: list[str]) -> dict:
    """grade_id -> why, for each slice whose run on the reference's own answers did not earn its points."""
    from grading_engine.evidence.judge import judge_cell

    plans = assert_plans(plans_of(ref))
    hidden = {nbg(c).get("grade_id"): hidden_line_numbers(c.source) for c in ref.cells if role(c) == "test"}
    bad = {}
    for gid, cut in slices.items():
        v = judge_cell(gid, plans, run_c.get(gid, []), run_a.get(gid, []), run_b.get(gid), nonce_c,
                       (nonces[0], nonces[1]), hidden, cut)
        if not v.ok:
            bad[gid] = v.why
    return bad


def _run_reference(nb: NotebookNode, assignment_dir: Path, config, log, executor) -> tuple[NotebookNode, dict]:
    with tempfile.TemporaryDirectory(prefix="course-reference-") as tmp:
        folder = Path(tmp) / (assignment_dir.name or "assignment")
        if assignment_dir.exists():
            shutil.copytree(assignment_dir, folder,
                            ignore=shutil.ignore_patterns("*.ipynb", ".ipynb_checkpoints", "__pycache__"))
        else:
            folder.mkdir()
        done, res = _run(nb, folder, config, log, executor)
    return done, res.get("course_integrity", {}).get("execution", {})


SLICE_RUNS = 3  # runs of the sliced reference at most: each leaves out the slices the previous one refuted


def _say_whole(log, bad: dict) -> None:
    if log is not None:
        for gid, why in sorted(bad.items()):
            log.warning("integrity: test cell %s cannot be sliced (%s): its checks run whole in the student's "
                        "process", gid, why)


# Runs read from the cache by this process: a worker grades the same notebooks for every student, and autograde
# asks for them three times a notebook (a file of a long notebook's runs is tens of MB of JSON). Kept pickled, so
# that each caller gets its own copy; looked up by the file's state, so that a file written again is read again.
_REMEMBERED: OrderedDict[str, tuple[tuple, bytes]] = OrderedDict()
REMEMBERED_FILES = 16  # at least the notebooks of one assignment, which a worker grades one after another


def _remembered(path: Path) -> dict | None:
    hit = _REMEMBERED.get(str(path))
    if hit is None or hit[0] != _file_state(path):
        return None
    _REMEMBERED.move_to_end(str(path))
    return pickle.loads(hit[1])


def _remember(path: Path, runs: dict) -> None:
    state = _file_state(path)
    if state is None:
        return
    _REMEMBERED[str(path)] = (state, pickle.dumps(runs, protocol=pickle.HIGHEST_PROTOCOL))
    _REMEMBERED.move_to_end(str(path))
    while len(_REMEMBERED) > REMEMBERED_FILES:
        _REMEMBERED.popitem(last=False)


def reference_runs(ref: NotebookNode, assignment_dir: Path, executor, config=None, log=None,
                   wait: bool = True) -> dict | None:
    """Evidence of runs A and B of the reference notebook, and the slices of its test cells (cached).

    ``executor`` is the execute preprocessor class. Run A is the notebook as it is, run B with every
    random generator moved; from both, :func:`slice_plans` gives each test cell's slice, and run C, the
    reference with its test cells sliced, must earn every point of every sliced cell, judged as a
    student's run is. A cell whose slice does not is graded unsliced (its values all computed in the
    student's process, as in runs A and B), and the log says so.

    ``wait=False``: None at once if another process is running this notebook's reference (it holds the lock)."""
    from grading_engine.config import GradingEngine

    settings = GradingEngine(config=config)
    key = cache_key(ref, assignment_dir, settings.sandbox, settings.threads, settings.input_seed)
    cdir = settings.reference_cache_dir()
    cdir.mkdir(parents=True, exist_ok=True)
    path = cdir / f"{key}.json"
    known = _remembered(path)
    if known is not None:
        return known
    lock = open(cdir / f"{key}.lock", "w")
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            return None
        if path.exists():
            try:
                found = json.loads(path.read_text())
            except ValueError:
                pass
            else:
                _remember(path, found)
                return found
        if log is not None:
            log.info("integrity: running the reference notebook (twice, then its slices) to record its evidence")
        tainted = taint_of(ref)
        seed = settings.input_seed
        while True:
            out: dict = {"key": key, "nonces": [], "runs": [], "audit": [], "stopped": [], "seed": seed}
            failed = []
            for perturb in (False, True):
                nonce = secrets.token_hex(8)
                nb, _ = instrumented(ref, tainted, nonce, perturb=perturb, modules=modules_of(ref), seed=seed)
                done, ex = _run_reference(nb, assignment_dir, config, log, executor)
                out["nonces"].append(nonce)
                out["runs"].append(_records(done))
                out["audit"].append(ex.get("audit", []))
                out["stopped"].append(ex.get("stopped"))
                errors = [nbg(c).get("grade_id") or i for i, c in enumerate(done.cells)
                          if role(c) == "test" and any(o.get("output_type") == "error" for o in c.get("outputs", []))]
                if errors and log is not None:
                    log.warning("integrity: reference run %s: test cells failed: %s", "B" if perturb else "A", errors)
                if errors and not perturb:
                    failed = errors
                    if seed:
                        break
            if not (failed and seed):
                break
            if log is not None:
                log.warning("integrity: with GradingEngine.input_seed = %d the reference fails %s: this notebook is "
                            "graded with its tests' own seeds", seed, failed)
            seed = 0
        slices = slice_plans(ref, out["runs"][0], out["runs"][1], out["nonces"])
        # first on run A's own records (they hold every value): a slice whose checks the grader cannot decide
        # from the values alone (an abstract class in isinstance, objects compared by ==) needs no run to go
        undecided = _check_slices(ref, slices, out["runs"][0], out["nonces"][0], out["runs"][0], out["runs"][1],
                                  out["nonces"])
        _say_whole(log, undecided)
        slices = {g: c for g, c in slices.items() if g not in undecided}
        for _ in range(SLICE_RUNS):
            if not slices:
                break
            nonce = secrets.token_hex(8)
            nb, _ = instrumented(ref, tainted, nonce, modules=modules_of(ref), slices=slices, seed=out["seed"])
            done, ex = _run_reference(nb, assignment_dir, config, log, executor)
            out["audit"].append(ex.get("audit", []))
            bad = _check_slices(ref, slices, _records(done), nonce, out["runs"][0], out["runs"][1], out["nonces"])
            if not bad:
                break
            _say_whole(log, bad)
            slices = {g: c for g, c in slices.items() if g not in bad}
        else:
            slices = {}
        out["slices"] = slices
        tmp_path = path.with_suffix(".tmp")
        text = json.dumps(out)
        tmp_path.write_text(text)
        os.replace(tmp_path, path)
        out = json.loads(text)  # as every later read gives it: plain JSON values, not notebook nodes
        _remember(path, out)
        return out
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()
