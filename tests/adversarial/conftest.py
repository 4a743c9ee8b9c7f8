"""The adversarial suite's report (both columns) at the end of the pytest run."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def pytest_terminal_summary(terminalreporter):
    mod = sys.modules.get("test_adversarial")
    if mod is None or not getattr(mod, "_RESULTS", None):
        return
    from suite import report

    terminalreporter.section("adversarial suite: stock nbgrader vs this course")
    terminalreporter.write_line(report(mod._RESULTS[0]))
