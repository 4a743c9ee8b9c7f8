"""A small nbgrader course in the style many instructors use, to prove the grading engine is course-agnostic.

Stock nbgrader grades it with the first block alone; the engine needs only the second block.
"""

c = get_config()  # noqa: F821  (provided by nbgrader when it loads this file)

c.CourseDirectory.course_id = "plain-course"
c.Execute.timeout = 30
c.ClearSolutions.code_stub = {"python": "# YOUR CODE HERE\nraise NotImplementedError()"}

# --- the grading engine: sandbox, scoring that requires evidence, integrity report ---
from grading_engine.plugin import configure  # noqa: E402

configure(c)
# --- end of the grading engine ---
