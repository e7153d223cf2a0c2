"""Two-stage pretraining of a small Megatron-Core GPT: Lighthouse for most steps, then dense (spec section 9)."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import pathlib
import time
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from ..config import ROPE_PLACEMENTS, LighthouseConfig
from ..schedule import LighthouseSchedule, lighthouse_enabled
from .corpus import load_corpus

logger = logging.getLogger(__name__)

MODES = ("two-stage", "dense", "lighthouse")
#: Learning-rate decay after the warm-up: ``cosine`` to 10% at the last step; ``constant`` (the published recipe's:
#: its torchtitan configs set ``decay_ratio = 0.0``, so the rate stays at ``lr`` after the warm-up); ``wsd``
#: (warm-up, stable, decay): constant, then linear to 10% over the last ``lr_decay_fraction`` of the steps.
LR_DECAY_STYLES = ("cosine", "constant", "wsd")
VOCAB = 256  # bytes
CHECKPOINT = "checkpoint.pt"
#: Settings that may change when resuming (the run's length and its reporting); every other one must match the
#: checkpoint, or the model, data or schedule would not be the ones it was trained with.
#: (Not ``device``: the model differs by device, learned positions and fp32 on CPU, RoPE and bf16 on CUDA.)
RESUMABLE_CHANGES = ("steps", "out", "resume", "log_every", "eval_every", "eval_batches")
#: Settings added after checkpoints were first written: the value an older checkpoint ran with.
OLD_CHECKPOINT_SETTINGS = {"rope": "tokens", "lr_decay_style": "cosine", "lr_decay_fraction": 0.2}
#: What to lower when memory runs out.
MEMORY_HINT = "lower --batch-size, --seq-len, --layers or --hidden"


@dataclasses.dataclass
class DemoConfig:
    """Settings of one demo run (every field is a CLI flag of ``python -m megatron_lighthouse.demo``).

    ``mode``: ``two-stage`` (Lighthouse, then dense for the last ``dense_fraction`` of steps), ``dense`` (dense from
    scratch, the baseline) or ``lighthouse`` (Lighthouse throughout). Validation loss is always measured densely;
    during the Lighthouse stage also with Lighthouse on (``val_loss_lighthouse`` in the evaluations).
    ``out``: directory of the checkpoints (``None``: keep nothing; the CLI writes its metrics and plot there too).
    Learning rate: linear warm-up over ``warmup`` steps, then ``lr_decay_style`` (:data:`LR_DECAY_STYLES`):
    ``cosine`` to 10% of ``lr`` at the last step, ``constant`` (the published recipe) or ``wsd`` (constant, then
    linear to 10% over the last ``lr_decay_fraction`` of the steps).
    ``rope``: :attr:`LighthouseConfig.rope <megatron_lighthouse.config.LighthouseConfig>` (``entries`` or
    ``tokens``); it matters on CUDA only, where the model uses RoPE (on CPU it has learned positions).
    """

    mode: str = "two-stage"
    steps: int = 200
    dense_fraction: float = 0.2
    seq_len: int = 1024
    batch_size: int = 4
    layers: int = 4
    hidden: int = 128
    heads: int = 4
    ffn: int = 384
    levels: int = 2
    pooling_factor: int = 4
    topk: int = 128
    dense_layers: Tuple[int, ...] = (0, -1)
    rope: str = "entries"
    lr: float = 2e-3
    warmup: int = 20
    lr_decay_style: str = "cosine"
    lr_decay_fraction: float = 0.2
    eval_every: int = 25
    eval_batches: int = 4
    log_every: int = 10
    device: str = "cpu"
    seed: int = 0
    corpus: Optional[str] = None
    corpus_bytes: int = 8 << 20
    out: Optional[str] = "demo_out"
    resume: bool = False

    def lighthouse(self) -> LighthouseConfig:
        return LighthouseConfig(levels=self.levels, pooling_factor=self.pooling_factor, topk=self.topk,
                                dense_layers=tuple(self.dense_layers), rope=self.rope)

    def validate(self) -> None:
        """Raise ``ValueError`` naming the flag for any setting that cannot run."""
        if self.mode not in MODES:
            raise ValueError(f"--mode {self.mode!r}: must be one of {MODES}")
        for name in ("steps", "seq_len", "batch_size", "layers", "hidden", "heads", "ffn", "eval_every",
                     "eval_batches", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be >= 1")
        if self.hidden % self.heads:
            raise ValueError(f"--hidden {self.hidden}: must be divisible by --heads {self.heads}")
        if not 0.0 <= self.dense_fraction < 1.0:
            raise ValueError(f"--dense-fraction {self.dense_fraction}: must be in [0, 1)")
        if self.rope not in ROPE_PLACEMENTS:
            raise ValueError(f"--rope {self.rope!r}: must be one of {ROPE_PLACEMENTS}")
        if self.lr_decay_style not in LR_DECAY_STYLES:
            raise ValueError(f"--lr-decay-style {self.lr_decay_style!r}: must be one of {LR_DECAY_STYLES}")
        if not 0.0 < self.lr_decay_fraction <= 1.0 or (
                self.lr_decay_style == "wsd" and self._decay_steps(self.steps) < 1):
            raise ValueError(f"--lr-decay-fraction {self.lr_decay_fraction}: must be in (0, 1], and with "
                             f"--lr-decay-style wsd give at least one decay step of --steps {self.steps}")
        if self.mode != "dense":
            lighthouse = self.lighthouse()
            try:
                lighthouse.validate(self.seq_len)
            except ValueError as err:
                raise ValueError(f"--seq-len {self.seq_len} does not fit the Lighthouse settings (--levels, "
                                 f"--pooling-factor, --topk): {err}") from None
            if len(lighthouse.dense_layer_set(self.layers)) == self.layers:
                raise ValueError(f"--dense-layers {self.dense_layers}: keeps all {self.layers} layers dense; "
                                 f"use more --layers or fewer dense layers")

    def schedule(self) -> LighthouseSchedule:
        """The run's :class:`~megatron_lighthouse.schedule.LighthouseSchedule` (per step)."""
        return LighthouseSchedule(dense_from_iteration=self.switch_step)

    def _decay_steps(self, steps: int) -> int:
        """Steps of a ``wsd`` decay over a schedule of ``steps`` steps (the last ``lr_decay_fraction`` of them)."""
        return int(round(steps * self.lr_decay_fraction))

    @property
    def switch_step(self) -> Optional[int]:
        """First dense step of a two-stage run (``None`` when Lighthouse never switches off)."""
        if self.mode == "two-stage":
            return self.steps - int(round(self.steps * self.dense_fraction))
        return 0 if self.mode == "dense" else None


