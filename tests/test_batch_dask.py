"""The batch grader on a real Dask cluster: a ``dask scheduler`` and two ``dask worker`` processes on loopback.

The workers run in folders of their own, outside the course: all they get of it travels through Dask (the
course's configuration and sources once per worker, each submission's files with its task). One worker is
killed (SIGKILL) while it grades a submission: Dask grades it again elsewhere, and the class ends with the
same gradebook as a run on the default LocalCluster.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from grading_engine.batch.gradebook import dump
from test_batch import FAST, env, nbgrader

pytestmark = pytest.mark.batch

PLAIN = Path(__file__).resolve().parent / "plain_course"
ASSIGNMENT, NOTEBOOK = "ps1", "problem_set"
DASK = Path(sys.executable).parent / "dask"
SLEEP = "import time\ntime.sleep(4)\n"  # the slow student's answer takes a while: long enough to be killed in


def _answers(nb, answers: dict[str, str]):
    nb = copy.deepcopy(nb)
    for cell in nb.cells:
        gid = cell.metadata.get("nbgrader", {}).get("grade_id")
        if gid in answers:
            cell.source = answers[gid]
    return nb


def plain_class(root: Path) -> list[str]:
    """The plain test course, generated, with four submissions: honest, blank, partly wrong and slow."""
    shutil.copytree(PLAIN, root, ignore=shutil.ignore_patterns("__pycache__", "gradebook.db", "release",
                                                                "submitted", "autograded", "feedback"))
    nbgrader(["generate_assignment", ASSIGNMENT, "--force"], root, **FAST)
    source = nbformat.read(root / "source" / ASSIGNMENT / f"{NOTEBOOK}.ipynb", as_version=4)
    release = nbformat.read(root / "release" / ASSIGNMENT / f"{NOTEBOOK}.ipynb", as_version=4)
    solutions = {c.metadata["nbgrader"]["grade_id"]: c.source for c in source.cells
                 if c.metadata.get("nbgrader", {}).get("solution")}
    honest = _answers(release, solutions)
    subs = {"blank": release, "honest": honest,
            "partly_wrong": _answers(honest, {"squares": "def squares(n):\n    return [i ** 2 for i in range(n)]\n"}),
            "slow": _answers(honest, {"squares": SLEEP + solutions["squares"]})}
    for student, nb in subs.items():
        folder = root / "submitted" / student / ASSIGNMENT
        folder.mkdir(parents=True)
        nbformat.write(nb, folder / f"{NOTEBOOK}.ipynb")
        shutil.copy2(root / "source" / ASSIGNMENT / "squares.png", folder / "squares.png")
        (folder / "timestamp.txt").write_text("2026-01-10 10:00:00.000000 UTC")
    return sorted(subs)


def grade(root: Path, *args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "grading_engine.batch", "grade", ASSIGNMENT, "--no-progress",
                             *args], cwd=root, env=env(**FAST), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


def journal(root: Path) -> dict[str, dict]:
    d = root / ".batch" / "journal" / ASSIGNMENT
    return {p.stem: json.loads(p.read_text()) for p in d.glob("*.json")} if d.exists() else {}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DaskCluster:
    """``dask scheduler`` and ``dask worker`` subprocesses, each in its own folder; stopped by :meth:`stop`."""

    def __init__(self, home: Path):
        self.home = home
        self.address = f"tcp://127.0.0.1:{free_port()}"
        self.procs: list[subprocess.Popen] = []
        self.client = None

    def _spawn(self, name: str, args: list[str]) -> subprocess.Popen:
        cwd = self.home / name
        cwd.mkdir(parents=True)
        with open(cwd / "log", "w") as log:
            p = subprocess.Popen([str(DASK), *args], cwd=cwd, stdout=log, stderr=subprocess.STDOUT,
                                 env=env(**FAST, DASK_DISTRIBUTED__SCHEDULER__ALLOWED_FAILURES="3"),
                                 start_new_session=True)
        self.procs.append(p)
        return p

    def start(self, workers: int) -> None:
        from distributed import Client

        self._spawn("scheduler", ["scheduler", "--host", "127.0.0.1", "--port", self.address.rsplit(":", 1)[1],
                                  "--dashboard-address", f"127.0.0.1:{free_port()}", "--no-show"])
        for k in range(workers):
            self._spawn(f"worker{k}", ["worker", self.address, "--nthreads", "1", "--nworkers", "1", "--name",
                                       f"w{k}", "--local-directory", str(self.home / f"worker{k}" / "scratch"),
                                       "--no-dashboard"])
        self.client = Client(self.address, timeout=60)
        self.client.wait_for_workers(workers, timeout=120)

    def executing(self) -> dict[str, tuple[int, list[str]]]:
        """Each worker's process id and the tasks it is running now."""
        def state(dask_worker):
            return os.getpid(), [str(ts.key) for ts in dask_worker.state.executing]

        return self.client.run(state)

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


@pytest.fixture
def cluster(tmp_path):
    c = DaskCluster(tmp_path / "cluster")
    try:
        yield c
    finally:
        c.stop()


def test_an_unreachable_scheduler_is_one_clear_line_and_exit_code_2(tmp_path):
    root = tmp_path / "course"
    plain_class(root)
    p = grade(root, "--scheduler", f"tcp://127.0.0.1:{free_port()}")
    out, err = p.communicate(timeout=300)
    assert p.returncode == 2, out + err
    assert err.strip().splitlines()[-1].startswith("error: cannot reach the Dask scheduler at tcp://127.0.0.1:"), err
    assert not journal(root)


