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
        text = p.read_text() if p.exists() else ""
        # the events are relayed as they happen: a line still being written is left for the next read
        return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines()]

    def audit_until(self, found, seconds: float = 15.0) -> list[dict]:
        """The audit events once ``found(events)`` holds, or at the deadline: on a busy machine they arrive late."""
        deadline = time.monotonic() + seconds
        events = self.audit()
        while not found(events) and time.monotonic() < deadline:
            time.sleep(0.1)
            events = self.audit()
        return events

    def close(self) -> None:
        try:
            self.kc.stop_channels()
            self.km.shutdown_kernel(now=False)
        finally:
            shutil.rmtree(self.runtime, ignore_errors=True)


def check_settings(nproc: int = 64, memory_mb: int = 1024, bwrap: str | None = None, warm: bool = False):
    """The engine's settings for a check: sandbox on, small limits, the installed kernelspec's packages."""
    from grading_engine.config import GradingEngine
    from grading_engine.sandbox.install import installed_bwrap, installed_packages

    return GradingEngine(sandbox=True, nproc=nproc, memory_mb=memory_mb, warm_kernels=warm,
                         bwrap=bwrap or installed_bwrap() or "bundled", sandbox_packages=installed_packages() or [])


def kernel_arguments(settings) -> list[str]:
    """What SandboxedExecute gives the launcher for these settings (a warm server's socket included)."""
    from grading_engine.sandbox import warm
    from grading_engine.sandbox.kernel import launcher_arguments

    server = warm.server_for(settings)
    if settings.warm_kernels and server is None:
        raise RuntimeError("the warm kernel server did not start (see the warning above)")
    return launcher_arguments(settings) + (["--warm", str(server)] if server is not None else [])


def run_checks(nproc: int = 64, memory_mb: int = 1024, bwrap: str | None = None,
               warm: bool = False) -> tuple[list[Check], float]:
    """The checks, in a cold sandbox or (``warm``) in a kernel forked by a warm server; ``bwrap``
    overrides the kernelspec's choice of binary (the launcher's ``--bwrap``)."""
    from grading_engine.sandbox.bwrap import availability, package_mounts, python_roots
    from grading_engine.sandbox.install import installed_packages

    course_dir = Path.cwd()  # run in the course directory: its source/, release/ and gradebook must stay unseen

    ok, why = availability(bwrap)
    if not ok:
        return [Check("bubblewrap starts", False, why)], 0.0
    checks = [Check("bubblewrap starts", True, why)]
    env = dict(os.environ)
    env.pop("COURSE_SANDBOX", None)
    args = kernel_arguments(check_settings(nproc, memory_mb, bwrap, warm))
    with tempfile.TemporaryDirectory(prefix="course-sandbox-check-") as tmp:
        work = Path(tmp) / "work"
        (work / "assets").mkdir(parents=True)
        (work / "assets" / "data.txt").write_text("asset ok")
        secret = Path(tmp) / "secret.txt"
        secret.write_text("instructor only")
        k = SandboxKernel(work, env, launcher_args=args)
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
            def opened(evs: list[dict]) -> bool:
                return any(e.get("e") == "open" for e in evs)

            events = k.audit_until(opened)
            checks.append(Check("audit events leave the kernel", opened(events), f"{len(events)} events"))
            cold = [e["a"][0] for e in k.audit() if e.get("e") == "sandbox.cold"]
            if warm:
                checks.append(Check("forked by the warm server", not cold, cold[0] if cold else "yes"))
            k.kc.execute("import os, signal; os.kill(os.getpid(), signal.SIGKILL)")
            deadline = time.monotonic() + 30
            while k.km.is_alive() and time.monotonic() < deadline:
                time.sleep(0.2)
            checks.append(Check("a kernel that kills itself dies, as it would outside", not k.km.is_alive(),
                                "dead" if not k.km.is_alive() else "still alive after 30 s"))
        finally:
            k.close()
    return checks, k.start_seconds


