#!/usr/bin/env bash
# Installs what the tests need, lints and runs them. The browser test needs Debian's chromium + chromium-driver.
set -euo pipefail
cd "$(dirname "$0")/.."
pip install -q -r requirements.txt
pip install -q --no-deps -e .
if ! command -v chromedriver >/dev/null && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq chromium chromium-driver) >/dev/null
fi
python -m ruff check .  # lint and import order (pyproject.toml [tool.ruff]); a finding fails the script
exec python -m pytest "$@"
