#!/usr/bin/env bash
# Mutation testing of the engine core with mutmut 3 (not part of the default test run; see scripts/mutation.py).
#
#   scripts/mutation.sh                          # all core modules, fast engine tests
#   scripts/mutation.sh denoise masks            # some modules (names without .py)
#   scripts/mutation.sh --with-mask-choice masks # also run tests/engine/method/test_mask_choice.py (~10 s a param)
#   scripts/mutation.sh --help
#
# Everything it writes goes under .mutation/ (git-ignored): the tool's virtual environment, one snapshot work
# folder per module (.mutation/work/<module>/, mutmut's mutants/ lives inside it) and the reports
# (.mutation/reports/<module>/{summary.json,survivors.md,run.log}, .mutation/reports/summary.md).
#
# mutmut 3.8.1 needs newer libcst/click than the project's environment may have, so it is installed into
# .mutation/venv, a virtual environment that sees the project's site-packages (torch, transformers, pytest).
# MUTATION_NICE=15 scripts/mutation.sh ... runs it at a lower CPU priority.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${MUTATION_OUT:-.mutation}"
VENV="$OUT/venv"
MUTMUT_VERSION=3.8.1
PYTHON="${PYTHON:-python3}"

if ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit(m.version('mutmut') != '$MUTMUT_VERSION')" \
     2>/dev/null; then
  echo "installing mutmut==$MUTMUT_VERSION into $VENV" >&2
  "$PYTHON" -m venv --system-site-packages "$VENV"
  "$VENV/bin/python" -m pip install -q "mutmut==$MUTMUT_VERSION"
fi
exec nice -n "${MUTATION_NICE:-0}" "$VENV/bin/python" scripts/mutation.py --out "$OUT" "$@"
