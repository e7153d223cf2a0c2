"""Two-stage pretraining of a small Megatron-Core GPT: Lighthouse for most steps, then dense (spec section 9)."""

from __future__ import annotations

import dataclasses
import logging
import math
import pathlib
import re
import tempfile
import time
import warnings
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F

from .. import atomic
from ..config import ROPE_PLACEMENTS, LighthouseConfig
from ..schedule import LighthouseSchedule, lighthouse_enabled
from .corpus import load_corpus
from .interrupts import HeldInterrupts

logger = logging.getLogger(__name__)

MODES = ("two-stage", "dense", "lighthouse")
#: Learning-rate decay after the warm-up: ``cosine`` to 10% at the last step; ``constant`` (the published recipe's:
#: its torchtitan configs set ``decay_ratio = 0.0``, so the rate stays at ``lr`` after the warm-up); ``wsd``
#: (warm-up, stable, decay): constant, then linear to 10% over the last ``lr_decay_fraction`` of the steps.
LR_DECAY_STYLES = ("cosine", "constant", "wsd")
#: What ``--device`` accepts (``cuda:N``: the GPU of index ``N`` among the visible ones).
DEVICE_CHOICES = ("cpu", "cuda", "cuda:N")
VOCAB = 256  # bytes
CHECKPOINT = "checkpoint.pt"
#: Settings that may change when resuming (the run's length and its reporting); every other one must match the
#: checkpoint, or the model, data or schedule would not be the ones it was trained with.
#: (Not ``device``: the model differs by device, learned positions and fp32 on CPU, RoPE and bf16 on CUDA.)
RESUMABLE_CHANGES = ("steps", "out", "resume", "overwrite", "log_every", "eval_every", "eval_batches")
#: Settings added after checkpoints were first written: the value an older checkpoint ran with.
OLD_CHECKPOINT_SETTINGS = {"rope": "tokens", "lr_decay_style": "cosine", "lr_decay_fraction": 0.2}
#: What to lower when memory runs out.
MEMORY_HINT = "lower --batch-size, --seq-len, --layers or --hidden"
#: Largest ``--seed`` (the batches of step ``s`` are drawn with seed ``seed * 1_000_003 + s``, which must fit 64 bits).
MAX_SEED = 2**32 - 1
#: The largest value of each size setting: beyond them a run neither fits one machine nor ends (refused with the
#: bound, not failed deep inside torch or left running).
MAX_SIZES = {"steps": 10**7, "seq_len": 2**24, "batch_size": 2**14, "layers": 1024, "hidden": 2**15, "heads": 1024,
             "ffn": 2**17, "eval_batches": 2**14}


class SettingsError(ValueError):
    """A setting, flag combination, output directory or checkpoint the demo cannot run with; the message is one line
    that names the flag (the CLI prints it as ``error: ...`` and exits 2, without a traceback)."""


class Interrupted(Exception):
    """Ctrl-C while training; the message says at which step and where the run can continue (the CLI prints it and
    exits 130, as for Ctrl-C before the first step)."""


def flag(name: str) -> str:
    """The CLI flag of the :class:`DemoConfig` field ``name``: ``seq_len`` -> ``--seq-len``."""
    return "--" + name.replace("_", "-")


def shown(value: Any) -> str:
    """A setting's value as it is typed on the command line (``dense_layers`` ``(0, -1)`` -> ``0,-1``)."""
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return str(value)


def switch_step_for(mode: str, steps: int, dense_fraction: float) -> Optional[int]:
    """First dense step of a run of ``steps`` steps started with these settings: ``steps - round(steps *
    dense_fraction)`` for ``two-stage``, 0 for ``dense``, ``None`` (Lighthouse throughout) for ``lighthouse``."""
    if mode == "two-stage":
        return steps - int(round(steps * dense_fraction))
    return 0 if mode == "dense" else None


