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
  bubblewrap        # sandbox for autograding student code (grading_engine.sandbox); setpriv comes with util-linux
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

# grading_engine.sandbox as an ordinary user needs unprivileged user namespaces; Ubuntu 24.04+ may restrict them
# with AppArmor (GitHub's runners do). Lift the restriction on this CI machine if bwrap cannot start.
if command -v bwrap >/dev/null && ! bwrap --unshare-user --ro-bind / / true 2>/dev/null; then
  if [ -e /proc/sys/kernel/apparmor_restrict_unprivileged_userns ]; then
    echo "system-packages: allowing unprivileged user namespaces for bubblewrap (kernel.apparmor_restrict_unprivileged_userns=0)"
    $SUDO sysctl -q -w kernel.apparmor_restrict_unprivileged_userns=0 || true
  fi
  bwrap --unshare-user --ro-bind / / true || echo "system-packages: WARNING: bwrap cannot start here; see README, Grading integrity" >&2
fi
