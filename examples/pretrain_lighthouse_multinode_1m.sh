#!/usr/bin/env bash
# Stage one at 1M tokens on several nodes (SLURM + torchrun), context parallelism sized for 1M, GPU monitor on.
# Submit with: sbatch --nodes=4 --gpus-per-node=8 examples/pretrain_lighthouse_multinode_1m.sh
# Variables (environment):
#   MEGATRON_LM_DIR, DATA_PATH, TOKENIZER_MODEL   as in pretrain_lighthouse_1gpu.sh (required)
#   NNODES (default $SLURM_NNODES) GPUS_PER_NODE=8 MASTER_ADDR (default: first SLURM node) MASTER_PORT=29500
#   CP_SIZE=8         context-parallel ranks per sequence (1M / 8 = 128K tokens per GPU); must divide the GPUs
#   SEQ_LEN=1048576 TOPK=2048 POOLING_FACTOR=4 LEVELS=3 DENSE_LAYERS=0,1,-2,-1   Lighthouse settings
#   NUM_LAYERS=30 HIDDEN=1024 HEADS=8 FFN=1536 TRANSFORMER_IMPL=transformer_engine|local   the model
#   TRAIN_ITERS=10000 CHECKPOINT_DIR (default ./checkpoints/lighthouse_1m)
#   LR=2e-3 LR_DECAY_STYLE=cosine|constant|linear   the learning rate after 2,000 warm-up iterations, and its decay
#                     (constant: the published configs' schedule)
#   MONITOR=1         per-rank GPU monitor (the --lighthouse-monitor flags need the patched pretrain_gpt.py)
#   DENSE_FROM_ITER   both stages in one run: dense from this iteration on (patched pretrain_gpt.py only)
#   DRY_RUN=1         validate everything, then print the command instead of running it
set -euo pipefail
source "$(dirname "$0")/common.sh"
: "${NNODES:=${SLURM_NNODES:-}}" "${GPUS_PER_NODE:=8}" "${CP_SIZE:=8}" "${MASTER_PORT:=29500}"
: "${SEQ_LEN:=1048576}" "${TOPK:=2048}" "${POOLING_FACTOR:=4}" "${LEVELS:=3}" "${DENSE_LAYERS:=0,1,-2,-1}"
: "${TRAIN_ITERS:=10000}" "${CHECKPOINT_DIR:=./checkpoints/lighthouse_1m}" "${MONITOR:=1}"
if [ -z "${MASTER_ADDR:-}" ] && [ -n "${SLURM_JOB_NODELIST:-}" ]; then
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
fi
require_megatron_lm
require_set DATA_PATH TOKENIZER_MODEL NNODES MASTER_ADDR
require_int NNODES GPUS_PER_NODE CP_SIZE SEQ_LEN TOPK POOLING_FACTOR LEVELS TRAIN_ITERS
(( NNODES * GPUS_PER_NODE % CP_SIZE == 0 )) || die "CP_SIZE=$CP_SIZE must divide NNODES*GPUS_PER_NODE=$((NNODES * GPUS_PER_NODE))"
model_flags
optimizer_flags
check_lighthouse "$SEQ_LEN" $((2 * CP_SIZE))  # each CP rank selects its two load-balanced chunks locally
monitor_flags=()
case "$MONITOR" in
    1) is_patched || die "MONITOR=1 needs the patched pretrain_gpt.py (patches/apply.sh $MEGATRON_LM_DIR) or MONITOR=0"
       monitor_flags=(--lighthouse-monitor --lighthouse-monitor-interval 1) ;;
    0) ;;
    *) die "MONITOR=$MONITOR: must be 0 or 1" ;;
esac
lighthouse_model_flags
launch srun --ntasks-per-node 1 torchrun --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE" \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" "$MEGATRON_LM_DIR/pretrain_gpt.py" \
    "${LH_FLAGS[@]}" "${MODEL_FLAGS[@]}" --context-parallel-size "$CP_SIZE" --cp-comm-type p2p \
    --micro-batch-size 1 --global-batch-size 32 \
    --recompute-granularity full --recompute-method uniform --recompute-num-layers 1 \
    "${OPT_FLAGS[@]}" --bf16 --train-iters "$TRAIN_ITERS" \
    --data-path "$DATA_PATH" --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER_MODEL" \
    --save "$CHECKPOINT_DIR" --save-interval 500 --log-interval 1 "${monitor_flags[@]}"
