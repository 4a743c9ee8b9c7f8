"""Batch grading for a whole class: parallel, resumable nbgrader autograde, with progress and reports.

    python -m grading_engine.batch grade ASSIGNMENT [ASSIGNMENT ...]   (or: course-grade ...)
    python -m grading_engine.batch report ASSIGNMENT [ASSIGNMENT ...]
    python -m grading_engine.batch status ASSIGNMENT [ASSIGNMENT ...]

See ``grading_engine.batch.runner`` for the design.
"""
