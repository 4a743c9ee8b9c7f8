"""Start JupyterLab for a student or an instructor of the course.

    python -m course_tools.lab student      [--dir DIR] [--exchange PATH] [--student-id ID] [jupyter lab options]
    python -m course_tools.lab instructor   [--dir COURSE_ROOT] [jupyter lab options]

Both start ``jupyter lab`` on 127.0.0.1 (pass ``--ip`` to change it) with
nbgrader's extensions, configured for the role and for this launch only
(nothing is written to the user's or the machine's Jupyter configuration):

* **student**: the *Assignment List* (fetch and submit) and the *Validate*
  button; the instructor tools (Formgrader, the Create Assignment toolbar,
  the course list) are switched off. nbgrader is configured for the course
  (course id ``lm-mechanics``, the exchange folder), so the student needs no
  ``nbgrader_config.py``. The server's folder is ``--dir`` (default: the
  current folder); fetched assignments land in ``<dir>/lm-mechanics/``.
* **instructor**: everything, in the course root (default: this repository),
  whose ``nbgrader_config.py`` points the Formgrader at ``source/``,
  ``submitted/``, ``autograded/`` and the gradebook.

For both: locked cells (setup and test cells) are shaded and labelled
"read-only", only the ``python3`` kernel is offered (``grading_engine.sandbox``
installs a second kernel that is for ``nbgrader autograde`` only), and
JupyterLab fetches no news and checks for no updates (the course works
offline).

The exchange is ``--exchange``, else ``$COURSE_EXCHANGE``, else
``exchange/`` in this repository: the same folder ``nbgrader_config.py``
gives the instructor. Options this launcher does not know go to
``jupyter lab`` (for example ``--port 8890 --no-browser``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from course_tools.paths import REPO_ROOT

COURSE_ID = "lm-mechanics"
ROLES = ("student", "instructor")

# JupyterLab plugins of the @jupyter/nbgrader extension, and nbgrader's server extensions
INSTRUCTOR_ONLY_PLUGINS = (
    "@jupyter/nbgrader:formgrader",
    "@jupyter/nbgrader:create-assignment",
    "@jupyter/nbgrader:course-list",
)
INSTRUCTOR_ONLY_SERVER_EXTENSIONS = (
    "nbgrader.server_extensions.formgrader",
    "nbgrader.server_extensions.course_list",
)
SHARED_SERVER_EXTENSIONS = (
    "nbgrader.server_extensions.assignment_list",
    "nbgrader.server_extensions.validate_assignment",
)
# the news feed and update check, and the pop-up that asks about them
OFFLINE_DISABLED_PLUGINS = ("@jupyterlab/apputils-extension:announcements",)
ALLOWED_KERNELS = ("python3",)

# JupyterLab marks the editor of a cell whose metadata says "editable": false
# (nbgrader's locked cells) with .jp-mod-readOnly but draws it like any other
# cell: typing into it silently does nothing. Shade it and label it.
LOCKED_CELL_CSS = """\
/* course_tools.lab: locked cells (nbgrader setup and test cells) look locked */
.jp-Notebook .jp-InputArea-editor:has(> .cm-editor.jp-mod-readOnly) {
  position: relative;
  background: var(--jp-layout-color2);
  border-left: 3px dashed var(--jp-border-color1);
}
.jp-Notebook .jp-InputArea-editor:has(> .cm-editor.jp-mod-readOnly)::after {
  content: "read-only";
  position: absolute;
  top: 2px;
  right: 8px;
  font-family: var(--jp-ui-font-family);
  font-size: var(--jp-ui-font-size0);
  color: var(--jp-ui-font-color2);
  pointer-events: none;
}
"""

STUDENT_NBGRADER_CONFIG = """\
# written by course_tools.lab for one JupyterLab session
c = get_config()
c.CourseDirectory.course_id = {course_id!r}
c.Exchange.root = {exchange!r}
c.Exchange.path_includes_course = True
"""


def default_exchange() -> Path:
    return Path(os.environ.get("COURSE_EXCHANGE", REPO_ROOT / "exchange"))


def write_config(role: str, config_dir: Path, exchange: Path, student_id: str | None = None) -> None:
    """Write the Jupyter configuration of one role into ``config_dir`` (the server's JUPYTER_CONFIG_DIR)."""
    student = role == "student"
    labconfig = config_dir / "labconfig"
    labconfig.mkdir(parents=True, exist_ok=True)
    disabled = {name: True for name in OFFLINE_DISABLED_PLUGINS}
    if student:
        disabled.update({name: True for name in INSTRUCTOR_ONLY_PLUGINS})
    (labconfig / "page_config.json").write_text(json.dumps({"disabledExtensions": disabled}, indent=2))

    extensions = {name: True for name in SHARED_SERVER_EXTENSIONS}
    extensions.update({name: not student for name in INSTRUCTOR_ONLY_SERVER_EXTENSIONS})
    server_config = {
        "ServerApp": {"jpserver_extensions": extensions},
        "LabApp": {"news_url": None, "check_for_updates_class": "jupyterlab.NeverCheckForUpdate",
                   "custom_css": True},
        "KernelSpecManager": {"allowed_kernelspecs": list(ALLOWED_KERNELS)},
    }
    (config_dir / "jupyter_server_config.json").write_text(json.dumps(server_config, indent=2))

    (config_dir / "custom").mkdir(exist_ok=True)
    (config_dir / "custom" / "custom.css").write_text(LOCKED_CELL_CSS)

    if student:
        text = STUDENT_NBGRADER_CONFIG.format(course_id=COURSE_ID, exchange=str(exchange))
        if student_id:
            text += f"c.CourseDirectory.student_id = {student_id!r}\n"
        (config_dir / "nbgrader_config.py").write_text(text)


def lab_env(config_dir: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """The server's environment: ``config_dir`` first, the user's own configuration and settings kept."""
    env = dict(os.environ if base is None else base)
    user_dir = env.get("JUPYTER_CONFIG_DIR") or str(Path(env.get("HOME") or Path.home()) / ".jupyter")
    # JupyterLab keeps its user settings and workspaces under the config dir unless told otherwise
    env.setdefault("JUPYTERLAB_SETTINGS_DIR", str(Path(user_dir) / "lab" / "user-settings"))
    env.setdefault("JUPYTERLAB_WORKSPACES_DIR", str(Path(user_dir) / "lab" / "workspaces"))
    env["JUPYTER_CONFIG_DIR"] = str(config_dir)  # custom/custom.css is served from here only
    previous = env.get("JUPYTER_CONFIG_PATH")
    env["JUPYTER_CONFIG_PATH"] = os.pathsep.join([user_dir] + ([previous] if previous else []))
    return env


def lab_command(root: Path, extra: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "jupyterlab", f"--ServerApp.root_dir={root}"]
    if not any(a == "--ip" or a.startswith(("--ip=", "--ServerApp.ip")) for a in extra):
        cmd.append("--ServerApp.ip=127.0.0.1")
    return cmd + extra


def prepare(role: str, root: Path | None = None, exchange: Path | None = None,
            student_id: str | None = None, extra: list[str] | None = None,
            config_dir: Path | None = None, env: dict[str, str] | None = None) -> tuple[list[str], dict[str, str], Path]:
    """Command, environment and folder that start JupyterLab for ``role``; writes the config, starts nothing.

    The server must run with the returned folder as its current directory
    (nbgrader's server extensions read ``nbgrader_config.py`` from there).
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, not {role!r}")
    root = Path(root or (Path.cwd() if role == "student" else REPO_ROOT)).resolve()
    if role == "instructor" and not (root / "nbgrader_config.py").exists():
        raise SystemExit(f"{root} has no nbgrader_config.py: start the instructor's JupyterLab in the course root")
    exchange = Path(exchange or default_exchange()).resolve()
    if config_dir is None:
        config_dir = Path(tempfile.mkdtemp(prefix=f"course-lab-{role}-"))
    write_config(role, config_dir, exchange, student_id)
    return lab_command(root, list(extra or [])), lab_env(config_dir, env), root


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m course_tools.lab", description=__doc__.split("\n\n")[0],
                                 epilog="Other options are passed to jupyter lab.")
    ap.add_argument("role", choices=ROLES)
    ap.add_argument("--dir", type=Path, default=None,
                    help="folder JupyterLab serves (student: the current folder; instructor: the course root)")
    ap.add_argument("--exchange", type=Path, default=None,
                    help="nbgrader exchange folder (default: $COURSE_EXCHANGE, else exchange/ in the repository)")
    ap.add_argument("--student-id", default=None,
                    help="student id used when submitting (default: the login name)")
    args, extra = ap.parse_known_args(argv)
    config_dir = Path(tempfile.mkdtemp(prefix=f"course-lab-{args.role}-"))
    try:
        cmd, env, root = prepare(args.role, args.dir, args.exchange, args.student_id, extra, config_dir)
        if args.role == "student" and args.exchange is None and "COURSE_EXCHANGE" not in os.environ:
            print(f"course_tools.lab: exchange {default_exchange()} (set COURSE_EXCHANGE or --exchange for a shared one)",
                  file=sys.stderr)
        proc = subprocess.Popen(cmd, env=env, cwd=root)
        # Ctrl-C reaches JupyterLab directly (it asks before shutting down); a
        # termination signal sent to this launcher is passed on to it.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        for sig in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, lambda signum, frame: proc.send_signal(signum))
        return proc.wait()
    finally:
        shutil.rmtree(config_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
