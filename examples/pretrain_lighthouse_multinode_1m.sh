#!/usr/bin/env bash
# Stage one at 1M tokens on several nodes (SLURM + torchrun), context parallelism sized for 1M, GPU monitor on.
# Submit with: sbatch --nodes=4 --gpus-per-node=8 examples/pretrain_lighthouse_multinode_1m.sh
# One node (NNODES=1, or unset outside SLURM): torchrun --standalone on this machine, no srun, no MASTER_ADDR.
# Variables (environment):
#   MEGATRON_LM_DIR, DATA_PATH, TOKENIZER_MODEL   as in pretrain_lighthouse_1gpu.sh (the last two unless MOCK_DATA=1)
#   MOCK_DATA=1 VOCAB_SIZE=32000   Megatron-LM's mock data and NullTokenizer: the smoke test of a cluster
#   NNODES (default $SLURM_NNODES, else 1) GPUS_PER_NODE=8   NNODES=1: torchrun --standalone, without srun
#   MASTER_ADDR (default: first SLURM node) MASTER_PORT=29500   the rendezvous of several nodes (not used by one)
#   CP_SIZE=8         context-parallel ranks per sequence (1M / 8 = 128K tokens per GPU); must divide the GPUs
#   CP_COMM_TYPE=p2p  --cp-comm-type: p2p, all_gather, a2a (CP_SIZE must divide HEADS) or a2a+p2p (all-to-all
#                     inside a node, p2p ring across); TRANSFORMER_IMPL=local runs its all-gather attention for each
#   SEQ_LEN=1048576 TOPK=2048 POOLING_FACTOR=4 LEVELS=3 DENSE_LAYERS=0,1,-2,-1   Lighthouse settings (DENSE_LAYERS=
#                     empty: no dense layer). Each CP rank builds its pyramid over its two 1M/(2*CP_SIZE) = 64K-token
#                     chunks, so the paper's LEVELS=3 keeps the subsequence short (10,240 entries per rank)
#   NUM_LAYERS=30 HIDDEN=1024 HEADS=8 FFN=1536 TRANSFORMER_IMPL=transformer_engine|local   the model
#   FP8=hybrid|e4m3   FP8 linear layers through TransformerEngine; empty: bf16
#   TRAIN_ITERS=10000 GLOBAL_BATCH=32 CHECKPOINT_DIR (default ./checkpoints/lighthouse_1m)
#   SAVE_INTERVAL=500 LOG_INTERVAL=1 EVAL_INTERVAL=1000 EVAL_ITERS=10   checkpoints, log lines, validation
#   LR=2e-3 MIN_LR=2e-4 LR_WARMUP_ITERS=2000 LR_DECAY_STYLE=cosine|constant|linear   the learning rate after the
#                     warm-up, and its decay (constant: the published configs' schedule)
#   MONITOR=1         per-rank GPU monitor (default; needs the patched Megatron-LM: unpatched, a note and no
#                     monitor); MONITOR=0 turns it off
#   DENSE_FROM_ITER   both stages in one run: dense from this iteration on (patched Megatron-LM only)
#   HYBRID_LAYER_PATTERN   a HybridModel of these layers through pretrain_hybrid.py instead of NUM_LAYERS GPT layers
#   DRY_RUN=1         validate everything, then print the command (with the variables it needs) instead of running it
#   A variable spelled close to one of these (POOLNG_FACTOR) or a LIGHTHOUSE_* setting is refused before anything.
set -euo pipefail
# sbatch runs a copy of this script from SLURM's spool directory: common.sh is then found from the directory the
# job was submitted from (the repository or its examples/).
for examples in "$(dirname "$0")" "${SLURM_SUBMIT_DIR:-.}/examples" "${SLURM_SUBMIT_DIR:-.}"; do
    [ -f "$examples/common.sh" ] && break
done
[ -f "$examples/common.sh" ] || { echo "error: examples/common.sh not found beside $0 or under SLURM_SUBMIT_DIR=${SLURM_SUBMIT_DIR:-}: submit from the megatron-lighthouse repository (sbatch ... examples/pretrain_lighthouse_multinode_1m.sh)" >&2; exit 2; }
source "$examples/common.sh"
check_variables NNODES GPUS_PER_NODE MASTER_ADDR MASTER_PORT CP_SIZE CP_COMM_TYPE TRAIN_ITERS
: "${NNODES:=${SLURM_NNODES:-1}}" "${GPUS_PER_NODE:=8}" "${CP_SIZE:=8}"
: "${SEQ_LEN:=1048576}" "${TOPK:=2048}" "${POOLING_FACTOR:=4}" "${LEVELS:=3}" "${DENSE_LAYERS=0,1,-2,-1}"
: "${TRAIN_ITERS:=10000}" "${CHECKPOINT_DIR:=./checkpoints/lighthouse_1m}" "${MONITOR:=1}"
: "${SAVE_INTERVAL:=500}" "${LOG_INTERVAL:=1}" "${EVAL_INTERVAL:=1000}" "${EVAL_ITERS:=10}" "${GLOBAL_BATCH:=32}"
require_megatron_lm
data_flags
require_int NNODES GPUS_PER_NODE SEQ_LEN TOPK POOLING_FACTOR LEVELS TRAIN_ITERS
if (( NNODES == 1 )); then
    note_unused "with NNODES=1 (torchrun --standalone on this machine)" MASTER_ADDR MASTER_PORT
    launcher=(torchrun --standalone --nproc-per-node "$GPUS_PER_NODE")
else
    : "${MASTER_PORT:=29500}"
    if [ -z "${MASTER_ADDR:-}" ] && [ -n "${SLURM_JOB_NODELIST:-}" ]; then
        MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    fi
    require_set MASTER_ADDR
    require_port MASTER_PORT
    launcher=(srun --ntasks-per-node 1 torchrun --nnodes "$NNODES" --nproc-per-node "$GPUS_PER_NODE"
              --rdzv-backend c10d --rdzv-endpoint "$MASTER_ADDR:$MASTER_PORT")
fi
model_flags
optimizer_flags "$TRAIN_ITERS"
run_flags "$TRAIN_ITERS"
monitor_flags
lighthouse_model_flags
context_parallel_flags $((NNODES * GPUS_PER_NODE)) "$GPUS_PER_NODE" "NNODES*GPUS_PER_NODE"
check_lighthouse_cp
launch "${launcher[@]}" "$MEGATRON_LM_DIR/$SCRIPT" "${LH_FLAGS[@]}" "${MODEL_FLAGS[@]}" "${OPT_FLAGS[@]}" \
    "${CP_FLAGS[@]}" "${RUN_FLAGS[@]}" "${DATA_FLAGS[@]}" "${MONITOR_FLAGS[@]}"
