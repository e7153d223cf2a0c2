#!/usr/bin/env bash
# Stage one on one GPU: Megatron-LM pretrain_gpt.py with Lighthouse at 128K context.
# Variables (environment):
#   MEGATRON_LM_DIR   Megatron-LM checkout (required); patched with patches/apply.sh for the --lighthouse flags,
#                     else the model comes from --spec megatron_lighthouse.env_spec (no switch, no monitor)
#   DATA_PATH         Megatron indexed dataset prefix (required)
#   TOKENIZER_MODEL   HuggingFace tokenizer name or path (required)
#   CHECKPOINT_DIR    where checkpoints go (default ./checkpoints/lighthouse)
#   SEQ_LEN=131072 TOPK=2048 POOLING_FACTOR=4 LEVELS=3 DENSE_LAYERS=0,1,-2,-1   Lighthouse settings
#   NUM_LAYERS=30 HIDDEN=1024 HEADS=8 FFN=1536 TRANSFORMER_IMPL=transformer_engine|local   the model
#   TRAIN_ITERS=10000
#   LR=2e-3 LR_DECAY_STYLE=cosine|constant|linear   the learning rate after 2,000 warm-up iterations, and its decay
#                     (constant: the published configs' schedule)
#   DENSE_FROM_ITER   both stages in one run: dense from this iteration on (patched pretrain_gpt.py only)
#   DRY_RUN=1         validate everything, then print the command instead of running it
set -euo pipefail
source "$(dirname "$0")/common.sh"
: "${SEQ_LEN:=131072}" "${TOPK:=2048}" "${POOLING_FACTOR:=4}" "${LEVELS:=3}" "${DENSE_LAYERS:=0,1,-2,-1}"
: "${TRAIN_ITERS:=10000}" "${CHECKPOINT_DIR:=./checkpoints/lighthouse}"
require_megatron_lm
require_set DATA_PATH TOKENIZER_MODEL
require_int SEQ_LEN TOPK POOLING_FACTOR LEVELS TRAIN_ITERS
model_flags
optimizer_flags
check_lighthouse "$SEQ_LEN" 1
lighthouse_model_flags
launch torchrun --nproc-per-node 1 "$MEGATRON_LM_DIR/pretrain_gpt.py" "${LH_FLAGS[@]}" "${MODEL_FLAGS[@]}" \
    --micro-batch-size 1 --global-batch-size 32 \
    --recompute-granularity full --recompute-method uniform --recompute-num-layers 1 \
    "${OPT_FLAGS[@]}" --bf16 --train-iters "$TRAIN_ITERS" \
    --data-path "$DATA_PATH" --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER_MODEL" \
    --save "$CHECKPOINT_DIR" --save-interval 1000 --log-interval 10 --eval-interval 1000 --eval-iters 10
