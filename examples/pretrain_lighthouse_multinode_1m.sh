#!/usr/bin/env bash
# Stage one at 1M tokens on several nodes (SLURM + torchrun), context parallelism sized for 1M.
# Submit with: sbatch --nodes=4 --gpus-per-node=8 examples/pretrain_lighthouse_multinode_1m.sh
# Variables (environment):
#   MEGATRON_LM_DIR, DATA_PATH, TOKENIZER_MODEL   as in pretrain_lighthouse_1gpu.sh (required)
#   NNODES (default $SLURM_NNODES) GPUS_PER_NODE=8 CP_SIZE=8 MASTER_ADDR (default: first SLURM node) MASTER_PORT=29500
#   SEQ_LEN=1048576 TOPK=2048 POOLING_FACTOR=4 LEVELS=3 DENSE_LAYERS=0,1,-2,-1 NUM_LAYERS=30 TRAIN_ITERS=10000
#   CHECKPOINT_DIR (default ./checkpoints/lighthouse_1m)
#   MONITOR=1         per-rank GPU monitor (needs the patched pretrain_gpt.py from patches/ for its flags)
#   DENSE_FROM_ITER   two-stage in one run: dense from this iteration on (needs the patched pretrain_gpt.py)
#   DRY_RUN=1         print the command instead of running it
set -euo pipefail
source "$(dirname "$0")/common.sh"
: "${NNODES:=${SLURM_NNODES:-}}" "${GPUS_PER_NODE:=8}" "${CP_SIZE:=8}" "${MASTER_PORT:=29500}"
: "${SEQ_LEN:=1048576}" "${TOPK:=2048}" "${POOLING_FACTOR:=4}" "${LEVELS:=3}" "${DENSE_LAYERS:=0,1,-2,-1}"
: "${NUM_LAYERS:=30}" "${TRAIN_ITERS:=10000}" "${CHECKPOINT_DIR:=./checkpoints/lighthouse_1m}" "${MONITOR:=1}"
if [ -z "${MASTER_ADDR:-}" ] && [ -n "${SLURM_JOB_NODELIST:-}" ]; then
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
fi
require_megatron_lm
require_set DATA_PATH TOKENIZER_MODEL NNODES MASTER_ADDR
require_int NNODES GPUS_PER_NODE CP_SIZE SEQ_LEN TOPK POOLING_FACTOR LEVELS NUM_LAYERS TRAIN_ITERS
(( NNODES * GPUS_PER_NODE % CP_SIZE == 0 )) || die "CP_SIZE=$CP_SIZE must divide NNODES*GPUS_PER_NODE=$((NNODES * GPUS_PER_NODE))"
check_lighthouse "$SEQ_LEN" $((2 * CP_SIZE))  # each CP rank selects its two load-balanced chunks locally
monitor_flags=()
if [ "$MONITOR" = 1 ]; then
    grep -q megatron_lighthouse "$MEGATRON_LM_DIR/pretrain_gpt.py" || die "MONITOR=1 needs the patched pretrain_gpt.py (patches/) or MONITOR=0"
    monitor_flags=(--lighthouse-monitor --lighthouse-monitor-interval 1)
fi
lighthouse_model_flags
launch srun --ntasks-per-node 1 torchrun --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE" \
    --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT" "$MEGATRON_LM_DIR/pretrain_gpt.py" \
    "${LH_FLAGS[@]}" --context-parallel-size "$CP_SIZE" --cp-comm-type p2p \
    --num-layers "$NUM_LAYERS" --hidden-size 1024 --num-attention-heads 8 --ffn-hidden-size 1536 \
    --swiglu --normalization RMSNorm --position-embedding-type rope --disable-bias-linear \
    --seq-length "$SEQ_LEN" --max-position-embeddings "$SEQ_LEN" --micro-batch-size 1 --global-batch-size 32 \
    --recompute-granularity full --recompute-method uniform --recompute-num-layers 1 \
    --lr 2e-3 --min-lr 2e-4 --lr-warmup-iters 2000 --lr-decay-style cosine --weight-decay 0.1 \
    --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0 --bf16 --train-iters "$TRAIN_ITERS" \
    --data-path "$DATA_PATH" --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER_MODEL" \
    --save "$CHECKPOINT_DIR" --save-interval 500 --log-interval 1 "${monitor_flags[@]}"
