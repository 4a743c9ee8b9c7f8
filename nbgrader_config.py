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
# Grading integrity (course.sandbox, course.integrity; README "Grading integrity").
# nbgrader autograde runs student code in the bubblewrap sandbox kernel
# (course-sandbox) and gives a test cell its points only with evidence that
# matches a reference run; nbgrader generate_feedback shows no hidden test.
# Environment switches: COURSE_SANDBOX=off (no isolation, loud warning),
# COURSE_INTEGRITY=off (stock scoring and feedback); both off = stock nbgrader.
def _course_integrity(c):
    import json
    import re
    import sys

    try:
        import course.integrity.config as integrity
    except ImportError:
        # not installed (pip install -e .): this checkout, or the one the sandbox kernelspec was installed from
        spec = Path(sys.prefix) / "share" / "jupyter" / "kernels" / "course-sandbox" / "kernel.json"
        candidates = [COURSE_ROOT]
        if spec.exists():
            found = re.search(r"sys\.path\.insert\(0, '([^']+)'\)", " ".join(json.loads(spec.read_text())["argv"]))
            if found:
                candidates.append(Path(found.group(1)))
        for root in candidates:
            if (root / "course" / "integrity" / "config.py").exists():
                sys.path.insert(0, str(root))
                break
        try:
            import course.integrity.config as integrity
        except ImportError:
            if "autograde" in sys.argv[1:3]:
                raise SystemExit("nbgrader_config.py: the course package is not importable, so autograde "
                                 "refuses to run without its sandbox; run: python3 bootstrap.py setup")
            return
    integrity.configure(c)


_course_integrity(c)
# ----------------------------------------------------------------------------
