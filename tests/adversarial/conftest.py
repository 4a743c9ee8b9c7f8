"""The adversarial suite's report at the end of the pytest run (the stock column with
``COURSE_ADVERSARIAL_STOCK=1``)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def pytest_terminal_summary(terminalreporter):
    mod = sys.modules.get("test_adversarial")
    if mod is None or not getattr(mod, "_RESULTS", None):
        return
    from suite import report

    results = mod._RESULTS[0]
    title = "stock nbgrader vs this course" if "stock" in results else (
        "this course (COURSE_ADVERSARIAL_STOCK=1 or python tests/adversarial/suite.py adds stock nbgrader)")
    terminalreporter.section(f"adversarial suite: {title}")
    terminalreporter.write_line(report(results))
