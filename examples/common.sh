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
# check_lighthouse SEQ_LEN CHUNKS: the Lighthouse settings must fit the (per-CP-chunk) sequence length.
check_lighthouse() {
    python3 - "$1" "$2" "$LEVELS" "$POOLING_FACTOR" "$TOPK" <<'PY' || exit 2
import sys
from megatron_lighthouse import LighthouseConfig
try:
    cfg = LighthouseConfig(levels=int(sys.argv[3]), pooling_factor=int(sys.argv[4]), topk=int(sys.argv[5]))
    cfg.validate(int(sys.argv[1]), chunks=int(sys.argv[2]))
except ValueError as err:
    sys.exit(f"error: SEQ_LEN/TOPK/POOLING_FACTOR/LEVELS: {err}")
print(f"lighthouse: subsequence {cfg.subsequence_length(int(sys.argv[1]), int(sys.argv[2]))} of {sys.argv[1]} tokens")
PY
}
# lighthouse_model_flags: set the array LH_FLAGS. With the patched pretrain_gpt.py (patches/apply.sh): the
# --lighthouse flags (validated and summarized at start-up; DENSE_FROM_ITER switches to dense in the same run).
# Unpatched: --spec megatron_lighthouse.spec lighthouse_layer_spec, its settings in LIGHTHOUSE_* variables.
lighthouse_model_flags() {
    if grep -q megatron_lighthouse "$MEGATRON_LM_DIR/pretrain_gpt.py"; then
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
        LH_FLAGS=(--spec megatron_lighthouse.spec lighthouse_layer_spec)
    fi
}
# launch CMD...: run it, or only print it when DRY_RUN=1.
launch() {
    if [ "${DRY_RUN:-0}" = 1 ]; then printf '%q ' "$@"; echo; else exec "$@"; fi
}
