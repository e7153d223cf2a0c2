#!/usr/bin/env bash
# Stage two: resume the stage-one Lighthouse checkpoint with dense attention up to TOTAL_ITERS.
# The model must be the stage-one model: set the same SEQ_LEN, NUM_LAYERS, HIDDEN, HEADS, FFN,
# TRANSFORMER_IMPL (and Lighthouse settings) as for pretrain_lighthouse_1gpu.sh.
#   patched pretrain_gpt.py: the same --lighthouse flags plus --lighthouse-dense-from-iteration DENSE_FROM_ITER
#                            (default 0: every resumed iteration is dense); Lighthouse layers switch off, nothing
#                            is rebuilt, the checkpoint keeps its structure;
#   unpatched:               the dense spec with the same state-dict keys (TE: Megatron's own; local:
#                            --spec megatron_lighthouse.env_spec dense_local_layer_spec).
# The learning-rate schedule is this script's (--override-opt_param-scheduler): its decay (LR_DECAY_STYLE) now runs
# to TOTAL_ITERS, continuing from the checkpoint's iteration; without the flag Megatron refuses a checkpoint whose
# schedule was derived from stage one's --train-iters.
# Variables (environment):
#   MEGATRON_LM_DIR, DATA_PATH, TOKENIZER_MODEL   as in pretrain_lighthouse_1gpu.sh (required)
#   LIGHTHOUSE_CHECKPOINT  the stage-one checkpoint directory (required)
#   CHECKPOINT_DIR (default ./checkpoints/dense)  TOTAL_ITERS=16000  GPUS_PER_NODE=1
#   SEQ_LEN=131072 TOPK=2048 POOLING_FACTOR=4 LEVELS=3 DENSE_LAYERS=0,1,-2,-1 DENSE_FROM_ITER=0
#   NUM_LAYERS=30 HIDDEN=1024 HEADS=8 FFN=1536 TRANSFORMER_IMPL=transformer_engine|local
#   LR=2e-3 LR_DECAY_STYLE=cosine|constant|linear   the learning rate after 2,000 warm-up iterations, and its decay
#                     (constant: the published configs' schedule)
#   DRY_RUN=1         validate everything, then print the command instead of running it
set -euo pipefail
source "$(dirname "$0")/common.sh"
: "${SEQ_LEN:=131072}" "${TOPK:=2048}" "${POOLING_FACTOR:=4}" "${LEVELS:=3}" "${DENSE_LAYERS:=0,1,-2,-1}"
: "${CHECKPOINT_DIR:=./checkpoints/dense}" "${TOTAL_ITERS:=16000}" "${GPUS_PER_NODE:=1}"
require_megatron_lm
require_set DATA_PATH TOKENIZER_MODEL LIGHTHOUSE_CHECKPOINT
[ -d "$LIGHTHOUSE_CHECKPOINT" ] || die "LIGHTHOUSE_CHECKPOINT=$LIGHTHOUSE_CHECKPOINT: no such directory"
require_int TOTAL_ITERS GPUS_PER_NODE SEQ_LEN TOPK POOLING_FACTOR LEVELS
model_flags
optimizer_flags
if is_patched; then
    : "${DENSE_FROM_ITER:=0}"
    check_lighthouse "$SEQ_LEN" 1
    lighthouse_model_flags
    spec=("${LH_FLAGS[@]}")
else
    [ -z "${DENSE_FROM_ITER:-}" ] || die "DENSE_FROM_ITER needs the patched pretrain_gpt.py (patches/apply.sh $MEGATRON_LM_DIR); unpatched, every resumed iteration is dense"
    case "$TRANSFORMER_IMPL" in
        local) spec=(--spec megatron_lighthouse.env_spec dense_local_layer_spec) ;;
        transformer_engine) spec=() ;;  # Megatron's own TE spec: the keys of the Lighthouse TE spec
    esac
fi
launch torchrun --nproc-per-node "$GPUS_PER_NODE" "$MEGATRON_LM_DIR/pretrain_gpt.py" "${spec[@]}" "${MODEL_FLAGS[@]}" \
    --micro-batch-size 1 --global-batch-size 32 \
    --recompute-granularity full --recompute-method uniform --recompute-num-layers 1 \
    "${OPT_FLAGS[@]}" --bf16 --train-iters "$TOTAL_ITERS" \
    --override-opt_param-scheduler \
    --data-path "$DATA_PATH" --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER_MODEL" \
    --load "$LIGHTHOUSE_CHECKPOINT" --save "$CHECKPOINT_DIR" --save-interval 1000 --log-interval 10
