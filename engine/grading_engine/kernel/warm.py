"""The fork server inside the sandbox: warm kernels, each behind walls of its own.

Started by :class:`grading_engine.sandbox.warm.WarmServer` inside one bubblewrap sandbox per grading
process, as ``python -P -m grading_engine.kernel.warm --socket PATH --preload MODULES``. It imports
ipykernel and the modules the notebooks import (torch, numpy, matplotlib, transformers, the course's
package) once, writes one "ready" line and then serves kernels: for each request of a kernel's
launcher (:class:`grading_engine.protocol.WarmRequest`, with the kernel's stdout, stderr and audit
pipe) it forks a *supervisor*, which

1. takes the kernel's own uid when the server runs as root (each kernel its own, as a cold sandbox
   gives it), and enters new user, mount, pid, ipc, network and uts namespaces;
2. builds the kernel's walls in its mount namespace: a fresh ``/tmp`` and ``/dev/shm``, the kernel's
   own folder (``k/<id>``: home with the copy of the notebook's folder, sockets, passwd) mounted where
   a cold sandbox has them, the server's folder (its socket, the other kernels' folders) covered by an
   empty read-only tmpfs, and the sandbox's writable root and ``/dev`` remounted read-only;
3. forks the pid namespace's init, which forks the kernel (pid 2, as in a cold sandbox; it cannot name,
   signal or trace the server, the supervisor or another kernel), which sets its resource limits, drops
   every capability (no_new_privs, checked), tells the launcher it started (the message's credentials
   give the launcher its pid) and becomes exactly the kernel :mod:`grading_engine.kernel.inner` runs in a
   cold sandbox;
4. kills the kernel when the launcher goes away or asks, and reports its exit code.

The server, the supervisors and the kernels are not dumpable, so no kernel can read or write another
process's memory through ``/proc``. Nothing a kernel does reaches the server: it runs in a copy-on-write
copy of the server's memory and writes only to its own mounts. When a supervisor cannot build the walls
(user namespaces not allowed here, say) it answers ``failed`` and the launcher starts a cold sandbox.

Standard library only, and no Python thread before a fork (the server checks).
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import gc
import json
import os
import select
import signal
import socket
import struct
import sys

from grading_engine.protocol import (
    SANDBOX_HOME,
    SANDBOX_RUN,
    WARM_DIR,
    WARM_KERNELS,
    WarmEvent,
    WarmReply,
    WarmRequest,
    import_preload,
)

CLONE_NEWNS = 0x00020000
CLONE_NEWUTS = 0x04000000
CLONE_NEWIPC = 0x08000000
CLONE_NEWUSER = 0x10000000
CLONE_NEWPID = 0x20000000
CLONE_NEWNET = 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME = 1024, 2048, 1 << 21
# statvfs flag -> the mount flag a remount must repeat (a mount inherited from a more privileged namespace
# keeps its locked flags; a remount that drops one of them is refused)
ST_TO_MS = {1: MS_RDONLY, 2: MS_NOSUID, 4: MS_NODEV, 8: MS_NOEXEC, 1024: MS_NOATIME, 2048: MS_NODIRATIME,
            4096: MS_RELATIME}
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
SIOCSIFFLAGS, IFF_UP, IFF_LOOPBACK, IFF_RUNNING = 0x8914, 0x1, 0x8, 0x40
MAX_REQUEST = 1 << 20

_libc = ctypes.CDLL(None, use_errno=True)


def _call(rc: int, what: str) -> None:
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


def prctl(option: int, value: int) -> None:
    _call(_libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0), f"prctl({option}, {value})")


def unshare(flags: int) -> None:
    _call(_libc.unshare(flags), "unshare")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    enc = (lambda s: None if s is None else s.encode())
    _call(_libc.mount(enc(source), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)),
          f"mount {source} on {target}")


def remount_read_only(target: str) -> None:
    """Make the mount at ``target`` read-only, keeping the flags it has."""
    kept = 0
    for st, ms in ST_TO_MS.items():
        if os.statvfs(target).f_flag & st:
            kept |= ms
    mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | kept)


# ----------------------------------------------------------------------------------------- the server


def serve(sock_path: str, preload: list[str]) -> None:
    prctl(PR_SET_DUMPABLE, 0)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the grader decides when the server stops
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # supervisors are reaped by the kernel
    # what ipykernel sets before matplotlib is imported, so importing it here changes nothing
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    import threading

    loaded, failed = [], []
    for name in ["ipykernel.kernelapp", "ipykernel.ipkernel", "grading_engine.kernel.inner",
                 "grading_engine.kernel.probe", "grading_engine.kernel.audit", "grading_engine.kernel.privileges",
                 *preload]:
        try:
            import_preload(name)
            loaded.append(name)
        except BaseException:  # noqa: BLE001 - what will not import here, the kernel imports (or not) itself
            failed.append(name)
        if threading.active_count() != 1:
            _ready(False, error=f"{threading.active_count()} Python threads after importing {name}: a "
                                "server with threads cannot fork safely")
            return
    gc.collect()
    gc.freeze()  # keep the shared pages shared after fork
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    srv.bind(sock_path)
    os.chmod(sock_path, 0o600)
    srv.listen(16)
    _ready(True, loaded=loaded, failed=failed)
    os.dup2(2, 1)  # the line above is all the grader reads of our stdout
    while True:
        conn, _ = srv.accept()
        try:
            msg, fds, _flags, _addr = socket.recv_fds(conn, MAX_REQUEST, 3)
        except OSError:
            conn.close()
            continue
        if msg == b"stop":
            return
        if not msg:
            conn.close()
            continue
        if os.fork() == 0:
            srv.close()
            _supervise(conn, msg, fds)  # never returns
        conn.close()
        for fd in fds:
            os.close(fd)


def _ready(ok: bool, **info) -> None:
    print(json.dumps({"ready": ok, **info}), flush=True)


# ------------------------------------------------------------------------------------- the supervisor


def _supervise(conn: socket.socket, msg: bytes, fds: list[int]) -> None:
    """In the forked child: build the walls, fork the kernel, watch it; never returns."""
    code = 0
    pid = None
    try:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        req = WarmRequest.from_bytes(msg)
        if len(fds) != 3:
            raise ValueError(f"expected 3 descriptors (stdout, stderr, audit), got {len(fds)}")
        enter_namespaces(req.uid)
        build_walls(f"{WARM_DIR}/{WARM_KERNELS}/{req.kernel_id}", req.tmp_mb)
        pid = os.fork()
        if pid == 0:
            _init(conn, req, fds)  # never returns
        for fd in fds:
            os.close(fd)
        code = _watch(conn, pid)
        _reply(conn, WarmReply(WarmEvent.EXITED, code))
    except BaseException as exc:  # noqa: BLE001 - report and leave, never return into the server's loop
        if pid is None:
            _reply(conn, WarmReply(WarmEvent.FAILED, 1, f"{type(exc).__name__}: {exc}"))
        code = 1
    finally:
        os._exit(code & 0xFF)


def _reply(conn: socket.socket, reply: WarmReply) -> None:
    try:
        conn.send(reply.to_bytes())
    except OSError:
        pass


def enter_namespaces(uid: int | None) -> None:
    """New user, mount, pid, ipc, network and uts namespaces; as ``uid`` first when given (a root server)."""
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    outer_uid, outer_gid = os.getuid(), os.getgid()
    prctl(PR_SET_DUMPABLE, 1)  # a process may write its own id maps only while it is dumpable
    unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWNET | CLONE_NEWUTS)
    for name, text in (("setgroups", "deny"), ("uid_map", f"{outer_uid} {outer_uid} 1"),
                       ("gid_map", f"{outer_gid} {outer_gid} 1")):
        with open(f"/proc/self/{name}", "w") as fh:
            fh.write(text)
    prctl(PR_SET_DUMPABLE, 0)
    _call(_libc.sethostname(b"sandbox", 7), "sethostname")
    _loopback_up()


def _loopback_up() -> None:
    """As bubblewrap does: the new network namespace has a loopback device, and nothing else."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", IFF_UP | IFF_LOOPBACK | IFF_RUNNING))
    except OSError:
        pass


