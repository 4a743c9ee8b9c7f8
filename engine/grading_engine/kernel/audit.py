"""In-kernel audit hook (PEP 578): report sensitive operations as they happen.

Installed by :mod:`grading_engine.kernel.inner` before anything else runs in the
kernel. Each event worth reporting is written at once, as one JSON line, to a
pipe whose other end is held by the kernel's launcher outside the sandbox, so
a report cannot be taken back: an audit hook cannot be removed, and what has
been written to the pipe has left the process. (Student code can write fake
lines or close the pipe; the first only adds reports, the second is itself
reported by the launcher.)

What is reported:

* file-system access outside the places a notebook may use (its own folder,
  ``$HOME``, ``/tmp``, the Python installation, the packages the notebooks import, ``/usr``, ...): ``open``,
  directory listings, deletions, renames, ``chdir``;
* network, processes and signals: sockets, ``subprocess``, ``os.system``,
  ``fork``, ``kill``;
* hooks into the interpreter: ``sys.settrace``/``setprofile``,
  ``sys.addaudithook``, ``ctypes``, ``gc.get_referrers``, ``sys._getframe``,
  ``exec``/``compile`` of strings, when made directly from a notebook cell.
  (Python raises no audit event when a module or class attribute is
  replaced; :mod:`grading_engine.kernel.probe` and the static scan look for that.)
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

from grading_engine.protocol import PACKAGE_DIRS_ENV

ALWAYS = frozenset({
    "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
    "socket.gethostbyname", "socket.gethostbyaddr", "urllib.Request", "http.client.connect",
    "ftplib.connect", "smtplib.connect", "poplib.connect", "imaplib.open", "nntplib.connect",
    "telnetlib.Telnet.open", "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn", "os.spawn",
    "os.fork", "os.forkpty", "os.kill", "os.killpg", "signal.pthread_kill", "pty.spawn",
    "sys.settrace", "sys.setprofile", "sys.addaudithook", "sqlite3.connect", "sqlite3.connect/handle",
    "resource.setrlimit", "resource.prlimit", "webbrowser.open", "cpython._PySys_ClearAuditHooks",
})
PATHS = {  # event -> indexes of path arguments
    "open": (0,), "os.listdir": (0,), "os.scandir": (0,), "os.chdir": (0,), "glob.glob": (0,),
    "os.remove": (0,), "os.rename": (0, 1), "os.rmdir": (0,), "os.mkdir": (0,), "shutil.rmtree": (0,),
    "shutil.copyfile": (0, 1), "shutil.copytree": (0, 1), "shutil.move": (0, 1), "os.chmod": (0,),
    "os.chown": (0,), "os.link": (0, 1), "os.symlink": (0, 1), "os.truncate": (0,), "os.utime": (0,),
    "os.walk": (0,), "os.fwalk": (0,),
}
LISTINGS = frozenset({"os.listdir", "os.scandir"})
DIRECT = {  # event -> how many frames below a notebook cell still count as "done by the cell"
    "ctypes.dlopen": 1, "ctypes.dlsym": 1, "ctypes.cdata": 1, "ctypes.PyObj_FromPtr": 1, "ctypes.string_at": 1,
    "ctypes.addressof": 1, "gc.get_objects": 0, "gc.get_referrers": 0, "gc.get_referents": 0,
    "sys._getframe": 0, "code.__new__": 0, "function.__new__": 0, "compile": 0, "exec": 0,
    "sys._current_frames": 0,
}
WATCHED = ALWAYS | frozenset(PATHS) | frozenset(DIRECT)
MAX_EVENTS = 3000

_fd = -1
_t0 = time.monotonic()
_count = 0
_local = threading.local()
_allowed: tuple[str, ...] = ()
_listable: frozenset[str] = frozenset()
_cell_prefixes: tuple[str, ...] = ()
_own_dir = os.path.dirname(os.path.abspath(__file__))
_sandbox_dir = os.path.join(os.path.dirname(_own_dir), "sandbox")
_write = os.write
_dumps = json.dumps
_getframe = sys._getframe


def allowed_roots() -> tuple[str, ...]:
    """Folders a notebook may touch; access elsewhere is reported."""
    roots = {"/usr", "/etc", "/dev", "/proc", "/sys", "/tmp", "/var/tmp", "/run/kernel", "/lib", "/lib64",
             "/lib32", "/bin", "/sbin", os.getcwd()}
    for p in (sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.path.dirname(_own_dir))):
        roots.add(p)
        roots.add(os.path.realpath(p))
    roots.update(package_dirs())
    home = os.path.expanduser("~")
    if os.environ.get("COURSE_SANDBOX_ACTIVE") == "1":
        roots.add(home)
    else:  # without the sandbox $HOME is the instructor's: only its caches count as normal
        roots.update(os.path.join(home, d) for d in (".cache", ".config", ".local", ".ipython", ".matplotlib",
                                                     ".jupyter"))
    import tempfile

    roots.add(tempfile.gettempdir())
    return tuple(sorted(r.rstrip("/") for r in roots if r))


def package_dirs() -> set[str]:
    """The folders of the packages the notebooks import (:data:`PACKAGE_DIRS_ENV`), as given and resolved."""
    return {q for p in os.environ.get(PACKAGE_DIRS_ENV, "").split(os.pathsep) if p.startswith("/")
            for q in (p.rstrip("/"), os.path.realpath(p))}


def listable_dirs() -> frozenset[str]:
    """Folders only listed without a report: those holding the packages, which the import system lists
    to find them (in the sandbox they hold nothing else)."""
    return frozenset(os.path.dirname(p) for p in package_dirs())


def _outside(path, listing: bool = False) -> str | None:
    if isinstance(path, int) or path is None:
        return None
    try:
        p = os.fsdecode(path)
    except Exception:
        return "?"
    full = os.path.normpath(os.path.join(os.getcwd(), p)) if not p.startswith("/") else os.path.normpath(p)
    for r in _allowed:
        if full == r or full.startswith(r + "/"):
            return None
    if listing and full in _listable:
        return None
    return full


def _cell_depth(limit: int | None = None) -> tuple[int | None, str, bool]:
    """(frames between the event and the nearest notebook cell, innermost place, raised by our code).

    ``limit``: the caller records the event only at a depth up to ``limit``, so the walk stops after that
    many frames (the answer is then "no cell", depth None): ``compile`` and ``exec`` come by the thousand
    from the libraries' own imports, each far below any cell."""
    f = _getframe(2)
    depth = 0
    where = ""
    while f is not None and (limit is None or depth <= limit):
        fn = f.f_code.co_filename
        if not where:
            where = f"{os.path.basename(fn)}:{f.f_lineno}"
        if fn.startswith(_own_dir) or fn.startswith(_sandbox_dir):
            return None, where, True
        if fn.startswith(_cell_prefixes):
            return depth, where, False
        depth += 1
        f = f.f_back
    return None, where, False