LEAVE_TRACES = r"""
import os, signal, torch, sys
for p in ('/tmp/trace', os.path.expanduser('~/trace'), 'trace', '/dev/shm/trace'):
    open(p, 'w').write('left by the first kernel')
tried = []
for p in ('/trace', '/run/trace', '/dev/trace', '/etc/trace', '/run/warm/trace'):
    try:
        open(p, 'w').write('x'); tried.append(p)
    except OSError:
        pass
torch.add = lambda *a, **k: 'patched'
os.environ['TRACE'] = '1'
signal.signal(signal.SIGUSR1, signal.SIG_IGN)
sys.modules['trace_module'] = sys
print('writable elsewhere:', tried)
"""

LOOK_FOR_TRACES = r"""
import os, signal, torch, sys
seen = [p for p in ('/tmp/trace', os.path.expanduser('~/trace'), 'trace', '/dev/shm/trace', '/trace', '/run/trace',
                    '/dev/trace', '/etc/trace') if os.path.exists(p)]
seen += [x for x in ('TRACE',) if x in os.environ]
seen += ['torch.add patched'] if torch.add(torch.ones(1), 1).tolist() != [2.0] else []
seen += ['SIGUSR1 handler'] if signal.getsignal(signal.SIGUSR1) is not signal.SIG_DFL else []
seen += ['module'] if 'trace_module' in sys.modules else []
print('traces:', seen)
"""

REACH_OTHERS = r"""
import os, signal
# /proc is the server's: its numbers name other processes there, and in our own pid namespace nothing but
# (by chance) our own threads, numbered from 1 (the last field of their NSpid)
own = {int(open(f'/proc/self/task/{t}/status').read().split('NSpid:')[1].split(chr(10))[0].split()[-1])
       for t in os.listdir('/proc/self/task')} | {1}
me = int(os.readlink('/proc/self'))
# our own sandbox's init (pid 1 in our namespace, as bubblewrap's is in a cold sandbox) is no other process
init = int(open('/proc/self/status').read().split('PPid:')[1].split()[0])
pids = [int(p) for p in os.listdir('/proc') if p.isdigit() and int(p) not in (me, init)]
signalled, read = [], []
for pid in pids:
    try:  # by the process itself, not its number
        fd = os.open(f'/proc/{pid}', os.O_RDONLY | os.O_DIRECTORY)
        try:
            signal.pidfd_send_signal(fd, signal.SIGKILL); signalled.append(f'{pid} (pidfd)')
        finally:
            os.close(fd)
    except OSError:
        pass
    if pid not in own:
        try:
            os.kill(pid, signal.SIGKILL); signalled.append(pid)
        except OSError:
            pass
    for f in ('environ', 'mem', 'root/run/warm'):
        try:
            open(f'/proc/{pid}/{f}', 'rb').read(1) if f != 'root/run/warm' else os.listdir(f'/proc/{pid}/{f}')
            read.append(f'{pid}/{f}')
        except OSError:
            pass
print('signalled:', signalled, 'read:', read, 'of', len(pids))
"""


