"""nbgrader's Execute preprocessor, running notebooks in the ``course-sandbox`` kernel.

Registered only in ``Autograde.autograde_preprocessors`` (see
:mod:`grading_engine.plugin`), so students' own ``nbgrader validate`` keeps
the ordinary kernel. On top of nbgrader's Execute it

* reads the engine's settings at run time (``GradingEngine(parent=self)``:
  ``nbgrader_config.py``, then the command line) and hands the launcher
  what it needs in the kernel's command line (:func:`launcher_arguments`):
  the sandbox switch, the limits, the modules to preload and to watch;
* refuses loudly when the sandbox cannot start (``RuntimeError``: this
  submission fails; the command line's autograde has already stopped before
  its first submission, see :class:`grading_engine.plugin.BeforeAutograde`),
  unless ``GradingEngine.sandbox`` is False (then it warns);
* with ``GradingEngine.sandbox`` and ``GradingEngine.evidence`` both False,
  is nbgrader's own Execute in the notebook's kernel;
* talks to the kernel over unix sockets (``transport = "ipc"``), the
  connection file and sockets in a private folder per kernel, so paths stay
  short and no kernel can see another's connection file;
* keeps grading when the kernel dies or stops answering (the cells not run
  are left without output and the evidence check gives them nothing) instead
  of failing the whole submission;
* caps each cell's output and the notebook's output, so a flood of output
  cannot exhaust the grader's memory; outputs of the MIME types in
  ``GradingEngine.output_caps`` have caps of their own;
* collects the kernel's audit events and attributes them to cells;
* takes the kernel as ready once it has answered ``kernel_info`` and IOPub has carried the idle
  status of that request (:func:`wait_until_ready`), rather than after jupyter_client's 0.2 s of
  IOPub silence.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from queue import Empty

from nbclient.exceptions import CellTimeoutError, DeadKernelError
from nbclient.util import ensure_async, run_hook, run_sync
from nbformat import NotebookNode
from nbgrader.preprocessors import Execute
from traitlets import Integer, Unicode

from grading_engine.config import GradingEngine
from grading_engine.sandbox import KERNEL_NAME, OPT_OUT_WARNING, REFUSAL, warm
from grading_engine.sandbox.kernel import launcher_arguments

RESOURCE_KEY = "course_integrity"


def ensure_kernelspec(packages: list[str], bwrap: str | None = None) -> None:
    """Install the sandbox kernelspec when it is missing.

    Each kernel gets the configured packages and bubblewrap binary when it starts
    (:func:`grading_engine.sandbox.kernel.launcher_arguments`), so an existing kernelspec is left as it
    is: grading one course never rewrites the kernelspec another course's grading relies on."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    from grading_engine.sandbox.install import install

    try:
        KernelSpecManager().get_kernel_spec(KERNEL_NAME)
    except NoSuchKernel:
        install(packages=packages, bwrap=None if bwrap in (None, "", "bundled") else bwrap)


async def wait_until_ready(kc, timeout: float) -> None:
    """Return once the kernel answered ``kernel_info`` and IOPub carried the idle status of that request.

    jupyter_client's ``wait_for_ready`` does the same, then waits for 0.2 s in which IOPub carries
    nothing. That flush is not needed here: nbclient keeps only the IOPub messages whose parent is the
    cell it runs, and the idle status already proves that IOPub is connected (a late subscription, which
    would lose a first cell's output, misses the status and the request is sent again).
    """
    deadline = time.monotonic() + timeout
    while True:
        msg_id = kc.kernel_info()
        reply = await _answer(kc.shell_channel, msg_id, "kernel_info_reply", 1.0)
        if reply is not None and await _answer(kc.iopub_channel, msg_id, "status", 0.2, state="idle"):
            kc._handle_kernel_info_reply(reply)
            return
        if not await ensure_async(kc.is_alive()):
            raise RuntimeError("Kernel died before replying to kernel_info")
        if time.monotonic() > deadline:
            raise RuntimeError(f"Kernel didn't respond in {timeout:g} seconds")


async def _answer(channel, msg_id: str, msg_type: str, timeout: float, state: str | None = None):
    """The first message of ``channel`` of type ``msg_type`` (and execution ``state``) answering ``msg_id``
    within ``timeout`` seconds; the others are dropped."""
    end = time.monotonic() + timeout
    while (left := end - time.monotonic()) > 0:
        try:
            msg = await ensure_async(channel.get_msg(timeout=left))
        except Empty:
            return None
        if msg["msg_type"] == msg_type and (msg.get("parent_header") or {}).get("msg_id") == msg_id and \
                (state is None or msg["content"].get("execution_state") == state):
            return msg
    return None


