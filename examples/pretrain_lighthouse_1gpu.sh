#!/usr/bin/env bash
# Stage one on one GPU: Megatron-LM pretrain_gpt.py with Lighthouse at 128K context.
# Variables (environment):
#   MEGATRON_LM_DIR   Megatron-LM checkout (required)
#   DATA_PATH         Megatron indexed dataset prefix (required)
#   TOKENIZER_MODEL   HuggingFace tokenizer name or path (required)
#   CHECKPOINT_DIR    where checkpoints go (default ./checkpoints/lighthouse)
#   SEQ_LEN=131072 TOPK=2048 POOLING_FACTOR=4 LEVELS=3 DENSE_LAYERS=0,1,-2,-1
#   NUM_LAYERS=30 HIDDEN=1024 HEADS=8 FFN=1536 TRAIN_ITERS=10000 LR=2e-3
#   DENSE_FROM_ITER   two-stage in one run: dense from this iteration on (needs the patched pretrain_gpt.py)
#   DRY_RUN=1         print the command instead of running it
set -euo pipefail
source "$(dirname "$0")/common.sh"
: "${SEQ_LEN:=131072}" "${TOPK:=2048}" "${POOLING_FACTOR:=4}" "${LEVELS:=3}" "${DENSE_LAYERS:=0,1,-2,-1}"
: "${NUM_LAYERS:=30}" "${HIDDEN:=1024}" "${HEADS:=8}" "${FFN:=1536}" "${TRAIN_ITERS:=10000}" "${LR:=2e-3}"
: "${CHECKPOINT_DIR:=./checkpoints/lighthouse}"
require_megatron_lm
require_set DATA_PATH TOKENIZER_MODEL
require_int SEQ_LEN TOPK POOLING_FACTOR LEVELS NUM_LAYERS HIDDEN HEADS FFN TRAIN_ITERS
check_lighthouse "$SEQ_LEN" 1
lighthouse_model_flags
launch torchrun --nproc-per-node 1 "$MEGATRON_LM_DIR/pretrain_gpt.py" \
    "${LH_FLAGS[@]}" \
    --num-layers "$NUM_LAYERS" --hidden-size "$HIDDEN" --num-attention-heads "$HEADS" --ffn-hidden-size "$FFN" \
    --swiglu --normalization RMSNorm --position-embedding-type rope --disable-bias-linear \
    --seq-length "$SEQ_LEN" --max-position-embeddings "$SEQ_LEN" --micro-batch-size 1 --global-batch-size 32 \
    --recompute-granularity full --recompute-method uniform --recompute-num-layers 1 \
    --lr "$LR" --min-lr 2e-4 --lr-warmup-iters 2000 --lr-decay-style cosine --weight-decay 0.1 \
    --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 --bf16 --train-iters "$TRAIN_ITERS" \
    --data-path "$DATA_PATH" --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER_MODEL" \
    --save "$CHECKPOINT_DIR" --save-interval 1000 --log-interval 10 --eval-interval 1000 --eval-iters 10
