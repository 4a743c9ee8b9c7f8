"""The gradebook on a real PostgreSQL server (nbgrader's db_url through COURSE_DB_URL).

The test starts its own throw-away server (initdb + pg_ctl, listening on a
Unix socket only, as an unprivileged user when run as root), points the
course at it, runs the real nbgrader commands and the batch grader, reads
the grades back, and stops the server. It is skipped, saying why, only when
no PostgreSQL server can be started on this machine (.ci/system-packages.sh
installs one).
"""

from __future__ import annotations

import csv
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from grading_engine.batch.gradebook import dump
from test_batch import ASSIGNMENT, FAST, batch, make_course, nbgrader, submit


def _pg_bin() -> Path | None:
    for name in ("pg_ctl",):
        found = shutil.which(name)
        if found and Path(found).resolve().with_name("initdb").exists():
            return Path(found).resolve().parent
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(d, "pg_ctl").exists() and Path(d, "initdb").exists():
            return Path(d)
    return None


@pytest.fixture(scope="module")
def postgres():
    """A running PostgreSQL server with an empty database; yields its SQLAlchemy URL."""
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (initdb, pg_ctl) on this machine; "
                    "install the postgresql package (.ci/system-packages.sh does)")
    base = Path(tempfile.mkdtemp(prefix="course-pg-"))
    os.chmod(base, 0o755)
    prefix: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        user = next((u for u in ("postgres", "nobody") if _has_user(u)), None)
        if user is None or not shutil.which("runuser"):
            shutil.rmtree(base, ignore_errors=True)
            pytest.skip("running as root without a 'postgres' or 'nobody' user and runuser to start PostgreSQL")
        pw = pwd.getpwnam(user)
        os.chown(base, pw.pw_uid, pw.pw_gid)
        prefix = ["runuser", "-u", user, "--"]
    data, sock, log = base / "data", base / "sock", base / "server.log"
    port = 5432 + (os.getpid() % 1000) + 1000

    def run(cmd):
        return subprocess.run(prefix + cmd, capture_output=True, text=True, timeout=120)

    r = run(["mkdir", str(sock)])
    r = run([str(bindir / "initdb"), "-D", str(data), "-U", "grader", "--auth=trust", "-E", "UTF8", "-N"])
    if r.returncode:
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(f"initdb failed, no PostgreSQL server can be started: {r.stderr.strip()[-500:]}")
    r = run([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(log), "-w", "-t", "60", "-o",
             f"-k {sock} -c listen_addresses='' -p {port} -F", "start"])
    if r.returncode:
        text = log.read_text() if log.exists() else r.stderr
        shutil.rmtree(base, ignore_errors=True)
        pytest.skip(f"pg_ctl start failed, no PostgreSQL server can be started: {text.strip()[-500:]}")
    try:
        import psycopg

        with psycopg.connect(host=str(sock), port=port, user="grader", dbname="postgres", autocommit=True) as conn:
            conn.execute("CREATE DATABASE gradebook")
        yield f"postgresql+psycopg://grader@/gradebook?host={sock}&port={port}"
    finally:
        run([str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"])
        shutil.rmtree(base, ignore_errors=True)


def _has_user(name: str) -> bool:
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def test_gradebook_round_trip_on_postgresql(postgres, tmp_path):
    db = {"COURSE_DB_URL": postgres, **FAST}
    root = make_course(tmp_path / "course", **db)  # nbgrader generate_assignment writes to PostgreSQL
    students = {"ann": "correct", "ben": "partial", "cat": "blank", "eve": "invalid"}
    submit(root, students)
    assert not (root / "gradebook.db").exists(), "the course must not fall back to SQLite"

    run = batch(root, "grade", ASSIGNMENT, "--workers", "2", "--no-progress", **db)
    assert "graded 3, failed 1" in run.stdout, run.stdout + run.stderr

    grades = dump(postgres)
    auto = {s: {k: v[0] for k, v in grades[f"{ASSIGNMENT}/{s}"]["notebooks"]["tiny"]["grades"].items()
                if k.startswith("test_")} for s in ("ann", "ben", "cat")}
    assert auto == {"ann": {"test_double": 2.0, "test_double_type": 1.0},
                    "ben": {"test_double": 2.0, "test_double_type": 0.0},
                    "cat": {"test_double": 0.0, "test_double_type": 0.0}}

    # nbgrader itself reads the grades back from PostgreSQL
    out = tmp_path / "grades.csv"
    r = nbgrader(["export", "--to", str(out)], root, **db)
    with out.open() as fh:
        rows = {row["student_id"]: row for row in csv.DictReader(fh)}
    assert set(rows) == set(students), r.stdout + r.stderr
    assert float(rows["ann"]["raw_score"]) == 3.0 and float(rows["cat"]["raw_score"]) == 0.0

    # a second run finds everything graded in PostgreSQL and changes nothing
    run = batch(root, "grade", ASSIGNMENT, "--no-progress", **db)
    assert "graded 0, failed 0, already done 4" in run.stdout, run.stdout + run.stderr
    assert dump(postgres) == grades
