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
# launch CMD...: run it, or only print it when DRY_RUN=1.
launch() {
    if [ "${DRY_RUN:-0}" = 1 ]; then printf '%q ' "$@"; echo; else exec "$@"; fi
}
