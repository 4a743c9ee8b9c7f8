"""Kernel start-up for the batch workers: warm kernels from a fork server, timings, fast teardown.

A batch worker runs nbgrader's own autograde in its process. Before it does,
:func:`install` registers :class:`WarmProvisioner` as the default jupyter_client
kernel provisioner *of that process only* (the instructor's Jupyter and stock
``nbgrader autograde`` are untouched). For each kernel nbgrader asks for:

* if the kernel's command is the plain ``<this python> -m ipykernel_launcher
  -f {connection_file} ...`` of the ``python3`` kernelspec, the kernel is
  forked from the worker's zygote (:mod:`grading_engine.batch.zygote`), which has
  already imported ipykernel, torch and the other modules of the notebooks'
  setup cells: a new process per notebook, without the start-up cost;
* for any other command (the ``course-sandbox`` kernelspec, whose launcher
  wraps the kernel in bubblewrap, or any kernelspec naming its own
  provisioner) the kernel is launched exactly as jupyter_client always does.
  The warm path never bypasses an isolating launcher: a kernelspec opts in
  only by being the plain command.

It also records when each kernel launch starts and ends, for the time split
the batch prints.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

from jupyter_client.provisioning import LocalProvisioner
from jupyter_client.provisioning.factory import KernelProvisionerFactory

from grading_engine.batch.timing import _record as event

PROVISIONER_NAME = "course-batch-warm"
FORK_TIMEOUT = 30.0  # seconds for the fork server to answer; a fork takes milliseconds


# set by the worker
_ZYGOTE: Zygote | None = None
LIVE: dict[int, int] = {}  # pid -> process group of every kernel this process started and has not cleaned up


def kill_all() -> None:
    """Kill every kernel still running (the worker is being stopped)."""
    for pid, pgid in list(LIVE.items()):
        for fn, arg in ((os.killpg, pgid), (os.kill, pid)):
            try:
                fn(arg, signal.SIGKILL)
            except (OSError, TypeError):
                pass
    LIVE.clear()


class ForkedProcess:
    """Popen-like handle on a kernel forked by the zygote and re-parented to this process."""

    def __init__(self, pid: int):
        self.pid = pid
        self.returncode: int | None = None
        self.stdin = self.stdout = self.stderr = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                self.returncode = 0 if not _alive(self.pid) else None
                return self.returncode
            if pid == self.pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(str(self.pid), timeout)
            time.sleep(0.01)
        return self.returncode  # type: ignore[return-value]

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            os.kill(self.pid, sig)

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except OSError:
        return False


class Zygote:
    """The worker's fork server (started lazily, restarted if it dies)."""

    def __init__(self, workdir: Path, preload: list[str], env: dict[str, str], extra_path: str | None = None):
        self.extra_path = extra_path
        self.dir = Path(workdir)
        self.preload = preload
        self.env = env
        self.proc: subprocess.Popen | None = None
        self.sock = self.dir / "zygote.sock"
        self.lock = threading.Lock()
        self.broken: str | None = None
        self.info: dict[str, Any] = {}
        self.restarts = 0

    def start(self) -> bool:
        if self.broken:
            return False
        if self.proc is not None and self.proc.poll() is None:
            return True
        if self.sock.exists():
            self.sock.unlink()
        env = dict(self.env)
        env.pop("JPY_PARENT_PID", None)
        if self.extra_path:  # to import grading_engine.batch.zygote; the kernels do not keep it on sys.path
            env["BATCH_EXTRA_PATH"] = self.extra_path
            env["PYTHONPATH"] = self.extra_path + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "grading_engine.batch.zygote", str(self.sock), json.dumps(self.preload)],
            cwd=self.dir, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        self.proc.stdout.close()  # one line, then the server writes to the worker's log
        self.proc.stdout = None
        try:
            self.info = json.loads(line)
        except ValueError:
            self.info = {"ready": False, "error": f"zygote said {line!r}"}
        if not self.info.get("ready"):
            self.broken = self.info.get("error", "zygote did not start")
            self.stop()
            return False
        return True

    def fork(self, args: list[str], cwd: str, env: dict[str, str]) -> int:
        with self.lock:
            if not self.start():
                raise RuntimeError(self.broken or "no zygote")
            try:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                    s.settimeout(FORK_TIMEOUT)
                    s.connect(str(self.sock))
                    s.sendall(json.dumps({"args": args, "cwd": cwd, "env": env,
                                          "parent_pid": os.getpid()}).encode() + b"\n")
                    data = b""
                    while not data.endswith(b"\n"):
                        chunk = s.recv(4096)
                        if not chunk:
                            break
                        data += chunk
                pid = int(json.loads(data or b'{"pid": 0}')["pid"])
                if pid <= 0:
                    raise RuntimeError("zygote failed to fork")
            except Exception:
                self.restart()  # whatever went wrong, the next kernel comes from a new server
                raise
            return pid

    def restart(self) -> None:
        """Stop the server; the next fork starts a new one."""
        self.stop()
        self.restarts += 1

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