def build_walls(base: str, tmp_mb: int) -> None:
    """The kernel's view of the file system, in its own mount namespace."""
    mount(None, "/", None, MS_REC | MS_PRIVATE)
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={tmp_mb}m,mode=1777")
    if os.path.isdir("/dev/shm"):
        mount("tmpfs", "/dev/shm", "tmpfs", MS_NOSUID | MS_NODEV, "size=64m,mode=1777")
    mount(f"{base}/home", SANDBOX_HOME, None, MS_BIND | MS_REC)
    mount(f"{base}/run", SANDBOX_RUN, None, MS_BIND)
    for name in ("passwd", "group"):
        mount(f"{base}/etc/{name}", f"/etc/{name}", None, MS_BIND)
        remount_read_only(f"/etc/{name}")
    # the server's socket and every other kernel's folder: covered
    mount("tmpfs", WARM_DIR, "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, "size=4k,mode=0555")
    remount_read_only(WARM_DIR)
    for target in ("/", "/dev"):  # bubblewrap's own tmpfs: writable, and shared by every kernel of the server
        remount_read_only(target)


def _watch(conn: socket.socket, pid: int) -> int:
    """Until the kernel exits: kill it when the launcher asks or goes away. Its exit code."""
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    killed = False
    while True:
        watched = [conn] + ([pidfd] if pidfd is not None else [])
        ready, _, _ = select.select(watched, [], [], 0.5 if pidfd is None else None)
        if conn in ready and not killed:
            try:
                data = conn.recv(64)
            except OSError:
                data = b""
            if not data or data == b"kill":
                os.kill(pid, signal.SIGKILL)
                killed = True
        done, status = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return os.waitstatus_to_exitcode(status)


# ----------------------------------------------------------------------------------------- the kernel


def _init(conn: socket.socket, req: WarmRequest, fds: list[int]) -> None:
    """pid 1 of the kernel's pid namespace, as bubblewrap's init is in a cold sandbox: it forks the kernel
    (pid 2, so that the kernel can signal itself as any process can), reaps what the kernel leaves, and
    exits with the kernel's exit code; the namespace's other processes die with it."""
    code = 1
    try:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        kernel = os.fork()
        if kernel == 0:
            _kernel(conn, req, fds)  # never returns
        conn.close()
        for fd in fds:
            os.close(fd)
        from grading_engine.kernel import privileges

        privileges.drop(None)
        while True:
            pid, status = os.waitpid(-1, 0)
            if pid == kernel:
                code = os.waitstatus_to_exitcode(status)
                break
    except BaseException:  # noqa: BLE001 - never outlive a failure: the namespace goes with us
        pass
    finally:
        os._exit(code & 0xFF if code >= 0 else 128 + (-code & 0x7F))


def _kernel(conn: socket.socket, req: WarmRequest, fds: list[int]) -> None:
    """pid 2 of its pid namespace: limits, no privileges, then the same kernel as a cold sandbox's."""
    code = 0
    started = False
    try:
        os.setsid()
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        out, err, audit_fd = fds
        devnull = os.open(os.devnull, os.O_RDONLY)
        for src, dst in ((devnull, 0), (out, 1), (err, 2)):
            os.dup2(src, dst)
        for fd in (devnull, out, err):
            os.close(fd)
        keep = {0, 1, 2, audit_fd, conn.fileno()}
        for fd in [int(f) for f in os.listdir("/proc/self/fd") if int(f) > 2 and int(f) not in keep]:
            try:
                os.close(fd)
            except OSError:
                pass
        os.chdir(f"{SANDBOX_HOME}/{req.workdir_name}")
        os.umask(0o022)
        import resource

        for name, (soft, hard) in req.rlimits.items():
            resource.setrlimit(getattr(resource, name), (soft, hard))
        from grading_engine.kernel import privileges

        privileges.drop(None)
        _reply(conn, WarmReply(WarmEvent.STARTED))
        started = True
        conn.close()
        _become_fresh(req.env)
        from grading_engine.kernel import inner

        sys.argv = [inner.__file__]
        inner.run(audit_fd, req.preload, req.watch, req.kernel_args)
    except SystemExit as exc:
        code = exit_code(exc)
    except BaseException as exc:  # noqa: BLE001
        if not started:
            _reply(conn, WarmReply(WarmEvent.FAILED, 1, f"{type(exc).__name__}: {exc}"))
        import traceback

        traceback.print_exc()
        code = 1
    finally:
        leave(code)


def exit_code(exc: SystemExit) -> int:
    """The exit code ``sys.exit(...)`` asked for, as the interpreter would give it."""
    return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)


def leave(code: int) -> None:
    """End a forked kernel as an interpreter ends: exit handlers, flushed output, then ``_exit`` (never
    back into the server's loop)."""
    try:
        import atexit

        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code & 0xFF)


def _become_fresh(env: dict[str, str]) -> None:
    """What a new process has that a forked one does not: its own environment, signals and random state."""
    os.environ.clear()
    os.environ.update(env)
    for sig in (signal.SIGTERM, signal.SIGCHLD, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)  # as in any Python process
    import tempfile

    tempfile.tempdir = None  # from this kernel's TMPDIR
    gc.unfreeze()
    import random

    random.seed()
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="grading_engine.kernel.warm")
    ap.add_argument("--socket", required=True)
    ap.add_argument("--preload", default="")
    args = ap.parse_args(argv)
    serve(args.socket, [m for m in args.preload.split(",") if m])


if __name__ == "__main__":
    main()
