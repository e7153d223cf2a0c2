"""The command line of ``python -m megatron_lighthouse.demo``: two-stage Lighthouse -> dense pretraining of a tiny
byte-level GPT on this Python's standard library (or ``--corpus``), with a dense baseline (``--mode dense``) to
compare against."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import pathlib
import sys
import warnings
from typing import Any, Iterator, List, Optional

from .. import atomic
from . import EXIT_INTERRUPTED, INTERRUPTED_BEFORE_TRAINING
from ..config import ROPE_PLACEMENTS
from .train import (
    DEFAULTS,
    DEVICE_CHOICES,
    LR_DECAY_STYLES,
    MAX_SIZES,
    MODES,
    DemoConfig,
    Interrupted,
    SettingsError,
    flag,
    run_demo,
    shown,
)

logger = logging.getLogger("megatron_lighthouse.demo")

#: The first lines of ``--help``.
DESCRIPTION = ("Two-stage pretraining of a tiny byte-level Megatron-Core GPT on this Python's standard library (or "
               "--corpus): Lighthouse attention for most steps, then dense, as in the paper; --mode dense is the "
               "baseline to compare against. Prints its settings, a progress bar and a summary table; writes its "
               "checkpoint, dense model, metrics and loss plot under --out.")
#: What each flag does, its range or choices; ``parse_args`` adds the default. Every field of :class:`DemoConfig`
#: has one (``--baseline`` and ``--no-save`` are the CLI's own, see :func:`build_parser`).
HELP = {
    "mode": f"attention schedule, one of: {MODES[0]} (Lighthouse, then dense for the last --dense-fraction of the "
            f"steps: the paper's recipe), {MODES[1]} (dense from scratch: the baseline), {MODES[2]} (Lighthouse "
            f"throughout)",
    "steps": f"training steps in all (1 to {MAX_SIZES['steps']}). With --resume: where the run now ends, above its "
             "checkpoint's step; the switch to dense stays at the step fixed when the run started, before or after it",
    "dense_fraction": "--mode two-stage only: the fraction of --steps trained dense at the end, in (0, 1), at least "
                      "one step of each stage; it fixes the switch step when a run starts (--resume keeps that step)",
    "seq_len": f"bytes per training sequence (1 to {MAX_SIZES['seq_len']}); with Lighthouse a multiple of "
               "pooling-factor**(levels-1) * topk/128 with >= 128 coarsest entries per tile (an error names the "
               "nearest valid lengths)",
    "batch_size": f"sequences per step (1 to {MAX_SIZES['batch_size']})",
    "layers": f"transformer layers (1 to {MAX_SIZES['layers']})",
    "hidden": f"hidden size (1 to {MAX_SIZES['hidden']}, divisible by --heads)",
    "heads": f"attention heads (1 to {MAX_SIZES['heads']})",
    "ffn": f"feed-forward (SwiGLU) hidden size (1 to {MAX_SIZES['ffn']})",
    "levels": "Lighthouse pyramid levels L (>= 2; level 0 is the tokens); not with --mode dense",
    "pooling_factor": "Lighthouse pooling factor p, tokens pooled per level: a power of two in [2, 64]; not with "
                      "--mode dense",
    "topk": "Lighthouse selection budget k: a positive multiple of 128; not with --mode dense",
    "dense_layers": "comma-separated layers that keep dense attention, 0-based, negative from the end (-1: the "
                    "last), not all of them; not with --mode dense",
    "rope": "--device cuda only (on CPU the model has learned positions, no RoPE): where Lighthouse layers apply "
            "RoPE, one of: entries (each selected entry rotated at its last token, the published model), tokens "
            "(before pooling, Megatron's order)",
    "lr": "peak learning rate of AdamW, in (0, 1]",
    "warmup": "steps of linear learning-rate warm-up at the start, in [0, --steps) (default: min(20, steps/10), "
              "rounded down; --resume keeps the run's)",
    "lr_decay_style": f"learning rate after the warm-up, one of: {LR_DECAY_STYLES[0]} (to 10% at the last step), "
                      f"{LR_DECAY_STYLES[1]} (the published recipe), {LR_DECAY_STYLES[2]} (constant, then linear "
                      f"to 10% over the last --lr-decay-fraction of the steps)",
    "lr_decay_fraction": "--lr-decay-style wsd only: the fraction of --steps that its decay takes, in (0, 1]: at "
                         "least one step, none of them in the warm-up",
    "eval_every": "steps between validation losses and checkpoints (>= 1); the last step is always evaluated",
    "eval_batches": f"batches of --batch-size validation sequences per evaluation (1 to {MAX_SIZES['eval_batches']})",
    "log_every": "steps between progress lines (>= 1)",
    "device": f"where to train, one of: {', '.join(DEVICE_CHOICES)} (N: the index of a visible GPU); CUDA trains in "
              "bf16 with RoPE, CPU in fp32 with learned positions",
    "seed": "seed of the initialization and of the batches, in [0, 2**32 - 1]",
    "corpus": "a text file, or a directory whose .py, .txt and .rst files are read in sorted order (default: this "
              "Python's standard library)",
    "corpus_bytes": "at most this many bytes of the corpus are read (>= 1); about 10% of its files go to validation",
    "out": "directory for checkpoint.pt (every --eval-every steps), model_dense.pt, metrics.json and loss.png; one "
           "that holds a run already is refused unless --resume or --overwrite is given",
    "resume": "continue the run in --out from its checkpoint.pt (only --steps, --eval-every, --eval-batches and "
              "--log-every may change; the switch step stays the checkpoint's); an --out without one starts the "
              "run, so one command serves the first launch and every restart",
    "overwrite": "start a new run in an --out that holds one, replacing its files",
}
#: The flags with a fixed set of values (shown in the usage line; :meth:`DemoConfig.validate` checks them).
CHOICES = {"mode": MODES, "rope": ROPE_PLACEMENTS, "lr_decay_style": LR_DECAY_STYLES, "device": DEVICE_CHOICES}
#: Library warnings that mean nothing to a demo user, ignored while the demo runs (``warnings.filterwarnings``
#: arguments): megatron-core's notes that TransformerEngine, Apex or absl is not installed (the demo uses none) and its
#: deprecation notices about its own settings. Nothing else is hidden.
QUIET_WARNINGS = (
    dict(message=r"(Transformer Engine and Apex are|Transformer Engine is|Apex is) not installed",
         module=r"megatron\."),
    dict(message=r"absl\.logging is not installed", module=r"megatron\."),
    dict(message=r".*\bdeprecated\b", category=UserWarning, module=r"megatron\."),
    dict(category=DeprecationWarning, module=r"megatron\."),
    dict(category=FutureWarning, module=r"megatron\."),
)
#: Library log lines hidden the same way: ``{logger name: message prefix}`` (torch's note, on a machine without
#: CUDA, that it found no CUDA runtime for building extensions, which the demo never builds).
QUIET_LOG_LINES = {"torch.utils.cpp_extension": "No CUDA runtime is found"}


@contextlib.contextmanager
def quiet_library_noise() -> Iterator[None]:
    """Hide :data:`QUIET_WARNINGS` and :data:`QUIET_LOG_LINES` inside the block; everything is restored on exit.
    Enter it before megatron-core is imported: most of those warnings come once, at import."""
    drops = [(logging.getLogger(name), lambda record, p=prefix: not record.getMessage().startswith(p))
             for name, prefix in QUIET_LOG_LINES.items()]
    with warnings.catch_warnings():
        for rule in QUIET_WARNINGS:
            warnings.filterwarnings("ignore", **rule)
        for log, drop in drops:
            log.addFilter(drop)
        try:
            yield
        finally:
            for log, drop in drops:
                log.removeFilter(drop)


class _Parser(argparse.ArgumentParser):
    """argparse's own errors (an unknown flag, a missing value) as :class:`SettingsError`: one line, exit 2."""

    def error(self, message: str):
        raise SettingsError(f"{message} (--help lists the flags)")


