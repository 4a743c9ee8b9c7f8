"""The integrity record of each submission, beside its grade, and the report.

One JSON file per student and assignment:
``<course root>/integrity/<assignment>/<student>.json``::

    {"assignment": ..., "student": ...,
     "submission": {"flags": [...]},                 # files: missing, renamed, extra, unreadable
     "notebooks": {"<notebook>": {
         "flags": [{"kind", "source", "detail", "where"}, ...],
         "cells": {"<test grade_id>": {"ok", "why", "checks", "recomputed"}},
         "execution": {...}, "sandbox": "on" | "off", "updated": "<time>"}}}

``source`` says how a flag was found: ``structure`` and ``static`` (read
from the submitted file by the grader), ``runtime`` (the audit stream, which
leaves the kernel as events happen), ``evidence`` (the grader's own check of
the test cells), ``probe`` (the kernel's report on itself, which code written
against it can fake) and ``execution`` (what the grader saw of the kernel).

``python -m grading_engine report <assignment>`` prints every submission's
autograded score next to its flags and writes ``integrity/<assignment>.csv``.
"""

from __future__ import annotations

import csv
import fcntl
import json
import time
from contextlib import contextmanager
from pathlib import Path

from grading_engine.protocol import FlagKind

KIND_TEXT = {k.value: k.text for k in FlagKind}  # kind -> the report's sentence


def integrity_dir(root: str | Path) -> Path:
    return Path(root) / "integrity"


def record_path(root: str | Path, assignment: str, student: str) -> Path:
    return integrity_dir(root) / assignment / f"{student}.json"


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = open(path.with_suffix(".lock"), "w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = {}
        if path.exists():
            try:
                data = json.loads(path.read_text())
            except ValueError:
                data = {}
        yield data
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(path)
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        lock.close()
        try:
            path.with_suffix(".lock").unlink()
        except OSError:
            pass


def set_stage_flags(root, assignment: str, student: str, notebook: str, stage: str, flags: list[dict],
                    **sections) -> list[dict]:
    """Record one stage's flags (``guard``: before nbgrader sanitises, ``run``: after the run); return all."""
    path = record_path(root, assignment, student)
    with _locked(path) as data:
        data["assignment"], data["student"] = assignment, student
        nb = data.setdefault("notebooks", {}).setdefault(notebook, {})
        nb.setdefault("stages", {})[stage] = flags
        nb.update(sections)
        nb["flags"] = [f for st in ("guard", "run") for f in nb["stages"].get(st, [])]
        nb["updated"] = time.strftime("%Y-%m-%d %H:%M:%S")
        return list(nb["flags"])


def set_submission_flags(root, assignment: str, student: str, flags: list[dict]) -> None:
    path = record_path(root, assignment, student)
    with _locked(path) as data:
        data["assignment"], data["student"] = assignment, student
        data["submission"] = {"flags": flags, "updated": time.strftime("%Y-%m-%d %H:%M:%S")}
        data.setdefault("notebooks", {})


def read_records(root, assignment: str) -> dict[str, dict]:
    d = integrity_dir(root) / assignment
    out = {}
    if d.exists():
        for p in sorted(d.glob("*.json")):
            try:
                out[p.stem] = json.loads(p.read_text())
            except ValueError:
                out[p.stem] = {"unreadable": True}
    return out


def scores(db_url: str, assignment: str) -> dict[tuple[str, str], tuple[float, float]]:
    """(student, notebook) -> (autograded score, autograded max) from the gradebook."""
    from nbgrader.api import Gradebook, MissingEntry

    out = {}
    with Gradebook(db_url) as gb:
        try:
            a = gb.find_assignment(assignment)
        except MissingEntry:
            return out
        for sub in a.submissions:
            for nb in sub.notebooks:
                auto = sum((g.auto_score or 0.0) if g.manual_score is None else g.manual_score
                           for g in nb.grades if g.cell_type == "code")
                mx = sum(g.max_score for g in nb.grades if g.cell_type == "code")
                out[(sub.student.id, nb.name)] = (auto, mx)
    return out


def flag_summary(flags: list[dict]) -> str:
    kinds: dict[str, int] = {}
    for f in flags:
        kinds[f["kind"]] = kinds.get(f["kind"], 0) + 1
    return ", ".join(f"{k}" + (f" x{n}" if n > 1 else "") for k, n in sorted(kinds.items()))


def render(root, db_url: str, assignment: str, verbose: bool = True) -> tuple[str, list[list]]:
    recs = read_records(root, assignment)
    sc = scores(db_url, assignment)
    students = sorted({s for s, _ in sc} | set(recs))
    rows = [["student", "notebook", "autograded", "max", "flags", "details"]]
    lines = [f"Integrity report: {assignment} ({len(students)} submissions)", ""]
    width = max([len(s) for s in students] + [7])
    for s in students:
        rec = recs.get(s, {})
        sub_flags = rec.get("submission", {}).get("flags", [])
        nbs = sorted({n for st, n in sc if st == s} | set(rec.get("notebooks", {})))
        if sub_flags:
            lines.append(f"{s:<{width}}  (submission)  FLAGS: {flag_summary(sub_flags)}")
            if verbose:
                lines += [f"{'':<{width}}      - [{f.get('source', '?')}] {f['kind']}: {f['detail']}" for f in sub_flags]
            rows.append([s, "", "", "", flag_summary(sub_flags), " | ".join(f["detail"] for f in sub_flags)])
        for nb in nbs:
            got, mx = sc.get((s, nb), (None, None))
            info = rec.get("notebooks", {}).get(nb, {})
            flags = info.get("flags", [])
            score = "   -  " if got is None else f"{got:5.1f} / {mx:.1f}"
            status = "ok" if not flags else "FLAGS: " + flag_summary(flags)
            sandbox = "" if info.get("sandbox", "on") == "on" else "  [no sandbox]"
            lines.append(f"{s:<{width}}  {nb:<34} {score:>13}  {status}{sandbox}")
            if verbose:
                for f in flags:
                    where = f" ({f['where']})" if f.get("where") else ""
                    lines.append(f"{'':<{width}}      - [{f.get('source', '?')}] {f['kind']}: {f['detail']}{where}")
            rows.append([s, nb, "" if got is None else got, "" if mx is None else mx, flag_summary(flags),
                         " | ".join(f["detail"] for f in flags)])
    flagged = sum(1 for s in students if recs.get(s, {}).get("submission", {}).get("flags")
                  or any(v.get("flags") for v in recs.get(s, {}).get("notebooks", {}).values()))
    lines += ["", f"{flagged} of {len(students)} submissions flagged. A flag is a lead for a person, not a verdict; "
                  "see integrity/<assignment>/<student>.json for every detail."]
    return "\n".join(lines), rows


def write_csv(root, assignment: str, rows: list[list]) -> Path:
    path = integrity_dir(root) / f"{assignment}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        csv.writer(fh).writerows(rows)
    return path
