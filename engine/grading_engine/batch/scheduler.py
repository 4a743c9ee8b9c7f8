"""The batch's scheduling policy, as a pure object: which job next, and what a result or a crash means.

No processes, no clock, no files: :class:`Scheduler` is told what happened
(a worker asks for work, a worker answered, a worker died) and answers with
a :class:`Decision`. The runner (:mod:`grading_engine.batch.runner`) does the
input and output: starting workers, merging results, writing the journal.

The policy:

* jobs go out in the order given (the runner puts the largest submissions
  first), one at a time per worker;
* a result that is a verdict on the submission (graded, or failed because of
  the submission) is merged;
* a failure before any of the student's code ran (the worker could not set
  up, a kernel never answered, the worker died) is not held against the
  student: the job is graded again, once; a second such failure is final;
* workers that keep dying (more crashes than ``crash_budget``) stop the batch.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Hashable, Iterable
from dataclasses import dataclass

MAX_ATTEMPTS = 2


@dataclass
class Job:
    """One student's submission of one assignment."""

    assignment: str
    student: str
    notebooks: int
    fingerprint: str
    attempts: int = 0

    @property
    def key(self) -> tuple[str, str]:
        return (self.assignment, self.student)


class Action(enum.Enum):
    MERGE = "merge"  # a verdict: put the worker's result into the course
    RETRY = "retry"  # no verdict yet: the job is queued again
    FAIL = "fail"    # no verdict, and no attempt left: record the job as failed


@dataclass(frozen=True)
class Decision:
    action: Action
    job: Job
    reason: str = ""


class WorkersKeepDying(RuntimeError):
    """More worker crashes than the batch's budget allows."""


class Scheduler:
    """Jobs waiting, jobs running (one per worker), and the retry policy. See the module docstring."""

    def __init__(self, jobs: Iterable[Job], max_attempts: int = MAX_ATTEMPTS, crash_budget: int | None = None):
        self._queue: deque[Job] = deque(jobs)
        self._running: dict[Hashable, Job] = {}
        self.max_attempts = max_attempts
        self.crash_budget = crash_budget
        self.crashes = 0
        self.finished = 0
        self.dispatched = 0

    # ------------------------------------------------------------------ state

    @property
    def pending(self) -> int:
        """Jobs waiting for a worker."""
        return len(self._queue)

    @property
    def done(self) -> bool:
        """Nothing waits and nothing runs."""
        return not self._queue and not self._running

    def running(self, worker: Hashable) -> Job | None:
        return self._running.get(worker)

    # ------------------------------------------------------------------ events

    def next_job(self, worker: Hashable) -> Job | None:
        """The job ``worker`` grades next, or None (it is busy, or nothing is left)."""
        if worker in self._running or not self._queue:
            return None
        job = self._queue.popleft()
        job.attempts += 1
        self._running[worker] = job
        self.dispatched += 1
        return job

    def on_result(self, worker: Hashable, before_student_code: bool = False, reason: str = "") -> Decision | None:
        """``worker`` answered for its job; ``before_student_code``: it failed before any student code ran."""
        job = self._running.pop(worker, None)
        if job is None:
            return None
        if before_student_code and job.attempts < self.max_attempts:
            self._queue.append(job)  # graded again, after the others waiting
            return Decision(Action.RETRY, job, reason)
        self.finished += 1
        return Decision(Action.MERGE, job, reason)

    def on_crash(self, worker: Hashable, reason: str) -> Decision | None:
        """``worker`` died or was stopped (no answer in time); its job, if any, is retried once."""
        self.crashes += 1
        if self.crash_budget is not None and self.crashes > self.crash_budget:
            raise WorkersKeepDying(f"batch workers keep dying ({reason})")
        job = self._running.pop(worker, None)
        if job is None:
            return None
        if job.attempts < self.max_attempts:
            self._queue.appendleft(job)  # first in line: its replacement worker takes it
            return Decision(Action.RETRY, job, reason)
        self.finished += 1
        return Decision(Action.FAIL, job, f"the grading process died twice ({reason})")

    def on_lost(self, worker: Hashable, reason: str) -> Decision | None:
        """``worker``'s job is lost for good (Dask gave up on it after the workers grading it died): failed."""
        job = self._running.pop(worker, None)
        if job is None:
            return None
        self.finished += 1
        return Decision(Action.FAIL, job, reason)
