#!/usr/bin/env bash
# Context-parallel benchmark on one GPU host: W=1, then W=$W_MAX GPUs, same chunked work (bench_cp.py).
# Run from anywhere; extra arguments go to bench_cp.py. Logs and JSON land in RESULTS_DIR and, when $OUT is set (the
# device machine), are copied there.
#   RESULTS_DIR=benchmarks/results   where the logs and JSON go (relative to the repository, or absolute); this
#                       inner's earlier files there are removed first
#   W_MAX=2             the CP size compared with W=1 (an integer >= 2; 4 on a 4-GPU host)
#   INNER=own           the CP attention: own (this package's all-gather) or te (LighthouseCoreAttention with
#                       TEDotProductAttention inside; needs megatron-core and TransformerEngine)
#   CP_COMM_TYPES=p2p   with INNER=te: TransformerEngine's communication types, one W_MAX run each after the one
#                       W=1 run, e.g. "p2p all_gather a2a"
#   bash benchmarks/run_cp_gpu.sh            # 1M tokens, B=1 H=8 D=128 k=2048 p=4 L=3, bf16
# Every setting is checked (bench_cp.py's own argument checks, for each run) before the first run starts.
set -euo pipefail
cd "$(dirname "$0")/.."
# The package and its Triton kernels from this checkout, installed or not.
export PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"
# NVLink multicast stays off on shared hosts.
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
W_MAX=${W_MAX:-2}
INNER=${INNER:-own}
die() { echo "error: $*" >&2; exit 2; }
[[ "$W_MAX" =~ ^[1-9][0-9]{0,3}$ ]] && (( W_MAX >= 2 )) || die "W_MAX=$W_MAX: must be an integer >= 2 (the CP size compared with W=1)"
case "$INNER" in
    own) [ -z "${CP_COMM_TYPES:-}" ] || die "CP_COMM_TYPES=$CP_COMM_TYPES: only with INNER=te (INNER=own is one all-gather)"
         runs=("") ;;
    te) read -ra comms <<< "${CP_COMM_TYPES:-p2p}"
        [ "${#comms[@]}" -gt 0 ] || die "CP_COMM_TYPES is empty: name one or more of TransformerEngine's communication types"
        runs=("${comms[@]}") ;;
    *) die "INNER=$INNER: must be own or te" ;;
esac
# bench_cp.py's argument checks for each run, in one Python before the first run (a misspelt type must not wait
# for W=1).
(cd benchmarks && python3 - "$INNER" "$W_MAX" "${runs[*]}" "$@" <<'PY') || exit 2
import sys
from bench_cp import parse_args
inner, w_max, comms, *rest = sys.argv[1:]
for comm in comms.split() or [None]:
    parse_args(["--inner", inner, "--max-cp", w_max, *(["--cp-comm-type", comm] if comm else []), *rest])
PY
RESULTS=${RESULTS_DIR:-benchmarks/results}
mkdir -p "$RESULTS"
# Named as bench_cp.py names its JSON: cp_cuda_w<W> (own), cp_cuda_te_w1 and cp_cuda_te_<comm>_w<W> (te). The
# W>1 runs must never compare against an older W=1 run: this inner's earlier JSON and logs go first.
prefix=cp_cuda_$([ "$INNER" = te ] && echo te_ || echo w)
rm -f "$RESULTS/$prefix"*.json "$RESULTS/$prefix"*.log
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, "gpus", torch.cuda.device_count())'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$RESULTS/cp_nvidia_smi.txt"
status=0
bench() {  # bench W LOG [bench_cp.py arguments]
    local world=$1 log=$2
    shift 2
    python3 -m torch.distributed.run --standalone --nproc-per-node "$world" benchmarks/bench_cp.py \
        --max-cp "$W_MAX" --out-dir "$RESULTS" --inner "$INNER" "$@" 2>&1 | tee "$RESULTS/$log" || status=1
}
if [ "$INNER" = te ]; then
    bench 1 cp_cuda_te_w1.log "$@"
    for comm in "${runs[@]}"; do
        bench "$W_MAX" "cp_cuda_te_${comm}_w$W_MAX.log" --cp-comm-type "$comm" "$@"
    done
else
    bench 1 cp_cuda_w1.log "$@"
    bench "$W_MAX" "cp_cuda_w$W_MAX.log" "$@"
fi
if [ -n "${OUT:-}" ]; then
    cp "$RESULTS/$prefix"*.json "$RESULTS/$prefix"*.log "$RESULTS/cp_nvidia_smi.txt" "$OUT"/ 2>/dev/null || true
fi
exit $status