def test_a_dask_cluster_without_the_course_grades_like_a_local_run_even_when_a_worker_dies(tmp_path, cluster):
    local, remote = tmp_path / "local", tmp_path / "remote"
    students = plain_class(local)
    shutil.copytree(local, remote)

    # the reference: the default LocalCluster on this machine
    p = grade(local, "--workers", "2")
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0 and f"graded {len(students)}, failed 0" in out, out + err
    assert "grading on a LocalCluster with 2 worker(s)" in err, err

    cluster.start(workers=2)
    p = grade(remote, "--scheduler", cluster.address)
    try:
        # SIGKILL the worker that is grading the slow submission, while it grades it
        t0 = time.monotonic()
        victim = None
        while victim is None:
            assert p.poll() is None, p.communicate()
            assert time.monotonic() - t0 < 300, "the slow submission never started"
            for pid, keys in cluster.executing().values():
                if any(f"-{ASSIGNMENT}-slow-" in k for k in keys):
                    victim = pid
            time.sleep(0.2)
        os.kill(victim, signal.SIGKILL)
        assert "slow" not in journal(remote), "the slow submission was killed before it was merged"
        out, err = p.communicate(timeout=600)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, out + err
    assert f"graded {len(students)}, failed 0, already done 0" in out, out + err
    assert f"grading on the Dask scheduler {cluster.address} with 2 worker(s)" in err, err
    assert victim not in {pid for pid, _ in cluster.executing().values()}, "the killed worker was replaced"
    assert {s: e["status"] for s, e in journal(remote).items()} == {s: "ok" for s in students}
    ours, ref = dump(f"sqlite:///{remote / 'gradebook.db'}"), dump(f"sqlite:///{local / 'gradebook.db'}")
    assert set(ours) == {f"{ASSIGNMENT}/{s}" for s in students}
    assert ours == ref
    scores = ours[f"{ASSIGNMENT}/honest"]["notebooks"][NOTEBOOK]["grades"]
    assert sum(v[0] or 0 for v in scores.values()) == 9, scores  # the honest answers earn every autograded point
    assert scores == ours[f"{ASSIGNMENT}/slow"]["notebooks"][NOTEBOOK]["grades"]
    assert {str(q.relative_to(remote / "autograded")) for q in (remote / "autograded").rglob("*.ipynb")} == \
        {f"{s}/{ASSIGNMENT}/{NOTEBOOK}.ipynb" for s in students}
    assert not (remote / ".batch" / "incoming").exists()
    # the workers' folders hold nothing of the course: it came to them through Dask, in their temporary folders
    assert not list((tmp_path / "cluster").rglob("*.ipynb"))


@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "plain"])
def test_a_folder_travels_as_bytes_and_back(tmp_path, compress):
    """Gzipped to a remote cluster, plain on a LocalCluster; unpacked alike."""
    import gzip

    from grading_engine.batch.cluster import pack, unpack

    src = tmp_path / "src"
    (src / "sub" / "deep").mkdir(parents=True)
    (src / "a.ipynb").write_text('{"cells": []}')
    (src / "a.ipynb").chmod(0o444)  # nbgrader's autograded notebooks are read-only: they stay so
    (src / "sub" / "deep" / "b.bin").write_bytes(bytes(range(256)))
    (src / "__pycache__").mkdir()
    (src / "__pycache__" / "x.pyc").write_bytes(b"junk")
    (src / "link").symlink_to("/etc/passwd")
    out = tmp_path / "out"
    data = pack(src, compress=compress)
    assert (data[:2] == b"\x1f\x8b") is compress  # the gzip magic, or a plain tar
    assert len(gzip.decompress(data) if compress else data) > 256
    unpack(data, out)
    got = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert got == ["a.ipynb", "sub", "sub/deep", "sub/deep/b.bin"]
    assert (out / "sub" / "deep" / "b.bin").read_bytes() == bytes(range(256))
    assert (out / "a.ipynb").stat().st_mode & 0o777 == 0o444


@pytest.mark.parametrize("mode", ["w:gz", "w"])
@pytest.mark.parametrize("kind", ["parent", "absolute", "symlink", "device"])
def test_unpacking_refuses_what_leaves_the_folder(tmp_path, kind, mode):
    """What a worker sends back is data: no path out of the folder, no link, no device (any Python 3.11)."""
    import io
    import tarfile

    from grading_engine.batch.cluster import unpack

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        info = tarfile.TarInfo({"parent": "../escaped", "absolute": str(tmp_path / "abs"),
                                "symlink": "link", "device": "dev"}[kind])
        if kind == "symlink":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        if kind == "device":
            info.type = tarfile.CHRTYPE
        data = b"" if kind in ("symlink", "device") else b"x"
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match="refused"):
        unpack(buf.getvalue(), tmp_path / "dest")
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "abs").exists()


def test_the_local_clusters_workers_leave_the_cores_to_the_kernels():
    """The batch's own LocalCluster: its workers are threads of the batch's process (no worker processes or
    nannies beside the grading processes), without Dask's profiler and with slow monitors."""
    import dask
    from grading_engine.batch.cluster import LOCAL_WORKER_CONFIG, connect

    keys = {**LOCAL_WORKER_CONFIG, "distributed.scheduler.allowed-failures": None}
    # connect() sets these in this process's configuration: leaving the block puts back what they were
    with dask.config.set({k: dask.config.get(k) for k in keys}):
        cluster = connect("", workers=1, allowed_failures=1)
        try:
            seen = cluster.client.run(lambda: {k: dask.config.get(k) for k in LOCAL_WORKER_CONFIG})
            pids = cluster.client.run(os.getpid)
        finally:
            cluster.close()
    assert list(seen.values()) == [LOCAL_WORKER_CONFIG], seen
    assert list(pids.values()) == [os.getpid()], pids
    assert LOCAL_WORKER_CONFIG["distributed.worker.profile.enabled"] is False
