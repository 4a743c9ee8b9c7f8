"""A fork server for IPython kernels: pay for ``import torch`` once per worker, not once per notebook.

Started by a batch worker as ``python -m grading_engine.batch.zygote SOCKET PRELOAD_JSON``.
It imports ipykernel, IPython and the modules the course's notebooks import
in their setup cells (torch, numpy, matplotlib, ...), then waits on a Unix
socket. For every kernel the worker asks for it forks twice; the grandchild
is a *new process* that turns itself into exactly what
``python -m ipykernel_launcher -f CONNECTION_FILE ...`` would be (its own
session, the requested working directory and environment, a fresh random
state, the kernel's command-line arguments) and runs the kernel. Its parent
exits at once, so the kernel is re-parented to the worker (a child
subreaper), which waits for it, signals it and kills it like any kernel it
started itself. One process per notebook, as with a cold start; only the
start-up work is shared, copy-on-write.

The zygote never runs student code and never starts a Python thread before
it forks (it checks, and refuses to serve otherwise; the native thread pool
that OpenBLAS starts when numpy is imported is shut down by OpenBLAS's own
fork handler and restarted in the child).
"""

from __future__ import annotations

import ctypes
import gc
import importlib
import json
import os
import signal
import socket
import sys
import time

from grading_engine.kernel.warm import exit_code, leave
from grading_engine.protocol import GRADING_KERNEL_ARGS, import_preload

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def prctl(option: int, value: int) -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(option, value, 0, 0, 0)
    except Exception:  # not Linux: the batch falls back to cold kernels there
        pass


def _threads() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 1


def _become_kernel(req: dict, base_path: list[str]) -> None:
    """In the grandchild: become ``python -m ipykernel_launcher <args>`` and run until shutdown."""
    code = 0
    try:
        os.setsid()
        parent = int(req["parent_pid"])
        deadline = time.monotonic() + 5
        while os.getppid() != parent and time.monotonic() < deadline:
            time.sleep(0.0005)
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != parent:
            os._exit(70)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as in any Python process
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.close(devnull)
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        import tempfile

        tempfile.tempdir = None  # computed again from this kernel's TMPDIR, not the server's
        gc.unfreeze()
        # a fresh process draws fresh random state; torch's default generator
        # is the same fixed seed in every new process and is left as it is
        import random

        random.seed()
        if "numpy" in sys.modules:
            sys.modules["numpy"].random.seed()
        sys.path[:] = list(base_path)
        import ipykernel_launcher  # noqa: F401  (what `python -m ipykernel_launcher` would run)

        sys.argv = [ipykernel_launcher.__file__, *req["args"], *GRADING_KERNEL_ARGS]
        from ipykernel import kernelapp

        kernelapp.launch_new_instance()
    except SystemExit as exc:
        code = exit_code(exc)
    except BaseException:  # noqa: BLE001 - report and leave, never return into the server loop
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        leave(code)


def serve(sock_path: str, preload: list[str]) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the worker decides when we stop
    prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    # what ipykernel sets before it imports matplotlib, so preloading it changes nothing
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    extra = os.environ.pop("BATCH_EXTRA_PATH", None)
    if extra:  # added only so that this module could be imported
        os.environ["PYTHONPATH"] = os.environ.get("PYTHONPATH", "").replace(extra, "", 1).lstrip(os.pathsep)
        if not os.environ["PYTHONPATH"]:
            del os.environ["PYTHONPATH"]
    if extra and extra in sys.path:
        # preload only what the kernel itself could import: forget the entry we
        # prepended (the first one) and the packages that came in through it
        del sys.path[sys.path.index(extra)]
    base_path = [p for p in sys.path if p not in ("", os.getcwd())]
    if extra:
        for name in [m for m in sys.modules if m == "course" or m.startswith("course.")]:
            if name != __name__:
                del sys.modules[name]
        importlib.invalidate_caches()
    import ipykernel.ipkernel  # noqa: F401
    import ipykernel.kernelapp  # noqa: F401
    import ipykernel_launcher  # noqa: F401

    loaded, failed = [], []
    for name in preload:
        try:
            import_preload(name)
            loaded.append(name)
        except BaseException:  # noqa: BLE001 - a module that will not import is imported by the kernel instead
            failed.append(name)
    gc.collect()
    gc.freeze()  # keep the shared pages shared after fork
    import threading

    if threading.active_count() != 1:
        # native threads of libraries that shut them down at fork (OpenBLAS's
        # pool, started by importing numpy) are fine; Python threads are not
        print(json.dumps({"ready": False, "error": f"{threading.active_count()} Python threads after preloading; "
                          "cannot fork safely"}), flush=True)
        return
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(sock_path)
    srv.listen(8)
    print(json.dumps({"ready": True, "loaded": loaded, "failed": failed, "native_threads": _threads()}), flush=True)
    # From here on our stdout is the worker's log (stderr), as it is for a kernel the worker starts
    # itself. The pipe that carried the line above is read once: a kernel inheriting it would
    # block in its first write once the pipe is full (each kernel logs its connection at start).
    os.dup2(2, 1)
    while True:
        conn, _ = srv.accept()
        with conn:
            data = b""
            while not data.endswith(b"\n"):
                chunk = conn.recv(1 << 16)
                if not chunk:
                    break
                data += chunk
            if not data.strip():
                continue
            req = json.loads(data)
            if req.get("stop"):
                return
            r, w = os.pipe()
            pid1 = os.fork()
            if pid1 == 0:  # intermediate child
                srv.close()
                os.close(r)
                pid2 = os.fork()
                if pid2 == 0:
                    os.close(w)
                    conn.close()
                    _become_kernel(req, base_path)
                os.write(w, str(pid2).encode())
                os._exit(0)
            os.close(w)
            pid = b""
            while True:
                chunk = os.read(r, 64)
                if not chunk:
                    break
                pid += chunk
            os.close(r)
            os.waitpid(pid1, 0)
            conn.sendall(json.dumps({"pid": int(pid or 0)}).encode() + b"\n")


if __name__ == "__main__":
    serve(sys.argv[1], json.loads(sys.argv[2]) if len(sys.argv) > 2 else [])
