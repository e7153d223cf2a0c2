"""Megatron-Core GPT training step, dense vs. Lighthouse, in one run.

Builds the paper's layer shape (hidden 1024, 8 heads of 128, SwiGLU FFN 1536, RMSNorm, RoPE, no biases) as a
Megatron-Core ``GPTModel`` twice per sequence length: from the dense block spec (stock core attention = torch SDPA,
cuDNN backend) and from the Lighthouse block spec (k=2048, p=4, L=3; first two and last two layers
dense). Times forward + backward + optimizer step at micro-batch 1; reports step time, tokens/s, peak memory and
model TFLOP/s (dense-model FLOPs for both, so the ratio is the speedup), and what holds the memory: the
parameters, gradients and AdamW state (``static_gib``) against the peak. ``--loss-chunk N`` computes the loss N
positions at a time (:func:`~megatron_lighthouse.chunked_loss.chunked_lm_loss`): at 1M tokens the full logits
alone are 64 GiB. A length that runs out of memory is reported and the run goes on. Prints a table, writes JSON
(and PNGs when matplotlib is installed: the step times, and the GPU monitor's report with ``--monitor-dir``)
under ``--out-dir``.

GPU (one H200):  python3 benchmarks/bench_train.py --layers 30 --seq-lens 32768 65536 131072
1M tokens on one GPU, monitor on (then the same with ``--modes dense --iters 1 --warmup 0``):
    python3 benchmarks/bench_train.py --seq-lens 1048576 --layers 8 --loss-chunk 16384 --modes lighthouse \
        --iters 1 --warmup 1 --monitor-dir $OUT/monitor --out-dir $OUT
The longest lengths on one GPU, every layer Lighthouse (``--dense-layers`` with none), the growing pyramid's L:
    python3 benchmarks/bench_train.py --seq-lens 2097152 4194304 --layers 8 --dense-layers --levels 5 \
        --modes lighthouse --iters 1 --warmup 1 --loss-chunk 16384 --out-dir $OUT
1M tokens, context parallel over 2 GPUs (torchrun, one process per GPU):
    torchrun --nproc-per-node 2 benchmarks/bench_train.py --context-parallel 2 --seq-lens 1048576 --layers 8 \
        --vocab 8192 --dense-layers --modes lighthouse --monitor-dir $OUT/monitor
CPU logic check (learned absolute positions): python benchmarks/bench_train.py --device cpu --tiny
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import sys
import time
from typing import Dict, List, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
from torch.nn.attention import SDPBackend, sdpa_kernel

from megatron_lighthouse import LighthouseConfig, split_for_cp
from megatron_lighthouse.chunked_loss import chunked_lm_loss
from megatron_lighthouse.config import ROPE_PLACEMENTS
from megatron_lighthouse.monitor import GPUMonitor, MonitorConfig
from megatron_lighthouse.monitor.report import load_run, render_timeline
from megatron_lighthouse.spec import get_gpt_decoder_block_dense_spec, get_gpt_decoder_block_with_lighthouse_spec
from megatron_lighthouse.transformer_config import LighthouseTransformerConfig

#: The plain integer flags and their defaults: the paper's layer shape and Lighthouse settings, the steps timed.
_INTS = dict(layers=30, hidden=1024, heads=8, ffn=1536, vocab=32768, topk=2048, pooling_factor=4, levels=3, iters=3,
             warmup=1)
#: ``--tiny``: a CPU-sized model and sequence valid for levels=2, p=2, topk=128.
_TINY = dict(layers=5, hidden=64, heads=4, ffn=96, vocab=256, seq_lens=[512], topk=128, pooling_factor=2, levels=2,
             iters=2, warmup=1, recompute="none")


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny CPU sizes for a logic check")
    for name, default in _INTS.items():
        p.add_argument("--" + name.replace("_", "-"), type=int, default=default)
    p.add_argument("--seq-lens", type=int, nargs="+", default=[32768, 65536, 131072])
    p.add_argument("--dense-layers", type=int, nargs="*", default=[0, 1, -2, -1])
    p.add_argument("--rope", choices=ROPE_PLACEMENTS, default="entries",
                   help="LighthouseConfig.rope: rotate the selected entries (published) or the tokens before pooling")
    p.add_argument("--recompute", choices=("full", "none"), default="full",
                   help="activation recompute: full (uniform, 1 layer per checkpoint) or none")
    p.add_argument("--modes", nargs="+", choices=("dense", "lighthouse"), default=["dense", "lighthouse"])
    p.add_argument("--context-parallel", type=int, default=1,
                   help="CP size (launch with torchrun, one process per GPU; world size must equal it)")
    p.add_argument("--monitor-dir", default=None, help="run the per-rank GPU monitor, JSONL + TensorBoard here")
    p.add_argument("--loss-chunk", type=int, default=0,
                   help="compute the loss this many positions at a time (0: the model's own loss, all logits at once)")
    p.add_argument("--out-dir", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results"))
    if p.parse_known_args(argv)[0].tiny:  # tiny sizes become the defaults; explicit flags still win
        p.set_defaults(**_TINY)
    args = p.parse_args(argv)
    for name in ("layers", "hidden", "heads", "ffn", "vocab", "iters", "context_parallel"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    if args.loss_chunk < 0 or args.warmup < 0:
        p.error("--loss-chunk and --warmup must be >= 0")
    return args


def init_megatron(device: torch.device, context_parallel: int) -> torch.device:
    """torch.distributed (torchrun's environment, else one process) + Megatron state with CP = ``context_parallel``.

    Returns this rank's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world != context_parallel:
        raise SystemExit(f"--context-parallel={context_parallel}: must equal the number of processes ({world})")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        for key, value in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000), RANK="0",
                               WORLD_SIZE="1").items():
            os.environ.setdefault(key, value)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(context_parallel_size=context_parallel)
    if device.type == "cuda":
        model_parallel_cuda_manual_seed(0)
    return device


