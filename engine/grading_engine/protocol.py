"""What crosses the sandbox wall: names and formats both sides use (standard library only)."""

from __future__ import annotations

EVIDENCE_MIME = "application/vnd.course.evidence+json"
"""MIME type of the display outputs that carry a test cell's observations from the kernel to the grader."""

SANDBOX_OPT_OUT_EVENT = "sandbox.off"
"""Audit event the launcher writes when it runs the kernel without bubblewrap."""
