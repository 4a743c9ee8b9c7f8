"""The autograde preprocessors around Execute: instrument the tests, then judge their evidence.

``Autograde.autograde_preprocessors`` becomes
``[InstrumentTests, SandboxedExecute, CheckEvidence, <nbgrader's own: IgnorePattern, ..., SaveAutoGrades, ...>]``
(see :mod:`grading_engine.plugin`), so ``nbgrader autograde`` applies them
itself and nbgrader's own scoring (``SaveAutoGrades``) decides the points:
a test cell without matching evidence gets an error output first in its
outputs, which nbgrader scores zero.
"""

from __future__ import annotations

import re
import secrets
import traceback
from pathlib import Path

from nbformat import NotebookNode
from nbgrader.coursedir import CourseDirectory
from nbgrader.preprocessors import NbGraderPreprocessor

from grading_engine import record as report
from grading_engine.config import FollowsEvidence, GradingEngine
from grading_engine.evidence.instrument import hidden_line_numbers
from grading_engine.evidence.judge import judge_cell
from grading_engine.evidence.reference import (
    assert_plans,
    evidence_of,
    gradebook_notebook,
    instrumented,
    modules_of,
    nbg,
    plans_of,
    reference_notebook,
    reference_runs,
    role,
    taint_of,
)
from grading_engine.preprocessors.execute import RESOURCE_KEY, SandboxedExecute
from grading_engine.protocol import EVIDENCE_MIME
from grading_engine.sandbox import SANDBOX_OPT_OUT_EVENT

ERROR_NAME = "GradingCheckFailed"


def course_reference(config, log, db_url: str, assignment: str, notebook: str, wait: bool = True):
    """(the reference notebook, its reference runs) of one notebook of the course's source folder (with the
    locked cells the gradebook holds); None if that notebook is missing, its runs None if ``wait`` is False
    and another process is running them (:func:`~grading_engine.evidence.reference.reference_runs`)."""
    cd = CourseDirectory(config=config)
    src_dir = Path(cd.format_path(cd.source_directory, ".", assignment))
    src_path = src_dir / f"{notebook}.ipynb"
    if not src_path.exists():
        return None
    ref = reference_notebook(src_path, gradebook_notebook(db_url, assignment, notebook))
    return ref, reference_runs(ref, src_dir, SandboxedExecute, config, log, wait=wait)


class InstrumentTests(FollowsEvidence, NbGraderPreprocessor):
    """Replace each test cell (already restored by OverwriteCells) by its instrumented version.

    On when ``GradingEngine.evidence`` is (read at run time)."""

    def preprocess(self, nb: NotebookNode, resources: dict):
        info = resources["nbgrader"]
        assignment, notebook = info["assignment"], info["notebook"]
        found = course_reference(self.config, self.log, info["db_url"], assignment, notebook)
        if found is None:
            self.log.error("integrity: the source of %s is missing: cannot run the reference, grading it without "
                           "evidence checks", notebook)
            return nb, resources
        ref, refruns = found
        plans = plans_of(ref)
        nonce = secrets.token_hex(8)
        present = {nbg(c).get("grade_id") for c in nb.cells if role(c) == "test"}
        # instrument with the reference's source of each test cell (OverwriteCells made them identical)
        ref_src = {nbg(c).get("grade_id"): c.source for c in ref.cells if role(c) == "test"}
        for c in nb.cells:
            gid = nbg(c).get("grade_id")
            if role(c) == "test" and gid in ref_src and c.source != ref_src[gid]:
                self.log.warning("integrity: test cell %s differs from the gradebook's", gid)
        slices = {g: c for g, c in (refruns.get("slices") or {}).items() if g in present}
        out, originals = instrumented(nb, taint_of(ref), nonce, probe=True, modules=modules_of(ref), slices=slices,
                                      seed=refruns.get("seed") or 0)
        nb.cells = out.cells
        resources[RESOURCE_KEY] = {
            "nonce": nonce,
            "originals": originals,
            "plans": assert_plans(plans),
            "test_ids": sorted(g for g in present if g in plans),
            "reference": refruns,
            "probe_index": len(nb.cells) - 1,
            "slices": slices,
        }
        return nb, resources