def build_model(args: argparse.Namespace, mode: str, seq_len: int, device: torch.device):
    """A GPTModel of the paper's shape; ``mode`` picks the dense or the Lighthouse block spec."""
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    lighthouse = LighthouseConfig(levels=args.levels, pooling_factor=args.pooling_factor, topk=args.topk,
                                  dense_layers=tuple(args.dense_layers), rope=args.rope)
    recompute = dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    config = LighthouseTransformerConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads, ffn_hidden_size=args.ffn,
        kv_channels=args.hidden // args.heads, gated_linear_unit=True, activation_func=F.silu,
        normalization="RMSNorm", add_bias_linear=False, hidden_dropout=0.0, attention_dropout=0.0,
        bf16=dtype == torch.bfloat16, params_dtype=dtype, pipeline_dtype=dtype,
        use_cpu_initialization=device.type == "cpu", lighthouse=lighthouse,
        context_parallel_size=args.context_parallel, **(recompute if args.recompute == "full" else {}))
    if mode == "lighthouse":
        lighthouse.validate(seq_len)
        spec = get_gpt_decoder_block_with_lighthouse_spec(config, lighthouse, use_transformer_engine=False,
                                                          normalization="RMSNorm")
    else:
        spec = get_gpt_decoder_block_dense_spec(config, use_transformer_engine=False, normalization="RMSNorm")
    position_embedding = "rope" if device.type == "cuda" else "learned_absolute"  # Megatron's RoPE needs CUDA
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=args.vocab,
                     max_sequence_length=seq_len, position_embedding_type=position_embedding)
    return model.to(device=device, dtype=dtype), config


def model_flops_per_step(args: argparse.Namespace, seq_len: int) -> float:
    """Training FLOPs of the *dense* model for one sequence (3x forward; causal attention counted at half)."""
    h, f, layers = args.hidden, args.ffn, args.layers
    per_token_linear = 2 * (4 * h * h + 3 * h * f) * layers + 2 * h * args.vocab
    attention = 2 * 2 * seq_len * h * layers / 2  # QK^T and PV per token, causal half
    return 3.0 * seq_len * (per_token_linear + attention)


def time_training(args: argparse.Namespace, mode: str, seq_len: int, device: torch.device, monitor=None) -> Dict:
    """Median step time (forward, backward, CP gradient all-reduce, AdamW) and peak memory of one mode at one
    length (the slowest rank's time and the largest rank's memory under CP). Dense attention runs on cuDNN."""
    torch.manual_seed(0)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model, _ = build_model(args, mode, seq_len, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    tokens = torch.randint(0, args.vocab, (1, seq_len), device=device)
    labels = torch.roll(tokens, -1, dims=1)
    positions = torch.arange(seq_len, device=device).unsqueeze(0)
    if args.context_parallel > 1:  # Megatron's load-balanced layout: chunks r and 2W-1-r of the sequence
        rank = parallel_state.get_context_parallel_rank()
        tokens, labels, positions = (split_for_cp(x, rank, args.context_parallel) for x in (tokens, labels, positions))
    static = None
    times, losses = [], []
    sync = torch.cuda.synchronize if device.type == "cuda" else lambda: None  # the current device: this rank's
    with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]) if device.type == "cuda" else contextlib.nullcontext():
        for i in range(args.warmup + args.iters):
            sync()
            start = time.perf_counter()
            if args.loss_chunk:
                loss = chunked_lm_loss(model, tokens, positions, labels, args.loss_chunk).mean()
            else:
                loss = model(tokens, positions, None, labels=labels).float().mean()
            loss.backward()
            if args.context_parallel > 1:
                for param in model.parameters():
                    dist.all_reduce(param.grad, group=parallel_state.get_context_parallel_group())
            optimizer.step()
            if static is None:  # parameters, gradients and AdamW state: what stays between steps
                state = [t for kept in optimizer.state.values() for t in kept.values() if torch.is_tensor(t)]
                grads = [p.grad for p in model.parameters() if p.grad is not None]
                static = sum(t.numel() * t.element_size() for t in [*model.parameters(), *grads, *state]) / 2**30
            optimizer.zero_grad(set_to_none=True)
            sync()
            elapsed = time.perf_counter() - start
            if monitor is not None:
                monitor.step(i, step_time=elapsed)
            if i >= args.warmup:
                times.append(elapsed)
            losses.append(loss.item())
    stats = torch.tensor([statistics.median(times), torch.cuda.max_memory_allocated(device) / 2**30
                          if device.type == "cuda" else 0.0], dtype=torch.float64, device=device)
    dist.all_reduce(stats, op=dist.ReduceOp.MAX)
    step, peak = stats.tolist()
    del model, optimizer
    return dict(mode=mode, seq_len=seq_len, context_parallel=args.context_parallel, layers=args.layers, step_s=step,
                times_s=times, tokens_per_s=seq_len / step, peak_gib=peak, static_gib=static, losses=losses,
                model_tflops=model_flops_per_step(args, seq_len) / step / 1e12)


