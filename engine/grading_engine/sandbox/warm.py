"""Warm sandboxed kernels: one fork server inside the sandbox per grading process.

A cold sandboxed kernel costs a bubblewrap, a new interpreter and ``import torch`` per notebook. With
``GradingEngine.warm_kernels`` (the default), :class:`grading_engine.preprocessors.execute.SandboxedExecute`
asks :func:`server_for` for a server when it first starts a kernel: one bubblewrap sandbox that runs
:mod:`grading_engine.kernel.warm` and has imported ipykernel and what the notebooks' setup cells import.
The kernel's launcher (:mod:`grading_engine.sandbox.kernel`, ``--warm SOCKET``) then asks the server for
the kernel instead of starting bubblewrap; the server forks it behind walls of its own (namespaces,
mounts, uid, limits: see :mod:`grading_engine.kernel.warm`). The server lives as long as the grading
process (``nbgrader autograde``, a batch worker), dies with it, and is started again if it dies.

When a server cannot start, or a kernel cannot get its walls from it, that kernel gets a fresh sandbox
of its own, and the log says so (once per process for the server, in the kernel's audit for a kernel).
"""

from __future__ import annotations

import ast
import atexit
import json
import os
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from grading_engine.protocol import WARM_DIR, WARM_KERNELS, WARM_SOCKET
from grading_engine.sandbox.bwrap import (
    Limits,
    build_command,
    package_mounts,
    python_roots,
    sandbox_env,
    sweep_stale,
    write_etc,
)

START_TIMEOUT = 180.0  # seconds for the server's imports (torch) on a loaded machine
# ipykernel imports its debugger (and debugpy) when a kernel starts
ALWAYS_PRELOAD = ("IPython", "matplotlib_inline.backend_inline", "ipykernel.debugger")
# what a preloaded package imports only on first use, at a cost every kernel would pay again: torch imports
# its compiler (torch._dynamo, 1.5 to 4.5 s on this course's machine) the first time an optimizer is built
ON_FIRST_USE = {"torch": ("torch._dynamo",)}
_ALSO_PRELOAD: list[str] = []  # see also_preload


def preload_modules(modules) -> list[str]:
    """:data:`ALWAYS_PRELOAD`, ``modules`` and what those import on first use (:data:`ON_FIRST_USE`), once each."""
    out: list[str] = []
    for name in [*ALWAYS_PRELOAD, *modules]:
        out += [name, *ON_FIRST_USE.get(name.partition(":")[0].split(".")[0], ())]
    return list(dict.fromkeys(out))


def also_preload(modules: list[str] | None) -> None:
    """Modules every server this process starts imports too, besides the first notebook's setup imports:
    a batch worker names those of all the notebooks it may grade, so that no kernel imports them itself."""
    _ALSO_PRELOAD[:] = list(dict.fromkeys(modules or []))


class WarmUnavailable(RuntimeError):
    """The fork server could not start; kernels get a fresh sandbox each."""


def setup_imports(nb, every_cell: bool = False) -> list[str]:
    """What a notebook imports at the top level of its setup cell (its first code cell), or of every code
    cell with ``every_cell`` (an instructor's notebook: the batch reads the source notebooks), as preload
    entries (:func:`grading_engine.protocol.import_preload`): ``module`` for ``import module``, and also
    ``module:name`` for ``from module import name``, so that what a package loads only when a name is first
    read is loaded once, in the server."""
    cells = [c for c in nb.cells if c.cell_type == "code" and c.source.strip()]
    mods: list[str] = []
    for code in cells if every_cell else cells[:1]:
        src = "\n".join(ln for ln in code.source.splitlines() if not ln.lstrip().startswith(("%", "!")))
        try:
            tree = ast.parse(src)
        except SyntaxError:
            continue
        for node in tree.body:
            if isinstance(node, ast.Import):
                mods += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                mods.append(node.module)
                mods += [f"{node.module}:{a.name}" for a in node.names if a.name != "*"]
    return list(dict.fromkeys(mods))


@dataclass(frozen=True)
class ServerKey:
    """What a server's sandbox depends on: a kernel uses the process's server only if all of it is equal."""

    limits: str
    packages: tuple[str, ...]
    bwrap: str