def _init_runtime(device: torch.device) -> None:
    """One-process torch.distributed + Megatron parallel state (all parallel sizes 1)."""
    from ..process_group import init_single_process_megatron

    init_single_process_megatron("nccl" if device.type == "cuda" else "gloo", prefix="lighthouse_demo_")
    if device.type == "cuda":
        from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

        model_parallel_cuda_manual_seed(0)


def build_model(cfg: DemoConfig, device: torch.device) -> torch.nn.Module:
    """GPTModel from the Lighthouse block spec (or the dense one for ``mode='dense'``)."""
    from megatron.core.models.gpt import GPTModel

    from ..spec import get_gpt_decoder_block_dense_spec, get_gpt_decoder_block_with_lighthouse_spec
    from ..transformer_config import LighthouseTransformerConfig

    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    lighthouse = cfg.lighthouse()
    config = LighthouseTransformerConfig(
        num_layers=cfg.layers, hidden_size=cfg.hidden, num_attention_heads=cfg.heads, ffn_hidden_size=cfg.ffn,
        gated_linear_unit=True, activation_func=F.silu, normalization="RMSNorm", add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, bf16=cuda, params_dtype=dtype, pipeline_dtype=dtype,
        use_cpu_initialization=not cuda, lighthouse=lighthouse,
    )
    if cfg.mode == "dense":
        spec = get_gpt_decoder_block_dense_spec(config, use_transformer_engine=False, normalization="RMSNorm")
    else:
        spec = get_gpt_decoder_block_with_lighthouse_spec(config, lighthouse, use_transformer_engine=False,
                                                          normalization="RMSNorm")
    # Megatron's RoPE needs CUDA; on CPU the demo uses learned positions.
    model = GPTModel(config=config, transformer_layer_spec=spec, vocab_size=VOCAB, max_sequence_length=cfg.seq_len,
                     position_embedding_type="rope" if cuda else "learned_absolute")
    return model.to(device=device, dtype=dtype)


