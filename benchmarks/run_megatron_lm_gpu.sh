#!/usr/bin/env bash
# The Megatron-LM user path on one GPU in one command, through the launch examples as a user runs them, at 128K
# tokens with Megatron-LM's mock data, on the local implementation (TRANSFORMER_IMPL=local, no TransformerEngine) or
# on TransformerEngine (TRANSFORMER_IMPL=transformer_engine), for a GPT model (MODEL=gpt: pretrain_gpt.py,
# examples/pretrain_lighthouse_1gpu.sh) or a HybridModel (MODEL=hybrid: pretrain_hybrid.py,
# examples/pretrain_lighthouse_hybrid_1gpu.sh, HYBRID_LAYER_PATTERN, default '*-' per layer of NUM_LAYERS: NUM_LAYERS
# attention layers, the first two and last two dense):
#   a_lighthouse       examples/pretrain_lighthouse_1gpu.sh, patched pretrain_gpt.py, MONITOR=1: ITERS_A
#                      Lighthouse iterations, checkpoint at the end
#   e_monitor_report   python -m megatron_lighthouse.monitor report on stage a's gpu_monitor.jsonl: gpu_monitor.png
#   b_resume_dense     examples/resume_dense.sh, patched: stage a's checkpoint, --lighthouse-dense-from-iteration
#                      ITERS_A (the switch is logged), ITERS_B dense iterations, checkpoint
#   d_unpatched_dense  examples/resume_dense.sh with the pristine (unpatched) script: stage b's checkpoint as an
#                      ordinary dense model, ITERS_D more iterations (the loss continues from stage b's)
#   c_dense_scratch    examples/pretrain_lighthouse_1gpu.sh DENSE=1, patched: the same model dense from scratch,
#                      ITERS_C iterations (the baseline)
#   f_lighthouse_fp8   with FP8_FORMAT set (TransformerEngine only): stage a's run with FP8=FP8_FORMAT (FP8 linear
#                      layers, Megatron-LM's default recipe), ITERS_F iterations; its lm loss against stage a's
#   g_dense_fp8        with FP8_FORMAT set: stage c's run with FP8=FP8_FORMAT, ITERS_G iterations (the FP8 baseline)
#   h_gpt_to_hybrid    MODEL=gpt, when STAGES names it: stage b again, as a HybridModel: stage a's Lighthouse GPT
#                      checkpoint through Megatron-LM's GPT -> Hybrid load (its migration guide's option A) into the
#                      patched pretrain_hybrid.py ('*-' per GPT layer, the same Lighthouse settings, dense from
#                      ITERS_A); its lm loss against stage b's (the same when weights and optimizer state carry over)
# Stage d runs Megatron-LM's own layer spec (MEGATRON_SPEC=1: nothing of this package builds the model) at D_SEQ_LEN
# tokens: with TransformerEngine the full SEQ_LEN (a HybridModel: Megatron-LM's hybrid_stack_spec); locally 8192, as
# Megatron's local core attention materializes [b, h, s, s] scores (275 GB in bf16 for 8 heads at 131072 tokens),
# and a RoPE model loads at any length (Megatron-LM compares no sequence length with NullTokenizer). A local
# HybridModel has no Megatron-LM spec (its hybrid stack is TransformerEngine's throughout): stage d takes the
# package's dense local hybrid stack, unpatched, at the full SEQ_LEN. Without Apex, the examples pass
# --no-gradient-accumulation-fusion themselves.
# Then benchmarks/megatron_log.py reads Megatron-LM's log lines of every stage (ms per iteration, lm loss, memory;
# the FP8 stages' lm loss against bf16) into a table (stdout, megatron_lm_gpu.txt) and megatron_lm_gpu.json.
#
# Usage: bash benchmarks/run_megatron_lm_gpu.sh MEGATRON_LM_DIR [OUT_DIR]
#   MEGATRON_LM_DIR   a Megatron-LM checkout (pretrain_gpt.py, pretrain_hybrid.py, megatron/, ...; verified at the
#                     commits of patches/apply.sh), patched or not; never changed: it is copied twice into
#                     WORK_DIR, one copy patched (patches/apply.sh), one pristine
#   OUT_DIR           results (default $OUT, else benchmarks/results/megatron_lm_gpu, or megatron_lm_hybrid_gpu with
#                     MODEL=hybrid): megatron_lm_gpu.json,
#                     megatron_lm_gpu.txt, gpu_monitor.png, megatron_lm_gpu_logs.tar.gz (the stage logs, their
#                     status table and the monitor's gpu_monitor.jsonl; in OUT_DIR/logs only while the stages run)
# Variables: NUM_LAYERS=8 SEQ_LEN=131072 VOCAB_SIZE=32000 TRANSFORMER_IMPL=local|transformer_engine MODEL=gpt|hybrid
#   HYBRID_LAYER_PATTERN   MODEL=hybrid's layers (default '*-' NUM_LAYERS times)
#   ITERS_A=4 ITERS_B=2 ITERS_C=ITERS_A+ITERS_B ITERS_D=2 ITERS_F=ITERS_A ITERS_G=ITERS_C   iterations per stage
#   FP8_FORMAT=       hybrid or e4m3: also run stages f and g (TRANSFORMER_IMPL=transformer_engine); empty: not
#   STAGES="a e b d c f g"   the stages to run, in this order (a stage whose input is missing is skipped, saying so);
#                     h only with MODEL=gpt
#   D_SEQ_LEN         stage d's sequence length (default: SEQ_LEN, but 8192 for a local GPT model)
#   BUDGET_S=560      seconds for everything; each stage's timeout is cut to what is left (minus RESERVE_S=25 for
#                     the report) TIMEOUT_A=240 TIMEOUT_B=150 TIMEOUT_C=150 TIMEOUT_D=150 TIMEOUT_E=60
#                     TIMEOUT_F=TIMEOUT_A TIMEOUT_G=TIMEOUT_C
#   WORK_DIR          copies and checkpoints (default: a new directory under ${TMPDIR:-/tmp}; kept)
#   PYTHON=python3    DRY_RUN=1: set up and print each stage's command (the examples' DRY_RUN), run no stage
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
die() { echo "error: $*" >&2; exit 2; }
[ $# -ge 1 ] && [ $# -le 2 ] || die "usage: $0 MEGATRON_LM_DIR [OUT_DIR]"
SRC=$1
[ -f "$SRC/pretrain_gpt.py" ] && [ -d "$SRC/megatron" ] || die "MEGATRON_LM_DIR=$SRC: not a Megatron-LM checkout (pretrain_gpt.py, megatron/)"
: "${NUM_LAYERS:=8}" "${SEQ_LEN:=131072}" "${VOCAB_SIZE:=32000}" "${TRANSFORMER_IMPL:=local}" "${FP8_FORMAT:=}"
: "${MODEL:=gpt}"
[[ "$NUM_LAYERS" =~ ^[1-9][0-9]*$ ]] || die "NUM_LAYERS=$NUM_LAYERS: must be a positive integer"
case "$MODEL" in
    gpt) EXAMPLE=pretrain_lighthouse_1gpu.sh MODEL_ENV=()
         OUT_DIR=${2:-${OUT:-$REPO/benchmarks/results/megatron_lm_gpu}} ;;
    hybrid) [ -f "$SRC/pretrain_hybrid.py" ] || die "MODEL=hybrid: $SRC has no pretrain_hybrid.py (Megatron-LM 0.19 or later)"
            : "${HYBRID_LAYER_PATTERN:=$(printf '*-%.0s' $(seq "$NUM_LAYERS"))}"
            EXAMPLE=pretrain_lighthouse_hybrid_1gpu.sh MODEL_ENV=("HYBRID_LAYER_PATTERN=$HYBRID_LAYER_PATTERN")
            OUT_DIR=${2:-${OUT:-$REPO/benchmarks/results/megatron_lm_hybrid_gpu}} ;;
    *) die "MODEL=$MODEL: must be gpt or hybrid" ;;
