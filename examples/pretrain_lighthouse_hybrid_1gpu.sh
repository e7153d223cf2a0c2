#!/usr/bin/env bash
# Stage one on one GPU for a Megatron-Core HybridModel: Megatron-LM pretrain_hybrid.py with Lighthouse in the
# attention layers at 128K context (or, DENSE=1, the same model dense: the baseline). It is
# pretrain_lighthouse_1gpu.sh with HYBRID_LAYER_PATTERN set; stage two is resume_dense.sh with the same pattern.
# Variables (environment), besides those of pretrain_lighthouse_1gpu.sh:
#   MEGATRON_LM_DIR   Megatron-LM checkout with pretrain_hybrid.py (0.19 or later; required); patched with
#                     patches/apply.sh for the --lighthouse flags, else the model comes from
#                     --spec megatron_lighthouse.env_spec lighthouse_hybrid_stack_spec (no switch, no monitor)
#   HYBRID_LAYER_PATTERN   the layers, Megatron's symbols (* attention, - MLP, E MoE, M Mamba, G Gated DeltaNet; |
#                     between pipeline segments); default: '*-' repeated NUM_LAYERS=30 times, the GPT model of
#                     NUM_LAYERS blocks. TRANSFORMER_IMPL=local (the package's local hybrid stack, no
#                     TransformerEngine) builds * - E only
#   DENSE_LAYERS=0,1,-2,-1   the attention layers kept dense, counted among the pattern's * layers (the first two
#                     and the last two, as in the paper; the start-up line names their hybrid layer numbers); a
#                     pattern needs five attention layers for this default to leave one running Lighthouse
#   CHECKPOINT_DIR    default ./checkpoints/hybrid_lighthouse (./checkpoints/hybrid_dense_baseline with DENSE=1)
#   DATA_PATH, TOKENIZER_MODEL or MOCK_DATA=1, SEQ_LEN=131072 TOPK=2048 POOLING_FACTOR=4 LEVELS=3, HIDDEN=1024
#   HEADS=8 FFN=1536 TRANSFORMER_IMPL=transformer_engine|local FP8, TRAIN_ITERS=10000 GLOBAL_BATCH=32,
#   SAVE_INTERVAL LOG_INTERVAL EVAL_INTERVAL EVAL_ITERS, LR MIN_LR LR_WARMUP_ITERS LR_DECAY_STYLE, DENSE_FROM_ITER,
#   DENSE=1, MONITOR=1, DRY_RUN=1 (validate everything, then print the command)   as in pretrain_lighthouse_1gpu.sh
set -euo pipefail
: "${NUM_LAYERS:=30}" "${DENSE:=0}"
[[ "$NUM_LAYERS" =~ ^[1-9][0-9]{0,3}$ ]] \
    || { echo "error: NUM_LAYERS=$NUM_LAYERS: must be a positive integer, at most 9999 ('*-' blocks)" >&2; exit 2; }
blocks=$(printf '*-%.0s' $(seq "$NUM_LAYERS"))
: "${HYBRID_LAYER_PATTERN:=$blocks}"
: "${CHECKPOINT_DIR:=./checkpoints/hybrid_$([ "$DENSE" = 1 ] && echo dense_baseline || echo lighthouse)}"
export NUM_LAYERS DENSE HYBRID_LAYER_PATTERN CHECKPOINT_DIR
exec bash "$(dirname "$0")/pretrain_lighthouse_1gpu.sh"
