"""Batch grading for a whole class: parallel, resumable nbgrader autograde, with progress and reports.

    python -m course.batch grade ASSIGNMENT [ASSIGNMENT ...]   (or: course-grade ...)
    python -m course.batch report ASSIGNMENT [ASSIGNMENT ...]
    python -m course.batch status ASSIGNMENT [ASSIGNMENT ...]

See ``course.batch.runner`` for the design.
"""
