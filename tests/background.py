"""Slow session fixtures computed in the background while the rest of the suite runs.

The grading fixtures (the harness's real ``nbgrader autograde`` of every notebook, ``nbgrader validate``,
the adversarial batch) spend their time in subprocesses. Each is written as a pytest generator fixture
(set-up, ``yield`` the value, tear-down) and declared with :func:`session_fixture`. From the end of
collection, one thread computes, one after the other in the order of their ``turn``, those that the
selected tests use, and the tests that use them run last, in that order too (``order_items``): every
other test runs meanwhile, on the cores the fixture's subprocesses leave. One thread, not one per
fixture, so that the machine is not crowded more than the fixtures themselves crowd it (the suite's own
timeouts, kernel start-up ones among them, assume that).

The background fixtures are the suite's critical path: the other tests are done long before them. Once the
thread has started, the main thread lowers its own priority (``nice`` +:data:`FOREGROUND_NICE`, Linux: per
thread, inherited by the processes it starts; ``COURSE_FOREGROUND_NICE`` sets it, 0 switches it off), so
that the other tests take the cycles the fixtures leave rather than slow them down. Nothing is ever
raised again, which an unprivileged process could not do; alone on the machine a niced process runs as fast.

A fixture the tests reach before its turn is computed at once in the test's own thread, as pytest would.
A run that ends before every fixture was used (``-x``, Ctrl-C) stops the thread's subprocesses and tears
down what was set up.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field

import pytest

Setup = Callable[[pytest.Config], Generator]


@dataclass
class _Job:
    name: str
    setup: Setup
    turn: int
    done: threading.Event = field(default_factory=threading.Event)
    claimed: bool = False  # a thread (the background one or a test's) computes it
    value: object = None
    error: BaseException | None = None
    gen: Generator | None = None
    began: float | None = None  # time.monotonic() of the set-up's start and end
    ended: float | None = None
    asked: float | None = None  # when the first test that uses it asked for it
    thread: str = ""

    def claim(self) -> bool:
        """True for the one thread that is to compute it."""
        with _LOCK:
            mine, self.claimed = not self.claimed, True
        return mine

    def compute(self, config: pytest.Config) -> None:
        self.began, self.thread = time.monotonic(), threading.current_thread().name
        try:
            self.gen = self.setup(config)
            self.value = next(self.gen)
        except BaseException as exc:  # reported to the tests that use the fixture
            self.error = exc
        finally:
            self.ended = time.monotonic()
            self.done.set()

    def teardown(self) -> None:
        gen, self.gen = self.gen, None
        if gen is not None and self.error is None:
            try:
                next(gen)
            except StopIteration:
                pass
            else:
                raise RuntimeError(f"the fixture {self.name} yields more than once")


_JOBS: dict[str, _Job] = {}
_LOCK = threading.Lock()
_THREAD: threading.Thread | None = None
_STARTED: float | None = None  # time.monotonic() when start() was called
FOREGROUND_NICE = 5


def session_fixture(turn: int):
    """Decorator: a session fixture named like the generator it decorates (set-up from the pytest config,
    ``yield`` the value, tear-down), computed in the background; lower turns first (the longest last, so
    that at the end, when the tests wait for it, it keeps every core busy)."""
    return lambda setup: _declare(setup, turn)


def _ordered() -> list[str]:
    return sorted(_JOBS, key=lambda name: _JOBS[name].turn)


def _declare(setup: Setup, turn: int):
    name = setup.__name__
    _JOBS[name] = _Job(name, setup, turn)

    @pytest.fixture(scope="session", name=name)
    def fixture(request):
        job = _JOBS[name]
        if job.asked is None:
            job.asked = time.monotonic()
        if job.claim():
            job.compute(request.config)
        job.done.wait()
        if job.error is not None:
            raise job.error
        yield job.value
        job.teardown()

    fixture.__doc__ = setup.__doc__
    return fixture


def wanted(items) -> list[str]:
    """The background fixtures that the selected tests use, in the order the thread computes them."""
    used = set()
    for item in items:
        used |= set(getattr(item, "fixturenames", ())) & set(_JOBS)
    return [name for name in _ordered() if name in used]


def order_items(items, alone: tuple[str, ...] = ()) -> None:
    """Tests that use a background fixture run last, in the order the fixtures are computed (stable); tests
    with a marker of ``alone`` after them, once the background work is done."""
    rank = {name: i + 1 for i, name in enumerate(_ordered())}

    def key(item) -> int:
        if any(item.get_closest_marker(m) for m in alone):
            return len(rank) + 1
        return max((rank[n] for n in getattr(item, "fixturenames", ()) if n in rank), default=0)

    items.sort(key=key)


def start(config: pytest.Config, items) -> None:
    """Compute the background fixtures the selected tests use, one after the other, in one thread."""
    global _THREAD, _STARTED
    _STARTED = time.monotonic()
    names = wanted(items)
    if not names or config.option.collectonly or os.environ.get("COURSE_NO_BACKGROUND"):
        return

    def run() -> None:
        for name in names:
            if _JOBS[name].claim():
                _JOBS[name].compute(config)

    _THREAD = threading.Thread(target=run, name="background fixtures", daemon=True)
    _THREAD.start()
    nice = int(os.environ.get("COURSE_FOREGROUND_NICE", FOREGROUND_NICE))
    if nice > 0 and sys.platform.startswith("linux"):
        os.nice(nice)  # this thread only: the background thread keeps the priority it was started with


def timeline() -> list[str]:
    """One line per background fixture computed: when its set-up ran (seconds from the end of collection),
    in which thread, and how long the first test that used it waited for it (the time the rest of the
    suite did not cover)."""
    if _STARTED is None:
        return []
    t0 = _STARTED
    lines = []
    for name in _ordered():
        job = _JOBS[name]
        if job.began is None:
            continue
        end = f"{job.ended - t0:6.0f}" if job.ended is not None else "   ..."
        took = f"{job.ended - job.began:5.0f} s" if job.ended is not None else "running"
        waited = ("not used" if job.asked is None
                  else f"first test waited {max(0.0, (job.ended or time.monotonic()) - job.asked):.0f} s")
        lines.append(f"{name:<18} {job.began - t0:6.0f} -> {end} s  ({took}, {job.thread}; {waited})")
    return lines


def stop() -> None:
    """At the end of the session: stop what is still being computed, tear down what no test used."""
    if _THREAD is not None and _THREAD.is_alive():
        import psutil

        for signal_them in ("terminate", "kill"):  # SIGKILL for what SIGTERM left after 10 s
            procs = psutil.Process().children(recursive=True)
            for p in procs:
                try:
                    getattr(p, signal_them)()
                except psutil.Error:
                    pass
            psutil.wait_procs(procs, timeout=10)
        _THREAD.join(timeout=30)
    for job in _JOBS.values():
        if job.done.is_set():
            try:
                job.teardown()
            except Exception:
                pass
