"""Drop every privilege before student code runs, and prove it (stdlib only).

Used in two places, the same way:

* a cold sandbox started as root: bubblewrap leaves its first process uid 0 with CAP_SETUID,
  CAP_SETGID and CAP_SETPCAP, and runs this file as a script (``python -I -S privileges.py UID
  COMMAND...``; nothing of ``site`` runs as root), which drops to ``UID`` and execs the kernel;
* a warm kernel forked inside the sandbox (:mod:`grading_engine.kernel.warm`): the child holds every
  capability of its own user namespace while it sets up its mounts, then calls :func:`drop` itself.

:func:`drop` empties the capability bounding and ambient sets, optionally takes ``uid`` as user and
group (no supplementary groups), empties the effective, permitted and inheritable sets, sets
no_new_privs, then reads ``/proc/self/status`` and raises unless all of that holds: fail closed.
"""

from __future__ import annotations

import ctypes
import os
import sys

PR_CAPBSET_DROP = 24
PR_SET_NO_NEW_PRIVS = 38
PR_CAP_AMBIENT = 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
_LINUX_CAPABILITY_VERSION_3 = 0x20080522

_libc = ctypes.CDLL(None, use_errno=True)


class NotDropped(OSError):
    """A privilege is still held after :func:`drop`."""


def prctl(*args: int) -> None:
    if _libc.prctl(*(ctypes.c_ulong(a) for a in args)) != 0:
        raise OSError(ctypes.get_errno(), f"prctl{args}")


def _last_cap() -> int:
    try:
        return int(open("/proc/sys/kernel/cap_last_cap").read())
    except (OSError, ValueError):
        return 63


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def status() -> dict[str, list[str]]:
    text = open("/proc/self/status").read()
    return {k: v.split() for k, v in (line.split(":", 1) for line in text.splitlines() if ":" in line)}


def drop(uid: int | None = None) -> None:
    """Drop to ``uid`` (None: keep the current ids) with no capabilities and no_new_privs; check it."""
    for cap in range(_last_cap() + 1):
        prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
    prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    if uid is not None:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
    if _libc.capset(ctypes.byref(_CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)), (_CapData * 2)()) != 0:
        raise OSError(ctypes.get_errno(), "capset")
    prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    have = status()
    ids = [str(uid if uid is not None else os.getuid())] * 4
    gids = [str(uid if uid is not None else os.getgid())] * 4
    want = {"Uid": ids, "Gid": gids, "NoNewPrivs": ["1"],
            **{k: [format(0, "016x")] for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}}
    if uid is not None:
        want["Groups"] = []
    wrong = {k: have.get(k, []) for k, v in want.items() if have.get(k, []) != v}
    if wrong:
        raise NotDropped(f"privileges not dropped: {wrong}")


def main(argv: list[str]) -> None:
    """``privileges.py UID COMMAND...``: drop to UID, then exec COMMAND (exit 126 if the drop fails)."""
    uid = int(argv[0])
    try:
        drop(uid)
    except OSError as exc:
        print(f"[course-sandbox] cannot drop privileges, refusing to run: {exc}", file=sys.stderr)
        os._exit(126)
    os.execv(argv[1], argv[1:])


if __name__ == "__main__":
    main(sys.argv[1:])
