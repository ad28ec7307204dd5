#!/usr/bin/env bash
# The recipe search on multilingual-e5-small recorded in benchmarks/research/RESULTS.md (seed 1, five NusaX targets).
# Resumable and cached: every command reuses the runs and evaluations earlier ones left in $WORK.
# Usage: bash benchmarks/research/recipe_search.sh [WORK]   (hours on 2 CPU cores; run it with nice in the background)
#        DRY_RUN=1 bash benchmarks/research/recipe_search.sh [WORK]   (prints each benchmark command instead of running it;
#        tests/benchmarks/research/test_recipe_search.py checks every printed command against its benchmark)
set -euo pipefail
cd "$(dirname "$0")/../.."
WORK=${1:-benchmarks/out/recipe-search}
py() {  # python, or with DRY_RUN=1 the command line it would run
    if [ -n "${DRY_RUN:-}" ]; then echo "python $*"; else python "$@"; fi
}
T="javanese sundanese balinese acehnese madurese"
B="py -m benchmarks.crosslingual --model multilingual-e5-small --targets $T --seeds 1 --no-calibrate --work-dir $WORK"
$B --methods task-only deftx --out "$WORK/s01-fit-head-last-layer"
$B --methods task-only deftx-src --out "$WORK/s02-last-layer-src"
$B --methods task-only deftx deftx-src --lang-scale 0.5 --out "$WORK/s03-last-layer-scale-half"
$B --methods task-only deftx deftx-src --lang-mlm-layer 6 --out "$WORK/s04-layer6"
$B --methods task-only deftx --lang-scale 0.25 --out "$WORK/s05-last-layer-scale-quarter"
G="--lang-lr 1e-4 --lang-steps 100"  # the gentle, longer language SFT
$B --methods task-only deftx lt-sft $G --out "$WORK/s06-lr1e-4-steps100"
$B --methods task-only deftx $G --lang-k 0.01 --out "$WORK/s08-gentle-k0.01"
$B --methods task-only deftx-src $G --out "$WORK/s11-gentle-src"
$B --methods task-only deftx $G --lang-k 0.1 --out "$WORK/s09-gentle-k0.1"
# post hoc, no training: which part of the vectors costs, and theta0 + phi_task + s (phi_target - phi_source)
py -m benchmarks.research.lang_parts --results "$WORK/s01-fit-head-last-layer.json" \
    --source-results "$WORK/s02-last-layer-src.json" --out "$WORK/parts-last-layer"
py -m benchmarks.research.lang_parts --results "$WORK/s04-layer6.json" --out "$WORK/parts-layer6"
py -m benchmarks.research.lang_parts --results "$WORK/s06-lr1e-4-steps100.json" --source-results "$WORK/s11-gentle-src.json" \
    --parts all none --out "$WORK/parts-gentle"
# what the vectors do to the representations (NusaX-MT valid: movement, alignment with Indonesian)
lang_args() {  # --lang target=vector for the seed-1 deftx runs of one results file
    if [ -n "${DRY_RUN:-}" ]; then echo "--lang javanese=DRY-RUN/vector"; return; fi  # no results file yet
    python - "$1" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(" ".join(f"--lang {x['target']}={x['folder']}/vector" for x in r["runs"]
               if x["kind"] == "language" and x["variant"] == "deftx" and x["seed"] == 1
               and x["target"] != r["settings"]["source"]))
PY
}
task=DRY-RUN
[ -n "${DRY_RUN:-}" ] || task=$(python -c "import json,sys; print(next(x['folder'] for x in json.load(open(sys.argv[1]))['runs'] if x['kind'] == 'task' and x['variant'] == 'deftx'))" "$WORK/s01-fit-head-last-layer.json")
for run in s01-fit-head-last-layer s04-layer6 s06-lr1e-4-steps100; do
    # shellcheck disable=SC2046
    py -m benchmarks.research.lang_diagnostics --task "$task/vector" $(lang_args "$WORK/$run.json") --out "$WORK/diag-$run"
done
py -m benchmarks.research.search_history "$WORK"/s[01]*.json
# the final comparison: 3 seeds, every method (phase 1 shared by the variants of a seed)
py -m benchmarks.crosslingual --model multilingual-e5-small --targets $T --seeds 3 --no-calibrate \
    --work-dir "$WORK" --out "$WORK/final-3seeds"
# the gentle recipe (s06) over 3 seeds, against task-only and LT-SFT
py -m benchmarks.crosslingual --model multilingual-e5-small --targets $T --seeds 3 --no-calibrate \
    --work-dir "$WORK" --methods task-only deftx lt-sft $G --out "$WORK/s10-gentle-3seeds"
