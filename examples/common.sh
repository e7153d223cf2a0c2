# Shared helpers of the launch examples (sourced, not run).
# die MSG: print an error and exit 2.
die() { echo "error: $*" >&2; exit 2; }
# note MSG: tell the user something the launch does differently from what was asked (stderr).
note() { echo "note: $*" >&2; }
# require_megatron_lm: set SCRIPT, Megatron-LM's entry point for the model: pretrain_hybrid.py when
# HYBRID_LAYER_PATTERN is set (a HybridModel; Megatron-LM 0.19 and later), else pretrain_gpt.py. MEGATRON_LM_DIR must
# be a Megatron-LM checkout that has it.
require_megatron_lm() {
    : "${HYBRID_LAYER_PATTERN:=}"
    SCRIPT=$([ -n "$HYBRID_LAYER_PATTERN" ] && echo pretrain_hybrid.py || echo pretrain_gpt.py)
    [ -n "${MEGATRON_LM_DIR:-}" ] || die "MEGATRON_LM_DIR is not set (a Megatron-LM checkout containing $SCRIPT)"
    [ -f "$MEGATRON_LM_DIR/$SCRIPT" ] || die "MEGATRON_LM_DIR=$MEGATRON_LM_DIR: no $SCRIPT there"
}
# require_set VAR...: each named variable must be non-empty.
require_set() { for v in "$@"; do [ -n "${!v:-}" ] || die "$v is not set"; done; }
# require_int VAR...: each named variable must be a positive integer (of at most 18 digits: bash's arithmetic).
require_int() {
    for v in "$@"; do
        [[ "${!v:-}" =~ ^[1-9][0-9]{0,17}$ ]] \
            || die "$v=${!v:-}: must be a positive integer$([[ "${!v:-}" =~ ^[1-9][0-9]+$ ]] && echo " of at most 18 digits")"
    done
}
# require_port VAR...: each named variable must be a TCP port, 1 to 65535.
require_port() {
    for v in "$@"; do
        [[ "${!v:-}" =~ ^[1-9][0-9]{0,4}$ ]] && (( ${!v} <= 65535 )) || die "$v=${!v:-}: must be a TCP port, 1 to 65535"
    done
}
# require_count VAR...: each named variable must be an integer >= 0 (of at most 18 digits).
require_count() {
    for v in "$@"; do
        [[ "${!v:-}" =~ ^[0-9]{1,18}$ ]] \
            || die "$v=${!v:-}: must be an integer >= 0$([[ "${!v:-}" =~ ^[0-9]+$ ]] && echo " of at most 18 digits")"
    done
}
# require_switch VAR...: each named variable must be 0 or 1.
require_switch() { for v in "$@"; do [[ "${!v:-}" =~ ^[01]$ ]] || die "$v=${!v:-}: must be 0 or 1"; done; }
# require_number VAR...: each named variable must be a decimal number such as 2e-3.
require_number() {
    for v in "$@"; do
        [[ "${!v:-}" =~ ^[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?$ ]] || die "$v=${!v:-}: must be a decimal number such as 2e-3"
    done
}
# model_flags: set the array MODEL_FLAGS (model shape, implementation, precision, sequence length), the same in
# every example: stage two must rebuild the stage-one model to load its checkpoint. Defaults: NUM_LAYERS=30
# HIDDEN=1024 HEADS=8 FFN=1536 (the paper's layer) TRANSFORMER_IMPL=transformer_engine (or local); SEQ_LEN is
# set by the calling script. With HYBRID_LAYER_PATTERN (after require_megatron_lm) the layers are its, not
# NUM_LAYERS: Megatron's symbols, which TRANSFORMER_IMPL=local limits to * (attention), - (MLP) and E (MoE), the
# layers of the package's local hybrid stack. FP8=hybrid or e4m3 trains the linear layers in FP8 through TransformerEngine
# (--fp8-format, Megatron-LM's default recipe; the attention stays bf16); empty (the default): bf16. No dropout,
# as in the package's own trainer (megatron_lighthouse.demo); the package's core attention refuses attention
# dropout under context parallelism.
model_flags() {
    : "${NUM_LAYERS:=30}" "${HIDDEN:=1024}" "${HEADS:=8}" "${FFN:=1536}" "${TRANSFORMER_IMPL:=transformer_engine}"
    : "${FP8:=}"
    require_int NUM_LAYERS HIDDEN HEADS FFN SEQ_LEN
    (( HIDDEN % HEADS == 0 )) || die "HIDDEN=$HIDDEN must be divisible by HEADS=$HEADS"
    case "$TRANSFORMER_IMPL" in
        transformer_engine|local) ;;
        *) die "TRANSFORMER_IMPL=$TRANSFORMER_IMPL: must be transformer_engine or local" ;;
    esac
    case "$FP8" in
        "") ;;
        hybrid|e4m3) [ "$TRANSFORMER_IMPL" = transformer_engine ] \
            || die "FP8=$FP8 with TRANSFORMER_IMPL=$TRANSFORMER_IMPL: FP8 training needs TransformerEngine (TRANSFORMER_IMPL=transformer_engine)" ;;
        *) die "FP8=$FP8: must be hybrid, e4m3 or empty (bf16)" ;;
    esac
    local layers=(--num-layers "$NUM_LAYERS") symbols='^[-*EMGD+|/]+$'
    if [ -n "$HYBRID_LAYER_PATTERN" ]; then
        [[ "$HYBRID_LAYER_PATTERN" =~ $symbols ]] || die "HYBRID_LAYER_PATTERN=$HYBRID_LAYER_PATTERN: must be Megatron's layer symbols (* attention, - MLP, E MoE, M Mamba, G Gated DeltaNet, D DSA, + MLA; | between pipeline segments, / before multi-token prediction)"
        [ "$TRANSFORMER_IMPL" != local ] || [[ ! "$HYBRID_LAYER_PATTERN" =~ [MGD+] ]] \
            || die "HYBRID_LAYER_PATTERN=$HYBRID_LAYER_PATTERN with TRANSFORMER_IMPL=local: the local hybrid stack builds * (attention), - (MLP) and E (MoE) layers only; Mamba, Gated DeltaNet, DSA and MLA layers need TransformerEngine"
        layers=(--hybrid-layer-pattern "$HYBRID_LAYER_PATTERN")
    fi
    MODEL_FLAGS=(--transformer-impl "$TRANSFORMER_IMPL" "${layers[@]}" --hidden-size "$HIDDEN"
                 --num-attention-heads "$HEADS" --ffn-hidden-size "$FFN" --swiglu --normalization RMSNorm
                 --position-embedding-type rope --disable-bias-linear --attention-dropout 0 --hidden-dropout 0
                 --seq-length "$SEQ_LEN" --max-position-embeddings "$SEQ_LEN")
    [ -z "$FP8" ] || MODEL_FLAGS+=(--fp8-format "$FP8")
    if [ "$TRANSFORMER_IMPL" = local ]; then
        # Megatron-LM's defaults that need TransformerEngine, each off (verified at d98e8a64 and core_v0.19.0):
        # RoPE fusion (TransformerConfig: "apply_rope_fusion is not available. Please install TE >= 1.4.") and the
        # persistent layer norm (the local RMSNorm is torch's: "persist_layer_norm not supported by torch
        # LayerNorm").
        MODEL_FLAGS+=(--no-rope-fusion --no-persist-layer-norm)
    fi
    if ! have_apex_wgrad_fusion; then
        # Megatron-LM's default gradient-accumulation fusion needs Apex's fused_weight_gradient_mlp_cuda in every
        # implementation (its output layer is Megatron's ColumnParallelLinear: "... module is not found" at the
        # first iteration); TransformerEngine installed from the package registry comes without Apex.
        note "Apex's fused_weight_gradient_mlp_cuda is not importable by python3: passing --no-gradient-accumulation-fusion"
        MODEL_FLAGS+=(--no-gradient-accumulation-fusion)
    fi
}
# have_apex_wgrad_fusion: python3 can import Apex's fused_weight_gradient_mlp_cuda extension (looked up, not loaded).
have_apex_wgrad_fusion() {
    python3 -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is None)' 2>/dev/null
}
# optimizer_flags ITERS: set the array OPT_FLAGS, the paper's AdamW settings, the same in every example: LR
# (default 2e-3) after LR_WARMUP_ITERS (default 2,000) warm-up iterations, betas 0.9/0.95, weight decay 0.1,
# gradient clipping 1.0; LR_DECAY_STYLE cosine (to MIN_LR, default 2e-4), constant (the published configs'
# schedule: no decay after the warm-up) or linear. The warm-up must end before ITERS (--train-iters, the
# decay's end), and MIN_LR must not exceed LR: Megatron-LM asserts both.
optimizer_flags() {
    : "${LR:=2e-3}" "${MIN_LR:=2e-4}" "${LR_WARMUP_ITERS:=2000}" "${LR_DECAY_STYLE:=cosine}"
    require_number LR MIN_LR
    awk -v lr="$LR" 'BEGIN { exit !(lr + 0 > 0) }' || die "LR=$LR: must be > 0 (the peak learning rate)"
    require_count LR_WARMUP_ITERS
    case "$LR_DECAY_STYLE" in
        cosine|constant|linear) ;;
        *) die "LR_DECAY_STYLE=$LR_DECAY_STYLE: must be cosine, constant or linear" ;;
    esac
    awk -v lr="$LR" -v min="$MIN_LR" 'BEGIN { exit !(lr + 0 >= min + 0) }' \
        || die "MIN_LR=$MIN_LR: must not exceed LR=$LR"
    (( LR_WARMUP_ITERS < $1 )) \
        || die "LR_WARMUP_ITERS=$LR_WARMUP_ITERS: the warm-up must end before the last iteration ($1); lower it for a short run"
    OPT_FLAGS=(--lr "$LR" --min-lr "$MIN_LR" --lr-warmup-iters "$LR_WARMUP_ITERS" --lr-decay-style "$LR_DECAY_STYLE"
               --weight-decay 0.1 --adam-beta1 0.9 --adam-beta2 0.95 --clip-grad 1.0)
}
# data_flags: set the array DATA_FLAGS. MOCK_DATA=1: Megatron-LM's mock GPT data and NullTokenizer with
# VOCAB_SIZE tokens (default 32000), no dataset or tokenizer needed (a smoke test of a machine or cluster); else
# DATA_PATH (an indexed dataset prefix) and TOKENIZER_MODEL (HuggingFace). Always
# --no-create-attention-mask-in-dataloader: Megatron-LM's default builds a [1, s, s] mask per sample in the
# data-loader workers, 17 GB at 128K tokens, which no causal kernel reads.
data_flags() {
    : "${MOCK_DATA:=0}" "${VOCAB_SIZE:=32000}"
    require_switch MOCK_DATA
    if [ "$MOCK_DATA" = 1 ]; then
        require_int VOCAB_SIZE
        DATA_FLAGS=(--mock-data --tokenizer-type NullTokenizer --vocab-size "$VOCAB_SIZE")
    else
        require_set DATA_PATH TOKENIZER_MODEL
        DATA_FLAGS=(--data-path "$DATA_PATH" --tokenizer-type HuggingFaceTokenizer --tokenizer-model "$TOKENIZER_MODEL")
    fi
    DATA_FLAGS+=(--no-create-attention-mask-in-dataloader)
}
# run_flags ITERS: set the array RUN_FLAGS: batch (micro-batch 1, GLOBAL_BATCH sequences per iteration, default
# 32), full recompute, bf16, ITERS iterations, checkpoints in CHECKPOINT_DIR every SAVE_INTERVAL iterations (and
# at the end), a log line every LOG_INTERVAL, EVAL_ITERS validation batches every EVAL_INTERVAL (and at the end).
# The calling script sets the defaults of the intervals.
run_flags() {
    : "${GLOBAL_BATCH:=32}"
    require_int GLOBAL_BATCH SAVE_INTERVAL LOG_INTERVAL EVAL_INTERVAL EVAL_ITERS
    require_set CHECKPOINT_DIR
    RUN_FLAGS=(--micro-batch-size 1 --global-batch-size "$GLOBAL_BATCH"
               --recompute-granularity full --recompute-method uniform --recompute-num-layers 1
               --bf16 --train-iters "$1" --save "$CHECKPOINT_DIR" --save-interval "$SAVE_INTERVAL"
               --log-interval "$LOG_INTERVAL" --eval-interval "$EVAL_INTERVAL" --eval-iters "$EVAL_ITERS")
}
# check_lighthouse SEQ_LEN CHUNKS [WHY]: the Lighthouse settings (TOPK POOLING_FACTOR LEVELS DENSE_LAYERS) must fit
# the sequence length split into CHUNKS (WHY: where that number comes from, for the error) and NUM_LAYERS (with
# HYBRID_LAYER_PATTERN: its attention layers, which DENSE_LAYERS then count), with at least one layer running
# Lighthouse. Errors name the variables.
check_lighthouse() {
    python3 - "$1" "$2" "${3:-}" "$LEVELS" "$POOLING_FACTOR" "$TOPK" "$DENSE_LAYERS" "$NUM_LAYERS" \
        "$HYBRID_LAYER_PATTERN" <<'PY' || exit 2
import importlib.util, os, sys
# Only the settings and pattern modules (standard library only), not the package: no torch import on a login node.
package = importlib.util.find_spec("megatron_lighthouse")
if package is None:
    sys.exit("error: megatron_lighthouse is not importable by python3; pip install -e /path/to/megatron-lighthouse")


def load(name):
    spec = importlib.util.spec_from_file_location(
        f"lighthouse_{name}", os.path.join(package.submodule_search_locations[0], f"{name}.py"))
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LighthouseConfig = load("config").LighthouseConfig
seq, chunks, why, levels, pooling, topk, dense, layers, pattern = sys.argv[1:]
# The settings' own names in the config's messages -> the variables the user set.
names = {"LighthouseConfig.levels": "LEVELS", "LighthouseConfig.pooling_factor": "POOLING_FACTOR",
         "LighthouseConfig.topk": "TOPK", "topk=": "TOPK=", "(topk must": "(TOPK must", f"chunks={chunks}": f"chunks={chunks}{why}"}
try:
    cfg = LighthouseConfig(levels=int(levels), pooling_factor=int(pooling), topk=int(topk))
    cfg.validate(int(seq), chunks=int(chunks))
except ValueError as err:
    message = str(err)
    for name, variable in names.items():
        message = message.replace(name, variable)
    sys.exit(f"error: SEQ_LEN/TOPK/POOLING_FACTOR/LEVELS: {message}")
try:
    indices = tuple(int(i) for i in dense.split(",") if i.strip())
except ValueError:
    sys.exit(f"error: DENSE_LAYERS={dense}: must be comma-separated layer indices (0-based, negative from the end), "
             "e.g. 0,1,-2,-1, or empty for none")
if pattern:  # a HybridModel: DENSE_LAYERS count its attention layers
    try:
        attention = load("hybrid_pattern").hybrid_attention_layers(pattern, LighthouseConfig(dense_layers=indices))
    except ValueError as err:
        sys.exit(f"error: HYBRID_LAYER_PATTERN={pattern} with DENSE_LAYERS={dense}: {err}")
else:
    try:
        kept = LighthouseConfig(dense_layers=indices).dense_layer_set(int(layers))
    except ValueError as err:
        sys.exit(f"error: DENSE_LAYERS={dense} with NUM_LAYERS={layers}: {err}")
    if len(kept) == int(layers):
        sys.exit(f"error: DENSE_LAYERS={dense} keeps all NUM_LAYERS={layers} layers dense: no layer would run "
                 "Lighthouse")
subsequence, ranks = cfg.subsequence_length(int(seq), int(chunks)), int(chunks) // 2  # 2 chunks per CP rank
each = f" ({subsequence // ranks} on each of the {ranks} context-parallel ranks)" if ranks > 1 else ""
print(f"lighthouse: subsequence {subsequence} of {seq} tokens{each}")
if pattern:
    print(f"lighthouse: {attention.describe()}")
PY
}
# context_parallel_flags GPUS GPUS_PER_NODE WHAT: set the array CP_FLAGS for CP_SIZE (default 1)
# context-parallel ranks per sequence out of GPUS (WHAT: the variables GPUS comes from, for the errors) and
# CP_COMM_TYPE (default p2p). CP_COMM_TYPE is one of TransformerEngine's communication types, which Megatron-LM passes
# to it unchanged: p2p, all_gather, a2a, a2a+p2p (the set of the package's check_cp_comm_type; any other spelling,
# Megatron-LM's help's "allgather" too, is refused). With TransformerEngine, a2a splits the heads over the CP ranks
# (HEADS divisible by CP_SIZE), and a2a+p2p runs the all-to-all inside a node and the p2p ring across
# (--hierarchical-context-parallel-sizes A P, A = gcd(CP_SIZE, GPUS_PER_NODE), HEADS divisible by A).
# TRANSFORMER_IMPL=local takes every type, as the package does, and runs its own all-gather attention whatever the
# type (a note says so). GLOBAL_BATCH must be a multiple of the GPUS/CP_SIZE data-parallel ranks. CP_SIZE > 1 adds
# CUDA_DEVICE_MAX_CONNECTIONS=1 to LAUNCH_ENV: Megatron-LM refuses context parallelism on Hopper and older GPUs
# without it (its ordering of communication and compute kernels).
context_parallel_flags() {
    local gpus=$1 per_node=$2 what=$3 given=${CP_COMM_TYPE+x}
    : "${CP_SIZE:=1}" "${CP_COMM_TYPE:=p2p}"
    require_int CP_SIZE GLOBAL_BATCH
    (( gpus % CP_SIZE == 0 )) || die "CP_SIZE=$CP_SIZE must divide $what=$gpus"
    (( GLOBAL_BATCH % (gpus / CP_SIZE) == 0 )) \
        || die "GLOBAL_BATCH=$GLOBAL_BATCH must be a multiple of the $((gpus / CP_SIZE)) data-parallel ranks ($what/CP_SIZE)"
    local types="p2p all_gather a2a a2a+p2p" plain close= t
    if [[ ! " $types " =~ " $CP_COMM_TYPE " ]] || [[ "$CP_COMM_TYPE" =~ " " ]]; then
        plain=$(tr -d '_ -' <<< "${CP_COMM_TYPE,,}")
        for t in $types; do [ "${t//_/}" != "$plain" ] || close="; use $t (TransformerEngine's spelling)"; done
        die "CP_COMM_TYPE=$CP_COMM_TYPE: not a context-parallel communication type of TransformerEngine, which accepts ${types// /, }$close"
    fi
    CP_FLAGS=(--context-parallel-size "$CP_SIZE" --cp-comm-type "$CP_COMM_TYPE")
    (( CP_SIZE == 1 )) || LAUNCH_ENV+=(CUDA_DEVICE_MAX_CONNECTIONS=1)
    if [ "$TRANSFORMER_IMPL" = local ]; then
        [ -z "$given" ] || (( CP_SIZE == 1 )) || note "CP_COMM_TYPE=$CP_COMM_TYPE with TRANSFORMER_IMPL=local: the local core attention runs this package's all-gather attention whatever the type (TransformerEngine's types apply with TRANSFORMER_IMPL=transformer_engine)"
    elif [ "$CP_COMM_TYPE" = a2a ]; then
        (( HEADS % CP_SIZE == 0 )) || die "CP_COMM_TYPE=a2a with HEADS=$HEADS and CP_SIZE=$CP_SIZE: TransformerEngine's all-to-all splits the heads over the CP ranks, so CP_SIZE must divide HEADS"
    fi
    if [ "$CP_COMM_TYPE" = a2a+p2p ]; then
        local a2a=$CP_SIZE rest=$per_node
        while (( rest )); do t=$((a2a % rest)); a2a=$rest; rest=$t; done  # gcd(CP_SIZE, GPUS_PER_NODE)
        [ "$TRANSFORMER_IMPL" = local ] || (( HEADS % a2a == 0 )) || die "CP_COMM_TYPE=a2a+p2p with HEADS=$HEADS: TransformerEngine's all-to-all inside a node splits the heads over its $a2a CP ranks (gcd of CP_SIZE=$CP_SIZE and GPUS_PER_NODE=$per_node), so $a2a must divide HEADS"
        CP_FLAGS+=(--hierarchical-context-parallel-sizes "$a2a" $((CP_SIZE / a2a)))
    fi
}
# check_lighthouse_cp: check_lighthouse for SEQ_LEN under CP_SIZE (after context_parallel_flags): each CP rank
# selects its two load-balanced chunks locally, so the settings must fit 2 * CP_SIZE chunks (1 without CP).
check_lighthouse_cp() {
    if (( CP_SIZE > 1 )); then check_lighthouse "$SEQ_LEN" $((2 * CP_SIZE)) " (2 x CP_SIZE=$CP_SIZE)"
    else check_lighthouse "$SEQ_LEN" 1; fi
}
# is_patched: SCRIPT carries the hook of patches/ (patches/apply.sh MEGATRON_LM_DIR).
is_patched() { grep -q megatron_lighthouse "$MEGATRON_LM_DIR/$SCRIPT"; }
# spec_kind: what an unpatched SCRIPT takes from --spec: a GPT layer spec ("layer") or a hybrid stack spec.
spec_kind() { [ -n "$HYBRID_LAYER_PATTERN" ] && echo hybrid_stack || echo layer; }
# LAUNCH_ENV: VAR=value words the launched command needs in its environment (exported, and printed in front of
# the command by DRY_RUN=1 so that the printed line can be pasted).
LAUNCH_ENV=()
# lighthouse_model_flags: set the array LH_FLAGS. With the patched SCRIPT: the --lighthouse flags (validated and
# summarized at start-up; DENSE_FROM_ITER switches to dense in the same run or on resume). Unpatched:
# --spec megatron_lighthouse.env_spec lighthouse_layer_spec (lighthouse_local_layer_spec with TRANSFORMER_IMPL=local;
# lighthouse[_local]_hybrid_stack_spec for pretrain_hybrid.py), its settings in LIGHTHOUSE_* variables (added to
# LAUNCH_ENV).
lighthouse_model_flags() {
    if is_patched; then
        LH_FLAGS=(--lighthouse --lighthouse-topk "$TOPK" --lighthouse-pooling-factor "$POOLING_FACTOR"
                  --lighthouse-levels "$LEVELS" --lighthouse-dense-layers "$DENSE_LAYERS")
        if [ -n "${DENSE_FROM_ITER:-}" ]; then
            require_count DENSE_FROM_ITER
            LH_FLAGS+=(--lighthouse-dense-from-iteration "$DENSE_FROM_ITER")
        fi
    else
        [ -z "${DENSE_FROM_ITER:-}" ] || die "DENSE_FROM_ITER needs the patched $SCRIPT (patches/apply.sh $MEGATRON_LM_DIR); or run examples/resume_dense.sh for stage two"
        LAUNCH_ENV+=("LIGHTHOUSE_LEVELS=$LEVELS" "LIGHTHOUSE_POOLING_FACTOR=$POOLING_FACTOR" "LIGHTHOUSE_TOPK=$TOPK"
                     "LIGHTHOUSE_DENSE_LAYERS=$DENSE_LAYERS")
        LH_FLAGS=(--spec megatron_lighthouse.env_spec "lighthouse_$([ "$TRANSFORMER_IMPL" = local ] && echo local_)$(spec_kind)_spec")
    fi
}
# dense_spec_flags: set the array SPEC_FLAGS to the dense model with the state-dict keys of the Lighthouse one,
# for any SCRIPT, patched or not: with TransformerEngine Megatron-LM's own spec (TEDotProductAttention runs 128K;
# pretrain_hybrid.py's hybrid_stack_spec, named as Megatron-LM's migration guide does); local, the package's dense
# spec (torch SDPA core attention): Megatron-LM's local DotProductAttention materializes the [s, s] scores of every
# head and cannot run at these lengths, and its hybrid stack spec is TransformerEngine's throughout.
dense_spec_flags() {
    case "$TRANSFORMER_IMPL" in
        local) SPEC_FLAGS=(--spec megatron_lighthouse.env_spec "dense_local_$(spec_kind)_spec") ;;
        transformer_engine) SPEC_FLAGS=()
            [ -z "$HYBRID_LAYER_PATTERN" ] || SPEC_FLAGS=(--spec megatron.core.models.hybrid.hybrid_layer_specs hybrid_stack_spec) ;;
    esac
}
# monitor_flags: set the array MONITOR_FLAGS from MONITOR (0 or 1): the per-rank GPU monitor (--lighthouse-monitor,
# a flag of the patched SCRIPT; on an unpatched one the run goes on without it, with a note).
monitor_flags() {
    require_switch MONITOR
    MONITOR_FLAGS=()
    if [ "$MONITOR" = 1 ]; then
        if is_patched; then
            MONITOR_FLAGS=(--lighthouse-monitor --lighthouse-monitor-interval 1)
        else
            note "MONITOR=1: the GPU monitor needs the patched $SCRIPT (patches/apply.sh $MEGATRON_LM_DIR); running without it"
        fi
    fi
}
# preflight LAUNCHER: what this machine needs before LAUNCHER starts the ranks, as one error line rather than a
# traceback from each rank: LAUNCHER on PATH; TransformerEngine in python3 when TRANSFORMER_IMPL=transformer_engine;
# with torchrun (its ranks run on this machine), a CUDA GPU that torch sees.
preflight() {
    if ! command -v "$1" >/dev/null; then
        [ "$1" = srun ] && die "srun: not found; this example runs under SLURM (sbatch $0)"
        die "$1: not found; activate the Python environment that has torch (torchrun comes with it)"
    fi
    python3 - "$TRANSFORMER_IMPL" "$1" "$SCRIPT" <<'PY' || exit 2
import importlib.util, sys
impl, launcher, script = sys.argv[1:]
if impl == "transformer_engine" and importlib.util.find_spec("transformer_engine") is None:
    sys.exit("error: TRANSFORMER_IMPL=transformer_engine (the default): transformer_engine is not installed in this "
             "Python; install it (pip install -e '.[te]') or set TRANSFORMER_IMPL=local")
if launcher == "torchrun":
    import torch
    if not torch.cuda.is_available():
        sys.exit(f"error: torch sees no CUDA GPU here, and Megatron-LM's {script} needs one (DRY_RUN=1 prints the "
                 "command instead of launching it)")
PY
}
# launch CMD...: run it (with LAUNCH_ENV exported) after the preflight, or only print it, LAUNCH_ENV first, when
# DRY_RUN=1.
launch() {
    if [ "$DRY_RUN" = 1 ]; then
        printf '%q ' "${LAUNCH_ENV[@]}" "$@"; echo
    else
        preflight "$1"
        [ "${#LAUNCH_ENV[@]}" = 0 ] || export "${LAUNCH_ENV[@]}"
        exec "$@"
    fi
}
# The variables every example reads through the helpers above (each example adds its own to check_variables).
COMMON_VARIABLES="MEGATRON_LM_DIR DATA_PATH TOKENIZER_MODEL MOCK_DATA VOCAB_SIZE CHECKPOINT_DIR SEQ_LEN TOPK
POOLING_FACTOR LEVELS DENSE_LAYERS DENSE_FROM_ITER NUM_LAYERS HIDDEN HEADS FFN TRANSFORMER_IMPL FP8 GLOBAL_BATCH
SAVE_INTERVAL LOG_INTERVAL EVAL_INTERVAL EVAL_ITERS LR MIN_LR LR_WARMUP_ITERS LR_DECAY_STYLE MONITOR DRY_RUN
HYBRID_LAYER_PATTERN"
# check_variables VAR...: this example reads COMMON_VARIABLES and VAR...; refuse, before anything else, an
# environment variable spelled close to one of them but not one of them (POOLNG_FACTOR=2 would leave POOLING_FACTOR
# at its default without a word), and a LIGHTHOUSE_* setting (the examples pass TOPK, POOLING_FACTOR, LEVELS and
# DENSE_LAYERS to Megatron-LM themselves, as flags or as those variables; LIGHTHOUSE_DENSE_KERNEL, read by the
# package's core attention, passes).
check_variables() {
    # shellcheck disable=SC2086 # the list is split into words on purpose
    python3 - "$0" "$@" $COMMON_VARIABLES <<'PY' || exit 2
import difflib, os, sys
script, known = os.path.basename(sys.argv[1]), set(sys.argv[2:])
for name, value in sorted(os.environ.items()):
    if name in known or name == "LIGHTHOUSE_DENSE_KERNEL":
        continue
    if name.startswith("LIGHTHOUSE_"):
        meant = difflib.get_close_matches(name[len("LIGHTHOUSE_"):], ["TOPK", "POOLING_FACTOR", "LEVELS", "DENSE_LAYERS"],
                                          n=1, cutoff=0.75)
        sys.exit(f"error: {name}={value}: not read by {script}, which takes its Lighthouse settings as TOPK, "
                 f"POOLING_FACTOR, LEVELS and DENSE_LAYERS and passes them to Megatron-LM itself"
                 + (f"; set {meant[0]}" if meant else ""))
    # a misspelling: a small edit of a name; not another tool's variable that extends one (SLURM_GPUS_PER_NODE)
    close = [k for k in difflib.get_close_matches(name, known, n=1, cutoff=0.8)
             if abs(len(k) - len(name)) <= 2 and not (name.endswith("_" + k) or name.startswith(k + "_"))]
    if close:
        sys.exit(f"error: {name}={value}: not a variable of {script}; did you mean {close[0]}? (its variables: "
                 f"{', '.join(sorted(known))})")
PY
}
# note_unused CONDITION VAR...: a note for each VAR set in the environment that the launch does not use, CONDITION
# saying why ("with DENSE=1" ...).
note_unused() {
    local why=$1 v
    shift
    for v in "$@"; do
        [ -z "${!v+x}" ] || note "$v=${!v} is not used $why"
    done
}
# DRY_RUN=1 prints the command instead of launching it; any other value than 0 or 1 is refused before anything.
: "${DRY_RUN:=0}"
require_switch DRY_RUN