esac
# Stage d with Megatron-LM's own spec, but for a local HybridModel (Megatron-LM has no local hybrid stack).
MEGATRON_SPEC=1
case "$TRANSFORMER_IMPL" in
    local) if [ "$MODEL" = gpt ]; then : "${D_SEQ_LEN:=8192}"; else : "${D_SEQ_LEN:=$SEQ_LEN}"; MEGATRON_SPEC=0; fi ;;
    transformer_engine) : "${D_SEQ_LEN:=$SEQ_LEN}" ;;
    *) die "TRANSFORMER_IMPL=$TRANSFORMER_IMPL: must be local or transformer_engine" ;;
esac
case "$FP8_FORMAT" in
    "") : "${STAGES:=a e b d c}" ;;
    hybrid|e4m3) [ "$TRANSFORMER_IMPL" = transformer_engine ] \
        || die "FP8_FORMAT=$FP8_FORMAT with TRANSFORMER_IMPL=$TRANSFORMER_IMPL: FP8 needs TransformerEngine"
        : "${STAGES:=a e b d c f g}" ;;
    *) die "FP8_FORMAT=$FP8_FORMAT: must be hybrid, e4m3 or empty (no FP8 stages)" ;;
esac
: "${ITERS_A:=4}" "${ITERS_B:=2}" "${ITERS_D:=2}" "${BUDGET_S:=560}" "${RESERVE_S:=25}"
: "${ITERS_C:=$((ITERS_A + ITERS_B))}" "${ITERS_F:=$ITERS_A}"
: "${ITERS_G:=$ITERS_C}"
: "${TIMEOUT_A:=240}" "${TIMEOUT_B:=150}" "${TIMEOUT_C:=150}" "${TIMEOUT_D:=150}" "${TIMEOUT_E:=60}"
: "${TIMEOUT_F:=$TIMEOUT_A}" "${TIMEOUT_G:=$TIMEOUT_C}"
: "${PYTHON:=python3}" "${DRY_RUN:=0}"
for v in NUM_LAYERS SEQ_LEN D_SEQ_LEN VOCAB_SIZE ITERS_A ITERS_B ITERS_C ITERS_D ITERS_F ITERS_G BUDGET_S TIMEOUT_A \
         TIMEOUT_B TIMEOUT_C TIMEOUT_D TIMEOUT_E TIMEOUT_F TIMEOUT_G; do
    [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || die "$v=${!v}: must be a positive integer"
done
[[ "$RESERVE_S" =~ ^[0-9]+$ ]] || die "RESERVE_S=$RESERVE_S: must be an integer >= 0"
[[ "$DRY_RUN" =~ ^[01]$ ]] || die "DRY_RUN=$DRY_RUN: must be 0 or 1"
for stage in $STAGES; do
    case "$stage" in
        a|b|c|d|e) ;;
        f|g) [ -n "$FP8_FORMAT" ] || die "STAGES=$STAGES: stage $stage is an FP8 stage; set FP8_FORMAT (hybrid or e4m3)" ;;
        h) [ "$MODEL" = gpt ] || die "STAGES=$STAGES: stage h loads stage a's GPT checkpoint into a HybridModel; it needs MODEL=gpt" ;;
        *) die "STAGES=$STAGES: $stage is not a stage (a e b d c f g h)" ;;
    esac
