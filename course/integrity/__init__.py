"""Grading that requires evidence, tamper detection and an integrity report.

Runs inside nbgrader's own pipeline (preprocessors registered in
``nbgrader_config.py``, see :mod:`course.integrity.config`):

* :mod:`course.integrity.guard` (before nbgrader's sanitising) checks the
  submitted notebook's structure and locked cells, scans the student's code,
  and repairs what would stop a batch (broken nbgrader metadata);
* :mod:`course.integrity.instrument` rewrites every test cell so that each
  ``assert`` reports what it observed (values computed from the student's
  code) through a display output, and the kernel reports interpreter hooks;
* :mod:`course.integrity.evidence` compares, in the grader's process, each
  test cell's observations with those of a reference run of the source
  notebook and recomputes every comparison with numpy / plain Python: a test
  cell keeps its points only with complete, matching evidence;
* :mod:`course.integrity.report` writes what looked like interference beside
  the grade (``integrity/<assignment>/<student>.json``) and prints it
  (``python -m course.integrity report <assignment>``);
* :mod:`course.integrity.feedback` removes hidden tests and tracebacks from
  ``nbgrader generate_feedback``.

:mod:`course.integrity.audit` and :mod:`course.integrity.probe` run inside the
kernel; they import nothing heavy.
"""

EVIDENCE_MIME = "application/vnd.course.evidence+json"
