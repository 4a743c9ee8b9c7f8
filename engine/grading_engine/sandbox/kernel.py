"""Launcher of the ``course-sandbox`` kernel.

jupyter_client starts this module (outside the sandbox) exactly as it would
start ``ipykernel_launcher``: ``python -I -m grading_engine.sandbox.kernel -f
CONNECTION_FILE [ipykernel arguments]``, with the notebook's folder as working
directory. It then

1. copies the working directory into a private folder (symlinks are copied as
   links, never followed; special files are skipped; the copy is capped);
2. makes a private socket folder, writes the kernel's connection file there
   with ``ip`` pointing inside the sandbox, and symlinks the socket paths the
   client expects (``<ip>-<port>`` next to the client's connection file) to
   it, so the client reaches exactly this kernel's sockets and the kernel sees
   no other kernel's connection file;
3. runs :mod:`grading_engine.kernel.inner` (ipykernel behind an audit hook) in
   bubblewrap with the limits of :mod:`grading_engine.sandbox.bwrap`;
4. forwards interrupts (SIGINT) to the kernel process, kills the sandbox on
   SIGTERM or after the wall-clock limit, copies the audit events the kernel
   writes to an inherited pipe into ``<connection file>.audit.jsonl`` (read by
   the grader), and removes everything it made.

Its settings come in its command line, from the kernelspec (``--package``,
``--bwrap``) and from the grader (SandboxedExecute appends
:func:`launcher_arguments` through ``KernelManager.start_kernel(extra_arguments=...)``):
``--sandbox on|off``, ``--limits JSON`` (:class:`~grading_engine.sandbox.bwrap.Limits`),
``--preload`` and ``--watch`` (comma-separated modules, passed on to the kernel).
Started without them (by hand), it uses the defaults of
:class:`grading_engine.config.GradingEngine`. The kernel gets the audit pipe as an
inherited descriptor named in its own command line (``--audit-fd N``).

With ``--sandbox off`` it runs the same inner kernel without bubblewrap,
after a warning.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from grading_engine.protocol import PACKAGE_DIRS_ENV, WARM_KERNELS, WarmEvent, WarmReply, WarmRequest
from grading_engine.sandbox import OPT_OUT_WARNING, SANDBOX_OPT_OUT_EVENT
from grading_engine.sandbox.bwrap import (
    SANDBOX_RUN,
    UID_BASE,
    Cgroups,
    Limits,
    build_command,
    is_root,
    package_dirs_value,
    rlimits,
    sandbox_env,
    write_etc,
)

WARM_START_TIMEOUT = 60.0  # seconds for a warm kernel's walls (a fork, a few mounts: milliseconds)
PORT_KEYS = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")
AUDIT_MAX_BYTES = 4 * 1024 * 1024


def audit_path_for(connection_file: str | os.PathLike) -> Path:
    """Where the launcher of a kernel writes its audit events."""
    p = Path(connection_file)
    return p.with_name(p.stem + ".audit.jsonl")


def host_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "course-sandbox"


def matplotlib_cache() -> Path | None:
    """A matplotlib font cache built outside the sandbox (built once, then copied into each kernel)."""
    d = host_cache_dir() / "matplotlib"
    if any(d.glob("fontlist-*.json")):
        return d
    try:
        tmp = Path(tempfile.mkdtemp(prefix="mpl-", dir=host_cache_dir() if host_cache_dir().exists() else None))
        env = dict(os.environ, MPLCONFIGDIR=str(tmp))
        subprocess.run([sys.executable, "-I", "-c", "import matplotlib.font_manager"], env=env,
                       capture_output=True, timeout=300, cwd="/")
        if any(tmp.glob("fontlist-*.json")):
            d.parent.mkdir(parents=True, exist_ok=True)
            try:
                tmp.rename(d)
            except OSError:  # another launcher won the race
                shutil.rmtree(tmp, ignore_errors=True)
            return d if d.exists() else None
        shutil.rmtree(tmp, ignore_errors=True)
    except Exception:
        return None
    return None


def copy_workdir(src: Path, dst: Path, max_bytes: int) -> list[str]:
    """Copy the notebook's folder; return notes about what was not copied."""
    notes: list[str] = []
    total = 0
    dst.mkdir(parents=True, exist_ok=True)
    for root, dirs, files in os.walk(src, followlinks=False):
        rel = Path(root).relative_to(src)
        dirs[:] = [d for d in dirs if d not in {".ipynb_checkpoints", "__pycache__"}]
        for d in list(dirs):
            sp = Path(root) / d
            if sp.is_symlink():
                dirs.remove(d)
                (dst / rel / d).symlink_to(os.readlink(sp))
            else:
                (dst / rel / d).mkdir(exist_ok=True)
        for f in files:
            sp = Path(root) / f
            dp = dst / rel / f
            try:
                st = sp.lstat()
                if stat.S_ISLNK(st.st_mode):
                    dp.symlink_to(os.readlink(sp))  # copied as a link: it resolves inside the sandbox only
                elif stat.S_ISREG(st.st_mode):
                    if total + st.st_size > max_bytes:
                        notes.append(f"not copied (size limit): {rel / f}")
                        continue
                    shutil.copyfile(sp, dp)
                    total += st.st_size
                else:
                    notes.append(f"not copied (special file): {rel / f}")
            except OSError as exc:
                notes.append(f"not copied ({exc.strerror}): {rel / f}")
    return notes


