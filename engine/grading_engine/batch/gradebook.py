"""Moving one submission's rows between nbgrader gradebooks.

The batch grader never lets two processes write one gradebook. Each worker
grades one submission at a time with nbgrader's own autograde, in a private
SQLite gradebook that holds only what that submission needs: the assignment's
definition (notebooks and cells, copied from the instructor's gradebook with
their ids) and the student's earlier rows for this assignment, if any (so a
regrade keeps manual grades exactly as stock ``nbgrader autograde`` would).
When it is done, the worker exports the submission's rows and the parent
process replaces that submission's rows in the instructor's gradebook with
them, in one transaction. SQLite or PostgreSQL: the code below speaks only
SQLAlchemy Core over nbgrader's own table definitions.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from nbgrader.api import Base, Gradebook
from sqlalchemy import create_engine, select
from sqlalchemy.engine import Connection, Engine

T = Base.metadata.tables
DEFINITION_TABLES = ["assignment", "notebook", "base_cell", "grade_cells", "solution_cells", "task_cells",
                     "source_cell"]
SUBMISSION_TABLES = ["submitted_assignment", "submitted_notebook", "grade", "comment"]

Rows = dict[str, list[dict[str, Any]]]


def engine(db_url: str) -> Engine:
    kw: dict[str, Any] = {"future": True}
    if db_url.startswith("sqlite"):
        kw["connect_args"] = {"timeout": 60}
    return create_engine(db_url, **kw)


def ensure_schema(db_url: str, course_id: str) -> None:
    """Create nbgrader's tables (and the course row) the way nbgrader does."""
    Gradebook(db_url, course_id).close()


def make_template(path: Path, main: Engine, course_id: str) -> None:
    """An empty SQLite gradebook with nbgrader's schema, the course row and main's schema version.

    The same as what ``Gradebook()`` creates, without its ``alembic heads``
    subprocess: the version is read from the instructor's gradebook.
    """
    from sqlalchemy import text

    with main.connect() as conn:
        try:
            version = conn.execute(text("SELECT version_num FROM alembic_version")).scalar()
        except Exception:  # noqa: BLE001 - no version table: let nbgrader make one
            version = None
    if version is None:
        ensure_schema(f"sqlite:///{path}", course_id)
        return
    db = engine(f"sqlite:///{path}")
    try:
        Base.metadata.create_all(bind=db)
        with db.begin() as conn:
            conn.execute(text("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)"))
            conn.execute(text("INSERT INTO alembic_version (version_num) VALUES (:v)"), {"v": version})
            conn.execute(T["course"].insert(), [{"id": course_id}])
    finally:
        db.dispose()


# --------------------------------------------------------------------------- reading rows

def _rows(conn: Connection, table: str, where) -> list[dict[str, Any]]:
    t = T[table]
    return [dict(r._mapping) for r in conn.execute(select(t).where(where(t)).order_by(t.c.id))]


def definition_rows(conn: Connection, assignment: str) -> Rows:
    """Assignment, notebooks and cells of one assignment, ids included."""
    out: Rows = {}
    out["assignment"] = _rows(conn, "assignment", lambda t: t.c.name == assignment)
    a_ids = [r["id"] for r in out["assignment"]]
    out["notebook"] = _rows(conn, "notebook", lambda t: t.c.assignment_id.in_(a_ids))
    nb_ids = [r["id"] for r in out["notebook"]]
    out["base_cell"] = _rows(conn, "base_cell", lambda t: t.c.notebook_id.in_(nb_ids))
    cell_ids = [r["id"] for r in out["base_cell"]]
    for name in ("grade_cells", "solution_cells", "task_cells"):
        out[name] = _rows(conn, name, lambda t: t.c.id.in_(cell_ids))
    out["source_cell"] = _rows(conn, "source_cell", lambda t: t.c.notebook_id.in_(nb_ids))
    return out


def submission_rows(conn: Connection, assignment: str, student: str) -> Rows:
    """Everything the gradebook holds about one student's submission of one assignment."""
    out: Rows = {"student": _rows(conn, "student", lambda t: t.c.id == student)}
    a = T["assignment"]
    a_ids = [r[0] for r in conn.execute(select(a.c.id).where(a.c.name == assignment))]
    out["submitted_assignment"] = _rows(
        conn, "submitted_assignment", lambda t: t.c.assignment_id.in_(a_ids) & (t.c.student_id == student))
    sa_ids = [r["id"] for r in out["submitted_assignment"]]
    out["submitted_notebook"] = _rows(conn, "submitted_notebook", lambda t: t.c.assignment_id.in_(sa_ids))
    sn_ids = [r["id"] for r in out["submitted_notebook"]]
    out["grade"] = _rows(conn, "grade", lambda t: t.c.notebook_id.in_(sn_ids))
    out["comment"] = _rows(conn, "comment", lambda t: t.c.notebook_id.in_(sn_ids))
    return out


# --------------------------------------------------------------------------- writing rows

def _insert(conn: Connection, table: str, rows: list[dict[str, Any]]) -> None:
    if rows:
        conn.execute(T[table].insert(), rows)


def delete_submission(conn: Connection, assignment: str, student: str) -> None:
    old = submission_rows(conn, assignment, student)
    sn_ids = [r["id"] for r in old["submitted_notebook"]]
    sa_ids = [r["id"] for r in old["submitted_assignment"]]
    if sn_ids:
        conn.execute(T["comment"].delete().where(T["comment"].c.notebook_id.in_(sn_ids)))
        conn.execute(T["grade"].delete().where(T["grade"].c.notebook_id.in_(sn_ids)))
        conn.execute(T["submitted_notebook"].delete().where(T["submitted_notebook"].c.id.in_(sn_ids)))
    if sa_ids:
        conn.execute(T["submitted_assignment"].delete().where(T["submitted_assignment"].c.id.in_(sa_ids)))