def _short(x) -> str:
    try:
        r = repr(x)
    except Exception:
        r = f"<{type(x).__name__}>"
    return r if len(r) <= 200 else r[:197] + "..."


def _hook(event: str, args: tuple) -> None:
    if event not in WATCHED or _fd < 0 or getattr(_local, "busy", False):
        return
    _local.busy = True
    try:
        global _count
        if _count >= MAX_EVENTS:
            return
        rec = None
        if event in PATHS:
            listing = event in LISTINGS
            outside = [o for i in PATHS[event] if i < len(args) and (o := _outside(args[i], listing))]
            if outside:
                depth, where, ours = _cell_depth()
                if not ours:
                    rec = {"e": event, "a": [_short(a) for a in args[:3]], "p": outside, "d": depth, "w": where}
        elif event in ALWAYS:
            depth, where, ours = _cell_depth()
            if not ours:
                rec = {"e": event, "a": [_short(a) for a in args[:3]], "d": depth, "w": where}
        else:
            depth, where, ours = _cell_depth(DIRECT[event])
            if not ours and depth is not None and depth <= DIRECT[event]:
                if event in ("exec", "compile"):
                    shown = [_short(args[0])[:120]]
                else:
                    shown = [_short(a) for a in args[:2]]
                rec = {"e": event, "a": shown, "d": depth, "w": where}
        if rec is not None:
            _count += 1
            rec["t"] = round(time.monotonic() - _t0, 3)
            _send(rec)
    except Exception:
        pass
    finally:
        _local.busy = False


def _send(rec: dict) -> None:
    global _fd
    if _fd < 0:
        return
    try:
        _write(_fd, (_dumps(rec) + "\n").encode())
    except OSError:
        _fd = -1


def emit(event: str, *args) -> None:
    """Write a marker (kernel ready, cell boundary, ...) into the audit stream."""
    if getattr(_local, "busy", False):
        return
    _local.busy = True
    try:
        _send({"e": event, "a": list(args), "t": round(time.monotonic() - _t0, 3)})
    finally:
        _local.busy = False


def install(fd: int) -> None:
    """Install the hook, writing to ``fd`` (negative: record nothing)."""
    global _fd, _allowed, _listable, _cell_prefixes, _t0
    _t0 = time.monotonic()  # event times count from here (a warm kernel imported this module long before)
    _local.busy = True
    try:
        _allowed = allowed_roots()
        _listable = listable_dirs()
        import tempfile

        tmp = tempfile.gettempdir()
        _cell_prefixes = (os.path.join(tmp, f"ipykernel_{os.getpid()}") + os.sep, "<ipython-input-")
    finally:
        _local.busy = False
    _fd = fd
    sys.addaudithook(_hook)
