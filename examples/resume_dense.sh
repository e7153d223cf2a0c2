#!/usr/bin/env bash
# Stage two: resume the stage-one Lighthouse checkpoint with dense attention up to TOTAL_ITERS.
# The model must be the stage-one model: set the same SEQ_LEN, NUM_LAYERS, HIDDEN, HEADS, FFN,
# TRANSFORMER_IMPL (and Lighthouse settings, and VOCAB_SIZE with MOCK_DATA=1) as for pretrain_lighthouse_1gpu.sh; for
# a HybridModel (pretrain_lighthouse_hybrid_1gpu.sh) its HYBRID_LAYER_PATTERN, and the script is pretrain_hybrid.py.
#   patched pretrain_gpt.py: the same --lighthouse flags plus --lighthouse-dense-from-iteration DENSE_FROM_ITER
#                            (default 0: every resumed iteration is dense); Lighthouse layers switch off, nothing
#                            is rebuilt, the checkpoint keeps its structure;
#   unpatched:               the dense spec with the same state-dict keys (TE: Megatron's own; local:
#                            --spec megatron_lighthouse.env_spec dense_local_layer_spec, as Megatron-LM's local
#                            core attention cannot run 128K). Any checkpoint of the model loads this way, also a
#                            stage-two one: an ordinary dense model from then on. MEGATRON_SPEC=1: Megatron-LM's own
#                            layer spec, nothing of this package (with TRANSFORMER_IMPL=local only up to
#                            SEQ_LEN=16384: its core attention keeps the [s, s] scores of every head; a HybridModel:
#                            Megatron-LM's hybrid_stack_spec, TransformerEngine only, as with MEGATRON_SPEC=0).
# The learning-rate schedule is this script's (--override-opt_param-scheduler): its decay (LR_DECAY_STYLE) now runs
# to TOTAL_ITERS, continuing from the checkpoint's iteration; without the flag Megatron refuses a checkpoint whose
# schedule was derived from stage one's --train-iters.
# Variables (environment):
#   MEGATRON_LM_DIR, DATA_PATH, TOKENIZER_MODEL   as in pretrain_lighthouse_1gpu.sh (the last two unless MOCK_DATA=1)
#   MOCK_DATA=1 VOCAB_SIZE=32000   Megatron-LM's mock data and NullTokenizer (as in stage one)
#   LIGHTHOUSE_CHECKPOINT  the stage-one checkpoint directory (required)
#   CHECKPOINT_DIR (default ./checkpoints/dense)  TOTAL_ITERS=16000  GPUS_PER_NODE=1  GLOBAL_BATCH=32
#   CP_SIZE=1 CP_COMM_TYPE=p2p   context parallelism as in stage one (pretrain_lighthouse_multinode_1m.sh): CP_SIZE
#                     must divide GPUS_PER_NODE; the Lighthouse settings must fit 2 x CP_SIZE chunks (patched)
#   SAVE_INTERVAL=1000 LOG_INTERVAL=10 EVAL_INTERVAL=1000 EVAL_ITERS=10   checkpoints, log lines, validation
#   SEQ_LEN=131072 TOPK=2048 POOLING_FACTOR=4 LEVELS=3 DENSE_LAYERS=0,1,-2,-1 (empty: none) DENSE_FROM_ITER=0
#   NUM_LAYERS=30 HIDDEN=1024 HEADS=8 FFN=1536 TRANSFORMER_IMPL=transformer_engine|local FP8=hybrid|e4m3|empty
#   HYBRID_LAYER_PATTERN   stage one's pattern when it trained a HybridModel (pretrain_hybrid.py); empty: GPT
#   LR=2e-3 MIN_LR=2e-4 LR_WARMUP_ITERS=2000 LR_DECAY_STYLE=cosine|constant|linear   the learning rate after the
#                     warm-up, and its decay (constant: the published configs' schedule)
#   MEGATRON_SPEC=0   1: unpatched only, Megatron-LM's own layer spec (see above)
#   DRY_RUN=1         validate everything, then print the command instead of running it
#   A variable spelled close to one of these (POOLNG_FACTOR) or a LIGHTHOUSE_* setting is refused before anything.
set -euo pipefail
source "$(dirname "$0")/common.sh"
check_variables LIGHTHOUSE_CHECKPOINT TOTAL_ITERS GPUS_PER_NODE MEGATRON_SPEC CP_SIZE CP_COMM_TYPE
: "${SEQ_LEN:=131072}" "${TOPK:=2048}" "${POOLING_FACTOR:=4}" "${LEVELS:=3}" "${DENSE_LAYERS=0,1,-2,-1}"
: "${CHECKPOINT_DIR:=./checkpoints/dense}" "${TOTAL_ITERS:=16000}" "${GPUS_PER_NODE:=1}"
: "${SAVE_INTERVAL:=1000}" "${LOG_INTERVAL:=10}" "${EVAL_INTERVAL:=1000}" "${EVAL_ITERS:=10}"
: "${MEGATRON_SPEC:=0}"
require_switch MEGATRON_SPEC
require_megatron_lm
data_flags
require_set LIGHTHOUSE_CHECKPOINT
[ -d "$LIGHTHOUSE_CHECKPOINT" ] || die "LIGHTHOUSE_CHECKPOINT=$LIGHTHOUSE_CHECKPOINT: no such directory"
require_int TOTAL_ITERS GPUS_PER_NODE SEQ_LEN TOPK POOLING_FACTOR LEVELS
model_flags
optimizer_flags "$TOTAL_ITERS"
run_flags "$TOTAL_ITERS"
context_parallel_flags "$GPUS_PER_NODE" "$GPUS_PER_NODE" GPUS_PER_NODE
if is_patched; then
    [ "$MEGATRON_SPEC" = 0 ] || die "MEGATRON_SPEC=1 needs the unpatched $SCRIPT (the patched one builds the model from its --lighthouse flags)"
    : "${DENSE_FROM_ITER:=0}"
    check_lighthouse_cp
    lighthouse_model_flags
    spec=("${LH_FLAGS[@]}")
