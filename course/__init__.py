"""Support package for the course on the mechanics of language models.

Notebooks import models, the tokenizer, training utilities and asset builders
from here; instructors use :mod:`course_tools.grading` and :mod:`course_tools.demo`.
Nothing in this package holds a reference answer or a hidden test: students
have it installed.
"""

__version__ = "0.1.0"
