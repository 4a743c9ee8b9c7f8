"""Instructor tools: lint, release, autograde harness (see ``python -m course_tools.grading --help``)."""
