#!/usr/bin/env bash
# Installs what the tests need and runs them. The browser test needs Debian's chromium + chromium-driver.
set -euo pipefail
cd "$(dirname "$0")/.."
pip install -q -r requirements.txt
pip install -q --no-deps -e .
if ! command -v chromedriver >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq chromium chromium-driver) >/dev/null
fi
exec python -m pytest "$@"
