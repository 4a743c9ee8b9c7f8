"""nbgrader configuration for the course.

Every path is relative to this file, so the course works wherever the
repository is cloned. Environment variables let the demo and the tests point
the gradebook and the exchange at temporary folders.
"""

import os
from pathlib import Path

c = get_config()  # noqa: F821  (provided by nbgrader when it loads this file)

COURSE_ROOT = Path(__file__).resolve().parent

c.CourseDirectory.course_id = "lm-mechanics"
c.CourseDirectory.root = str(COURSE_ROOT)

# Gradebook: SQLite in the course directory unless COURSE_DB_URL says otherwise
# (for example postgresql://user@host/gradebook for a shared server).
c.CourseDirectory.db_url = os.environ.get(
    "COURSE_DB_URL", f"sqlite:///{COURSE_ROOT / 'gradebook.db'}"
)

# Exchange: where released assignments and submissions travel between the
# instructor and the students. The demo points COURSE_EXCHANGE at a
# temporary folder; a shared JupyterHub would use /srv/nbgrader/exchange.
c.Exchange.root = os.environ.get("COURSE_EXCHANGE", str(COURSE_ROOT / "exchange"))
c.Exchange.path_includes_course = True

# Files never copied into a release or a submission.
c.CourseDirectory.ignore = [".ipynb_checkpoints", "*.pyc", "__pycache__"]

# Execution: a cell that runs longer than two minutes is interrupted and
# scores zero; the rest of the notebook is still graded.
c.Execute.timeout = 120
c.Execute.interrupt_on_timeout = True

# What students see in place of the reference answers.
c.ClearSolutions.code_stub = {"python": "# YOUR CODE HERE\nraise NotImplementedError()"}
c.ClearSolutions.text_stub = "YOUR ANSWER HERE"
c.ClearSolutions.enforce_metadata = True

# Learning platform import (`nbgrader zip_collect ASSIGNMENT`): the zip of
# submissions goes into downloaded/ASSIGNMENT/archive/, and each notebook in it
# is named "<student_id>__<notebook>.ipynb" (two underscores), for example
# "jdoe__get_set_input_embeddings.ipynb", possibly inside folders. nbgrader
# matches the pattern against the file's full path, hence the optional folder
# prefix. Student ids: letters, digits, ".", "-" and "_".
c.ZipCollectApp.archive_directory = "archive"
c.FileNameCollectorPlugin.named_regexp = (
    r"^(?:.*/)?(?P<student_id>[A-Za-z0-9][A-Za-z0-9._-]*?)__(?P<file_id>[^/]+\.ipynb)$"
)

# ----------------------------------------------------------------------------
# The grading engine (engine/, package grading_engine; README "Grading integrity"):
# nbgrader autograde runs student code in its bubblewrap sandbox kernel and gives
# a test cell its points only with evidence that matches a reference run;
# nbgrader generate_feedback shows no hidden test. Its settings are
# c.GradingEngine.* (python -m grading_engine settings lists them with their help);
# each can also be given on the command line, which wins over this file:
#   nbgrader autograde ASSIGNMENT --GradingEngine.evidence=False
c.GradingEngine.sandbox_packages = ["course"]  # the support package the notebooks import
c.GradingEngine.preload = ["numpy", "torch"]  # imported in the grading kernel before student code
# The sandbox's limits keep their defaults here; for example, for a machine with less memory:
#   c.GradingEngine.memory_mb = 2048   (address space per process, MB)
#   c.GradingEngine.wall_s = 900       (wall-clock seconds per notebook)

try:
    from grading_engine.plugin import configure
except ImportError as exc:
    _missing = f"the grading engine is not importable ({exc}); run: python3 bootstrap.py setup"

    def _refuse(**kwargs):
        raise SystemExit(f"nbgrader_config.py: {_missing}; autograde refuses to run student code without it")

    # autograde alone calls this hook: every other command still works without the engine
    c.Autograde.pre_convert_hook = _refuse
else:
    configure(c)
# ----------------------------------------------------------------------------