def chown_tree(path: Path, uid: int) -> None:
    os.chown(path, uid, uid, follow_symlinks=False)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(root, name), uid, uid, follow_symlinks=False)


class AuditSink(threading.Thread):
    """Copies audit lines from the kernel's pipe to the audit file, as they come."""

    def __init__(self, fd: int, path: Path):
        super().__init__(daemon=True)
        self.fd = fd
        self.path = path
        self.dropped = 0
        self.fh = path.open("ab", buffering=0)
        self.lock = threading.Lock()

    def write(self, record: dict) -> None:
        with self.lock:
            self.fh.write((json.dumps(record) + "\n").encode())

    def run(self) -> None:
        written = 0
        buf = b""
        with os.fdopen(self.fd, "rb", buffering=0) as pipe:
            while True:
                try:
                    chunk = pipe.read(65536)
                except OSError:
                    break
                if not chunk:
                    break
                buf += chunk
                *lines, buf = buf.split(b"\n")
                for line in lines:
                    if written + len(line) > AUDIT_MAX_BYTES:
                        self.dropped += 1
                        continue
                    written += len(line) + 1
                    with self.lock:
                        self.fh.write(line + b"\n")

    def close(self) -> None:
        if self.dropped:
            self.write({"e": "sandbox.audit_truncated", "a": [self.dropped]})
        self.fh.close()


def kernel_pid(init_pid: int | None) -> int | None:
    """The kernel process: the child of bubblewrap's init in the sandbox."""
    if not init_pid:
        return None
    try:
        kids = Path(f"/proc/{init_pid}/task/{init_pid}/children").read_text().split()
        return int(kids[0]) if kids else None
    except (OSError, ValueError):
        return None


def launcher_arguments(settings) -> list[str]:
    """What the grader appends to the kernelspec's command: the settings of a
    :class:`grading_engine.config.GradingEngine` that the launcher and the kernel need."""
    args = ["--sandbox", "on" if settings.sandbox else "off", "--limits", Limits.from_settings(settings).to_json(),
            "--preload", ",".join(settings.preload), "--bwrap", settings.bwrap or "bundled"]
    # per kernel, not in the shared kernelspec: two courses graded with one environment mount their own packages
    for name in settings.sandbox_packages:
        args += ["--package", name]
    if settings.watch_modules:
        args += ["--watch", ",".join(settings.watch_modules)]
    return args


@dataclass(frozen=True)
class LaunchArgs:
    connection_file: Path
    packages: list[str]
    bwrap: str
    sandbox: bool
    limits: Limits
    preload: list[str] | None  # None: the kernel's own default
    watch: list[str]
    kernel_args: list[str]  # the rest, for ipykernel
    warm: str | None = None  # the socket of a warm kernel server (grading_engine.sandbox.warm)


def _modules(text: str | None) -> list[str] | None:
    return None if text is None else [m.strip() for m in text.split(",") if m.strip()]


