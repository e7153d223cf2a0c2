#!/usr/bin/env bash
# Context-parallel benchmark on one GPU host: W=1, then W=$W_MAX (default 2) GPUs, same chunked work.
# Run from anywhere; extra arguments go to bench_cp.py. Logs and JSON land in benchmarks/results/ and,
# when $OUT is set (the device machine), are copied there.
#   bash benchmarks/run_cp_gpu.sh            # 1M tokens, B=1 H=8 D=128 k=2048 p=4 L=3, bf16
set -euo pipefail
cd "$(dirname "$0")/.."
# The package and its Triton kernels from this checkout, installed or not.
export PYTHONPATH="$PWD:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"
# NVLink multicast stays off on shared hosts.
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
W_MAX=${W_MAX:-2}
RESULTS=benchmarks/results
mkdir -p "$RESULTS"
rm -f "$RESULTS"/cp_cuda_w*.json  # the W>1 run must never compare against an older W=1 run
python3 -c 'import torch, triton; print("torch", torch.__version__, "triton", triton.__version__, "gpus", torch.cuda.device_count())'
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$RESULTS/cp_nvidia_smi.txt"
status=0
for W in 1 "$W_MAX"; do
    python3 -m torch.distributed.run --standalone --nproc-per-node "$W" benchmarks/bench_cp.py \
        --max-cp "$W_MAX" --out-dir "$RESULTS" "$@" 2>&1 | tee "$RESULTS/cp_cuda_w$W.log" || status=1
done
if [ -n "${OUT:-}" ]; then
    cp "$RESULTS"/cp_cuda_w*.json "$RESULTS"/cp_cuda_w*.log "$RESULTS/cp_nvidia_smi.txt" "$OUT"/ 2>/dev/null || true
fi
exit $status