def require_sandbox(log=None, settings: GradingEngine | None = None, fatal: bool = False) -> None:
    """Refuse to run student code when the sandbox is asked for and cannot start.

    ``fatal``: ``SystemExit``, which stops the whole run (autograde's pre-convert hook, before the first
    submission); else ``RuntimeError``, which fails this submission, loudly (inside a server such as the
    formgrader, nbgrader catches either). ``settings``: default, those of the environment's defaults.
    """
    settings = settings if settings is not None else GradingEngine()
    if not settings.sandbox:
        if log is not None:
            log.warning(OPT_OUT_WARNING)
        else:
            print(f"WARNING: {OPT_OUT_WARNING}", file=sys.stderr)
        return
    from grading_engine.sandbox.bwrap import availability

    ok, why = availability(settings.bwrap)
    if not ok:
        msg = REFUSAL.format(why=why)
        if log is not None:
            log.error(msg)
        raise (SystemExit if fatal else RuntimeError)(msg)


class SandboxedExecute(Execute):
    kernel_name = Unicode(KERNEL_NAME, help="kernel that runs student code while autograding").tag(config=True)
    max_cell_output_bytes = Integer(
        1_000_000, help="output kept per cell (outputs of the types in GradingEngine.output_caps apart)",
    ).tag(config=True)
    max_notebook_output_bytes = Integer(10_000_000, help="output kept per notebook").tag(config=True)

    _stock = False
    _launcher_args: list[str] = []

    def preprocess(self, nb, resources=None, km=None):
        settings = GradingEngine(parent=self)
        self._stock = not (settings.sandbox or settings.evidence)
        if self._stock:  # the engine is off: nbgrader's own Execute, in the notebook's own kernel
            if self.kernel_name == KERNEL_NAME:
                self.kernel_name = ""
            return super().preprocess(nb, resources, km)
        require_sandbox(self.log, settings)
        self._launcher_args = []
        server = None
        if self.kernel_name == KERNEL_NAME:
            ensure_kernelspec(settings.sandbox_packages, settings.bwrap)
            self._launcher_args = launcher_arguments(settings)
            server = warm.server_for(settings, nb, self.log)
            if server is not None:
                self._launcher_args += ["--warm", str(server)]
        self._reset_counts(settings)
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
            "kernel": self._kernel_origin(server),
        }
        return nb_out, res

    def _kernel_origin(self, server) -> str:
        """Where the kernel came from: a warm sandbox server, a sandbox of its own, or no sandbox."""
        if self.kernel_name != KERNEL_NAME:
            return "unsandboxed"
        fell_back = any(e.get("e") == "sandbox.cold" for e in self._events)
        return "warm" if server is not None and not fell_back else "cold"

    def _reset_counts(self, settings: GradingEngine) -> None:
        self._caps = dict(settings.output_caps)
        self._stopped = None
        self._cell_bytes: dict[int, int] = {}
        self._capped: dict[tuple[int, str], int] = {}
        self._total_bytes = 0
        self._truncated: set[int] = set()

    # -- kernel

    async def async_start_new_kernel(self, **kwargs):
        """Start the kernel with the launcher's settings after the configured extra arguments."""
        configured = list(self.extra_arguments)
        self.extra_arguments = configured + self._launcher_args
        try:
            await super().async_start_new_kernel(**kwargs)
        finally:
            self.extra_arguments = configured

    start_new_kernel = run_sync(async_start_new_kernel)

    async def async_start_new_kernel_client(self):
        """nbclient's, with :func:`wait_until_ready` for jupyter_client's ``wait_for_ready``."""
        if self._stock:
            return await super().async_start_new_kernel_client()
        try:
            self.kc = self.km.client()
            await ensure_async(self.kc.start_channels())
            await wait_until_ready(self.kc, self.startup_timeout)
        except Exception as e:
            self.log.error("Error occurred while starting new kernel client for kernel %s: %s",
                           getattr(self.km, "kernel_id", None), e)
            await self._async_cleanup_kernel()
            raise
        self.kc.allow_stdin = False
        await run_hook(self.on_notebook_start, notebook=self.nb)
        return self.kc

    start_new_kernel_client = run_sync(async_start_new_kernel_client)

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
        if self._stock:
            return super().preprocess_cell(cell, resources, index)
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
        if self._stock:
            return super().output(outs, msg, display_id, cell_index)
        content = msg.get("content", {})
        size = len(json.dumps(content, default=str))
        data = content.get("data") or {}
        mime = next(iter(data)) if len(data) == 1 else None
        if mime in self._caps:  # an output of one capped type only: counted apart from the rest
            used = self._capped.get((cell_index, mime), 0) + size
            self._capped[(cell_index, mime)] = used
            if used > self._caps[mime]:
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