else
    [ -z "${DENSE_FROM_ITER:-}" ] || die "DENSE_FROM_ITER needs the patched $SCRIPT (patches/apply.sh $MEGATRON_LM_DIR); unpatched, every resumed iteration is dense"
    dense_spec_flags
    spec=("${SPEC_FLAGS[@]}")
    if [ "$MEGATRON_SPEC" = 1 ] && [ -n "$HYBRID_LAYER_PATTERN" ]; then  # Megatron's hybrid_stack_spec: SPEC_FLAGS
        [ "$TRANSFORMER_IMPL" != local ] || die "MEGATRON_SPEC=1 with HYBRID_LAYER_PATTERN and TRANSFORMER_IMPL=local: Megatron-LM's hybrid stack spec is TransformerEngine's throughout (its final norm too); use TRANSFORMER_IMPL=transformer_engine, or MEGATRON_SPEC=0 for the package's dense local hybrid stack"
    elif [ "$MEGATRON_SPEC" = 1 ]; then
        [ "$TRANSFORMER_IMPL" != local ] || (( SEQ_LEN <= 16384 )) || die "MEGATRON_SPEC=1 with TRANSFORMER_IMPL=local and SEQ_LEN=$SEQ_LEN: Megatron-LM's local core attention keeps the [s, s] scores of every head; use SEQ_LEN <= 16384 (a RoPE model loads at any length)"
        [ "$TRANSFORMER_IMPL" != local ] || (( CP_SIZE == 1 )) || die "MEGATRON_SPEC=1 with TRANSFORMER_IMPL=local and CP_SIZE=$CP_SIZE: Megatron-LM's local core attention has no context parallelism; use MEGATRON_SPEC=0 (the package's dense local spec) or TRANSFORMER_IMPL=transformer_engine"
        spec=()
    fi
fi
launch torchrun --nproc-per-node "$GPUS_PER_NODE" "$MEGATRON_LM_DIR/$SCRIPT" "${spec[@]}" "${MODEL_FLAGS[@]}" \
    "${OPT_FLAGS[@]}" "${CP_FLAGS[@]}" "${RUN_FLAGS[@]}" --override-opt_param-scheduler "${DATA_FLAGS[@]}" \
    --load "$LIGHTHOUSE_CHECKPOINT"
