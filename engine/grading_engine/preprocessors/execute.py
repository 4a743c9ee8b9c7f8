"""nbgrader's Execute preprocessor, running notebooks in the ``course-sandbox`` kernel.

Registered only in ``Autograde.autograde_preprocessors`` (see
:mod:`grading_engine.plugin`), so students' own ``nbgrader validate`` keeps
the ordinary kernel. On top of nbgrader's Execute it

* refuses loudly (``SystemExit``, before any student code runs) when the
  sandbox cannot start, unless ``COURSE_SANDBOX=off`` (then it warns);
* talks to the kernel over unix sockets (``transport = "ipc"``), the
  connection file and sockets in a private folder per kernel, so paths stay
  short and no kernel can see another's connection file;
* keeps grading when the kernel dies or stops answering (the cells not run
  are left without output and the evidence check gives them nothing) instead
  of failing the whole submission;
* caps each cell's output and the notebook's output, so a flood of output
  cannot exhaust the grader's memory;
* collects the kernel's audit events and attributes them to cells.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from nbclient.exceptions import CellTimeoutError, DeadKernelError
from nbformat import NotebookNode
from traitlets import Integer, Unicode

from nbgrader.preprocessors import Execute

from grading_engine.protocol import EVIDENCE_MIME
from grading_engine.config import GradingEngine
from grading_engine.sandbox import KERNEL_NAME, OPT_OUT_WARNING, REFUSAL, requested

RESOURCE_KEY = "course_integrity"


def ensure_kernelspec(packages: list[str]) -> None:
    """Install the sandbox kernelspec when it is missing or mounts other packages than configured."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    from grading_engine.sandbox.install import install, installed_packages

    try:
        spec = KernelSpecManager().get_kernel_spec(KERNEL_NAME)
    except NoSuchKernel:
        install(packages=packages)
        return
    prefix = str(Path(spec.resource_dir).parents[3])
    if installed_packages(prefix) != list(packages):
        install(prefix, packages=packages)


def require_sandbox(log=None) -> None:
    """Exit the whole nbgrader run (before any student code) when the sandbox cannot start."""
    if not requested():
        if log is not None:
            log.warning(OPT_OUT_WARNING)
        else:
            print(f"WARNING: {OPT_OUT_WARNING}", file=sys.stderr)
        return
    from grading_engine.sandbox.bwrap import availability

    ok, why = availability()
    if not ok:
        msg = REFUSAL.format(why=why)
        if log is not None:
            log.error(msg)
        if "autograde" in sys.argv[1:3]:
            raise SystemExit(msg)  # the command line: stop the whole run now
        raise RuntimeError(msg)  # inside a server (formgrader): fail this submission, loudly, not the server


class SandboxedExecute(Execute):
    kernel_name = Unicode(KERNEL_NAME, help="kernel that runs student code while autograding").tag(config=True)
    max_cell_output_bytes = Integer(1_000_000, help="output kept per cell (evidence excluded)").tag(config=True)
    max_notebook_output_bytes = Integer(10_000_000, help="output kept per notebook").tag(config=True)
    max_cell_evidence_bytes = Integer(16_000_000, help="evidence kept per cell").tag(config=True)

    def preprocess(self, nb, resources=None, km=None):
        require_sandbox(self.log)
        if self.kernel_name == KERNEL_NAME:
            ensure_kernelspec(GradingEngine(parent=self).sandbox_packages)
        self._stopped = None
        self._cell_bytes: dict[int, int] = {}
        self._cell_evidence: dict[int, int] = {}
        self._total_bytes = 0
        self._truncated: set[int] = set()
        self._events: list[dict] = []
        self._runtime = Path(tempfile.mkdtemp(prefix="cs-"))
        self._connection_file = str(self._runtime / "k.json")
        try:
            out = super().preprocess(nb, resources, km)
        finally:
            self._collect_audit()
            shutil.rmtree(self._runtime, ignore_errors=True)
        nb_out, res = out
        info = res.setdefault(RESOURCE_KEY, {})
        info["execution"] = {
            "stopped": self._stopped,
            "truncated_cells": sorted(self._truncated),
            "audit": self._events,
        }
        return nb_out, res

    # -- kernel

    def create_kernel_manager(self):
        if not self.kernel_name:
            self.kernel_name = self.nb.metadata.get("kernelspec", {}).get("name", "python3")
        kwargs = {"kernel_name": self.kernel_name, "config": self.config}
        if self.kernel_name == KERNEL_NAME:
            kwargs.update(transport="ipc", connection_file=self._connection_file, ip=str(self._runtime / "k-ipc"))
        self.km = self.kernel_manager_class(**kwargs)
        return self.km

    def _collect_audit(self) -> None:
        from grading_engine.sandbox.kernel import audit_path_for

        path = audit_path_for(self._connection_file)
        if not path.exists():
            return
        for line in path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                rec = {"e": "audit.garbled", "a": [line[:200]]}
            if isinstance(rec, dict):
                self._events.append(rec)
        path.unlink(missing_ok=True)

    # -- cells

    def preprocess_cell(self, cell, resources, index):
        if self._stopped is not None:
            return cell, resources
        try:
            return super().preprocess_cell(cell, resources, index)
        except DeadKernelError:
            self._stop(cell, index, "the kernel died while running this cell")
        except CellTimeoutError:
            self._stop(cell, index, "the kernel did not respond after this cell's timeout; it was stopped")
        return cell, resources

    def _stop(self, cell, index: int, why: str) -> None:
        self._stopped = {"cell": index, "why": why}
        self.log.warning("%s (cell %d); the rest of the notebook is not run", why, index)
        if cell.cell_type == "code":
            # first, so that nbgrader's scoring sees it before anything the cell printed
            cell.outputs.insert(0, NotebookNode(output_type="error", ename="KernelStopped", evalue=why,
                                                traceback=[f"KernelStopped: {why}"]))

    def output(self, outs, msg, display_id, cell_index):
        content = msg.get("content", {})
        size = len(json.dumps(content, default=str))
        data = content.get("data") or {}
        if EVIDENCE_MIME in data and len(data) == 1:
            used = self._cell_evidence.get(cell_index, 0) + size
            self._cell_evidence[cell_index] = used
            if used > self.max_cell_evidence_bytes:
                self._truncated.add(cell_index)
                return None
            return super().output(outs, msg, display_id, cell_index)
        used = self._cell_bytes.get(cell_index, 0) + size
        self._cell_bytes[cell_index] = used
        self._total_bytes += size
        if used > self.max_cell_output_bytes or self._total_bytes > self.max_notebook_output_bytes:
            if cell_index not in self._truncated:
                self._truncated.add(cell_index)
                outs.append(NotebookNode(output_type="stream", name="stdout",
                                         text="\n[grader: further output of this cell was dropped: too much output]\n"))
            return None
        return super().output(outs, msg, display_id, cell_index)