@dataclasses.dataclass
class DemoConfig:
    """Settings of one demo run (every field is a CLI flag of ``python -m megatron_lighthouse.demo``).

    ``mode``: ``two-stage`` (Lighthouse, then dense for the last ``dense_fraction`` of steps), ``dense`` (dense from
    scratch, the baseline) or ``lighthouse`` (Lighthouse throughout). Validation loss is always measured densely;
    during the Lighthouse stage also with Lighthouse on (``val_loss_lighthouse`` in the evaluations).
    The switch step is fixed when a run starts (:attr:`switch_step`) and kept in its checkpoint: a ``resume`` with
    other ``steps`` keeps it.
    ``out``: directory of the checkpoints (``None``: keep nothing; the CLI writes its metrics and plot there too).
    A directory that holds a run already is refused unless ``resume`` (continue it) or ``overwrite`` (replace it).
    Learning rate: linear warm-up over ``warmup`` steps (``None``: :attr:`warmup_steps`, ``min(20, steps // 10)``,
    fixed when a run starts: a resumed run keeps its own), then ``lr_decay_style`` (:data:`LR_DECAY_STYLES`):
    ``cosine`` to 10% of ``lr`` at the last step, ``constant`` (the published recipe) or ``wsd`` (constant, then
    linear to 10% over the last ``lr_decay_fraction`` of the steps).
    ``rope``: :attr:`LighthouseConfig.rope <megatron_lighthouse.config.LighthouseConfig>` (``entries`` or
    ``tokens``); it matters on CUDA only, where the model uses RoPE (on CPU it has learned positions).
    :meth:`validate` refuses any value out of range and any setting that the run would not use
    (:meth:`unused_settings`) when it differs from its default.
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
    warmup: Optional[int] = None
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
    overwrite: bool = False

    def lighthouse(self) -> LighthouseConfig:
        """The run's :class:`~megatron_lighthouse.config.LighthouseConfig` (``ValueError`` naming its fields)."""
        return LighthouseConfig(levels=self.levels, pooling_factor=self.pooling_factor, topk=self.topk,
                                dense_layers=tuple(self.dense_layers), rope=self.rope)

    @property
    def cuda(self) -> bool:
        """Whether the run is on a GPU (``--device cuda`` or ``cuda:N``)."""
        return self.device.startswith("cuda")

    def unused_settings(self) -> Dict[str, str]:
        """The settings this run does not use, each with why: ``{field: reason}``."""
        unused: Dict[str, str] = {}
        if self.mode != "two-stage":
            unused["dense_fraction"] = f"only --mode two-stage switches to dense (this is --mode {self.mode})"
        if self.mode == "dense":
            for name in ("levels", "pooling_factor", "topk", "dense_layers", "rope"):
                unused[name] = "--mode dense has no Lighthouse layers"
        elif not self.cuda:
            unused["rope"] = "only --device cuda uses RoPE (on CPU the model has learned positions)"
        if self.lr_decay_style != "wsd":
            unused["lr_decay_fraction"] = f"only --lr-decay-style wsd uses it (this is {self.lr_decay_style})"
        if self.out is None:
            unused["overwrite"] = "--no-save writes nothing"
        return unused

    def validate(self) -> None:
        """Raise :class:`SettingsError` (a ``ValueError``), one line ``--flag VALUE: rule``, for any setting that
        cannot run or would not be used; touches no file and builds nothing."""
        def refuse(name: str, rule: str) -> SettingsError:
            value = getattr(self, name)
            return SettingsError(f"{flag(name)}{'' if isinstance(value, bool) else ' ' + shown(value)}: {rule}")

        for name, choices in (("mode", MODES), ("rope", ROPE_PLACEMENTS), ("lr_decay_style", LR_DECAY_STYLES)):
            if getattr(self, name) not in choices:
                raise refuse(name, f"must be one of {', '.join(choices)}")
        for name in ("steps", "seq_len", "batch_size", "layers", "hidden", "heads", "ffn", "eval_every",
                     "eval_batches", "log_every", "corpus_bytes"):
            if getattr(self, name) < 1:
                raise refuse(name, "must be >= 1")
            if getattr(self, name) > MAX_SIZES.get(name, math.inf):
                raise refuse(name, f"must be at most {MAX_SIZES[name]} (the demo's range)")
        if self.hidden % self.heads:
            raise refuse("hidden", f"must be divisible by --heads {self.heads}")
        if not 0 <= self.seed <= MAX_SEED:
            raise refuse("seed", f"must be in [0, {MAX_SEED}]")
        if not (math.isfinite(self.lr) and 0 < self.lr <= 1):
            raise refuse("lr", "must be a positive number, at most 1 (AdamW diverges beyond)")
        if self.warmup is not None and not 0 <= self.warmup < self.steps:
            raise refuse("warmup", f"must be in [0, --steps {self.steps}): the warm-up is the start of the run")
        for name, reason in self.unused_settings().items():
            if getattr(self, name) != DEFAULTS[name]:
                raise refuse(name, f"not used: {reason}; drop it")
        if not 0.0 < self.dense_fraction < 1.0:
            raise refuse("dense_fraction", "must be in (0, 1)")
        if self.mode == "two-stage" and not 1 <= self.switch_step < self.steps:
            raise refuse("dense_fraction", f"gives {self.steps - self.switch_step} dense steps of --steps "
                                           f"{self.steps}; two-stage needs a Lighthouse step and a dense step")
        if not 0.0 < self.lr_decay_fraction <= 1.0:
            raise refuse("lr_decay_fraction", "must be in (0, 1]")
        if self.lr_decay_style == "wsd":
            decay = self._decay_steps(self.steps)
            if not 1 <= decay <= self.steps - self.warmup_steps:
                raise refuse("lr_decay_fraction", f"gives {decay} decay steps of --steps {self.steps} after "
                                                  f"--warmup {self.warmup_steps}; --lr-decay-style wsd needs 1 to "
                                                  f"{self.steps - self.warmup_steps}")
        if self.mode != "dense":
            self._validate_lighthouse()
        self._validate_device()
        if self.corpus == "":
            raise SettingsError("--corpus: empty; give a text file or a directory, or leave it out for the standard "
                                "library")
        if self.out == "":
            raise SettingsError("--out: empty; give a directory, or --no-save to keep nothing")
        if self.resume and self.overwrite:
            raise SettingsError("--resume continues the run in --out, --overwrite replaces it: give one of them")
        if self.resume and not self.out:
            raise SettingsError("--resume needs --out (the directory holding checkpoint.pt), not --no-save")

    def _validate_lighthouse(self) -> None:
        """The Lighthouse settings and ``seq_len`` against them (the rules of :class:`LighthouseConfig`)."""
        for i in self.dense_layers:
            if not -self.layers <= i < self.layers:
                raise SettingsError(f"--dense-layers {shown(self.dense_layers)}: layer {i} is not one of --layers "
                                    f"{self.layers} (0 to {self.layers - 1}, or -{self.layers} to -1 from the end)")
        try:
            lighthouse = self.lighthouse()
        except ValueError as err:  # "LighthouseConfig.levels=1: must be >= 2 ..." -> "--levels 1: must be >= 2 ..."
            named = re.match(r"LighthouseConfig\.(\w+)=(.*?): (.*)", str(err))
            raise SettingsError(f"{flag(named[1])} {named[2]}: {named[3]}" if named else str(err)) from None
        try:
            lighthouse.validate(self.seq_len)
        except ValueError as err:
            raise SettingsError(f"--seq-len {self.seq_len} does not fit the Lighthouse settings (--levels, "
                                f"--pooling-factor, --topk): {err}") from None
        if len(lighthouse.dense_layer_set(self.layers)) == self.layers:
            raise SettingsError(f"--dense-layers {shown(self.dense_layers)}: keeps all {self.layers} layers dense; "
                                f"use more --layers or fewer dense layers")

    def _validate_device(self) -> None:
        """``cpu``, ``cuda`` or ``cuda:N`` of a visible GPU."""
        named = re.fullmatch(r"cpu|cuda(?::(\d+))?", self.device)
        if not named:
            raise SettingsError(f"--device {self.device}: must be one of {', '.join(DEVICE_CHOICES)}")
        if self.cuda:
            count = torch.cuda.device_count()
            index = int(named[1] or 0)
            if not count:
                raise SettingsError(f"--device {self.device}: no CUDA device is visible; use --device cpu")
            if index >= count:
                raise SettingsError(f"--device {self.device}: {count} CUDA device(s) visible, cuda:0 to "
                                    f"cuda:{count - 1}")

    @property
    def warmup_steps(self) -> int:
        """Steps of learning-rate warm-up: ``warmup``, or when it is ``None`` (not given) ``min(20, steps // 10)``."""
        return min(20, self.steps // 10) if self.warmup is None else self.warmup

    def _decay_steps(self, steps: int) -> int:
        """Steps of a ``wsd`` decay over a schedule of ``steps`` steps (the last ``lr_decay_fraction`` of them)."""
        return int(round(steps * self.lr_decay_fraction))

    @property
    def switch_step(self) -> Optional[int]:
        """First dense step of a run started with these settings (``None`` when Lighthouse never switches off);
        a resumed run keeps the one of its checkpoint instead."""
        return switch_step_for(self.mode, self.steps, self.dense_fraction)


#: The defaults, against which :meth:`DemoConfig.validate` tells a setting that was given from one left alone.
DEFAULTS = {f.name: f.default for f in dataclasses.fields(DemoConfig)}


def describe(cfg: DemoConfig, switch_step: Optional[int], parameters: int) -> List[str]:
    """The lines the demo prints once at the start: the model, the training and the attention settings in use
    (none that the run does not use), with the switch step ``switch_step`` and the model's ``parameters``."""
    positions = "RoPE" if cfg.cuda else "learned positions"
    lines = [f"model: {cfg.layers} layers, hidden {cfg.hidden}, {cfg.heads} heads, ffn {cfg.ffn}, "
             f"{parameters / 1e6:.2f}M parameters, {'bf16' if cfg.cuda else 'fp32'}, {positions}, on {cfg.device}"]
    decay = {"cosine": "cosine decay to 10% at the last step", "constant": "constant",
             "wsd": f"constant, then linear to 10% over the last {cfg._decay_steps(cfg.steps)} steps"}
    lines.append(f"training: {cfg.steps} steps of {cfg.batch_size} x {cfg.seq_len} bytes, lr {cfg.lr:g} "
                 f"({cfg.warmup_steps} warm-up steps, then {decay[cfg.lr_decay_style]}), seed {cfg.seed}")
    if cfg.mode == "dense":
        lines.append("attention: dense throughout (--mode dense): Lighthouse is off")
        return lines
    lighthouse = cfg.lighthouse()
    cost = lighthouse.attention_cost(cfg.seq_len, cfg.heads, cfg.hidden // cfg.heads)
    kept = ",".join(map(str, sorted(lighthouse.dense_layer_set(cfg.layers))))
    rope = f", RoPE on the {cfg.rope}" if cfg.cuda else ""
    lines.append(f"Lighthouse: levels {cfg.levels}, pooling factor {cfg.pooling_factor}, topk {cfg.topk}{rope}; "
                 f"layers {kept} stay dense; each Lighthouse layer attends over S = {cost['subsequence_length']} of "
                 f"the {cfg.seq_len} positions: {cost['ratio']:.2f}x the attention FLOPs of dense")
    if switch_step is None:
        lines.append("schedule: Lighthouse throughout (--mode lighthouse), no switch to dense")
    else:
        lines.append(f"schedule: Lighthouse for steps 0-{switch_step - 1}, dense from step {switch_step} "
                     f"(the switch step, fixed when the run started) to {cfg.steps}")
    return lines


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
    return cfg.lr * _lr_factor(cfg.lr_decay_style, step, cfg.warmup_steps, cfg.steps, cfg._decay_steps(cfg.steps))


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


def save_torch(path: pathlib.Path, obj: Any) -> None:
    """``torch.save(obj)`` to ``path`` through :func:`~megatron_lighthouse.atomic.write_atomic`."""
    atomic.write_atomic(path, lambda f: torch.save(obj, f))


def _checkpoint_problem(ckpt: Any) -> Optional[str]:
    """What makes ``ckpt`` (a loaded file) not a demo checkpoint, or ``None``."""
    if not isinstance(ckpt, dict):
        return f"it holds a {type(ckpt).__name__}, not the demo's dict"
    missing = [k for k in ("model", "optimizer", "state", "config") if k not in ckpt]
    if missing:
        return f"it has no {', '.join(missing)} entries"
    config, state = ckpt["config"], ckpt["state"]
    if not isinstance(config, dict) or not all(k in config for k in ("mode", "steps", "dense_fraction", "warmup")):
        return "its config has no mode, steps, dense_fraction and warmup"
    if config["mode"] not in MODES or not _is_count(config["steps"], 1) or not (
            isinstance(config["dense_fraction"], float) and 0 < config["dense_fraction"] < 1) or not (
            config["warmup"] is None or _is_count(config["warmup"], 0)):
        return (f"its config has mode {config['mode']!r}, steps {config['steps']!r}, dense_fraction "
                f"{config['dense_fraction']!r}, warmup {config['warmup']!r}: not the values of a run")
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) or not all(
            k in state for k in ("train", "evals", "seconds", "tokens")):
        return "its run state has no step, train, evals, seconds and tokens"
    step, switch = state["step"], state.get("switch_step")
    if not _is_count(step, 0) or step > config["steps"]:
        return f"its step {step!r} is not a step of its run of {config['steps']} steps"
    if switch is not None and not _is_count(switch, 0):
        return f"its switch step {switch!r} is not a step (an int >= 0)"
    if not (isinstance(state["train"], list) and isinstance(state["evals"], list) and all(
            isinstance(state[k], dict) and set(state[k]) == {"lighthouse", "dense"} for k in ("seconds", "tokens"))):
        return "its run state's train, evals, seconds or tokens are not what the demo writes"
    return None


def _is_count(value: Any, low: int) -> bool:
    """Whether ``value`` is an int (not a bool) >= ``low``."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def read_checkpoint(path: pathlib.Path, device: torch.device) -> Dict:
    """Load and check the demo checkpoint ``path`` (tensors only, no code runs: ``weights_only``).

    ``SettingsError`` naming the file and what is wrong when it is empty, truncated or not a demo checkpoint."""
    fix = f"use another --out for a new run, or --overwrite to replace {path.name}"
    if path.stat().st_size == 0:
        raise SettingsError(f"--resume: {path} is empty (a write that never finished?); {fix}")
    try:
        with warnings.catch_warnings():  # torch's own warnings about a foreign pickle: the error says it all
            warnings.simplefilter("ignore")
            ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as err:  # truncated zip, a foreign pickle, another format: torch raises many kinds
        raise SettingsError(f"--resume: {path} cannot be read as a checkpoint, truncated or not one "
                            f"({_first_sentence(err)}); {fix}") from None
    problem = _checkpoint_problem(ckpt)
    if problem:
        raise SettingsError(f"--resume: {path} is not a demo checkpoint ({problem}); {fix}")
    return ckpt


def resumable_state(ckpt: Dict, cfg: DemoConfig, path: pathlib.Path) -> Dict:
    """The run state of checkpoint ``ckpt`` (read from ``path``) to continue with settings ``cfg``, its switch step
    included (``state["switch_step"]``; a checkpoint older than that key: the one of its own saved settings).

    ``SettingsError`` when ``cfg`` differs from the checkpoint's settings in more than :data:`RESUMABLE_CHANGES`,
    or its ``steps`` are not past the saved step (or, two-stage, the switch step)."""
    now = dataclasses.asdict(cfg)
    saved = {**OLD_CHECKPOINT_SETTINGS, **ckpt["config"]}
    ignored = set(RESUMABLE_CHANGES) | set(cfg.unused_settings())
    changed = [f"{flag(k)} {shown(saved.get(k))} -> {shown(now[k])}" for k in now
               if k not in ignored and saved.get(k) != now[k]]
    if changed:
        may_change = ", ".join(flag(k) for k in RESUMABLE_CHANGES if k not in ("out", "resume", "overwrite"))
        raise SettingsError(f"--resume: {path} was written with other settings ({'; '.join(changed)}); rerun with "
                            f"the checkpoint's settings (only {may_change} may change) or use another --out")
    state = dict(ckpt["state"])
    state.setdefault("switch_step", switch_step_for(saved["mode"], saved["steps"], saved["dense_fraction"]))
    done, switch = state["step"], state["switch_step"]
    if cfg.steps <= done:
        raise SettingsError(f"--steps {cfg.steps}: {path} is at step {done} already; pass --steps above {done} "
                            f"with --resume to train on")
    if cfg.mode == "two-stage" and cfg.steps <= switch:
        raise SettingsError(f"--steps {cfg.steps}: this run switches to dense at step {switch} (fixed when it "
                            f"started), so it would end without a dense step; pass --steps above {switch}")
    return state


def _prepare_out(cfg: DemoConfig, device: torch.device) -> Tuple[Optional[pathlib.Path], Optional[Dict]]:
    """The output directory (``None``: ``--no-save``) and the checkpoint to resume from (``None``: a new run).

    Creates the directory and refuses, before any work and leaving every file as it is: an ``--out`` that is a file
    or cannot be created or written in; one that holds a run (``checkpoint.pt``) without ``--resume`` or
    ``--overwrite``; a checkpoint that cannot continue."""
    if not cfg.out:
        return None, None
    out = pathlib.Path(cfg.out)
    path = out / CHECKPOINT
    if out.exists() and not out.is_dir():
        raise SettingsError(f"--out {out}: is a file, not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=out).close()  # the checkpoints are written there: a file that leaves no trace
    except OSError as err:
        raise SettingsError(f"--out {out}: cannot create it or write in it ({err.strerror or err})") from None
    if cfg.resume:
        if not path.exists():
            logger.info("--resume: no %s yet, starting at step 0", path)
            return out, None
        return out, read_checkpoint(path, device)
    if path.exists() and not cfg.overwrite:
        raise SettingsError(f"--out {out}: holds a run already ({CHECKPOINT}); add --resume to continue it, "
                            f"--overwrite to replace it, or give another --out")
    return out, None


def run_demo(cfg: DemoConfig) -> Dict:
    """Train, switch, evaluate; returns the metrics (also written to ``cfg.out/metrics.json`` by the CLI).

    Every refusal (:class:`SettingsError`) comes before the model is built, and all but the corpus size before the
    corpus is read. Ctrl-C before the first step is a ``KeyboardInterrupt`` raised between the phases of the start
    (:class:`HeldInterrupts`), while training an :class:`Interrupted` that says where the run can continue."""
    held = HeldInterrupts()
    try:
        return _run(cfg, held)
    finally:
        held.release(check=False)


def _run(cfg: DemoConfig, held: HeldInterrupts) -> Dict:
    """:func:`run_demo` with Ctrl-C ``held`` until the first step."""
    cfg.validate()
    device = torch.device(cfg.device)
    out, ckpt = _prepare_out(cfg, device)
    if cfg.warmup is None:  # not given: fixed when the run starts, as the switch step (--resume keeps the run's)
        cfg = dataclasses.replace(cfg, warmup=cfg.warmup_steps if ckpt is None else ckpt["config"]["warmup"])
        cfg.validate()  # a resumed run's warm-up against its --steps
    if ckpt is not None:
        state = resumable_state(ckpt, cfg, out / CHECKPOINT)
    else:
        state = dict(step=0, train=[], evals=[], seconds={"lighthouse": 0.0, "dense": 0.0},
                     tokens={"lighthouse": 0, "dense": 0}, switch_step=cfg.switch_step)
    try:
        train, val = load_corpus(cfg.corpus, cfg.corpus_bytes)
    except ValueError as err:  # "--corpus PATH: no such file or directory", empty, or no text files there
        raise SettingsError(str(err)) from None
    if min(len(train), len(val)) <= cfg.seq_len + 1:
        read = f"{len(train)} train / {len(val)} validation bytes"
        if len(train) + len(val) < cfg.corpus_bytes:  # the whole corpus was read: it is what is too small
            raise SettingsError(f"--corpus {cfg.corpus or 'the standard library'}: holds {read} in all, too few "
                                f"for --seq-len {cfg.seq_len} (each split needs more than --seq-len + 1 bytes); give "
                                f"a larger corpus or lower --seq-len")
        raise SettingsError(f"--corpus-bytes {cfg.corpus_bytes}: {read} read, too few for --seq-len {cfg.seq_len}; "
                            f"raise --corpus-bytes or lower --seq-len")
    held.check()
    _init_runtime(device)
    held.check()
    torch.manual_seed(cfg.seed)
    switch = state["switch_step"]
    schedule = LighthouseSchedule(dense_from_iteration=switch)
    saved_step: Optional[int] = None
    training = False  # a step has started: Ctrl-C from then on says where the run can continue
    tokens_per_step = cfg.batch_size * cfg.seq_len
    try:
        model = build_model(cfg, device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1)
        if ckpt is not None:
            _load_into(ckpt, model, optimizer, out / CHECKPOINT)
            saved_step = state["step"]
            logger.info("resumed from %s at step %d", out / CHECKPOINT, saved_step)
        for line in describe(cfg, switch, sum(p.numel() for p in model.parameters())):
            logger.info("%s", line)
        first = state["step"]
        held.release()
        training = True
        for step in range(first, cfg.steps):
            stage = "lighthouse" if schedule.apply(model, step) else "dense"  # --mode dense: dense from step 0
            if step == switch and cfg.mode == "two-stage":
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
            if (step + 1) % cfg.log_every == 0 or step == first:  # and the first step this process trains
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
                    save_torch(out / CHECKPOINT, dict(model=model.state_dict(), optimizer=optimizer.state_dict(),
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
        if not training:
            raise  # before the first step: the CLI says so
        raise Interrupted(f"interrupted at step {state['step']}{_resume_hint(cfg, out, saved_step)}") from None
    if out is not None:
        from ..export import dense_state_dict

        try:
            save_torch(out / "model_dense.pt", dense_state_dict(model))
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted after the last step, while writing {out / 'model_dense.pt'} (the "
                              f"checkpoint of step {saved_step} is whole)") from None
    return summarize(cfg, state)


def _load_into(ckpt: Dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer, path: pathlib.Path) -> None:
    """The checkpoint's model and optimizer state into ``model`` and ``optimizer`` (``SettingsError`` when they do
    not fit: a checkpoint whose settings match has the same shapes, so this means the file was altered)."""
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise SettingsError(f"--resume: {path} does not fit the model of its own settings ({_first_sentence(err)}); "
                            f"use another --out for a new run, or --overwrite to replace it") from None


def _first_sentence(err: BaseException) -> str:
    """``TypeName: first sentence of the message`` of a library's exception, for a one-line error."""
    text = (str(err).strip().splitlines() or [""])[0].split(". ")[0]
    return f"{type(err).__name__}: {text[:120]}"


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
    """Final validation loss of each stage (``final_val_loss``: every layer dense; ``final_val_loss_lighthouse``: with
    the Lighthouse layers on, Lighthouse stage only), wall time and tokens/s, plus the curves."""
    stages: List[Dict] = []
    for stage in ("lighthouse", "dense"):
        evals = [e for e in state["evals"] if e["stage"] == stage]
        if state["tokens"][stage]:
            seconds = state["seconds"][stage]
            stages.append(dict(stage=stage, steps=sum(t["stage"] == stage for t in state["train"]),
                               final_val_loss=evals[-1]["val_loss"] if evals else None,
                               final_val_loss_lighthouse=evals[-1].get("val_loss_lighthouse") if evals else None,
                               seconds=seconds, tokens_per_s=state["tokens"][stage] / seconds if seconds else 0.0))
    return dict(config=dataclasses.asdict(cfg), switch_step=state["switch_step"], stages=stages,
                final_val_loss=state["evals"][-1]["val_loss"] if state["evals"] else None,
                train=state["train"], evals=state["evals"])
