#!/usr/bin/env bash
# System packages the course's grading and its tests need (Debian/Ubuntu).
# Each block says what needs it; .ci/run calls this before the tests.
set -euo pipefail
if ! command -v apt-get >/dev/null; then
  echo "system-packages: no apt-get here; install the packages below with your system's package manager" >&2
  exit 0
fi
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
PACKAGES=(
  bubblewrap        # sandbox for autograding student code (course.sandbox)
  postgresql        # tests/test_postgres.py starts a throw-away server (the gradebook on PostgreSQL)
  chromium          # the browser the end-to-end JupyterLab test drives (tests/browser, Playwright)
  chromium-driver   #   and its driver, from Debian: the test never downloads a browser
)
missing=()
for p in "${PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