def replace_submission(db: Engine, assignment: str, student: str, rows: Rows) -> None:
    """Make the gradebook's rows of (assignment, student) exactly ``rows``, atomically.

    The student row is created when missing and otherwise left alone (names and
    e-mail belong to the instructor's roster, not to grading).
    """
    with db.begin() as conn:
        s = T["student"]
        if conn.execute(select(s.c.id).where(s.c.id == student)).first() is None:
            _insert(conn, "student", rows.get("student") or [{"id": student}])
        delete_submission(conn, assignment, student)
        for table in SUBMISSION_TABLES:
            _insert(conn, table, rows.get(table, []))


def seed_worker_gradebook(path: Path, course_id: str, definitions: Rows, existing: Rows | None) -> None:
    """A fresh SQLite gradebook for one worker job: the assignment and the student's earlier rows."""
    db = engine(f"sqlite:///{path}")
    try:
        with db.begin() as conn:
            for table in DEFINITION_TABLES:
                _insert(conn, table, definitions.get(table, []))
            if existing:
                _insert(conn, "student", existing.get("student", []))
                for table in SUBMISSION_TABLES:
                    _insert(conn, table, existing.get(table, []))
    finally:
        db.dispose()


def assignment_exists(db: Engine, assignment: str) -> bool:
    a = T["assignment"]
    with db.connect() as conn:
        return conn.execute(select(a.c.id).where(a.c.name == assignment)).first() is not None


def graded_students(db: Engine, assignment: str) -> set[str]:
    """Students that have a submission of ``assignment`` in the gradebook."""
    a, sa = T["assignment"], T["submitted_assignment"]
    with db.connect() as conn:
        q = select(sa.c.student_id).join(a, a.c.id == sa.c.assignment_id).where(a.c.name == assignment)
        return {r[0] for r in conn.execute(q)}


# --------------------------------------------------------------------------- JSON transport

def _enc(v: Any) -> Any:
    if isinstance(v, dt.datetime):
        return {"$dt": v.isoformat()}
    if isinstance(v, dt.timedelta):
        return {"$td": v.total_seconds()}
    return v


def _dec(v: Any) -> Any:
    if isinstance(v, dict) and "$dt" in v:
        return dt.datetime.fromisoformat(v["$dt"])
    if isinstance(v, dict) and "$td" in v:
        return dt.timedelta(seconds=v["$td"])
    return v


def rows_to_json(rows: Rows | None) -> Any:
    if rows is None:
        return None
    return {t: [{k: _enc(v) for k, v in r.items()} for r in rs] for t, rs in rows.items()}


def rows_from_json(data: Any) -> Rows | None:
    if data is None:
        return None
    return {t: [{k: _dec(v) for k, v in r.items()} for r in rs] for t, rs in data.items()}


# --------------------------------------------------------------------------- comparing gradebooks

def dump(db_url: str, assignments: list[str] | None = None) -> dict[str, Any]:
    """Every submission's grades and comments, keyed by names instead of ids.

    Two gradebooks with equal dumps hold the same grading results, whatever
    the random ids of their rows (used to show that a resumed run equals an
    uninterrupted one).
    """
    db = engine(db_url)
    out: dict[str, Any] = {}
    try:
        with db.connect() as conn:
            a = T["assignment"]
            names = [r[0] for r in conn.execute(select(a.c.name))]
            for name in sorted(names):
                if assignments and name not in assignments:
                    continue
                defs = definition_rows(conn, name)
                nb_name = {r["id"]: r["name"] for r in defs["notebook"]}
                cell_name = {r["id"]: (nb_name[r["notebook_id"]], r["name"]) for r in defs["base_cell"]}
                sa = T["submitted_assignment"]
                a_ids = [r["id"] for r in defs["assignment"]]
                students = sorted(r[0] for r in conn.execute(select(sa.c.student_id).where(sa.c.assignment_id.in_(a_ids))))
                for student in students:
                    rows = submission_rows(conn, name, student)
                    sub = rows["submitted_assignment"][0]
                    sn = {r["id"]: r for r in rows["submitted_notebook"]}
                    entry: dict[str, Any] = {
                        "timestamp": str(sub["timestamp"]), "extension": str(sub["extension"]), "notebooks": {}}
                    for r in rows["submitted_notebook"]:
                        entry["notebooks"][nb_name[r["notebook_id"]]] = {
                            "flagged": r["flagged"], "late_submission_penalty": r["late_submission_penalty"],
                            "grades": {}, "comments": {}}
                    for g in rows["grade"]:
                        n = nb_name[sn[g["notebook_id"]]["notebook_id"]]
                        entry["notebooks"][n]["grades"][cell_name[g["cell_id"]][1]] = [
                            g["auto_score"], g["manual_score"], g["extra_credit"], g["needs_manual_grade"]]
                    for c in rows["comment"]:
                        n = nb_name[sn[c["notebook_id"]]["notebook_id"]]
                        entry["notebooks"][n]["comments"][cell_name[c["cell_id"]][1]] = [
                            c["auto_comment"], c["manual_comment"]]
                    out[f"{name}/{student}"] = entry
    finally:
        db.dispose()
    return json.loads(json.dumps(out, sort_keys=True))
