#!/usr/bin/env bash
# Stage two: resume the Lighthouse checkpoint with dense attention (same model, same keys) to TOTAL_ITERS.
# Variables (environment):
#   MEGATRON_LM_DIR, DATA_PATH, TOKENIZER_MODEL   as in pretrain_lighthouse_1gpu.sh (required)
#   LIGHTHOUSE_CHECKPOINT  the stage-one checkpoint directory (required)
#   CHECKPOINT_DIR (default ./checkpoints/dense)  TOTAL_ITERS=16000  SEQ_LEN=131072  NUM_LAYERS=30
#   TRANSFORMER_IMPL=local|transformer_engine (default local: dense SDPA core attention via --spec)
#   DRY_RUN=1         print the command instead of running it
set -euo pipefail
source "$(dirname "$0")/common.sh"
: "${CHECKPOINT_DIR:=./checkpoints/dense}" "${TOTAL_ITERS:=16000}" "${SEQ_LEN:=131072}" "${NUM_LAYERS:=30}"
: "${TRANSFORMER_IMPL:=local}"
require_megatron_lm
require_set DATA_PATH TOKENIZER_MODEL LIGHTHOUSE_CHECKPOINT
[ -d "$LIGHTHOUSE_CHECKPOINT" ] || die "LIGHTHOUSE_CHECKPOINT=$LIGHTHOUSE_CHECKPOINT: no such directory"
require_int TOTAL_ITERS SEQ_LEN NUM_LAYERS
case "$TRANSFORMER_IMPL" in
    local) spec=(--spec megatron_lighthouse.spec dense_local_layer_spec --transformer-impl local) ;;
    transformer_engine) spec=(--transformer-impl transformer_engine) ;;  # TE's own dense spec, same keys
    *) die "TRANSFORMER_IMPL=$TRANSFORMER_IMPL: must be local or transformer_engine" ;;
esac
launch torchrun --nproc-per-node "${GPUS_PER_NODE:-1}" "$MEGATRON_LM_DIR/pretrain_gpt.py" "${spec[@]}" \
    --num-layers "$NUM_LAYERS" --hidden-size 1024 --num-attention-heads 8 --ffn-hidden-size 1536 \
    --swiglu --normalization RMSNorm --position-embedding-type rope --disable-bias-linear \
    --seq-length "$SEQ_LEN" --max-position-embeddings "$SEQ_LEN" --micro-batch-size 1 --global-batch-size 32 \
    --recompute-granularity full --recompute-method uniform --recompute-num-layers 1 \
    --lr 2e-3 --min-lr 2e-4 --lr-warmup-iters 2000 --lr-decay-style cosine --weight-decay 0.1 \
    --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 --bf16 --train-iters "$TOTAL_ITERS" \
    --data-path "$DATA_PATH" --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER_MODEL" \
    --load "$LIGHTHOUSE_CHECKPOINT" --save "$CHECKPOINT_DIR" --save-interval 1000 --log-interval 10
