"""Drive a real JupyterLab with Playwright and the system's Chromium.

A :class:`LabServer` is JupyterLab started by :mod:`course_tools.lab` (the same
launcher students and instructors use) on 127.0.0.1, a free port and a
random token. A :class:`Lab` wraps one browser page on it with the few UI
gestures the end-to-end test needs: menus, cells, running, waiting for the
kernel, screenshots.

No browser is downloaded: Chromium comes from the system's package manager
(Debian packages ``chromium`` and ``chromium-driver``, installed by
``.ci/system-packages.sh``) and Playwright only drives it.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from course_tools.lab import prepare

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORT = {"width": 1400, "height": 900}
SCROLL_TO_TOP = """(e, margin) => {
    e.scrollIntoView({block: 'start'});
    let p = e.parentElement;
    while (p && !['auto', 'scroll'].includes(getComputedStyle(p).overflowY)) p = p.parentElement;
    (p || e.ownerDocument.scrollingElement).scrollBy(0, -margin);
}"""


def find_chromium() -> str | None:
    """Path of the system's Chromium (only $COURSE_CHROMIUM when it is set), or None."""
    wanted = os.environ.get("COURSE_CHROMIUM")
    for path in [wanted] if wanted else CHROMIUM_CANDIDATES:
        if Path(path).is_file() and os.access(path, os.X_OK):
            return path
    return None