AUDIT_KINDS = [
    (re.compile(r"^(socket\.|urllib|http\.|ftplib|smtplib|poplib|imaplib|nntplib|telnetlib|webbrowser)"), "network"),
    (re.compile(r"^(subprocess|os\.system|os\.exec|os\.posix_spawn|os\.spawn|os\.fork|os\.forkpty|os\.kill|"
                r"os\.killpg|signal\.|pty\.|resource\.)"), "process"),
    (re.compile(r"^(sys\.settrace|sys\.setprofile|sys\.addaudithook|sys\._getframe|sys\._current_frames|gc\.|ctypes|"
                r"cpython\.)"), "interpreter_hook"),
    (re.compile(r"^(exec|compile|code\.__new__|function\.__new__)$"), "dynamic_code"),
    (re.compile(r"^(open|os\.|glob\.|shutil\.|sqlite3\.)"), "file_access"),
]
_ADDR = re.compile(r"0x[0-9a-f]+")


def _sig(ev: dict) -> tuple:
    return (ev.get("e"), tuple(ev.get("p") or []) or tuple(_ADDR.sub("0x", str(a)) for a in ev.get("a", [])))


def audit_flags(events: list[dict], reference_events: list[list[dict]], cell_of: dict) -> tuple[list[dict], bool]:
    """Flags from the audit stream (events the reference runs did not also produce); and whether it ran sandboxed."""
    ref = {_sig(e) for run in reference_events for e in run}
    ready = False
    cell = None
    flags: dict[tuple, dict] = {}
    sandboxed = True
    for ev in events:
        e = ev.get("e", "")
        if e == SANDBOX_OPT_OUT_EVENT:
            sandboxed = False
            continue
        if e == "kernel.ready":
            ready = True
            continue
        if e == "cell":
            cell = cell_of.get((ev.get("a") or [None])[0], cell)
            continue
        if e == "sandbox.exit":
            continue
        if e == "sandbox.oom":
            a = ev.get("a") or ["?", "?"]
            flags[("oom", e)] = {"kind": "kernel_stopped", "source": "execution", "where": "",
                                 "detail": f"the sandbox ran out of memory ({a[1]} MB): the kernel's memory "
                                           f"cgroup killed {a[0]} process(es)"}
            continue
        if e == "sandbox.audit_truncated":
            flags[("audit", e)] = {"kind": "audit_channel", "source": "runtime",
                                   "detail": f"the notebook caused too many audit events ({ev.get('a')} dropped)",
                                   "where": ""}
            continue
        if not ready or e.startswith("sandbox.") or _sig(ev) in ref:
            continue
        kind = next((k for rx, k in AUDIT_KINDS if rx.search(e)), "interpreter_hook")
        what = ", ".join(ev.get("p") or [str(a) for a in ev.get("a", [])])[:160]
        key = (kind, e, what)
        if key in flags:
            flags[key]["count"] = flags[key].get("count", 1) + 1
            continue
        flags[key] = {"kind": kind, "source": "runtime", "detail": f"{e}: {what}",
                      "where": f"cell {cell}" if cell is not None else ""}
    out = []
    for f in flags.values():
        n = f.pop("count", 1)
        if n > 1:
            f["detail"] += f" ({n} times)"
        out.append(f)
    return out, sandboxed


