#!/usr/bin/env bash
# Test-only system packages: Debian's headless Chromium and its driver, for the FiftyOne App
# browser test (tests/test_review_app.py). Idempotent and quiet: when both are installed it
# returns at once without touching apt.
set -euo pipefail

need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need+=(chromium-driver)
if [ ${#need[@]} -eq 0 ]; then
    exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then
        SUDO=sudo
    else
        # Not fatal: the browser test skips itself, saying what is missing.
        echo "setup-test-deps: cannot install ${need[*]} (needs root or sudo);" \
             "the FiftyOne App browser test will be skipped" >&2
        exit 0
    fi
else
    SUDO=
fi

echo "setup-test-deps: installing ${need[*]} (apt-get)" >&2
export DEBIAN_FRONTEND=noninteractive
# Refresh the package lists only when they are missing or the install fails on stale ones.
if ! $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null 2>&1; then
    $SUDO apt-get update -qq >/dev/null
    $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
command -v chromium >/dev/null && command -v chromedriver >/dev/null