def _lr_factor(style: str, step: int, warmup: int, steps: int, decay_steps: int) -> float:
    """Multiplier of ``lr`` at step ``step`` of a schedule of ``steps`` steps: linear warm-up over ``warmup`` steps,
    then ``style`` (:data:`LR_DECAY_STYLES`; ``decay_steps``: the length of a ``wsd`` decay)."""
    if step < warmup:
        return (step + 1) / warmup
    if style == "constant":
        return 1.0
    if style == "wsd":
        into_decay = step - (steps - decay_steps)
        return 1.0 if into_decay < 0 else 1.0 - 0.9 * (into_decay + 1) / decay_steps  # 0.1 at the last step
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def _lr_at(cfg: DemoConfig, step: int) -> float:
    """The run's learning rate at ``step`` (see :class:`DemoConfig`)."""
    return cfg.lr * _lr_factor(cfg.lr_decay_style, step, cfg.warmup, cfg.steps, cfg._decay_steps(cfg.steps))


def byte_windows(data: torch.Tensor, offsets: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The ``seq_len + 1``-byte windows of ``data`` (1-D uint8) starting at ``offsets``: int64
    ``[len(offsets), seq_len + 1]`` (inputs ``[:, :-1]``, labels ``[:, 1:]``)."""
    return torch.stack([data[o : o + seq_len + 1] for o in offsets.tolist()]).long()


def _batch(data: torch.Tensor, offsets: torch.Tensor, seq_len: int, device: torch.device):
    rows = byte_windows(data, offsets, seq_len).to(device)
    return rows[:, :-1], rows[:, 1:]


def _train_offsets(cfg: DemoConfig, step: int, train_len: int) -> torch.Tensor:
    """Window starts of step ``step``: a function of the seed and the step only, so a resumed run sees the same
    batches as an uninterrupted one."""
    gen = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    return torch.randint(0, train_len - cfg.seq_len - 1, (cfg.batch_size,), generator=gen)


def _token_losses(model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-byte loss of every position: ``[b, s]`` tokens and labels -> ``[b, s]`` float32."""
    positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    return model(tokens, positions, None, labels=labels).float()


def _loss(model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The training step's loss: the mean of :func:`_token_losses`."""
    return _token_losses(model, tokens, labels).mean()


def validation_offsets(val_len: int, seq_len: int, windows: int) -> torch.Tensor:
    """Start offsets (int64 ``[windows]``) of the fixed, evenly spaced validation windows of ``seq_len + 1`` bytes
    in a validation text of ``val_len`` bytes: the windows :func:`evaluate` scores."""
    return torch.linspace(0, val_len - seq_len - 1, windows).long()


@torch.no_grad()
def evaluate(model: torch.nn.Module, val: torch.Tensor, cfg: DemoConfig, device: torch.device,
             dense: bool = True) -> float:
    """Validation loss over the fixed evenly spaced windows: with every layer dense (``dense=True``: the model the
    recipe ships) or with the Lighthouse layers on (the model as the Lighthouse stage trains it)."""
    offsets = validation_offsets(len(val), cfg.seq_len, cfg.eval_batches * cfg.batch_size)
    total = 0.0
    model.eval()
    with lighthouse_enabled(model, not dense):
        for chunk in offsets.split(cfg.batch_size):
            total += _token_losses(model, *_batch(val, chunk, cfg.seq_len, device)).mean(1).sum().item()
    model.train()
    return total / len(offsets)


def _save(path: pathlib.Path, payload: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)  # a crash mid-save never leaves a torn checkpoint


def _resume(out: pathlib.Path, cfg: DemoConfig, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
            device: torch.device) -> Optional[Dict]:
    """Load ``out/checkpoint.pt`` into ``model`` and ``optimizer``; returns the saved run state (``None``: none).

    ``ValueError`` when the checkpoint was written with settings that cannot continue (names the flags)."""
    path = out / CHECKPOINT
    if not path.exists():
        logger.info("--resume: no %s yet, starting at step 0", path)
        return None
    ckpt = torch.load(path, map_location=device, weights_only=False)
    now = dataclasses.asdict(cfg)
    saved = {**OLD_CHECKPOINT_SETTINGS, **ckpt["config"]}
    changed = [f"--{k.replace('_', '-')} {saved.get(k)} -> {now[k]}" for k in now
               if k not in RESUMABLE_CHANGES and saved.get(k) != now[k]]
    if changed:
        may_change = ", ".join("--" + k.replace("_", "-") for k in RESUMABLE_CHANGES if k not in ("out", "resume"))
        raise ValueError(f"--resume: {path} was written with other settings ({'; '.join(changed)}); rerun with the "
                         f"checkpoint's settings (only {may_change} may change) or use another --out")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    logger.info("resumed from %s at step %d", path, ckpt["state"]["step"])
    return ckpt["state"]


def run_demo(cfg: DemoConfig) -> Dict:
    """Train, switch, evaluate; returns the metrics (also written to ``cfg.out/metrics.json`` by the CLI)."""
    cfg.validate()
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible")
    train, val = load_corpus(cfg.corpus, cfg.corpus_bytes)
    if min(len(train), len(val)) <= cfg.seq_len + 1:
        raise ValueError(f"--corpus: {len(train)} train / {len(val)} validation bytes, too few for --seq-len "
                         f"{cfg.seq_len}; raise --corpus-bytes or lower --seq-len")
    _init_runtime(device)
    torch.manual_seed(cfg.seed)
    schedule = cfg.schedule()
    out = pathlib.Path(cfg.out) if cfg.out else None
    state = dict(step=0, train=[], evals=[], seconds={"lighthouse": 0.0, "dense": 0.0},
                 tokens={"lighthouse": 0, "dense": 0})
    saved_step: Optional[int] = None
    tokens_per_step = cfg.batch_size * cfg.seq_len
    try:
        model = build_model(cfg, device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1)
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            if cfg.resume:
                state = _resume(out, cfg, model, optimizer, device) or state
                saved_step = state["step"] or None
        for step in range(state["step"], cfg.steps):
            stage = "lighthouse" if schedule.apply(model, step) else "dense"  # --mode dense: dense from step 0
            if step == cfg.switch_step and cfg.mode == "two-stage":
                logger.info("step %d: switching Lighthouse off, dense attention from here on", step)
            for group in optimizer.param_groups:
                group["lr"] = _lr_at(cfg, step)
            start = time.perf_counter()
            loss = _loss(model, *_batch(train, _train_offsets(cfg, step, len(train)), cfg.seq_len, device))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = time.perf_counter() - start
            state["seconds"][stage] += elapsed
            state["tokens"][stage] += tokens_per_step
            state["train"].append(dict(step=step, loss=loss.item(), stage=stage, seconds=elapsed))
            state["step"] = step + 1
            if (step + 1) % cfg.log_every == 0 or step == 0:
                logger.info("%s  %-10s  loss %.4f  %8.0f tokens/s", _progress(state, cfg.steps), stage, loss.item(),
                            tokens_per_step / elapsed)
            if (step + 1) % cfg.eval_every == 0 or step + 1 == cfg.steps:
                record = dict(step=step + 1, val_loss=evaluate(model, val, cfg, device), stage=stage)
                if stage == "lighthouse":  # and as it trains: how much of it the switch to dense has to relearn
                    record["val_loss_lighthouse"] = evaluate(model, val, cfg, device, dense=False)
                state["evals"].append(record)
                logger.info("step %4d  validation loss (dense) %.4f%s", step + 1, record["val_loss"],
                            f", with Lighthouse {record['val_loss_lighthouse']:.4f}" if stage == "lighthouse" else "")
                if out is not None:
                    _save(out / CHECKPOINT, dict(model=model.state_dict(), optimizer=optimizer.state_dict(),
                                                 state=state, config=dataclasses.asdict(cfg)))
                    saved_step = state["step"]
    except (RuntimeError, MemoryError) as err:  # torch.cuda.OutOfMemoryError is a RuntimeError
        out_of_memory = isinstance(err, (torch.cuda.OutOfMemoryError, MemoryError)) or (
            "can't allocate memory" in str(err))  # the CPU allocator's out-of-memory error
        if not out_of_memory:
            raise
        raise SystemExit(f"out of memory at step {state['step']} ({type(err).__name__}): {MEMORY_HINT}"
                         f"{_resume_hint(cfg, out, saved_step)}") from None
    except KeyboardInterrupt:
        raise SystemExit(f"interrupted at step {state['step']}{_resume_hint(cfg, out, saved_step)}") from None
    if out is not None:
        from ..export import save_dense_checkpoint

        save_dense_checkpoint(model, str(out / "model_dense.pt"))
    return summarize(cfg, state)


def _progress(state: Dict, total: int, width: int = 20) -> str:
    """``step  120/200 [############--------]  60% eta 0:00:35``: the ETA from the mean step time so far."""
    done = state["step"]
    seconds = sum(state["seconds"].values())
    eta = int(round(seconds / max(1, len(state["train"])) * (total - done)))
    filled = width * done // total
    return (f"step {done:4d}/{total} [{'#' * filled}{'-' * (width - filled)}] {100 * done // total:3d}% "
            f"eta {eta // 3600}:{eta // 60 % 60:02d}:{eta % 60:02d}")


def _resume_hint(cfg: DemoConfig, out: Optional[pathlib.Path], saved_step: Optional[int]) -> str:
    """Where the run can continue from, for error messages (``saved_step``: step of the last checkpoint)."""
    if out is None:
        return " (no --out: nothing was saved; add --out DIR to keep checkpoints)"
    if saved_step is None:
        return f" (no checkpoint yet: one is written every --eval-every {cfg.eval_every} steps)"
    return f"; the checkpoint of step {saved_step} is kept: rerun the same command with --resume to continue"


def summarize(cfg: DemoConfig, state: Dict) -> Dict:
    """Final validation loss of each stage, wall time and tokens/s, plus the curves."""
    stages: List[Dict] = []
    for stage in ("lighthouse", "dense"):
        evals = [e for e in state["evals"] if e["stage"] == stage]
        if state["tokens"][stage]:
            seconds = state["seconds"][stage]
            stages.append(dict(stage=stage, steps=sum(t["stage"] == stage for t in state["train"]),
                               final_val_loss=evals[-1]["val_loss"] if evals else None, seconds=seconds,
                               tokens_per_s=state["tokens"][stage] / seconds if seconds else 0.0))
    return dict(config=dataclasses.asdict(cfg), switch_step=cfg.switch_step, stages=stages,
                final_val_loss=state["evals"][-1]["val_loss"] if state["evals"] else None,
                train=state["train"], evals=state["evals"])