def warm_args(cmd: list[str]) -> list[str] | None:
    """The ipykernel arguments of a plain ``python -m ipykernel_launcher`` command, else None."""
    if len(cmd) >= 3 and cmd[1:3] == ["-m", "ipykernel_launcher"]:
        exe = cmd[0]
        if exe == sys.executable or os.path.abspath(exe) == os.path.abspath(sys.executable):
            return list(cmd[3:])
    return None


class WarmProvisioner(LocalProvisioner):
    """LocalProvisioner that forks plain Python kernels from the zygote and times every launch."""

    async def pre_launch(self, **kwargs: Any) -> dict[str, Any]:
        event("launch_start")
        return await super().pre_launch(**kwargs)

    async def launch_kernel(self, cmd: list[str], **kwargs: Any) -> Any:
        # a private temporary folder per kernel, removed in cleanup(): scratch files a notebook
        # writes to tempfile's folder go with it, even when the kernel is killed at once
        self._tmp = tempfile.mkdtemp(prefix="course-kernel-")
        kwargs["env"] = dict(kwargs.get("env") or os.environ, TMPDIR=self._tmp)
        args = warm_args(cmd)
        if args is None or _ZYGOTE is None:
            info = await super().launch_kernel(cmd, **kwargs)
            LIVE[self.pid] = self.pgid or self.pid
            event("launched_cold")
            return info
        env = dict(kwargs.get("env") or os.environ)
        env["JPY_PARENT_PID"] = str(os.getpid())
        cwd = str(kwargs.get("cwd") or os.getcwd())
        try:
            pid = _ZYGOTE.fork(args, cwd, env)
        except Exception:  # noqa: BLE001 - never fail a grade because the fast path failed
            info = await super().launch_kernel(cmd, **kwargs)
            LIVE[self.pid] = self.pgid or self.pid
            event("launched_cold")
            return info
        self.process = ForkedProcess(pid)  # type: ignore[assignment]
        self.pid = pid
        self.pgid = pid  # the kernel called setsid()
        self.cwd = cwd
        LIVE[pid] = pid
        event("launched_warm")
        return self.connection_info

    async def kill(self, restart: bool = False) -> None:
        """Stop the kernel at once (the batch sets ``shutdown_kernel = "immediate"``).

        A forked kernel is simply killed. Any other kernel may be a launcher
        that must clean up after itself (the course sandbox removes its
        private folder and closes its audit log on SIGTERM): it gets SIGTERM
        and up to 5 s before the process group is killed.
        """
        proc = self.process
        if proc is not None and not isinstance(proc, ForkedProcess) and proc.poll() is None:
            try:
                proc.terminate()
                deadline = time.monotonic() + 5
                while proc.poll() is None and time.monotonic() < deadline:
                    await asyncio.sleep(0.02)
            except OSError:
                pass
        await super().kill(restart)

    async def cleanup(self, restart: bool = False) -> None:
        await super().cleanup(restart)
        if getattr(self, "_tmp", None):
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        LIVE.pop(getattr(self, "pid", None), None)
        event("kernel_gone")


def install(workdir: Path, preload: list[str] | None, env: dict[str, str], extra_path: str | None = None) -> None:
    """Make WarmProvisioner this process's default provisioner; start a zygote if ``preload`` is given."""
    global _ZYGOTE
    factory = KernelProvisionerFactory.instance()
    factory.provisioners[PROVISIONER_NAME] = EntryPoint(
        name=PROVISIONER_NAME, value="grading_engine.batch.kernels:WarmProvisioner",
        group=KernelProvisionerFactory.GROUP_NAME)
    factory.default_provisioner_name = PROVISIONER_NAME
    if preload is not None and sys.platform.startswith("linux"):
        from grading_engine.batch.zygote import PR_SET_CHILD_SUBREAPER, prctl

        prctl(PR_SET_CHILD_SUBREAPER, 1)
        _ZYGOTE = Zygote(workdir, preload, env, extra_path)


def shutdown() -> None:
    if _ZYGOTE is not None:
        _ZYGOTE.stop()


def restart_zygote() -> bool:
    """Stop the fork server, if there is one; the next warm kernel comes from a new one."""
    if _ZYGOTE is None or _ZYGOTE.proc is None:
        return False
    _ZYGOTE.restart()
    return True


def kill_now() -> None:
    """Kill the fork server without waiting, safe in a signal handler.

    ``Popen.wait`` takes a lock that the interrupted code may hold (a
    ``poll()`` in progress), and a handler that waits for it never returns.
    """
    proc = _ZYGOTE.proc if _ZYGOTE is not None else None
    if proc is not None:
        try:
            os.kill(proc.pid, signal.SIGKILL)
        except OSError:
            pass


def zygote_state() -> dict[str, Any]:
    if _ZYGOTE is None:
        return {"enabled": False}
    return {"enabled": True, "broken": _ZYGOTE.broken, **_ZYGOTE.info}