def print_table(rows: List[Dict]) -> None:
    print(f"{'seq':>8} {'mode':<11} {'step ms':>10} {'tokens/s':>10} {'TFLOP/s*':>8} {'peak GiB':>9} "
          f"{'static GiB':>10} {'speedup':>8}")
    dense = {r["seq_len"]: r["step_s"] for r in rows if r["mode"] == "dense" and not r.get("oom")}
    for r in rows:
        if r.get("oom"):
            print(f"{r['seq_len']:>8} {r['mode']:<11} {'out of memory':>10}")
            continue
        speed = f"{dense[r['seq_len']] / r['step_s']:.2f}x" if r["seq_len"] in dense else ""
        print(f"{r['seq_len']:>8} {r['mode']:<11} {r['step_s'] * 1e3:>10.1f} {r['tokens_per_s']:>10.0f} "
              f"{r['model_tflops']:>8.1f} {r['peak_gib']:>9.2f} {r['static_gib']:>10.2f} {speed:>8}")


def plot(rows: List[Dict], path: str) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in ("dense", "lighthouse"):
        pts = [(r["seq_len"], r["step_s"] * 1e3) for r in rows if r["mode"] == mode and not r.get("oom")]
        if pts:
            ax.plot(*zip(*pts), marker="o", label=mode)
    ax.set(xscale="log", yscale="log", xlabel="tokens per sequence", ylabel="training step (ms)",
           title="GPT training step, dense vs Lighthouse")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main(argv: Optional[List[str]] = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible (use --device cpu --tiny for a logic check)")
    device = init_megatron(device, args.context_parallel)
    is_main = dist.get_rank() == 0
    monitor = None
    if args.monitor_dir:
        monitor = GPUMonitor(MonitorConfig(interval_s=1.0, log_interval=1, wandb=False,
                                           jsonl_path=os.path.join(args.monitor_dir, "run.jsonl"),
                                           tensorboard_dir=os.path.join(args.monitor_dir, "tb"))).start()
    rows = []
    for seq_len in args.seq_lens:
        for mode in args.modes:
            if is_main:
                print(f"[bench_train] {mode} at {seq_len} tokens, {args.layers} layers, CP={args.context_parallel}",
                      flush=True)
            try:
                rows.append(time_training(args, mode, seq_len, device, monitor))
            except torch.cuda.OutOfMemoryError as err:  # report, keep going with the other rows
                error = str(err).splitlines()[0]
                print(f"[bench_train] {mode} at {seq_len}: out of memory ({error})", flush=True)
                rows.append(dict(mode=mode, seq_len=seq_len, layers=args.layers, oom=True, error=error))
                torch.cuda.empty_cache()
    if monitor is not None:
        monitor.stop()
    if not is_main:
        return 0
    os.makedirs(args.out_dir, exist_ok=True)
    if monitor is not None and monitor.config.jsonl_path and os.path.exists(monitor.config.jsonl_path):
        render_timeline(load_run(monitor.config.jsonl_path), os.path.join(args.out_dir, "monitor_report.png"))
    print_table(rows)
    print("* TFLOP/s of the dense model's FLOPs per step for both modes, so the ratio is the speed-up")
    tag = ("cpu_tiny" if args.tiny else torch.cuda.get_device_name(device).replace(" ", "_") if device.type == "cuda"
           else "cpu")
    if args.context_parallel > 1:
        tag += f"_cp{args.context_parallel}"
    record = dict(date=datetime.date.today().isoformat(), command="python3 " + " ".join(sys.argv),
                  device=tag, torch=torch.__version__, settings=vars(args), rows=rows)
    path = os.path.join(args.out_dir, f"train_{tag}.json")
    with open(path, "w") as fh:
        json.dump(record, fh, indent=1)
    png = plot(rows, os.path.join(args.out_dir, f"train_{tag}.png"))
    print(f"wrote {path}" + (f" and {png}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