class CheckEvidence(FollowsEvidence, NbGraderPreprocessor):
    """After Execute: judge every test cell from its evidence, restore the sources, write the record.

    On when ``GradingEngine.evidence`` is (read at run time)."""

    def preprocess(self, nb: NotebookNode, resources: dict):
        info = resources.get(RESOURCE_KEY)
        if not info or "nonce" not in info:
            return nb, resources
        nbinfo = resources["nbgrader"]
        nonce = info["nonce"]
        ref = info["reference"]
        flags: list[dict] = []
        execution = info.get("execution", {})

        # 1. evidence out of every cell; the probe cell out of the notebook
        records: dict[int, list[dict]] = {}
        for i, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            recs = evidence_of(cell)
            if recs:
                records[i] = recs
            cell.outputs = [o for o in cell.get("outputs", [])
                            if EVIDENCE_MIME not in (o.get("data") or {})]
        probe_index = info["probe_index"]
        final = [r for r in records.get(probe_index, []) if r.get("k") == "final" and r.get("n") == nonce]
        if probe_index < len(nb.cells) and nb.cells[probe_index].get("metadata", {}).get("course_integrity") == "probe":
            probe_cell = nb.cells.pop(probe_index)
        else:
            probe_cell = None

        # 2. judge each test cell
        plans = info["plans"]
        ref_runs = ref.get("runs", [{}, {}])
        nonces = ref.get("nonces", ["", ""])
        verdicts = {}
        slices = info.get("slices") or {}
        hidden = {nbg(c).get("grade_id"): hidden_line_numbers(info["originals"].get(i, c.source))
                  for i, c in enumerate(nb.cells) if role(c) == "test"}
        for i, cell in enumerate(nb.cells):
            if role(cell) != "test":
                continue
            gid = nbg(cell).get("grade_id")
            if gid not in info["test_ids"]:
                continue
            v = judge_cell(gid, plans, records.get(i, []), ref_runs[0].get(gid, []),
                           ref_runs[1].get(gid) if len(ref_runs) > 1 else None, nonce,
                           (nonces[0], nonces[1] if len(nonces) > 1 else None), hidden, slices.get(gid))
            verdicts[gid] = v.to_json()
            for f in v.flags:
                f["source"] = "evidence"
                f.setdefault("where", gid)
                flags.append(f)
            has_error = any(o.get("output_type") == "error" or (o.get("output_type") == "stream"
                                                                 and o.get("name") == "stderr")
                            for o in cell.get("outputs", []))
            if not v.ok:
                # a sliced cell never raises for a failed check (its kernel does not know the expected values)
                if not has_error and execution.get("stopped") is None and gid not in slices:
                    flags.append({"kind": "hidden_failure", "source": "evidence", "where": gid,
                                  "detail": f"{gid}: {v.why}, yet the cell shows no error"})
                cell.outputs.insert(0, NotebookNode(output_type="error", ename=ERROR_NAME, evalue=v.why,
                                                    traceback=[f"{ERROR_NAME}: {v.why}"]))
            # a test cell that does not end in an expression has no result of its own
            cell.outputs = [o for o in cell.outputs if o.get("output_type") != "execute_result"] \
                if not _ends_in_expression(info["originals"].get(i, cell.source)) else cell.outputs

        # 3. the original sources back
        for i, src in info["originals"].items():
            if i < len(nb.cells):
                nb.cells[i].source = src

        # 4. what else was seen
        for rec_cell, recs in records.items():
            alien = [r for r in recs if r.get("n") not in (nonce,)]
            if alien:
                flags.append({"kind": "forged_evidence", "source": "evidence", "where": f"cell {rec_cell}",
                              "detail": f"{len(alien)} evidence record(s) with a nonce the grader did not issue"})
        stopped = execution.get("stopped")
        if stopped is not None:
            flags.append({"kind": "kernel_stopped", "source": "execution", "where": f"cell {stopped['cell']}",
                          "detail": stopped["why"]})
        elif probe_cell is not None and not final:
            flags.append({"kind": "probe_missing", "source": "probe", "where": "",
                          "detail": "the grader's last cell did not report: later cells were emptied, replaced or "
                                    "their output suppressed"})
        for rec in final:
            for finding in rec.get("s", []):
                flags.append({"kind": finding.get("k", "interpreter_hook"), "source": "probe", "where": "",
                              "detail": finding.get("d", "")})
        for idx in execution.get("truncated_cells", []):
            flags.append({"kind": "output_flood", "source": "execution", "where": f"cell {idx}",
                          "detail": "the cell's output was truncated by the grader"})
        cell_of = {c.get("execution_count"): i for i, c in enumerate(nb.cells)
                   if c.cell_type == "code" and c.get("execution_count") is not None}
        aflags, sandboxed = audit_flags(execution.get("audit", []), ref.get("audit", []), cell_of)
        flags += aflags
        cd = CourseDirectory(config=self.config)
        try:
            everything = report.set_stage_flags(
                cd.root, nbinfo["assignment"], nbinfo["student"], nbinfo["notebook"], "run", flags, cells=verdicts,
                sandbox="on" if sandboxed and GradingEngine(parent=self).sandbox else "off",
                execution={"stopped": stopped, "truncated_cells": execution.get("truncated_cells"),
                           "kernel": execution.get("kernel")})
            if everything:
                self._flag_in_gradebook(nbinfo)
        except Exception:
            self.log.error("integrity: could not write the record: %s", traceback.format_exc())
        for f in flags:
            self.log.warning("integrity flag %s/%s/%s: %s: %s", nbinfo["student"], nbinfo["assignment"],
                             nbinfo["notebook"], f["kind"], f["detail"])
        return nb, resources


    def _flag_in_gradebook(self, nbinfo: dict) -> None:
        """Raise nbgrader's own flag on the submitted notebook, which the formgrader shows (never lowered here)."""
        from nbgrader.api import Gradebook

        with Gradebook(nbinfo["db_url"]) as gb:
            sub = gb.find_submission_notebook(nbinfo["notebook"], nbinfo["assignment"], nbinfo["student"])
            if not sub.flagged:
                sub.flagged = True
                gb.db.commit()


def _ends_in_expression(source: str) -> bool:
    import ast

    from grading_engine.evidence.instrument import parse_cell

    tree = parse_cell(source)
    return bool(tree and tree.body and isinstance(tree.body[-1], ast.Expr))
