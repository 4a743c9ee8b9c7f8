"""Instructor tools: lint, release, autograde harness (see ``python -m course.grading --help``)."""