done
[ -n "$STAGES" ] || die "STAGES is empty: name the stages to run (a e b d c f g h)"
START=$SECONDS

WORK=${WORK_DIR:-$(mktemp -d "${TMPDIR:-/tmp}/megatron_lm_gpu.XXXXXX")}
LOGS=$OUT_DIR/logs
mkdir -p "$WORK" "$LOGS" || die "cannot create $WORK or $LOGS"
PATCHED=$WORK/megatron-lm-patched PRISTINE=$WORK/megatron-lm-pristine
CKPT_A=$WORK/ckpt_a_lighthouse CKPT_B=$WORK/ckpt_b_resume_dense CKPT_C=$WORK/ckpt_c_dense_scratch
CKPT_D=$WORK/ckpt_d_unpatched_dense
STATUS=$LOGS/stages.tsv
printf 'stage\trc\tseconds\n' > "$STATUS"
export PYTHONPATH="$REPO:$REPO/kernels${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# NVLink multicast stays off on shared hosts (one GPU here, but Megatron-LM still sets up NCCL).
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

# -- setup: the two copies, the patch, the dataset helpers, torchrun ------------------------------------------
{
    echo "repo $REPO  Megatron-LM $SRC  work $WORK  out $OUT_DIR"
    if [ "$DRY_RUN" = 0 ]; then
        "$PYTHON" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available())'
        "$PYTHON" -c 'import importlib.util as u; print("python modules missing:", [m for m in ("triton", "einops", "pybind11", "pynvml", "matplotlib") if u.find_spec(m) is None] or "none")'
        nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
        # Megatron-LM compiles its dataset helpers at start-up; once here, before the copies, so no stage pays.
        make -C "$SRC/megatron/core/datasets" 2>&1 | tail -n 2
    fi
    rm -rf "$PATCHED" "$PRISTINE"
    # -a keeps the times: the compiled helpers stay newer than their source, so no stage's make rebuilds them.
    cp -a "$SRC" "$PATCHED" && cp -a "$SRC" "$PRISTINE" || die "cannot copy $SRC into $WORK"
    for script in pretrain_gpt.py pretrain_hybrid.py; do  # where the given checkout was patched already
        [ -f "$PRISTINE/$script" ] && grep -q megatron_lighthouse "$PRISTINE/$script" || continue
        (cd "$PRISTINE" && git apply --reverse --include="$script" "$REPO/patches/megatron_lm_lighthouse.patch") \
            || die "$SRC/$script carries the hook and the patch does not reverse: give an unpatched checkout"
    done
    bash "$REPO/patches/apply.sh" "$PATCHED" || die "patches/apply.sh $PATCHED failed"
    mkdir -p "$CKPT_A" "$CKPT_B" "$CKPT_C" "$CKPT_D" "$WORK/ckpt_f_lighthouse_fp8" "$WORK/ckpt_g_dense_fp8" \
        "$WORK/ckpt_h_gpt_to_hybrid"
} 2>&1 | tee "$LOGS/setup.log"
[ "${PIPESTATUS[0]}" = 0 ] || exit 2
if ! command -v torchrun >/dev/null; then  # the examples call torchrun; some installs lack the entry point
    mkdir -p "$WORK/bin"
    printf '#!/usr/bin/env bash\nexec %q -m torch.distributed.run "$@"\n' "$PYTHON" > "$WORK/bin/torchrun"
    chmod +x "$WORK/bin/torchrun"
    export PATH="$WORK/bin:$PATH"
