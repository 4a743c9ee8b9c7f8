"""Feedback without hidden tests: a preprocessor for ``nbgrader generate_feedback``.

Stock ``generate_feedback`` renders the autograded notebook, whose test
cells hold the hidden tests, and their tracebacks, which quote the failing
line. :class:`SanitizeFeedback` (registered in
``GenerateFeedback.preprocessors``) keeps what a student needs to learn from
a failure, which check failed and its message, and removes the rest:

* in every cell, the region between ``### BEGIN HIDDEN TESTS`` and
  ``### END HIDDEN TESTS`` becomes one comment line;
* the error outputs of test cells keep the exception type and message only;
* any other output that quotes a line of a hidden test (student code can
  print the source of the cell it runs in) has that line replaced.
"""

from __future__ import annotations

import re

from nbgrader.preprocessors import NbGraderPreprocessor

from grading_engine.protocol import EVIDENCE_MIME

BEGIN = "BEGIN HIDDEN TESTS"
END = "END HIDDEN TESTS"
PLACEHOLDER = "# (hidden tests: not shown; they ran when your work was graded)"
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def hidden_lines(source: str) -> list[str]:
    out, inside = [], False
    for line in source.splitlines():
        if BEGIN in line:
            inside = True
        elif END in line:
            inside = False
        elif inside and len(line.strip()) >= 12:
            out.append(line.strip())
    return out


def strip_hidden(source: str) -> str:
    lines, inside, kept = source.splitlines(), False, []
    for line in lines:
        if BEGIN in line:
            inside = True
            indent = line[: len(line) - len(line.lstrip())]
            kept.append(indent + PLACEHOLDER)
        elif END in line:
            inside = False
        elif not inside:
            kept.append(line)
    return "\n".join(kept)


def _redact(text: str, secrets: list[str]) -> str:
    for s in secrets:
        if s in text:
            text = text.replace(s, "[hidden test line]")
    return text


def _is_test(cell) -> bool:
    m = cell.get("metadata", {}).get("nbgrader", {}) or {}
    return cell.get("cell_type") == "code" and bool(m.get("grade")) and not m.get("solution")


class SanitizeFeedback(NbGraderPreprocessor):
    def preprocess(self, nb, resources):
        secrets: list[str] = []
        for cell in nb.cells:
            secrets += hidden_lines(cell.get("source", ""))
        secrets = sorted(set(secrets), key=len, reverse=True)
        for cell in nb.cells:
            if BEGIN in cell.get("source", ""):
                cell.source = strip_hidden(cell.source)
            if cell.get("cell_type") != "code":
                continue
            test = _is_test(cell)
            outputs = []
            for out in cell.get("outputs", []):
                data = out.get("data") or {}
                if EVIDENCE_MIME in data:
                    continue
                if out.get("output_type") == "error":
                    if test:
                        ename = out.get("ename", "Error")
                        evalue = _redact(_ANSI.sub("", str(out.get("evalue", ""))), secrets)
                        out["evalue"] = evalue
                        out["traceback"] = [f"{ename}: {evalue}" if evalue else ename]
                    else:
                        out["traceback"] = [_redact(t, secrets) for t in out.get("traceback", [])]
                elif out.get("output_type") == "stream":
                    out["text"] = _redact(out.get("text", ""), secrets)
                else:
                    for mime, value in list(data.items()):
                        if isinstance(value, str):
                            data[mime] = _redact(value, secrets)
                        elif isinstance(value, list):
                            data[mime] = [_redact(v, secrets) if isinstance(v, str) else v for v in value]
                outputs.append(out)
            cell.outputs = outputs
        return nb, resources
