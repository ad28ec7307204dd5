#!/usr/bin/env bash
# The recipe search on multilingual-e5-small recorded in benchmarks/RESULTS.md (seed 1, five NusaX targets).
# Resumable and cached: every command reuses the runs and evaluations earlier ones left in $WORK.
# Usage: bash benchmarks/recipe_search.sh [WORK]   (hours on 2 CPU cores; run it with nice in the background)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${1:-benchmarks/out/recipe-search}
T="javanese sundanese balinese acehnese madurese"
B="python -m benchmarks.crosslingual --model multilingual-e5-small --targets $T --seeds 1 --no-calibrate --work-dir $WORK"
$B --methods task-only deftx --out "$WORK/s01-fit-head-last-layer"
$B --methods task-only deftx-src --out "$WORK/s02-last-layer-src"
$B --methods task-only deftx deftx-src --lang-scale 0.5 --out "$WORK/s03-last-layer-scale-half"
$B --methods task-only deftx deftx-src --lang-mlm-layer 6 --out "$WORK/s04-layer6"
$B --methods task-only deftx --lang-scale 0.25 --out "$WORK/s05-last-layer-scale-quarter"
python -m benchmarks.search_history "$WORK"/s0*.json