def run_sibling_checks(nproc: int = 64, memory_mb: int = 1024, bwrap: str | None = None) -> list[Check]:
    """Two kernels of one warm server: nothing of the first reaches the second, neither can reach the other,
    and a first kernel that exhausts its memory and process limits harms neither the server nor the next."""
    from grading_engine.sandbox import warm

    settings = check_settings(nproc, memory_mb, bwrap, warm=True)
    args = kernel_arguments(settings)
    checks: list[Check] = []
    env = dict(os.environ)
    env.pop("COURSE_SANDBOX", None)
    with tempfile.TemporaryDirectory(prefix="course-sandbox-check-") as tmp:
        work = Path(tmp) / "work"
        work.mkdir()
        first = SandboxKernel(work, env, launcher_args=args)
        try:
            out, err = first.run(LEAVE_TRACES)
            checks.append(Check("a kernel cannot write outside its own places", err is None and "[]" in out,
                                out.strip() or str(err)))
            second = SandboxKernel(work, env, launcher_args=args)
            try:
                out, err = second.run(LOOK_FOR_TRACES)
                checks.append(Check("nothing a kernel leaves (files, patches, env, signals) reaches the next",
                                    out.strip() == "traces: []", out.strip() or str(err)))
                out, err = second.run(REACH_OTHERS)
                checks.append(Check("a kernel cannot signal or read the server or another kernel",
                                    err is None and "signalled: [] read: []" in out, out.strip() or str(err)))
                out, err = first.run("print('first alive')")
                checks.append(Check("the other kernel is untouched", "first alive" in out, out.strip() or str(err)))
            finally:
                second.close()
            first.run("import os, time\ntry:\n    while True:\n        if os.fork() == 0:\n            time.sleep(30); os._exit(0)\n"
                      "except OSError:\n    pass\ntry:\n    junk = [bytearray(2**26) for _ in range(10**4)]\nexcept MemoryError:\n"
                      "    pass\nprint('exhausted')")
        finally:
            first.close()
        third = SandboxKernel(work, env, launcher_args=args)
        try:
            out, err = third.run("import os; print('fork ok', os.fork() != 0 or os._exit(0))")
            checks.append(Check("a kernel that exhausted its limits harms neither the server nor the next kernel",
                                "fork ok" in out and warm.server_for(settings) is not None, out.strip() or str(err)))
        finally:
            third.close()
    return checks


def first_answer_seconds(settings, work: Path) -> float:
    """From asking for a kernel to the result of its first cell."""
    t0 = time.perf_counter()
    k = SandboxKernel(work, launcher_args=kernel_arguments(settings))
    try:
        k.run("import torch; print(torch.ones(1).item())")
        return time.perf_counter() - t0
    finally:
        k.close()


def run_selftest(bwrap: str | None = None) -> int:
    from grading_engine.sandbox.bwrap import resolve_bwrap
    from grading_engine.sandbox.install import installed_bwrap

    chosen = resolve_bwrap(bwrap)
    source = "--bwrap" if bwrap else "the kernelspec's --bwrap" if installed_bwrap() not in (None, "bundled") \
        else "default"
    print(f"bwrap: {chosen.describe()} [{chosen.choice}: {source}]")
    checks, _ = run_checks(bwrap=bwrap)
    from grading_engine.sandbox.warm import unavailable_here

    no_warm = unavailable_here(check_settings(bwrap=bwrap).sandbox_packages)
    if no_warm:
        print(f"warm kernels: not checked: {no_warm}")
    if checks[0].ok and not no_warm:
        warm_checks, _ = run_checks(bwrap=bwrap, warm=True)
        checks += [Check(f"warm: {c.name}", c.ok, c.detail) for c in warm_checks[1:]]
        checks += [Check(f"warm: {c.name}", c.ok, c.detail) for c in run_sibling_checks(bwrap=bwrap)]
    width = max(len(c.name) for c in checks)
    for c in checks:
        print(f"{'OK  ' if c.ok else 'FAIL'}  {c.name:<{width}}  {c.detail}")
    if checks[0].ok and not no_warm:
        with tempfile.TemporaryDirectory(prefix="course-sandbox-check-") as tmp:
            cold = min(first_answer_seconds(check_settings(bwrap=bwrap), Path(tmp)) for _ in range(2))
            warm = min(first_answer_seconds(check_settings(bwrap=bwrap, warm=True), Path(tmp)) for _ in range(3))
        print(f"time to first answer (start a kernel, run `import torch`): cold sandbox {cold:.2f} s, "
              f"warm {warm:.2f} s ({cold / warm:.1f}x)")
    return 0 if all(c.ok for c in checks) else 1