def launch_chromium(playwright, executable: str, profile_dir: Path):
    """A headless Chromium with a fresh profile (``--user-data-dir``), as a Playwright context."""
    # Playwright passes the profile as --user-data-dir itself (it refuses it in args)
    return playwright.chromium.launch_persistent_context(
        str(profile_dir), executable_path=executable, headless=True, args=CHROMIUM_ARGS,
        viewport=VIEWPORT, accept_downloads=False)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LabServer:
    """JupyterLab for one role, started with ``course_tools.lab``'s configuration on loopback."""

    def __init__(self, role: str, root: Path, workdir: Path, env: dict[str, str], exchange: Path,
                 student_id: str | None = None):
        self.role, self.root, self.exchange, self.student_id = role, Path(root), Path(exchange), student_id
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.log_path = Path(workdir) / f"{role}-lab.log"
        self.config_dir = Path(workdir) / f"{role}-jupyter-config"
        self.env = env
        self.proc: subprocess.Popen | None = None

    def start(self) -> LabServer:
        extra = [f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0",
                 f"--IdentityProvider.token={self.token}", "--ServerApp.open_browser=False",
                 "--LabApp.expose_app_in_browser=False"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            extra.append("--allow-root")  # CI containers run as root
        self.config_dir.mkdir(parents=True, exist_ok=True)
        cmd, env, cwd = prepare(self.role, self.root, self.exchange, self.student_id, extra,
                                config_dir=self.config_dir, env=self.env)
        self.log = self.log_path.open("w")
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        return self

    def url(self, path: str = "lab") -> str:
        sep = "&" if "?" in path else "?"
        return f"http://127.0.0.1:{self.port}/{path.lstrip('/')}{sep}token={self.token}"

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"JupyterLab ({self.role}) exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url("api/status"), timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.5)
        raise TimeoutError(f"JupyterLab ({self.role}) not ready after {timeout} s:\n{self.tail()}")

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        if getattr(self, "log", None):
            self.log.close()


class Lab:
    """One JupyterLab page: menus, notebook cells, kernel waits and screenshots."""

    def __init__(self, page, server: LabServer, artifacts: Path, first_shot: int = 1):
        self.page, self.server, self.artifacts = page, server, Path(artifacts)
        self.first_shot = first_shot
        self.shots: list[Path] = []

    @contextlib.contextmanager
    def on_failure_screenshot(self):
        """Leave a screenshot of the whole page when a step fails."""
        try:
            yield
        except BaseException:
            try:
                self.page.screenshot(path=str(self.artifacts / f"FAILED_{self.server.role}.png"), timeout=10_000)
            except Exception:
                pass
            raise

    # -- navigation ---------------------------------------------------------
    def open(self, path: str = "lab") -> Lab:
        self.page.goto(self.server.url(path))
        self.page.wait_for_selector("#jp-main-dock-panel")
        self.page.locator(".lm-MenuBar-itemLabel", has_text="Nbgrader").wait_for()
        return self

    def open_menu(self, top: str):
        """Open a menu of the menu bar; return its item labels' locator.

        A click on the menu bar toggles: a menu still closing (after Escape, on a slow machine) is opened
        again rather than waited for in vain."""
        label = self.page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(f"^{re.escape(top)}$"))
        items = self.page.locator(".lm-Menu-content .lm-Menu-itemLabel")
        for attempt in range(3):
            label.click()
            try:
                items.first.wait_for(state="visible", timeout=10_000)
                return items
            except Exception:
                if attempt == 2:
                    raise
        return items

    def close_menu(self) -> None:
        self.page.keyboard.press("Escape")
        self.page.locator(".lm-Menu-content").first.wait_for(state="detached")

    def menu(self, top: str, item: str) -> None:
        self.open_menu(top).filter(has_text=re.compile(f"^{re.escape(item)}$")).click()

    def shot(self, name: str, locator=None, top=None, margin: int = 0) -> Path:
        """Screenshot into the artifacts folder: of the page, of one element (``locator``),
        or of the page scrolled so that ``top`` is the first thing in view (``margin`` pixels below the top)."""
        path = self.artifacts / f"{self.first_shot + len(self.shots):02d}_{self.server.role}_{name}.png"
        if top is not None:
            top.evaluate(SCROLL_TO_TOP, margin)
        elif locator is not None:
            locator.scroll_into_view_if_needed()
        if top is not None or locator is not None:
            self.page.wait_for_timeout(400)  # let MathJax and the editors render what scrolled into view
        (locator or self.page).screenshot(path=str(path))
        self.shots.append(path)
        return path

    # -- notebook -----------------------------------------------------------
    @property
    def notebook(self):
        return self.page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook")

    def code_cell(self, contains: str):
        """The code cell whose source contains ``contains`` (exactly one)."""
        cells = self.notebook.locator(".jp-CodeCell").filter(
            has=self.page.locator(".jp-InputArea-editor", has_text=contains))
        cells.first.wait_for()
        n = cells.count()
        assert n == 1, f"{n} code cells contain {contains!r}"
        return cells.first

    def wait_kernel_idle(self, timeout: float = 120_000) -> None:
        """Wait until the kernel has started and every queued cell has finished."""
        self.page.locator(".jp-StatusBar-Widget", has_text=re.compile(r"\|\s*Idle")).first.wait_for(timeout=timeout)
        self.page.wait_for_function(
            """() => {
                const nb = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden)');
                if (!nb) return false;
                const busy = [...nb.querySelectorAll('.jp-InputPrompt')].some(p => p.textContent.includes('*'));
                const ind = nb.querySelector('.jp-Notebook-ExecutionIndicator');
                return !busy && (!ind || ind.dataset.status === 'idle');
            }""", timeout=timeout, polling=250)
        # the status bar can lag one message behind the prompts
        self.page.locator(".jp-StatusBar-Widget", has_text=re.compile(r"\|\s*Idle")).first.wait_for(timeout=timeout)

    def run_all(self) -> None:
        self.menu("Run", "Run All Cells")
        self.page.wait_for_timeout(500)
        self.wait_kernel_idle()

    def select(self, cell) -> None:
        """Select a cell in command mode (click its prompt, not its editor)."""
        cell.locator(".jp-InputPrompt").click()

    def run_from(self, cell) -> None:
        """Run the cell and all below it (stops at the first error, like Run All)."""
        self.select(cell)
        self.menu("Run", "Run Selected Cell and All Below")
        self.page.wait_for_timeout(500)
        self.wait_kernel_idle()

    def replace_line(self, cell, old: str, new: str) -> None:
        """Type ``new`` over the editor line that contains ``old``, as a student would."""
        line = cell.locator(".cm-line", has_text=old)
        line.click()
        self.page.keyboard.press("End")
        self.page.keyboard.press("Shift+Home")  # to the first non-blank character: keeps the indentation
        self.page.keyboard.type(new)
        self.page.keyboard.press("Escape")  # back to command mode
        text = cell.locator(".cm-content").text_content()
        assert new in text, f"typing did not land in the cell; it now reads:\n{text}"

    # textContent, not innerText: JupyterLab skips rendering cells out of view
    # (content-visibility), and innerText of those is empty
    @staticmethod
    def prompt(cell) -> str:
        return (cell.locator(".jp-InputPrompt").text_content() or "").strip()

    @staticmethod
    def error_text(cell) -> str:
        """Text of the cell's error output ('' when it has none)."""
        err = cell.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
        return "\n".join(err.all_text_contents())

    @staticmethod
    def output_text(cell) -> str:
        return "\n".join(cell.locator(".jp-OutputArea-output").all_text_contents())

    def save(self) -> None:
        self.page.keyboard.press("Control+s")
        self.page.locator(".jp-NotebookPanel:not(.lm-mod-hidden)").wait_for()
        self.page.wait_for_function(
            """() => { const t = document.querySelector('.lm-DockPanel-tabBar .lm-TabBar-tab.jp-mod-current');
                       return t && !t.classList.contains('jp-mod-dirty'); }""", timeout=30_000)


def copy_course(instructor: Path, repo_root: Path, assignment: str, notebooks: list[str]) -> None:
    """An instructor's course folder with one assignment reduced to ``notebooks`` (and its other files)."""
    src = repo_root / "source" / assignment
    dst = instructor / "source" / assignment
    dst.mkdir(parents=True)
    shutil.copy2(repo_root / "nbgrader_config.py", instructor / "nbgrader_config.py")
    for item in src.iterdir():
        if item.suffix == ".ipynb":
            if item.stem in notebooks:
                shutil.copy2(item, dst / item.name)
        elif item.is_dir():
            shutil.copytree(item, dst / item.name, ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"))
        else:
            shutil.copy2(item, dst / item.name)