def parse_args(argv: list[str] | None = None) -> LaunchArgs:
    ap = argparse.ArgumentParser(prog="grading_engine.sandbox.kernel", allow_abbrev=False)
    ap.add_argument("-f", dest="connection_file", required=True)
    ap.add_argument("--package", dest="packages", action="append", default=[],
                    help="a package the notebooks import, mounted read-only (repeatable; from the kernelspec)")
    ap.add_argument("--bwrap", default="bundled", help="the bubblewrap binary: bundled, system or a path")
    ap.add_argument("--sandbox", choices=["on", "off"], default=None,
                    help="off: run the kernel without bubblewrap (GradingEngine.sandbox)")
    ap.add_argument("--limits", type=Limits.from_json, default=None, help="the sandbox limits, as JSON")
    ap.add_argument("--preload", default=None, help="modules the kernel imports before student code")
    ap.add_argument("--watch", default=None, help="modules whose functions the probe also watches")
    ap.add_argument("--warm", default=None, help="socket of the grading process's warm kernel server")
    args, extra = ap.parse_known_args(argv)
    defaults = None
    if args.sandbox is None or args.limits is None:  # not started by the grader: the settings' defaults
        from grading_engine.config import GradingEngine

        defaults = GradingEngine()
    return LaunchArgs(
        connection_file=Path(args.connection_file).resolve(),
        packages=list(dict.fromkeys(args.packages)),
        bwrap=args.bwrap,
        sandbox=defaults.sandbox if args.sandbox is None else args.sandbox == "on",
        limits=Limits.from_settings(defaults) if args.limits is None else args.limits,
        preload=_modules(args.preload),
        watch=_modules(args.watch) or [],
        kernel_args=extra,
        warm=args.warm,
    )


def inner_command(args: LaunchArgs, audit_fd: int, connection_file: str) -> list[str]:
    """The kernel's command line: its own settings, then ipykernel's."""
    cmd = [sys.executable, "-P", "-m", "grading_engine.kernel.inner", "--audit-fd", str(audit_fd)]
    if args.preload is not None:
        cmd += ["--preload", ",".join(args.preload)]
    if args.watch:
        cmd += ["--watch", ",".join(args.watch)]
    return cmd + ["-f", connection_file, *args.kernel_args]


@dataclass
class Prepared:
    """A kernel's private folder (``home``, ``run``, ``etc``), made and filled by the launcher."""

    work: Path
    name: str  # the notebook folder's name under home
    uid: int | None  # root: the kernel's own uid
    links: list[Path]


def prepare(args: LaunchArgs, info: dict, sink: AuditSink, parent: Path | None) -> Prepared:
    """Make the kernel's folder (in ``parent``: a warm server's kernel folders; else /tmp) and fill it:
    the copy of the notebook's folder, the connection file, passwd, and the client's socket links."""
    from grading_engine.sandbox.bwrap import sweep_stale

    sweep_stale(Path(tempfile.gettempdir()) if parent is None else parent, "course-sandbox-" if parent is None else "")
    work = Path(tempfile.mkdtemp(prefix=f"course-sandbox-{os.getpid()}-" if parent is None else f"{os.getpid()}-",
                                 dir=parent))
    home, run, etc = work / "home", work / "run", work / "etc"
    for d in (home, run, etc):
        d.mkdir()
    uid = UID_BASE + os.getpid() if is_root() else None
    write_etc(etc, uid if uid is not None else os.getuid())
    name = Path.cwd().name or "work"
    for note in copy_workdir(Path.cwd(), home / name, args.limits.copy_mb * 1024 * 1024):
        sink.write({"e": "sandbox.copy", "a": [note]})
    mpl = matplotlib_cache()
    if mpl is not None:
        shutil.copytree(mpl, home / ".config" / "matplotlib", dirs_exist_ok=True)
    (run / "connection.json").write_text(json.dumps(dict(info, ip=f"{SANDBOX_RUN}/k")))
    os.chmod(run / "connection.json", 0o600)
    if uid is not None:
        chown_tree(home, uid)
        chown_tree(run, uid)
        if parent is not None:  # a warm kernel's supervisor, already this uid, mounts these itself
            os.chown(work, uid, uid)
    links = []
    for key in PORT_KEYS:
        link = Path(f"{info['ip']}-{info[key]}")
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(run / f"k-{info[key]}")
        links.append(link)
    return Prepared(work, name, uid, links)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    info = json.loads(args.connection_file.read_text())
    audit_r, audit_w = os.pipe()
    sink = AuditSink(audit_r, audit_path_for(args.connection_file))
    sink.start()
    started = time.monotonic()
    state = {"proc": None, "init_pid": None, "reason": "exit", "kill": None, "interrupt": None}

    def on_interrupt(signum, frame) -> None:
        if state["interrupt"] is not None:
            state["interrupt"]()

    def on_terminate(signum, frame) -> None:
        state["reason"] = f"signal {signum}"
        if state["kill"] is not None:
            state["kill"]()

    signal.signal(signal.SIGINT, on_interrupt)
    signal.signal(signal.SIGTERM, on_terminate)
    signal.signal(signal.SIGHUP, on_terminate)

    if not args.sandbox:
        rc = run_unsandboxed(args, audit_w, sink, state, started)
    elif info.get("transport") != "ipc":
        print("[course-sandbox] the sandboxed kernel has no network, so it needs transport 'ipc' "
              "(the course's SandboxedExecute sets it); got " + repr(info.get("transport")),
              file=sys.stderr, flush=True)
        return 2
    else:
        rc = run_sandboxed(args, info, audit_w, sink, state, started)
    sink.join(timeout=5)
    sink.write({"e": "sandbox.exit", "a": [rc, state["reason"], round(time.monotonic() - started, 2)]})
    sink.close()
    return rc