fi

# Settings of every stage: the examples' variables (one model; a short run: no warm-up to wait for, constant LR;
# bf16 unless the stage sets FP8).
COMMON=(MOCK_DATA=1 "VOCAB_SIZE=$VOCAB_SIZE" "TRANSFORMER_IMPL=$TRANSFORMER_IMPL" "NUM_LAYERS=$NUM_LAYERS"
        "SEQ_LEN=$SEQ_LEN" GLOBAL_BATCH=1 LOG_INTERVAL=1 EVAL_INTERVAL=1000 EVAL_ITERS=1 SAVE_INTERVAL=1000
        LR_WARMUP_ITERS=1 LR_DECAY_STYLE=constant FP8= "DRY_RUN=$DRY_RUN" "${MODEL_ENV[@]}")

# stage NAME TIMEOUT CMD...: run CMD (under timeout, cut to the budget left), log to LOGS/NAME.log, record its rc.
stage() {
    local name=$1 limit=$2 left rc begin=$SECONDS
    shift 2
    left=$((BUDGET_S - (SECONDS - START) - RESERVE_S))
    (( limit < left )) || limit=$left
    echo "== $name (timeout ${limit}s): $*"
    if (( limit < 10 )); then
        echo "skipped: ${left}s of BUDGET_S=$BUDGET_S left" | tee "$LOGS/$name.log"
        printf '%s\tskipped\t0\n' "$name" >> "$STATUS"
        return 1
    fi
    if [ "$DRY_RUN" = 1 ]; then
        "$@" 2>&1 | tee "$LOGS/$name.log"
    else
        timeout --kill-after=20 "$limit" "$@" 2>&1 | tee "$LOGS/$name.log"
    fi
    rc=${PIPESTATUS[0]}
    [ "$rc" = 124 ] && echo "== $name: timed out after ${limit}s" | tee -a "$LOGS/$name.log"
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - begin))" >> "$STATUS"
    return "$rc"
}
# skip NAME WHY: record a stage that cannot run.
skip() { echo "== $1: skipped: $2" | tee "$LOGS/$1.log"; printf '%s\tskipped\t0\n' "$1" >> "$STATUS"; }
# has_checkpoint DIR: Megatron-LM saved a checkpoint there (or a dry run would have).
has_checkpoint() { [ "$DRY_RUN" = 1 ] || [ -s "$1/latest_checkpointed_iteration.txt" ]; }

