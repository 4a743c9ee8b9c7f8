"""``python -m grading_engine.sandbox check``: start the sandbox kernel and test its walls.

Each check runs code in a real ``course-sandbox`` kernel (as nbgrader would
start it) and reports what happened. Used by ``tests/test_sandbox.py`` too.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from grading_engine.sandbox import KERNEL_NAME


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


class SandboxKernel:
    """A ``course-sandbox`` kernel started the way SandboxedExecute starts it (ipc, private folder)."""

    def __init__(self, cwd: Path, env: dict | None = None, kernel_name: str = KERNEL_NAME,
                 launcher_args: list[str] | None = None):
        from jupyter_client.manager import KernelManager

        self.runtime = Path(tempfile.mkdtemp(prefix="cs-"))
        kwargs = {"kernel_name": kernel_name}
        if kernel_name == KERNEL_NAME:
            kwargs.update(transport="ipc", connection_file=str(self.runtime / "k.json"),
                          ip=str(self.runtime / "k-ipc"))
        self.km = KernelManager(**kwargs)
        t0 = time.perf_counter()
        self.km.start_kernel(cwd=str(cwd), env=env or dict(os.environ), extra_arguments=[
            *(launcher_args or []), "--HistoryManager.hist_file=:memory:"])
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=180)
        self.start_seconds = time.perf_counter() - t0

    def run(self, code: str, timeout: float = 120) -> tuple[str, str | None]:
        """(stdout, error name or None) of one cell."""
        out: list[str] = []
        err: list[str] = []

        def hook(msg):
            t = msg["msg_type"]
            if t == "stream":
                out.append(msg["content"]["text"])
            elif t == "error":
                err.append(msg["content"]["ename"] + ": " + msg["content"]["evalue"])

        self.kc.execute_interactive(code, output_hook=hook, timeout=timeout)
        return "".join(out), (err[0] if err else None)

    def audit(self) -> list[dict]:
        import json

        from grading_engine.sandbox.kernel import audit_path_for

        p = audit_path_for(self.runtime / "k.json")
        return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []

    def close(self) -> None:
        try:
            self.kc.stop_channels()
            self.km.shutdown_kernel(now=False)
        finally:
            shutil.rmtree(self.runtime, ignore_errors=True)


def run_checks(nproc: int = 64, memory_mb: int = 1024, bwrap: str | None = None) -> tuple[list[Check], float]:
    """The checks; ``bwrap`` overrides the kernelspec's choice of binary (the launcher's ``--bwrap``)."""
    from grading_engine.sandbox.bwrap import availability, package_mounts, python_roots
    from grading_engine.sandbox.install import installed_packages

    course_dir = Path.cwd()  # run in the course directory: its source/, release/ and gradebook must stay unseen

    ok, why = availability(bwrap)
    if not ok:
        return [Check("bubblewrap starts", False, why)], 0.0
    checks = [Check("bubblewrap starts", True, why)]
    env = dict(os.environ, COURSE_SANDBOX_NPROC=str(nproc), COURSE_SANDBOX_MEMORY_MB=str(memory_mb))
    env.pop("COURSE_SANDBOX", None)
    with tempfile.TemporaryDirectory(prefix="course-sandbox-check-") as tmp:
        work = Path(tmp) / "work"
        (work / "assets").mkdir(parents=True)
        (work / "assets" / "data.txt").write_text("asset ok")
        secret = Path(tmp) / "secret.txt"
        secret.write_text("instructor only")
        k = SandboxKernel(work, env, launcher_args=["--bwrap", bwrap] if bwrap else None)
        try:
            out, err = k.run("import os; print(os.getuid(), os.getcwd(), open('assets/data.txt').read())")
            uid = int(out.split()[0]) if out else 0
            checks.append(Check("runs unprivileged, in a copy of the notebook's folder",
                                err is None and uid != 0 and "asset ok" in out, out.strip() or str(err)))
            out, err = k.run("print(' '.join(f'{k}={v.split()[0] if v.split() else None}' for k, v in (line.split(':', 1) "
                             "for line in open('/proc/self/status')) if k.startswith('Cap') or k == 'NoNewPrivs'))")
            caps = dict(kv.split("=") for kv in out.split())
            checks.append(Check("no capabilities, no_new_privs", err is None and caps.get("NoNewPrivs") == "1" and all(
                caps.get(c) == "0" * 16 for c in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")),
                out.strip() or str(err)))
            out, err = k.run(
                "import socket\ntry:\n    socket.create_connection(('1.1.1.1', 53), timeout=3); print('CONNECTED')\n"
                "except OSError as e:\n    print('blocked', e)")
            checks.append(Check("no network", "blocked" in out, out.strip()))
            hidden = [str(course_dir / "source"), str(course_dir / "gradebook.db"), str(course_dir / "release"),
                      str(secret), tmp]
            # folders above a read-only mount exist, but hold only what leads to a mount
            mounts = [str(m) for m in python_roots() + package_mounts(installed_packages() or [])]
            out, err = k.run(
                f"import os\nseen = [p for p in {hidden!r} if os.path.exists(p)]\nmounts = {mounts!r}\n"
                f"for d in {[str(course_dir), str(Path.home())]!r}:\n    if os.path.isdir(d):\n"
                f"        seen += [q for q in (os.path.join(d, x) for x in os.listdir(d))\n"
                f"                 if not any(m == q or m.startswith(q + os.sep) for m in mounts)]\nprint(seen)")
            checks.append(Check("course files, home and other folders are invisible", out.strip() == "[]",
                                out.strip() or str(err)))
            out, err = k.run("open('written.txt', 'w').write('x'); print('written')")
            checks.append(Check("writes stay inside", "written" in out and not (work / "written.txt").exists(),
                                "the host folder is unchanged" if not (work / "written.txt").exists()
                                else "written.txt reached the host"))
            out, err = k.run(
                "import os, time\nn = 0\ntry:\n    for _ in range(100000):\n        if os.fork() == 0:\n"
                "            time.sleep(20); os._exit(0)\n        n += 1\nexcept OSError as e:\n"
                "    print('stopped after', n, type(e).__name__)")
            checks.append(Check(f"fork bomb stopped (limit {nproc} processes)", "stopped after" in out,
                                out.strip() or str(err)))
            out, err = k.run("try:\n    b = bytearray(8 * 2**30)\n    print('ALLOCATED')\nexcept MemoryError:\n"
                             "    print('MemoryError')")
            checks.append(Check(f"memory limited ({memory_mb} MB address space)", "MemoryError" in out,
                                out.strip() or str(err)))
            t0 = time.perf_counter()
            import threading

            threading.Timer(1.0, k.km.interrupt_kernel).start()
            out, err = k.run("import time\ntry:\n    time.sleep(30)\nexcept KeyboardInterrupt:\n    print('interrupted')")
            checks.append(Check("interrupts reach the kernel", "interrupted" in out,
                                f"after {time.perf_counter() - t0:.1f} s"))
            k.run("try:\n    open('/srv/course-sandbox-probe')\nexcept OSError:\n    pass")
            events = [e for e in k.audit() if e.get("e") == "open"]
            checks.append(Check("audit events leave the kernel", bool(events), f"{len(k.audit())} events"))
        finally:
            k.close()
    return checks, k.start_seconds


def run_selftest(bwrap: str | None = None) -> int:
    from grading_engine.sandbox.bwrap import resolve_bwrap
    from grading_engine.sandbox.install import installed_bwrap

    chosen = resolve_bwrap(bwrap)
    source = "--bwrap" if bwrap else "the kernelspec's --bwrap" if installed_bwrap() not in (None, "bundled") \
        else "default"
    print(f"bwrap: {chosen.describe()} [{chosen.choice}: {source}]")
    checks, start = run_checks(bwrap=bwrap)
    width = max(len(c.name) for c in checks)
    for c in checks:
        print(f"{'OK  ' if c.ok else 'FAIL'}  {c.name:<{width}}  {c.detail}")
    if start:
        print(f"kernel start (sandbox, torch preloaded): {start:.1f} s")
    return 0 if all(c.ok for c in checks) else 1