def run_unsandboxed(args: LaunchArgs, audit_w: int, sink: AuditSink, state: dict, started: float) -> int:
    print(f"[course-sandbox] WARNING: {OPT_OUT_WARNING}", file=sys.stderr, flush=True)
    sink.write({"e": SANDBOX_OPT_OUT_EVENT, "a": []})
    env = dict(os.environ)
    pkg_parent = str(Path(__file__).resolve().parent.parent.parent)
    env["PYTHONPATH"] = pkg_parent + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env[PACKAGE_DIRS_ENV] = package_dirs_value(args.packages)
    proc = subprocess.Popen(inner_command(args, audit_w, str(args.connection_file)), env=env, pass_fds=(audit_w,))
    os.close(audit_w)
    state["proc"] = proc
    state["interrupt"] = lambda: proc.send_signal(signal.SIGINT)
    state["kill"] = proc.kill
    return _wait(proc, args.limits, started, state, proc.kill)


def run_sandboxed(args: LaunchArgs, info: dict, audit_w: int, sink: AuditSink, state: dict, started: float) -> int:
    warm_socket = Path(args.warm) if args.warm else None
    parent = warm_socket.parent / WARM_KERNELS if warm_socket is not None else None
    if parent is not None and not parent.is_dir():
        sink.write({"e": "sandbox.cold", "a": [f"no warm kernel server at {warm_socket}"]})
        warm_socket = parent = None
    prep = prepare(args, info, sink, parent)
    cgroups = Cgroups(f"course-sandbox-{os.getpid()}", args.limits.total_mb, args.limits.nproc + 64)
    sink.write({"e": "sandbox.cgroup", "a": ["on" if cgroups.active else "off"]})
    try:
        rc = None
        if warm_socket is not None:
            rc, why = run_warm(args, prep, warm_socket, audit_w, cgroups, state, started)
            if rc is None:
                print(f"[course-sandbox] WARNING: no warm kernel ({why}); starting a fresh sandbox",
                      file=sys.stderr, flush=True)
                sink.write({"e": "sandbox.cold", "a": [why]})
        if rc is None:
            rc = run_cold(args, prep, audit_w, cgroups, state, started)
        if cgroups.oom_kills():
            sink.write({"e": "sandbox.oom", "a": [cgroups.oom_kills(), args.limits.total_mb]})
        return rc
    finally:
        cgroups.remove()
        for link in prep.links:
            try:
                link.unlink()
            except OSError:
                pass
        shutil.rmtree(prep.work, ignore_errors=True)


def warm_request(args: LaunchArgs, prep: Prepared) -> WarmRequest:
    import resource

    names = {getattr(resource, n): n for n in dir(resource) if n.startswith("RLIMIT_")}
    return WarmRequest(
        kernel_id=prep.work.name, workdir_name=prep.name, env=sandbox_env(args.limits, packages=args.packages),
        rlimits={names[r]: v for r, v in rlimits(args.limits, prep.uid).items()}, tmp_mb=args.limits.tmp_mb,
        kernel_args=["-f", f"{SANDBOX_RUN}/connection.json", *args.kernel_args], preload=args.preload,
        watch=args.watch, uid=prep.uid)


