#!/usr/bin/env bash
# Issue 7's quality runs on one GPU machine: one bench_quality.py invocation per variant, all side by side, each
# running its seeds in parallel processes; then one report merged from every process's own (it survives an
# invocation cut short by TIMEOUT_S). $OUT/NAME (benchmarks/results/NAME without $OUT) gets five files, within what
# the device tool brings back: the merged quality.json, quality.png and merged.log, nvidia_smi.txt, and runs.tar.gz
# with every process's report, plot and log (no checkpoints), refreshed every 30 s while the runs go.
#
#   bash benchmarks/run_quality_gpu.sh NAME "SEEDS" "VARIANT=DEMO FLAGS" ... [-- SHARED DEMO FLAGS]
#   bash benchmarks/run_quality_gpu.sh stagger "0 1 2" "dense=--mode dense" \
#       "two-stage-37=--mode two-stage --dense-layers 0,1,-2,-1 --dense-fraction 0.375"
#
# Shared flags default to docs/RESULTS.md's 16K standard-library runs (1,200 steps). Environment: TIMEOUT_S (per
# invocation, default 540), CORPUS=site-packages (read the directory that holds torch instead of the standard
# library), OMP_NUM_THREADS (default: the cores divided by the processes).
set -uo pipefail
cd "$(dirname "$0")/.."
[ $# -ge 3 ] || { echo "usage: $0 NAME \"SEEDS\" \"VARIANT=FLAGS\"... [-- SHARED FLAGS]" >&2; exit 2; }
NAME=$1 SEEDS=$2
shift 2
VARIANTS=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do VARIANTS+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
SHARED=("$@")
if [ ${#SHARED[@]} -eq 0 ]; then
    SHARED=(--device cuda --seq-len 16384 --levels 3 --pooling-factor 4 --topk 256 --layers 6 --hidden 256 --heads 4
            --ffn 768 --dense-layers 0,-1 --batch-size 2 --steps 1200 --eval-every 100 --eval-batches 16
            --log-every 100 --corpus-bytes 40000000 --lr 2e-3 --warmup 60)
fi
if [ "${CORPUS:-}" = site-packages ]; then
    SHARED+=(--corpus "$(python3 -c 'import os, torch; print(os.path.dirname(os.path.dirname(torch.__file__)))')")
fi
read -r -a SEED_LIST <<< "$SEEDS"
PROCESSES=$(( ${#VARIANTS[@]} * ${#SEED_LIST[@]} ))
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( $(nproc) / PROCESSES > 0 ? $(nproc) / PROCESSES : 1 ))}
WORK=/tmp/lighthouse_quality/$NAME
DEST=${OUT:+$OUT/$NAME}
DEST=${DEST:-benchmarks/results/$NAME}
rm -rf "$WORK" && mkdir -p "$WORK" "$DEST"
python3 -c 'import torch, megatron.core as m; print("torch", torch.__version__, "megatron-core", m.__version__)'
if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$DEST/nvidia_smi.txt"
fi
echo "$PROCESSES processes, OMP_NUM_THREADS=$OMP_NUM_THREADS, shared flags: ${SHARED[*]}"
copy_back() {  # reports, plots and logs only, in one archive: the checkpoints stay behind
    (cd "$WORK" && find . \( -name '*.json' -o -name '*.png' -o -name '*.log' \) -print0 \
        | tar --null -czf "$DEST/runs.tar.gz.tmp" -T -) && mv "$DEST/runs.tar.gz.tmp" "$DEST/runs.tar.gz"
}
(while sleep 30; do copy_back; done) &  # so a call cut short still brings back what has run
COPIER=$!
for variant in "${VARIANTS[@]}"; do
    dir="$WORK/${variant%%=*}"
    timeout "${TIMEOUT_S:-540}" python3 benchmarks/bench_quality.py --out-dir "$dir" --seeds $SEEDS \
        --processes "${#SEED_LIST[@]}" --variant "$variant" -- "${SHARED[@]}" > "$WORK/${variant%%=*}.log" 2>&1 &
done
wait $(jobs -p | grep -v "^$COPIER$")
reports=()  # in the order given: the first variant is the baseline
for variant in "${VARIANTS[@]}"; do
    for report in "$WORK/${variant%%=*}"/part*/quality.json; do [ -e "$report" ] && reports+=("$report"); done
done
status=0
if [ ${#reports[@]} -gt 0 ]; then
    python3 benchmarks/bench_quality.py --out-dir "$WORK" --merge "${reports[@]}" | tee "$WORK/merged.log" || status=1
else
    echo "no run wrote a report" >&2; status=1
fi
kill "$COPIER" 2>/dev/null
copy_back
for file in quality.json quality.png merged.log; do [ -e "$WORK/$file" ] && cp "$WORK/$file" "$DEST/"; done
tail -n 3 "$WORK"/*.log
exit $status