def build_parser() -> argparse.ArgumentParser:
    """The CLI: one flag per :class:`DemoConfig` field, plus ``--baseline`` and ``--no-save``. Values are parsed
    as strings (:func:`parse_args` converts and :meth:`DemoConfig.validate` checks them); a flag not given is left
    out of the namespace (``argparse.SUPPRESS``)."""
    p = _Parser(prog="python -m megatron_lighthouse.demo", description=DESCRIPTION,
                argument_default=argparse.SUPPRESS,
                epilog="The switch from Lighthouse to dense is fixed when a run starts and kept in its checkpoint: "
                       "--resume with other --steps never moves it. Bad values are refused before any work.")
    for field in dataclasses.fields(DemoConfig):
        text = HELP[field.name]
        if isinstance(field.default, bool):
            p.add_argument(flag(field.name), action="store_true", help=text.replace("%", "%%"))
        else:
            if field.default is not None:
                text += f" (default: {shown(field.default)})"
            choices = CHOICES.get(field.name)
            p.add_argument(flag(field.name), metavar="{" + ",".join(choices) + "}" if choices else None,
                           help=text.replace("%", "%%"))
        if field.name == "mode":
            p.add_argument("--baseline", action="store_true", help="shorthand for --mode dense")
        elif field.name == "out":
            p.add_argument("--no-save", action="store_true",
                           help="keep nothing: no checkpoints, metrics or plot (not with --out)")
    return p


