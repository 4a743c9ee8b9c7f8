"""The batch's scheduling policy (grading_engine.batch.scheduler): pure, so tested without a process or a clock."""

from __future__ import annotations

import pytest
from grading_engine.batch.scheduler import Action, Job, Scheduler, WorkersKeepDying


def jobs(*students: str) -> list[Job]:
    return [Job("a1", s, 1, f"fp-{s}") for s in students]


def drain(sched: Scheduler, worker="w0") -> list[str]:
    """Grade everything on one worker, every result a verdict; the students in the order they went out."""
    order = []
    while (job := sched.next_job(worker)) is not None:
        order.append(job.student)
        assert sched.on_result(worker).action is Action.MERGE
    return order


def test_jobs_go_out_in_order_one_per_worker():
    s = Scheduler(jobs("ann", "ben", "cat"))
    assert s.next_job("w0").student == "ann"
    assert s.next_job("w0") is None, "a busy worker gets nothing more"
    assert s.next_job("w1").student == "ben"
    assert s.running("w0").student == "ann" and s.pending == 1
    assert s.on_result("w0").action is Action.MERGE
    assert s.next_job("w0").student == "cat"
    assert s.next_job("w2") is None, "nothing left"
    assert not s.done
    s.on_result("w0")
    s.on_result("w1")
    assert s.done and s.finished == 3 and s.dispatched == 3


def test_a_verdict_is_merged_even_when_the_submission_failed():
    s = Scheduler(jobs("ann"))
    s.next_job("w0")
    d = s.on_result("w0", before_student_code=False, reason="not JSON")
    assert (d.action, d.job.student, d.reason) == (Action.MERGE, "ann", "not JSON")
    assert s.done


def test_a_failure_before_student_code_is_retried_once_after_the_others():
    s = Scheduler(jobs("ann", "ben"))
    s.next_job("w0")
    d = s.on_result("w0", before_student_code=True, reason="kernel did not start")
    assert d.action is Action.RETRY and d.job.student == "ann"
    assert s.next_job("w0").student == "ben", "the retried job goes to the back"
    s.on_result("w0")
    again = s.next_job("w0")
    assert again.student == "ann" and again.attempts == 2
    d = s.on_result("w0", before_student_code=True, reason="kernel did not start")
    assert d.action is Action.MERGE, "the second such failure is final: its result is recorded"
    assert s.done and s.finished == 2


def test_a_crashed_workers_job_is_retried_first_then_fails():
    s = Scheduler(jobs("ann", "ben"))
    s.next_job("w0")
    d = s.on_crash("w0", "exit code -9")
    assert d.action is Action.RETRY and d.job.student == "ann"
    assert s.next_job("w1").student == "ann", "the crashed job goes first"
    d = s.on_crash("w1", "no result after 60 s")
    assert d.action is Action.FAIL and d.job.student == "ann"
    assert d.reason == "the grading process died twice (no result after 60 s)"
    assert drain(s) == ["ben"]
    assert s.done and s.finished == 2 and s.crashes == 2


def test_an_idle_worker_that_dies_costs_no_job():
    s = Scheduler(jobs("ann"))
    assert s.on_crash("w0", "exited") is None
    assert s.on_result("w0") is None, "a result with no job running is ignored"
    assert drain(s) == ["ann"]


def test_retry_and_crash_share_the_attempts():
    s = Scheduler(jobs("ann"))
    s.next_job("w0")
    assert s.on_result("w0", before_student_code=True).action is Action.RETRY
    s.next_job("w0")
    assert s.on_crash("w0", "exited").action is Action.FAIL


def test_workers_that_keep_dying_stop_the_batch():
    s = Scheduler(jobs("ann"), crash_budget=2)
    s.on_crash("w0", "exited")
    s.on_crash("w0", "exited")
    with pytest.raises(WorkersKeepDying, match="exit code 1"):
        s.on_crash("w0", "exit code 1")


def test_max_attempts_is_a_setting():
    s = Scheduler(jobs("ann"), max_attempts=1)
    s.next_job("w0")
    assert s.on_result("w0", before_student_code=True).action is Action.MERGE
    s = Scheduler(jobs("ben"), max_attempts=3)
    for _ in range(2):
        s.next_job("w0")
        assert s.on_crash("w0", "exited").action is Action.RETRY
    s.next_job("w0")
    assert s.on_crash("w0", "exited").action is Action.FAIL
