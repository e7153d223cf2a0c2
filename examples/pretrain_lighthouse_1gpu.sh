#!/usr/bin/env bash
# Stage one on one GPU: Megatron-LM pretrain_gpt.py with Lighthouse at 128K context (or, DENSE=1, the same model
# dense: the baseline).
# Variables (environment):
#   MEGATRON_LM_DIR   Megatron-LM checkout (required); patched with patches/apply.sh for the --lighthouse flags,
#                     else the model comes from --spec megatron_lighthouse.env_spec (no switch, no monitor)
#   DATA_PATH         Megatron indexed dataset prefix (required unless MOCK_DATA=1)
#   TOKENIZER_MODEL   HuggingFace tokenizer name or path (required unless MOCK_DATA=1)
#   MOCK_DATA=1       Megatron-LM's mock data and NullTokenizer of VOCAB_SIZE=32000 tokens instead: no dataset, no
#                     tokenizer (a smoke test of the machine)
#   CHECKPOINT_DIR    where checkpoints go (default ./checkpoints/lighthouse; ./checkpoints/dense_baseline with DENSE=1)
#   SEQ_LEN=131072 TOPK=2048 POOLING_FACTOR=4 LEVELS=3 DENSE_LAYERS=0,1,-2,-1   Lighthouse settings (DENSE_LAYERS=
#                     empty: no dense layer)
#   HYBRID_LAYER_PATTERN   a HybridModel of these layers through pretrain_hybrid.py instead (DENSE_LAYERS count its
#                     attention layers; see pretrain_lighthouse_hybrid_1gpu.sh)
#   NUM_LAYERS=30 HIDDEN=1024 HEADS=8 FFN=1536 TRANSFORMER_IMPL=transformer_engine|local   the model (local: no
#                     TransformerEngine needed; the flags for Megatron-LM's TE-only defaults are added; without
#                     Apex, --no-gradient-accumulation-fusion is added, with a note)
#   FP8=hybrid|e4m3   FP8 linear layers through TransformerEngine (Megatron-LM's default recipe); empty: bf16
#   TRAIN_ITERS=10000 GLOBAL_BATCH=32 (sequences per iteration, one per micro-batch)
#   SAVE_INTERVAL=1000 LOG_INTERVAL=10 EVAL_INTERVAL=1000 EVAL_ITERS=10   checkpoints (also at the end), log lines,
#                     validation (also at the end)
#   LR=2e-3 MIN_LR=2e-4 LR_WARMUP_ITERS=2000 LR_DECAY_STYLE=cosine|constant|linear   the learning rate after the
#                     warm-up, and its decay (constant: the published configs' schedule)
#   DENSE_FROM_ITER   both stages in one run: dense from this iteration on (patched Megatron-LM only)
#   DENSE=1           the same model dense from the start (no Lighthouse; TRANSFORMER_IMPL=local uses the package's
#                     dense spec: Megatron-LM's local core attention cannot run 128K); a note names each Lighthouse
#                     setting given, as it is unused
#   MONITOR=1         per-rank GPU monitor, gpu_monitor.jsonl in CHECKPOINT_DIR (patched Megatron-LM; else a
#                     note and no monitor)
#   DRY_RUN=1         validate everything, then print the command (with the variables it needs) instead of running it
#   A variable spelled close to one of these (POOLNG_FACTOR) or a LIGHTHOUSE_* setting is refused before anything.
set -euo pipefail
source "$(dirname "$0")/common.sh"
check_variables DENSE TRAIN_ITERS
: "${DENSE:=0}" "${MONITOR:=0}"
require_switch DENSE
[ "$DENSE" = 0 ] || note_unused "with DENSE=1 (the dense model has no Lighthouse layers)" TOPK POOLING_FACTOR LEVELS DENSE_LAYERS
: "${SEQ_LEN:=131072}" "${TOPK:=2048}" "${POOLING_FACTOR:=4}" "${LEVELS:=3}" "${DENSE_LAYERS=0,1,-2,-1}"
: "${TRAIN_ITERS:=10000}" "${CHECKPOINT_DIR:=./checkpoints/$([ "$DENSE" = 1 ] && echo dense_baseline || echo lighthouse)}"
: "${SAVE_INTERVAL:=1000}" "${LOG_INTERVAL:=10}" "${EVAL_INTERVAL:=1000}" "${EVAL_ITERS:=10}"
require_megatron_lm
data_flags
require_int SEQ_LEN TOPK POOLING_FACTOR LEVELS TRAIN_ITERS
model_flags
optimizer_flags "$TRAIN_ITERS"
run_flags "$TRAIN_ITERS"
monitor_flags
if [ "$DENSE" = 1 ]; then
    [ -z "${DENSE_FROM_ITER:-}" ] || die "DENSE_FROM_ITER=$DENSE_FROM_ITER with DENSE=1: the model is dense from the start; drop one"
    dense_spec_flags
    spec=("${SPEC_FLAGS[@]}")
else
    check_lighthouse "$SEQ_LEN" 1
    lighthouse_model_flags
    spec=("${LH_FLAGS[@]}")
fi
launch torchrun --nproc-per-node 1 "$MEGATRON_LM_DIR/$SCRIPT" "${spec[@]}" "${MODEL_FLAGS[@]}" \
    "${OPT_FLAGS[@]}" "${RUN_FLAGS[@]}" "${DATA_FLAGS[@]}" "${MONITOR_FLAGS[@]}"
