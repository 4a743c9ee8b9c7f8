"""Fixtures of the end-to-end browser test: the system's Chromium, driven by Playwright."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from labdriver import CHROMIUM_CANDIDATES, find_chromium, launch_chromium  # noqa: E402

from course_tools.paths import REPO_ROOT  # noqa: E402

ARTIFACTS = REPO_ROOT / "build" / "browser-artifacts"


def pytest_configure(config):
    config.addinivalue_line("markers", "browser: drives JupyterLab in a real browser (Chromium via Playwright)")


@pytest.fixture(scope="session")
def chromium_path() -> str:
    path = find_chromium()
    if path is None:
        where = os.environ.get("COURSE_CHROMIUM") or " or ".join(CHROMIUM_CANDIDATES)
        msg = (f"no Chromium at {where}: the browser test drives the system's Chromium (Playwright's own "
               "browser downloads are not used). On Debian run `bash .ci/system-packages.sh` "
               "(packages chromium and chromium-driver)")
        if os.environ.get("COURSE_BROWSER_REQUIRED", "").lower() in {"1", "true", "yes"}:
            pytest.fail(msg)
        pytest.skip(msg)
    return path


@pytest.fixture(scope="session")
def artifacts(chromium_path) -> Path:
    """Screenshots and logs of the browser test, kept after the run (build/ is gitignored).

    Asks for Chromium first, so that a skipped run leaves the last run's artifacts alone."""
    if ARTIFACTS.exists():
        shutil.rmtree(ARTIFACTS)
    ARTIFACTS.mkdir(parents=True)
    return ARTIFACTS


@pytest.fixture
def browser_context(chromium_path):
    from playwright.sync_api import sync_playwright

    profile = Path(tempfile.mkdtemp(prefix="course-chromium-profile-"))
    with sync_playwright() as p:
        context = launch_chromium(p, chromium_path, profile)
        context.set_default_timeout(60_000)  # a shared 2-core CI machine can be slow
        try:
            yield context
        finally:
            context.close()
            shutil.rmtree(profile, ignore_errors=True)