def run_warm(args: LaunchArgs, prep: Prepared, server: Path, audit_w: int, cgroups: Cgroups, state: dict,
             started: float) -> tuple[int | None, str]:
    """Ask the server for the kernel and follow it to its end: (exit code, "") or (None, why not)."""
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)  # the kernel's own message gives its pid
    try:
        sock.settimeout(10)
        sock.connect(str(server))
        socket.send_fds(sock, [warm_request(args, prep).to_bytes()], [1, 2, audit_w])
        sock.settimeout(WARM_START_TIMEOUT)
        reply, pid = _recv_reply(sock)
    except (OSError, ValueError) as exc:
        sock.close()
        return None, f"the server did not answer: {exc}"
    if reply.event is not WarmEvent.STARTED or not pid:
        sock.close()
        return None, reply.detail or f"the server answered {reply.event.value}"
    os.close(audit_w)
    cgroups.add(pid)

    def signal_kernel(sig: int) -> None:
        try:
            os.kill(pid, sig)
        except OSError:
            pass

    state["interrupt"] = lambda: signal_kernel(signal.SIGINT)
    state["kill"] = lambda: signal_kernel(signal.SIGKILL)
    deadline = started + args.limits.wall_s
    sock.settimeout(1.0)
    while True:
        try:
            reply, _ = _recv_reply(sock)
        except TimeoutError:
            if time.monotonic() > deadline:
                state["reason"] = f"wall-clock limit {args.limits.wall_s} s"
                signal_kernel(signal.SIGKILL)
            continue
        except (OSError, ValueError):  # the supervisor is gone: so is the kernel (it dies with it)
            signal_kernel(signal.SIGKILL)
            sock.close()
            return -9, ""
        if reply.event is WarmEvent.EXITED:
            sock.close()
            return reply.code, ""


def _recv_reply(sock) -> tuple[WarmReply, int | None]:
    """One reply and the pid of the process that sent it (its credentials, in our pid namespace)."""
    import socket
    import struct

    data, anc, _flags, _addr = sock.recvmsg(4096, socket.CMSG_SPACE(struct.calcsize("3i")))
    if not data:
        raise OSError("connection closed")
    pid = None
    for level, kind, payload in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
            pid = struct.unpack("3i", payload[:struct.calcsize("3i")])[0]
    return WarmReply.from_bytes(data), pid


def run_cold(args: LaunchArgs, prep: Prepared, audit_w: int, cgroups: Cgroups, state: dict, started: float) -> int:
    """A fresh bubblewrap sandbox for this kernel alone."""
    info_r, info_w = os.pipe()
    env = sandbox_env(args.limits, packages=args.packages)
    work = prep.work
    cmd = build_command(inner_command(args, audit_w, f"{SANDBOX_RUN}/connection.json"), workdir_name=prep.name,
                        home_dir=work / "home", run_dir=work / "run", etc_dir=work / "etc", env=env, uid=prep.uid,
                        limits=args.limits, packages=args.packages, info_fd=info_w, bwrap=args.bwrap)
    limit_values = rlimits(args.limits, prep.uid)

    def preexec() -> None:
        import resource

        cgroups.join()
        os.umask(0o022)
        for res, val in limit_values.items():
            try:
                resource.setrlimit(res, val)
            except (ValueError, OSError):
                pass

    proc = subprocess.Popen(cmd, pass_fds=(audit_w, info_w), start_new_session=True, preexec_fn=preexec,
                            stdin=subprocess.DEVNULL)
    os.close(audit_w)
    os.close(info_w)
    state["proc"] = proc

    def read_info() -> None:
        with os.fdopen(info_r, "rb") as fh:
            data = fh.read()
        try:
            state["init_pid"] = json.loads(data.decode() or "{}").get("child-pid")
        except ValueError:
            pass

    threading.Thread(target=read_info, daemon=True).start()

    def kill_sandbox() -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass

    def interrupt() -> None:
        pid = kernel_pid(state["init_pid"])
        if pid:
            try:
                os.kill(pid, signal.SIGINT)
            except OSError:
                pass

    state["interrupt"] = interrupt
    state["kill"] = kill_sandbox
    return _wait(proc, args.limits, started, state, kill_sandbox)


def _wait(proc: subprocess.Popen, limits: Limits, started: float, state: dict, kill) -> int:
    deadline = started + limits.wall_s
    while True:
        try:
            return proc.wait(timeout=1.0)
        except subprocess.TimeoutExpired:
            if time.monotonic() > deadline:
                state["reason"] = f"wall-clock limit {limits.wall_s} s"
                kill()
        except KeyboardInterrupt:
            continue


if __name__ == "__main__":
    sys.exit(main())
