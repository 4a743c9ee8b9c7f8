"""Where grading time goes: nbclient hooks that timestamp each notebook's run.

The batch worker sets these hooks on nbgrader's ``Execute`` preprocessor (they
observe, they change nothing). The benchmark sets them through a config line
in a throw-away course directory, with ``BATCH_TIMING_FILE`` naming a JSON-lines
file, to time stock ``nbgrader autograde`` the same way.

Per notebook the events split into: kernel start (launch until the kernel
answers), imports (the setup cell, the notebook's first code cell), execution
(every other cell, until the last cell starts: nbclient's hooks do not see
a reply, so the end of a cell is the start of the next), kernel shutdown (until
the provisioner has cleaned up; known only in the batch worker); the rest of the wall time is nbgrader's
own bookkeeping (reading and writing notebooks, sanitising, the gradebook).
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

EVENTS: list[tuple[str, float]] = []


def _record(name: str) -> None:
    t = time.perf_counter()
    EVENTS.append((name, t))
    path = os.environ.get("BATCH_TIMING_FILE")
    if path:
        with open(path, "a") as fh:
            fh.write(json.dumps({"event": name, "t": time.time(), "pid": os.getpid()}) + "\n")


def _first_code(notebook) -> int:
    for i, c in enumerate(notebook.cells):
        if c.cell_type == "code" and c.source.strip():
            return i
    return -1


_state: dict[str, Any] = {"first": -1, "in_setup": False}


def on_notebook_start(notebook=None, **_):
    _state["first"] = _first_code(notebook) if notebook is not None else -1
    _state["in_setup"] = False
    _record("notebook_start")


def on_cell_start(cell=None, cell_index=None, **_):
    # nbclient runs cells one after another: a cell starts once the previous one has its reply
    if _state["in_setup"]:
        _state["in_setup"] = False
        _record("setup_end")
    _record("cell_done")


def on_cell_execute(cell=None, cell_index=None, **_):
    if cell_index == _state["first"]:
        _state["in_setup"] = True
        _record("setup_start")


HOOKS = {
    "on_notebook_start": on_notebook_start,
    "on_cell_start": on_cell_start,
    "on_cell_execute": on_cell_execute,
}

CONFIG_LINES = "\n".join(
    ["import grading_engine.batch.timing as _batch_timing"]
    + [f"c.Execute.{name} = _batch_timing.{name}" for name in HOOKS]
) + "\n"


def kernel_start_failed(events: list[tuple[str, float]]) -> bool:
    """Whether the last kernel launched never answered (no notebook started after its launch).

    Nothing of the student's runs before the kernel answers, so such a failure
    says nothing about the submission: the batch grades it again.
    """
    launched = started = None
    for name, t in sorted(events, key=lambda e: e[1]):
        if name == "launch_start":
            launched, started = t, None
        elif name == "notebook_start" and launched is not None:
            started = t
    return launched is not None and started is None


def split(events: list[tuple[str, float]]) -> list[dict[str, float]]:
    """Per-notebook durations from a time-ordered event list (seconds)."""
    out: list[dict[str, float]] = []
    cur: dict[str, float] = {}
    for name, t in sorted(events, key=lambda e: e[1]):
        if name == "launch_start":
            if cur:
                out.append(_close(cur))
            cur = {"launch_start": t}
        elif name == "notebook_start" and "notebook_start" in cur:
            out.append(_close(cur))
            cur = {"notebook_start": t}
        elif name == "cell_done":
            cur[name] = t
        else:
            cur.setdefault(name, t)
    if cur:
        out.append(_close(cur))
    return [d for d in out if d]


def _close(ev: dict[str, float]) -> dict[str, float]:
    if "notebook_start" not in ev:
        return {}
    d: dict[str, float] = {}
    if "launch_start" in ev:
        d["kernel_start"] = ev["notebook_start"] - ev["launch_start"]
    s0, s1 = ev.get("setup_start"), ev.get("setup_end")
    end = ev.get("cell_done")
    if s0 is not None and s1 is not None:
        d["imports"] = s1 - s0
    if end is not None:
        d["execution"] = end - ev["notebook_start"] - d.get("imports", 0.0)
        if "kernel_gone" in ev:
            d["shutdown"] = ev["kernel_gone"] - end
    d["warm"] = 1.0 if "launched_warm" in ev else 0.0
    return d