def _value(name: str, text: str) -> Any:
    """The value of :class:`DemoConfig` field ``name`` typed as ``text`` (``SettingsError`` naming the flag)."""
    default = 0 if name == "warmup" else DEFAULTS[name]  # an int; its default, None, follows --steps
    if isinstance(default, tuple):  # --dense-layers
        try:
            return tuple(int(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise SettingsError(f"{flag(name)} {text}: must be comma-separated integers") from None
    if not isinstance(default, (int, float)):
        return text
    try:
        return type(default)(text)
    except ValueError:
        raise SettingsError(f"{flag(name)} {text}: must be {'an integer' if isinstance(default, int) else 'a number'}"
                            ) from None


def parse_args(argv: Optional[List[str]] = None) -> DemoConfig:
    """The :class:`DemoConfig` of the command line ``argv`` (default ``sys.argv[1:]``), not yet validated.

    ``SettingsError`` for a value of the wrong type, an unknown flag, or two flags that contradict each other."""
    given = vars(build_parser().parse_args(argv))
    if given.pop("baseline", False):
        if given.get("mode", "dense") != "dense":
            raise SettingsError(f"--baseline is --mode dense: it cannot go with --mode {given['mode']}")
        given["mode"] = "dense"
    if given.pop("no_save", False):
        if "out" in given:
            raise SettingsError(f"--out {given['out']}: --no-save keeps nothing; give one of them")
        given["out"] = None
    return DemoConfig(**{name: _value(name, v) if isinstance(v, str) else v for name, v in given.items()})


#: The summary's columns of final validation losses: (heading, key of a stage in the metrics).
LOSS_COLUMNS = (("val loss, Lighthouse on", "final_val_loss_lighthouse"), ("val loss, all dense", "final_val_loss"))


def print_summary(metrics: dict) -> None:
    """The table of stages (steps, final validation loss with the Lighthouse layers on and with every layer dense,
    wall time, tokens/s) and the final loss. Each loss column says how the model was evaluated; a stage that was
    not evaluated that way shows ``-`` (the dense stage has no Lighthouse layers on)."""
    losses = "".join(f" {heading:>23}" for heading, _ in LOSS_COLUMNS)
    print(f"\n{'stage':<11} {'steps':>6}{losses} {'wall s':>8} {'tokens/s':>10}")
    for s in metrics["stages"]:
        losses = "".join(f" {'-' if s.get(key) is None else format(s[key], '.4f'):>23}" for _, key in LOSS_COLUMNS)
        print(f"{s['stage']:<11} {s['steps']:>6}{losses} {s['seconds']:>8.1f} {s['tokens_per_s']:>10.0f}")
    print(f"final validation loss (all dense, the model the run ships): {metrics['final_val_loss']:.4f}")


def write_metrics(metrics: dict, path: pathlib.Path) -> pathlib.Path:
    """``metrics`` as indented JSON to ``path`` (atomically: :func:`~megatron_lighthouse.atomic.write_atomic`)."""
    return atomic.write_atomic(path, lambda f: f.write(json.dumps(metrics, indent=1).encode()))


def plot(metrics: dict, path: pathlib.Path) -> Optional[pathlib.Path]:
    """Training and validation loss curves with the switch marked, as a PNG at ``path`` (atomically); ``None``
    without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: no loss-curve PNG (pip install matplotlib)")
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([t["step"] for t in metrics["train"]], [t["loss"] for t in metrics["train"]], lw=0.8, alpha=0.6,
            label="train")
    ax.plot([e["step"] for e in metrics["evals"]], [e["val_loss"] for e in metrics["evals"]], marker="o",
            label="validation (dense)")
    sparse = [e for e in metrics["evals"] if "val_loss_lighthouse" in e]
    if sparse:
        ax.plot([e["step"] for e in sparse], [e["val_loss_lighthouse"] for e in sparse], marker="s", ms=4,
                label="validation (Lighthouse on)")
    switch = metrics["switch_step"]
    if switch and metrics["config"]["mode"] == "two-stage":
        ax.axvline(switch, color="k", ls="--", lw=1, label=f"Lighthouse -> dense (step {switch})")
    ax.set(xlabel="step", ylabel="loss (nats/byte)", title=f"megatron-lighthouse demo: {metrics['config']['mode']}")
    ax.legend()
    fig.tight_layout()
    try:
        return atomic.write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110))
    finally:
        plt.close(fig)




def main(argv: Optional[List[str]] = None) -> int:
    """Run the demo of the command line ``argv`` (default ``sys.argv[1:]``); returns the exit status: 0; 2 after
    printing one line ``error: ...`` for settings, an output directory or a checkpoint it cannot run with; 130 after
    one line when Ctrl-C stops it (before the first step: reading the corpus, importing Megatron-Core, building the
    model; while training: with where the run can continue)."""
    try:
        return _run(argv)
    except Interrupted as err:
        print(err, file=sys.stderr)
    except KeyboardInterrupt:
        print(INTERRUPTED_BEFORE_TRAINING, file=sys.stderr)
    return EXIT_INTERRUPTED


def _run(argv: Optional[List[str]]) -> int:
    """:func:`main` without its Ctrl-C handling."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    for noisy in ("megatron", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    with quiet_library_noise():
        try:
            cfg = parse_args(argv)
            metrics = run_demo(cfg)
        except SettingsError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        try:
            print_summary(metrics)
            if cfg.out:
                out = pathlib.Path(cfg.out)
                write_metrics(metrics, out / "metrics.json")
                png = plot(metrics, out / "loss.png")
                print(f"wrote {out / 'metrics.json'}" + (f" and {png}" if png else "") + f"; checkpoints in {out}")
        except KeyboardInterrupt:
            raise Interrupted("interrupted after the last step, while writing the summary" + (
                f" to {cfg.out} (its checkpoint is whole)" if cfg.out else "")) from None
    return 0

