"""The engine's settings: one traitlets Configurable, from nbgrader_config.py and the command line.

A limit set in a course's config file reaches the sandbox launcher's bubblewrap command and the
kernel's rlimits; ``--GradingEngine.evidence=False`` on nbgrader's command line switches the evidence
checks off at run time; the settings listing shows every setting; no process reads another's
sys.argv or environment to learn a setting.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from grading_engine.config import LIMITS, GradingEngine, course_config
from grading_engine.sandbox.bwrap import Limits, build_command, rlimits, sandbox_env
from grading_engine.sandbox.kernel import inner_command, launcher_arguments, parse_args
from traitlets.config import Config

ENGINE = Path(__file__).resolve().parents[1] / "engine" / "grading_engine"
MB = 1024 * 1024


def write_config(root: Path, extra: str = "") -> Path:
    """A small course's nbgrader_config.py, in the plain style of any nbgrader course, with the engine added."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / "nbgrader_config.py"
    path.write_text(
        "c = get_config()\n"
        f"c.CourseDirectory.root = {str(root)!r}\n"
        "c.CourseDirectory.course_id = 'config-test'\n"
        f"c.CourseDirectory.db_url = 'sqlite:///{root / 'gradebook.db'}'\n"
        + extra
        + "from grading_engine.plugin import configure\nconfigure(c)\n"
    )
    return path


# ----------------------------------------------------------------------------- the settings


def test_every_limit_is_a_setting_with_the_launchers_defaults():
    settings = GradingEngine()
    for name in LIMITS:
        assert name in settings.traits(config=True), name
    defaults = dict(Limits().__dict__, threads=min(4, os.cpu_count() or 1))
    clean = {k: v for k, v in os.environ.items() if not k.startswith("COURSE_SANDBOX_")}
    old = dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update(clean)
        assert GradingEngine().limit_values() == defaults
    finally:
        os.environ.clear()
        os.environ.update(old)


def test_every_setting_has_help():
    for name, trait in GradingEngine.class_traits(config=True).items():
        assert len(trait.help) > 30, f"GradingEngine.{name} has no help"


def test_environment_variables_are_only_defaults(monkeypatch):
    monkeypatch.setenv("COURSE_SANDBOX", "off")
    monkeypatch.setenv("COURSE_INTEGRITY", "OFF")
    monkeypatch.setenv("COURSE_SANDBOX_MEMORY_MB", "1234")
    monkeypatch.setenv("COURSE_SANDBOX_NPROC", "many")  # not a number: the built-in default
    monkeypatch.setenv("COURSE_INTEGRITY_CACHE", "/tmp/refcache")
    s = GradingEngine()
    assert (s.sandbox, s.evidence, s.memory_mb, s.nproc) == (False, False, 1234, 256)
    assert s.reference_cache_dir() == Path("/tmp/refcache")
    c = Config()
    c.GradingEngine.sandbox = True
    c.GradingEngine.memory_mb = 99
    s = GradingEngine(config=c)
    assert (s.sandbox, s.memory_mb) == (True, 99)  # the configuration wins over the environment
    monkeypatch.setenv("COURSE_SANDBOX", "on")
    assert GradingEngine().sandbox is True


