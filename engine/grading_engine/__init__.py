"""A grading engine for nbgrader courses: a sandbox, scoring that requires evidence, an integrity report
and a batch grader. Any nbgrader course adds it in ``nbgrader_config.py``::

    from grading_engine.plugin import configure
    configure(c)

The package is cut by the process its code runs in: the grader side (``plugin``, ``preprocessors``,
``evidence``, ``record``, ``batch``), the launcher outside the sandbox (``sandbox``), and the kernel side
inside it (``kernel``), which imports only ``protocol``. Only ``kernel``, ``protocol`` and this file are
mounted into the sandbox, so this file imports nothing.

Runs inside nbgrader's own pipeline (preprocessors registered in
``nbgrader_config.py``, see :mod:`grading_engine.plugin`):

* :mod:`grading_engine.preprocessors.guard` (before nbgrader's sanitising) checks the
  submitted notebook's structure and locked cells, scans the student's code,
  and repairs what would stop a batch (broken nbgrader metadata);
* :mod:`grading_engine.evidence.instrument` rewrites every test cell so that each
  ``assert`` reports what it observed (values computed from the student's
  code) through a display output, and the kernel reports interpreter hooks;
* :mod:`grading_engine.evidence.judge` compares, in the grader's process, each
  test cell's observations with those of a reference run of the source
  notebook and recomputes every comparison with numpy / plain Python: a test
  cell keeps its points only with complete, matching evidence;
* :mod:`grading_engine.record` writes what looked like interference beside
  the grade (``integrity/<assignment>/<student>.json``) and prints it
  (``python -m grading_engine report <assignment>``);
* :mod:`grading_engine.preprocessors.feedback` removes hidden tests and tracebacks from
  ``nbgrader generate_feedback``.

:mod:`grading_engine.kernel.audit` and :mod:`grading_engine.kernel.probe` run inside the
kernel; they import nothing heavy.
"""

__version__ = "0.2.0"