@dataclass
class WarmServer:
    key: ServerKey
    dir: Path
    proc: subprocess.Popen
    info: dict = field(default_factory=dict)
    started_s: float = 0.0

    @property
    def socket(self) -> Path:
        return self.dir / WARM_SOCKET

    @property
    def kernels(self) -> Path:
        return self.dir / WARM_KERNELS

    def alive(self) -> bool:
        return self.proc.poll() is None and self.socket.exists()

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
                    s.settimeout(2)
                    s.connect(str(self.socket))
                    s.send(b"stop")
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                pass
            if self.proc.poll() is None:
                try:
                    os.killpg(self.proc.pid, 9)
                except OSError:
                    pass
                self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def unavailable_here(packages=()) -> str | None:
    """Why warm kernels cannot work with this installation, or None."""
    under_tmp = [str(r) for r in python_roots() + package_mounts(packages) if Path("/tmp") in r.parents]
    if under_tmp:  # each warm kernel mounts a fresh /tmp of its own, which would cover them
        return (f"the Python environment or a mounted package lives under /tmp ({under_tmp[0]}), which each warm "
                "kernel gets fresh; install the course elsewhere for warm kernels")
    return None


def start_server(key: ServerKey, preload: list[str]) -> WarmServer:
    """Start a fork server in its own sandbox, importing ``preload``, and wait for its "ready" line."""
    limits = Limits.from_json(key.limits)
    why = unavailable_here(key.packages)
    if why:
        raise WarmUnavailable(why)
    tmp = Path(tempfile.gettempdir())
    sweep_stale(tmp, "course-warm-")
    d = Path(tempfile.mkdtemp(prefix=f"course-warm-{os.getpid()}-"))
    os.chmod(d, 0o711)  # each kernel reaches its own folder k/<id>, and lists nothing
    (d / WARM_KERNELS).mkdir(mode=0o711)
    etc = d / "etc"
    etc.mkdir()
    write_etc(etc, os.getuid())
    cmd = build_command(
        [sys.executable, "-P", "-m", "grading_engine.kernel.warm", "--socket", f"{WARM_DIR}/{WARM_SOCKET}",
         "--preload", ",".join(preload)],
        workdir_name="", home_dir=None, run_dir=None, etc_dir=etc, env=sandbox_env(limits, packages=key.packages),
        uid=None, limits=limits, packages=key.packages, bwrap=key.bwrap, warm_dir=d)
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, start_new_session=True)
    server = WarmServer(key, d, proc)
    line = _first_line(proc, START_TIMEOUT)
    try:
        server.info = json.loads(line or "{}")
    except ValueError:
        server.info = {}
    if not server.info.get("ready"):
        server.stop()
        why = server.info.get("error") or f"no ready line within {START_TIMEOUT:.0f} s (exit {proc.poll()})"
        raise WarmUnavailable(f"the warm kernel server did not start: {why}")
    server.started_s = time.monotonic() - t0
    return server


def _first_line(proc: subprocess.Popen, timeout: float) -> str:
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    buf = b""
    deadline = time.monotonic() + timeout
    fd = proc.stdout.fileno()
    while b"\n" not in buf and time.monotonic() < deadline:
        if not sel.select(timeout=max(0.0, deadline - time.monotonic())):
            break
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        buf += chunk
    sel.close()
    proc.stdout.close()  # the server writes nothing more there (it points its stdout at its stderr)
    return buf.split(b"\n", 1)[0].decode(errors="replace")


_SERVERS: dict[ServerKey, WarmServer] = {}
_FAILED: dict[ServerKey, str] = {}
_LOCK = threading.Lock()


def server_for(settings, nb=None, log=None) -> Path | None:
    """The socket of this process's server for these settings (started when needed), or None.

    ``nb``: the notebook about to be graded; when the server starts, it imports what that notebook's
    setup cell imports (a later notebook that imports more imports the rest itself). None when warm
    kernels are off or the server cannot start (said once, loudly, in ``log``).
    """
    if not (settings.sandbox and settings.warm_kernels):
        return None
    key = ServerKey(Limits.from_settings(settings).to_json(), tuple(settings.sandbox_packages),
                    settings.bwrap or "bundled")
    with _LOCK:
        if key in _FAILED:
            return None
        server = _SERVERS.get(key)
        if server is not None and not server.alive():
            _SERVERS.pop(key).stop()
            server = None
        if server is None:
            for other in list(_SERVERS):  # one server per process: one for other settings is stopped
                _SERVERS.pop(other).stop()
            preload = preload_modules([*settings.preload, *_ALSO_PRELOAD, *(setup_imports(nb) if nb is not None else [])])
            try:
                server = _SERVERS[key] = start_server(key, preload)
            except (WarmUnavailable, OSError) as exc:
                _FAILED[key] = str(exc)
                msg = f"{exc}; every notebook gets a fresh sandbox instead (slower, as safe)"
                (log.warning if log is not None else lambda m: print(f"WARNING: {m}", file=sys.stderr))(msg)
                return None
            if log is not None:
                log.info("warm sandboxed kernels: server started in %.1f s (%s)", server.started_s,
                         ", ".join(server.info.get("loaded", [])))
        return server.socket


def stop_all() -> None:
    with _LOCK:
        for k in list(_SERVERS):
            _SERVERS.pop(k).stop()


atexit.register(stop_all)