MONITOR_LOG=$CKPT_A/gpu_monitor.jsonl
run_a() {
    stage a_lighthouse "$TIMEOUT_A" env "${COMMON[@]}" "MEGATRON_LM_DIR=$PATCHED" "CHECKPOINT_DIR=$CKPT_A" \
        "TRAIN_ITERS=$ITERS_A" MONITOR=1 bash "$REPO/examples/$EXAMPLE"
}
run_e() {
    if [ "$DRY_RUN" = 1 ] || [ -s "$MONITOR_LOG" ]; then
        local dry_echo=(); [ "$DRY_RUN" = 0 ] || dry_echo=(echo)  # the examples print themselves under DRY_RUN=1
        stage e_monitor_report "$TIMEOUT_E" "${dry_echo[@]}" "$PYTHON" -m megatron_lighthouse.monitor report \
            "$MONITOR_LOG" --out "$OUT_DIR/gpu_monitor.png"
    else
        skip e_monitor_report "no $MONITOR_LOG (stage a failed or did not run, or NVML is missing)"
    fi
    [ ! -s "$MONITOR_LOG" ] || cp "$MONITOR_LOG" "$LOGS/"  # into the logs archive: the PNG can be redrawn from it
}
run_b() {
    if has_checkpoint "$CKPT_A"; then
        stage b_resume_dense "$TIMEOUT_B" env "${COMMON[@]}" "MEGATRON_LM_DIR=$PATCHED" "LIGHTHOUSE_CHECKPOINT=$CKPT_A" \
            "CHECKPOINT_DIR=$CKPT_B" "TOTAL_ITERS=$((ITERS_A + ITERS_B))" "DENSE_FROM_ITER=$ITERS_A" \
            bash "$REPO/examples/resume_dense.sh"
    else
        skip b_resume_dense "stage a saved no checkpoint in $CKPT_A"
    fi
}
run_d() {
    if has_checkpoint "$CKPT_B"; then
        stage d_unpatched_dense "$TIMEOUT_D" env "${COMMON[@]}" "MEGATRON_LM_DIR=$PRISTINE" "LIGHTHOUSE_CHECKPOINT=$CKPT_B" \
            "CHECKPOINT_DIR=$CKPT_D" "TOTAL_ITERS=$((ITERS_A + ITERS_B + ITERS_D))" "MEGATRON_SPEC=$MEGATRON_SPEC" \
            "SEQ_LEN=$D_SEQ_LEN" \
            bash "$REPO/examples/resume_dense.sh"
    else
        skip d_unpatched_dense "stage b saved no checkpoint in $CKPT_B"
    fi
}
run_c() {
    stage c_dense_scratch "$TIMEOUT_C" env "${COMMON[@]}" "MEGATRON_LM_DIR=$PATCHED" "CHECKPOINT_DIR=$CKPT_C" \
        "TRAIN_ITERS=$ITERS_C" DENSE=1 bash "$REPO/examples/$EXAMPLE"
}
run_f() {
    stage f_lighthouse_fp8 "$TIMEOUT_F" env "${COMMON[@]}" "FP8=$FP8_FORMAT" "MEGATRON_LM_DIR=$PATCHED" \
        "CHECKPOINT_DIR=$WORK/ckpt_f_lighthouse_fp8" "TRAIN_ITERS=$ITERS_F" bash "$REPO/examples/$EXAMPLE"
}
run_g() {
    stage g_dense_fp8 "$TIMEOUT_G" env "${COMMON[@]}" "FP8=$FP8_FORMAT" "MEGATRON_LM_DIR=$PATCHED" \
        "CHECKPOINT_DIR=$WORK/ckpt_g_dense_fp8" "TRAIN_ITERS=$ITERS_G" DENSE=1 bash "$REPO/examples/$EXAMPLE"
}
run_h() {
    if has_checkpoint "$CKPT_A"; then
        stage h_gpt_to_hybrid "$TIMEOUT_B" env "${COMMON[@]}" "HYBRID_LAYER_PATTERN=$(printf '*-%.0s' $(seq "$NUM_LAYERS"))" \
            "MEGATRON_LM_DIR=$PATCHED" "LIGHTHOUSE_CHECKPOINT=$CKPT_A" "CHECKPOINT_DIR=$WORK/ckpt_h_gpt_to_hybrid" \
            "TOTAL_ITERS=$((ITERS_A + ITERS_B))" "DENSE_FROM_ITER=$ITERS_A" bash "$REPO/examples/resume_dense.sh"
    else
        skip h_gpt_to_hybrid "stage a saved no checkpoint in $CKPT_A"
    fi
}
for name in $STAGES; do
    "run_$name"
