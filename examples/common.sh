# Shared helpers of the launch examples (sourced, not run).
# die MSG: print an error and exit 2.
die() { echo "error: $*" >&2; exit 2; }
# require_megatron_lm: MEGATRON_LM_DIR must be a Megatron-LM checkout.
require_megatron_lm() {
    [ -n "${MEGATRON_LM_DIR:-}" ] || die "MEGATRON_LM_DIR is not set (a Megatron-LM checkout containing pretrain_gpt.py)"
    [ -f "$MEGATRON_LM_DIR/pretrain_gpt.py" ] || die "MEGATRON_LM_DIR=$MEGATRON_LM_DIR: no pretrain_gpt.py there"
}
# require_set VAR...: each named variable must be non-empty.
require_set() { for v in "$@"; do [ -n "${!v:-}" ] || die "$v is not set"; done; }
# require_int VAR...: each named variable must be a positive integer.
require_int() { for v in "$@"; do [[ "${!v:-}" =~ ^[1-9][0-9]*$ ]] || die "$v=${!v:-}: must be a positive integer"; done; }
# model_flags: set the array MODEL_FLAGS (model shape, implementation, sequence length), the same in every
# example: stage two must rebuild the stage-one model to load its checkpoint. Defaults: NUM_LAYERS=30
# HIDDEN=1024 HEADS=8 FFN=1536 (the paper's layer) TRANSFORMER_IMPL=transformer_engine (or local); SEQ_LEN is
# set by the calling script.
model_flags() {
    : "${NUM_LAYERS:=30}" "${HIDDEN:=1024}" "${HEADS:=8}" "${FFN:=1536}" "${TRANSFORMER_IMPL:=transformer_engine}"
    require_int NUM_LAYERS HIDDEN HEADS FFN SEQ_LEN
    (( HIDDEN % HEADS == 0 )) || die "HIDDEN=$HIDDEN must be divisible by HEADS=$HEADS"
    case "$TRANSFORMER_IMPL" in
        transformer_engine|local) ;;
        *) die "TRANSFORMER_IMPL=$TRANSFORMER_IMPL: must be transformer_engine or local" ;;
    esac
    MODEL_FLAGS=(--transformer-impl "$TRANSFORMER_IMPL" --num-layers "$NUM_LAYERS" --hidden-size "$HIDDEN"
                 --num-attention-heads "$HEADS" --ffn-hidden-size "$FFN" --swiglu --normalization RMSNorm
                 --position-embedding-type rope --disable-bias-linear
                 --seq-length "$SEQ_LEN" --max-position-embeddings "$SEQ_LEN")
}
# optimizer_flags: set the array OPT_FLAGS, the paper's AdamW settings, the same in every example: LR (default
# 2e-3) after 2,000 warm-up iterations, betas 0.9/0.95, weight decay 0.1, gradient clipping 1.0; LR_DECAY_STYLE
# cosine (to 2e-4, the default), constant (the published configs' schedule: no decay after the warm-up) or linear.
optimizer_flags() {
    : "${LR:=2e-3}" "${LR_DECAY_STYLE:=cosine}"
    [[ "$LR" =~ ^[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?$ ]] || die "LR=$LR: must be a decimal number such as 2e-3"
    case "$LR_DECAY_STYLE" in
        cosine|constant|linear) ;;
        *) die "LR_DECAY_STYLE=$LR_DECAY_STYLE: must be cosine, constant or linear" ;;
    esac
    OPT_FLAGS=(--lr "$LR" --min-lr 2e-4 --lr-warmup-iters 2000 --lr-decay-style "$LR_DECAY_STYLE" --weight-decay 0.1
               --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0)
}
# check_lighthouse SEQ_LEN CHUNKS: the Lighthouse settings (TOPK POOLING_FACTOR LEVELS DENSE_LAYERS) must fit the
# (per-CP-chunk) sequence length and NUM_LAYERS.
check_lighthouse() {
    python3 - "$1" "$2" "$LEVELS" "$POOLING_FACTOR" "$TOPK" "$DENSE_LAYERS" "$NUM_LAYERS" <<'PY' || exit 2
import importlib.util, os, sys
# Only the settings module (standard library only), not the package: no torch import on a login node.
package = importlib.util.find_spec("megatron_lighthouse")
if package is None:
    sys.exit("error: megatron_lighthouse is not importable by python3; pip install -e /path/to/megatron-lighthouse")
spec = importlib.util.spec_from_file_location(
    "lighthouse_config", os.path.join(package.submodule_search_locations[0], "config.py"))
config = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(config)
LighthouseConfig = config.LighthouseConfig
seq, chunks, levels, pooling, topk, dense, layers = sys.argv[1:]
try:
    cfg = LighthouseConfig(levels=int(levels), pooling_factor=int(pooling), topk=int(topk))
    cfg.validate(int(seq), chunks=int(chunks))
except ValueError as err:
    sys.exit(f"error: SEQ_LEN/TOPK/POOLING_FACTOR/LEVELS: {err}")
try:
    cfg = LighthouseConfig(levels=int(levels), pooling_factor=int(pooling), topk=int(topk),
                           dense_layers=tuple(int(i) for i in dense.split(",") if i.strip()))
    cfg.dense_layer_set(int(layers))
except ValueError as err:
    sys.exit(f"error: DENSE_LAYERS={dense} with NUM_LAYERS={layers}: {err}")
print(f"lighthouse: subsequence {cfg.subsequence_length(int(seq), int(chunks))} of {seq} tokens")
PY
}
# is_patched: pretrain_gpt.py carries the hook of patches/ (patches/apply.sh MEGATRON_LM_DIR).
is_patched() { grep -q megatron_lighthouse "$MEGATRON_LM_DIR/pretrain_gpt.py"; }
# lighthouse_model_flags: set the array LH_FLAGS. With the patched pretrain_gpt.py: the --lighthouse flags
# (validated and summarized at start-up; DENSE_FROM_ITER switches to dense in the same run or on resume).
# Unpatched: --spec megatron_lighthouse.env_spec lighthouse_layer_spec (lighthouse_local_layer_spec with
# TRANSFORMER_IMPL=local), its settings in LIGHTHOUSE_* variables.
lighthouse_model_flags() {
    if is_patched; then
        LH_FLAGS=(--lighthouse --lighthouse-topk "$TOPK" --lighthouse-pooling-factor "$POOLING_FACTOR"
                  --lighthouse-levels "$LEVELS" --lighthouse-dense-layers "$DENSE_LAYERS")
        if [ -n "${DENSE_FROM_ITER:-}" ]; then
            [[ "$DENSE_FROM_ITER" =~ ^[0-9]+$ ]] || die "DENSE_FROM_ITER=$DENSE_FROM_ITER: must be an integer >= 0"
            LH_FLAGS+=(--lighthouse-dense-from-iteration "$DENSE_FROM_ITER")
        fi
    else
        [ -z "${DENSE_FROM_ITER:-}" ] || die "DENSE_FROM_ITER needs the patched pretrain_gpt.py (patches/apply.sh $MEGATRON_LM_DIR); or run examples/resume_dense.sh for stage two"
        export LIGHTHOUSE_LEVELS=$LEVELS LIGHTHOUSE_POOLING_FACTOR=$POOLING_FACTOR LIGHTHOUSE_TOPK=$TOPK \
               LIGHTHOUSE_DENSE_LAYERS=$DENSE_LAYERS
        LH_FLAGS=(--spec megatron_lighthouse.env_spec "$([ "$TRANSFORMER_IMPL" = local ] && echo lighthouse_local_layer_spec || echo lighthouse_layer_spec)")
    fi
}
# launch CMD...: run it, or only print it when DRY_RUN=1.
launch() {
    if [ "${DRY_RUN:-0}" = 1 ]; then printf '%q ' "$@"; echo; else exec "$@"; fi
}