def test_the_settings_listing(tmp_path):
    write_config(tmp_path, "c.GradingEngine.wall_s = 77\n")
    p = subprocess.run([sys.executable, "-m", "grading_engine", "settings", "--root", str(tmp_path),
                        "--GradingEngine.memory_mb=1234"], capture_output=True, text=True, timeout=120,
                       cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    for name in GradingEngine.class_traits(config=True):
        assert f"GradingEngine.{name} = " in out, name
    assert "GradingEngine.wall_s = 77    (default 1800)" in out  # from the config file
    assert "GradingEngine.memory_mb = 1234    (default 4096)" in out  # from the command line
    assert "RLIMIT_AS" in out and "COURSE_SANDBOX" in out  # the help, and where a default comes from


# ----------------------------------------------------------------------------- grader -> launcher -> kernel


def test_a_limit_in_the_config_file_reaches_the_bwrap_command(tmp_path):
    """config file -> GradingEngine -> the kernel's extra arguments -> the launcher -> bwrap and rlimits."""
    import resource

    write_config(tmp_path, "c.GradingEngine.tmp_mb = 33\nc.GradingEngine.memory_mb = 777\n"
                           "c.GradingEngine.preload = ['numpy']\nc.GradingEngine.sandbox = True\n")
    settings = GradingEngine(config=course_config(tmp_path))
    conn = tmp_path / "k.json"
    args = parse_args(["-f", str(conn), "--package", "course", "--HistoryManager.hist_file=:memory:",
                       *launcher_arguments(settings)])
    assert args.sandbox is True and args.limits.tmp_mb == 33 and args.limits.memory_mb == 777
    assert args.kernel_args == ["--HistoryManager.hist_file=:memory:"]  # the rest goes on to ipykernel
    cmd = build_command(inner_command(args, 7, "/run/kernel/connection.json"), workdir_name="w",
                        home_dir=tmp_path / "h", run_dir=tmp_path / "r", etc_dir=tmp_path / "e",
                        env=sandbox_env(args.limits), uid=None, limits=args.limits)
    k = cmd.index("/tmp")
    assert cmd[k - 3:k + 1] == ["--size", str(33 * MB), "--tmpfs", "/tmp"]
    tail = cmd[cmd.index("--") + 1:]
    assert tail[tail.index("--audit-fd") + 1] == "7" and tail[tail.index("--preload") + 1] == "numpy"
    assert not any(a.startswith("COURSE_AUDIT_FD") for a in cmd)
    assert rlimits(args.limits, None)[resource.RLIMIT_AS] == (777 * MB, 777 * MB)


def test_the_launcher_refuses_malformed_limits(tmp_path):
    with pytest.raises(SystemExit):
        parse_args(["-f", str(tmp_path / "k.json"), "--limits", '{"memory_mb": "lots"}'])
    with pytest.raises(SystemExit):
        parse_args(["-f", str(tmp_path / "k.json"), "--limits", '{"memroy_mb": 1}'])


def test_the_kernel_takes_its_settings_from_its_command_line():
    from grading_engine.kernel.inner import parse_args as inner_args

    args, rest = inner_args(["--audit-fd", "5", "--preload", "numpy,torch", "--watch", "course", "-f", "c.json",
                             "--HistoryManager.hist_file=:memory:"])
    assert (args.audit_fd, args.preload, args.watch) == (5, "numpy,torch", "course")
    assert rest == ["-f", "c.json", "--HistoryManager.hist_file=:memory:"]


def test_no_setting_travels_in_sys_argv_or_the_environment():
    """The handshakes carry the settings: nothing sniffs sys.argv or reads COURSE_AUDIT_FD / limits from env."""
    for rel in ("plugin.py", "preprocessors/execute.py", "preprocessors/evidence.py", "batch/worker.py"):
        assert "sys.argv" not in (ENGINE / rel).read_text(), rel  # which command runs: nbgrader's hook says
    for rel in ("sandbox/kernel.py", "kernel/inner.py", "sandbox/bwrap.py", "evidence/reference.py"):
        text = (ENGINE / rel).read_text()
        assert "COURSE_AUDIT_FD" not in text and "COURSE_SANDBOX_MEMORY_MB" not in text, rel
        assert 'environ.get("COURSE_' not in text, rel


# ----------------------------------------------------------------------------- run time, not load time


def test_the_command_line_switches_evidence_off_at_run_time(tmp_path, monkeypatch):
    """nbgrader's --GradingEngine.evidence=False reaches the preprocessors, which the config file installed."""
    from nbgrader.apps.autogradeapp import AutogradeApp
    from nbgrader.converters import Autograde
    from traitlets.config import Application

    write_config(tmp_path)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("COURSE_INTEGRITY", raising=False)
    for argv, expected in (([], True), (["--GradingEngine.evidence=False"], False)):
        AutogradeApp.clear_instance()
        Application.clear_instance()
        try:
            app = AutogradeApp.instance()
            app.initialize(argv)
            converter = Autograde(coursedir=app.coursedir, parent=app)
            built = [cls(parent=converter) for cls in converter.sanitize_preprocessors + converter.autograde_preprocessors]
            on = {type(p).__name__: p.enabled for p in built}
            assert on["GuardSubmission"] is expected and on["InstrumentTests"] is expected
            assert on["CheckEvidence"] is expected and on["SandboxedExecute"] is True
            hook = converter.pre_convert_hook
            assert hook.settings().evidence is expected  # the hook reads the running app's merged config
        finally:
            AutogradeApp.clear_instance()
            Application.clear_instance()


def test_autograde_refuses_before_the_first_submission(monkeypatch):
    from grading_engine.plugin import BeforeAutograde, refuse_unless_ready
    from grading_engine.sandbox import bwrap

    monkeypatch.setattr(bwrap, "availability", lambda *a, **k: (False, "no bubblewrap on this test machine"))
    c = Config()
    from grading_engine.plugin import configure

    configure(c)
    assert isinstance(c.Autograde.pre_convert_hook, BeforeAutograde)
    c.GradingEngine.sandbox = True
    with pytest.raises(SystemExit, match="no bubblewrap on this test machine"):
        c.Autograde.pre_convert_hook(assignment="a", student="s", notebooks=[])
    with pytest.raises(SystemExit, match="refuses"):
        refuse_unless_ready(c)  # the batch worker, before it reports ready
    c.GradingEngine.sandbox = False
    c.GradingEngine.evidence = False
    c.Autograde.pre_convert_hook(assignment="a", student="s", notebooks=[])  # opted out: no refusal
    refuse_unless_ready(c)


def test_a_broken_engine_configuration_refuses_autograde_only():
    import grading_engine.plugin as plugin

    def broken(cfg):
        raise RuntimeError("cannot configure")

    c = Config()
    original = plugin._configure
    try:
        plugin._configure = broken
        plugin.configure(c)
    finally:
        plugin._configure = original
    Refuse = plugin.Refuse
    assert isinstance(c.Autograde.pre_convert_hook, Refuse)
    with pytest.raises(SystemExit, match="cannot configure"):
        c.Autograde.pre_convert_hook(assignment="a", student="s", notebooks=[])


# ----------------------------------------------------------------------------- end to end, in a real sandbox


def _tiny_course(root: Path, config_extra: str) -> None:
    write_config(root, config_extra)
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    meta = {"schema_version": 3, "task": False}
    nb.cells = [
        nbformat.v4.new_code_cell(
            "import os, resource\n"
            "vfs = os.statvfs('/tmp')\n"
            "print('limits', resource.getrlimit(resource.RLIMIT_AS)[0] // 2**20, vfs.f_blocks * vfs.f_frsize // 2**20)",
            metadata={"nbgrader": dict(meta, grade=False, solution=False, locked=True, grade_id="setup")}),
        nbformat.v4.new_code_cell(
            "def double(x):\n    ### BEGIN SOLUTION\n    return 2 * x\n    ### END SOLUTION",
            metadata={"nbgrader": dict(meta, grade=False, solution=True, locked=False, grade_id="answer")}),
        nbformat.v4.new_code_cell(
            "assert double(3) == 6",
            metadata={"nbgrader": dict(meta, grade=True, solution=False, locked=True, grade_id="test", points=1)}),
    ]
    (root / "source" / "ps1").mkdir(parents=True)
    nbformat.write(nb, str(root / "source" / "ps1" / "p.ipynb"))


def _nbgrader(root: Path, *args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nbgrader", *args], cwd=root, env=env, capture_output=True,
                          text=True, timeout=600)


@pytest.mark.grading
def test_config_file_limits_and_command_line_switch_in_a_real_autograde(tmp_path):
    """`nbgrader autograde ps1 --GradingEngine.evidence=False` with limits set in nbgrader_config.py: the
    sandboxed kernel runs under those limits, and no evidence check runs."""
    from grading_engine.sandbox.bwrap import availability

    ok, why = availability()
    if not ok:
        pytest.skip(f"the sandbox cannot start here: {why}")
    root = tmp_path / "course"
    _tiny_course(root, "c.GradingEngine.memory_mb = 1500\nc.GradingEngine.tmp_mb = 40\n"
                       "c.GradingEngine.preload = []\n"
                       # the kernelspec the other tests use: a different list would reinstall it
                       "c.GradingEngine.sandbox_packages = ['course']\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("COURSE_")}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")  # nbgrader runs alembic
    p = _nbgrader(root, "generate_assignment", "ps1", "--force", env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    sub = root / "submitted" / "alice" / "ps1"
    sub.mkdir(parents=True)
    released = nbformat.read(str(root / "release" / "ps1" / "p.ipynb"), as_version=4)
    answer = released.cells[1]
    assert "NotImplementedError" in answer.source
    answer.source = "def double(x):\n    return x + x"
    nbformat.write(released, str(sub / "p.ipynb"))
    p = _nbgrader(root, "autograde", "ps1", "--GradingEngine.evidence=False", env=env)
    log = p.stdout + p.stderr
    assert p.returncode == 0, log
    graded = nbformat.read(str(root / "autograded" / "alice" / "ps1" / "p.ipynb"), as_version=4)
    text = "".join(o.get("text", "") for o in graded.cells[0].outputs)
    assert "limits 1500 40" in text, text  # RLIMIT_AS from the launcher, /tmp's size from bwrap
    assert "reference notebook" not in log and not (root / "integrity").exists()  # evidence off
    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{root / 'gradebook.db'}") as gb:
        assert gb.find_submission("ps1", "alice").score == 1
    assert json.loads((root / "autograded" / "alice" / "ps1" / "p.ipynb").read_text())  # a readable notebook


def test_output_caps_are_per_mime_type():
    """GradingEngine.output_caps: an output of a capped type counts against its own cap, not the cell's."""
    from grading_engine.preprocessors.execute import SandboxedExecute

    c = Config()
    c.GradingEngine.output_caps = {"application/x-records+json": 300}
    c.SandboxedExecute.max_cell_output_bytes = 400
    ep = SandboxedExecute(config=c)
    ep._reset_counts(GradingEngine(parent=ep))
    ep.reset_execution_trackers()
    ep.clear_before_next_output = False  # what nbclient sets before a cell runs

    def show(mime: str, n: int) -> dict:
        return {"msg_type": "display_data", "header": {"msg_type": "display_data"}, "parent_header": {},
                "content": {"data": {mime: "x" * n}, "metadata": {}, "transient": {}}}

    outs: list = []
    for _ in range(3):  # 3 x ~250 bytes of text: over the cell's cap from the second on
        ep.output(outs, show("application/x-records+json", 200), None, 0)
    assert len(outs) == 1 and ep._truncated == {0}  # the capped type: kept up to its own cap, then dropped
    outs = []
    ep.output(outs, show("text/plain", 200), None, 1)
    ep.output(outs, show("application/x-records+json", 200), None, 1)  # its own budget: the text does not count
    assert len(outs) == 2 and 1 not in ep._truncated
    ep.output(outs, show("text/plain", 200), None, 1)
    assert 1 in ep._truncated and "too much output" in outs[-1]["text"]


@pytest.mark.parametrize("course_sets, env_sets, workers, expected", [
    (None, None, 2, "share"),  # nothing chosen: this machine's cores shared by the batch's grading processes
    (3, None, 2, 3),  # the course's nbgrader_config.py wins
    (None, "3", 2, 3),  # so does COURSE_SANDBOX_THREADS
    (None, None, None, "default"),  # a worker of a cluster started by hand: the setting as it is
])
def test_a_batch_shares_the_cores_between_its_kernels(monkeypatch, course_sets, env_sets, workers, expected):
    from grading_engine.batch.worker import THREAD_VARIABLES, share_cores

    class App:
        def __init__(self, config):
            self.config = config

        def update_config(self, overlay):
            self.config.merge(overlay)

    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items()
                                        if k not in (*THREAD_VARIABLES, "COURSE_SANDBOX_THREADS")})
    if env_sets is not None:
        monkeypatch.setenv("COURSE_SANDBOX_THREADS", env_sets)
    config = Config()
    if course_sets is not None:
        config.GradingEngine.threads = course_sets
    app = App(config)
    chosen = share_cores(app, workers)
    got = GradingEngine(config=app.config).threads
    cores = len(os.sched_getaffinity(0))
    want = {"share": max(1, min(4, cores // 2)), "default": min(4, os.cpu_count() or 1)}.get(expected, expected)
    assert got == want
    if expected == "share":  # the sandboxed kernels' environment and the plain kernels' get it
        assert chosen == want
        assert sandbox_env(Limits.from_settings(GradingEngine(config=app.config)))["OMP_NUM_THREADS"] == str(want)
        assert [os.environ.get(v) for v in THREAD_VARIABLES] == [str(want)] * 3
    else:
        assert chosen is None and not any(v in os.environ for v in THREAD_VARIABLES)


@pytest.mark.grading
def test_the_grading_seed_moves_the_hidden_inputs_in_a_real_autograde(tmp_path):
    """`--GradingEngine.input_seed=1234`: the hidden test draws other inputs than the ones it was written
    with, in the reference runs and in each student's run alike: an honest answer keeps its point, an answer
    that learned the test's own input fails."""
    import random

    from grading_engine.sandbox.bwrap import availability

    ok, why = availability()
    if not ok:
        pytest.skip(f"the sandbox cannot start here: {why}")
    root = tmp_path / "course"
    _tiny_course(root, "c.GradingEngine.preload = []\nc.GradingEngine.sandbox_packages = ['course']\n")
    nb = nbformat.read(str(root / "source" / "ps1" / "p.ipynb"), as_version=4)
    nb.cells[2].source = ("assert double(3) == 6\n### BEGIN HIDDEN TESTS\nimport random\nrandom.seed(4)\n"
                          "x = random.randint(0, 10**9)\nprint('input', x)\nwant = 2 * x\nassert double(x) == want\n"
                          "### END HIDDEN TESTS")
    nbformat.write(nb, str(root / "source" / "ps1" / "p.ipynb"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("COURSE_")}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    env["COURSE_INTEGRITY_CACHE"] = str(tmp_path / "cache")
    p = _nbgrader(root, "generate_assignment", "ps1", "--force", env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    random.seed(4)
    learned = random.randint(0, 10**9)
    random.seed(1238)
    moved = random.randint(0, 10**9)
    answers = {"alice": "def double(x):\n    return x + x",
               "bob": f"def double(x):\n    return {{3: 6, {learned}: {2 * learned}}}.get(x, 0)"}
    for student, code in answers.items():
        sub = root / "submitted" / student / "ps1"
        sub.mkdir(parents=True)
        released = nbformat.read(str(root / "release" / "ps1" / "p.ipynb"), as_version=4)
        released.cells[1].source = code
        nbformat.write(released, str(sub / "p.ipynb"))
    p = _nbgrader(root, "autograde", "ps1", "--GradingEngine.input_seed=1234", env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    from nbgrader.api import Gradebook

    with Gradebook(f"sqlite:///{root / 'gradebook.db'}") as gb:
        assert gb.find_submission("ps1", "alice").score == 1
        assert gb.find_submission("ps1", "bob").score == 0
    graded = nbformat.read(str(root / "autograded" / "alice" / "ps1" / "p.ipynb"), as_version=4)
    assert f"input {moved}" in "".join(o.get("text", "") for o in graded.cells[2].outputs)
    assert "random.seed(4)" in graded.cells[2].source  # the autograded notebook keeps the test as written
    cached = [json.loads(f.read_text()) for f in (tmp_path / "cache").glob("*.json")]
    assert [c["seed"] for c in cached] == [1234]