done

# -- report: the table and JSON from Megatron-LM's own log lines, the logs in one archive ----------------------
parse=("$PYTHON" "$REPO/benchmarks/megatron_log.py" --status "$STATUS" --json "$OUT_DIR/megatron_lm_gpu.json")
for name in a_lighthouse b_resume_dense d_unpatched_dense c_dense_scratch f_lighthouse_fp8 g_dense_fp8 h_gpt_to_hybrid; do
    [ -f "$LOGS/$name.log" ] && parse+=("$name=$LOGS/$name.log")
done
# FP8 against bf16 from the same seed; the GPT checkpoint's stage two as a HybridModel against the GPT's
for pair in a_lighthouse:f_lighthouse_fp8 c_dense_scratch:g_dense_fp8 b_resume_dense:h_gpt_to_hybrid; do
    [ -f "$LOGS/${pair%%:*}.log" ] && [ -f "$LOGS/${pair##*:}.log" ] && parse+=(--compare-loss "$pair")
done
echo "== report: ${parse[*]}"
"${parse[@]}" | tee "$OUT_DIR/megatron_lm_gpu.txt"
report=${PIPESTATUS[0]}
failed=$(awk -F'\t' 'NR > 1 && $2 != "0" { printf " %s", $1 }' "$STATUS")
tar -czf "$OUT_DIR/megatron_lm_gpu_logs.tar.gz" -C "$OUT_DIR" logs && rm -rf "$LOGS"
echo "== done in $((SECONDS - START))s; in $OUT_DIR:" $(ls "$OUT_DIR")
[ -z "$failed" ] || { echo "== stages that did not finish:$failed" >&2; exit 1; }
exit "$report"
