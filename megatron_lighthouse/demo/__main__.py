"""``python -m megatron_lighthouse.demo``: two-stage Lighthouse -> dense pretraining on an embedded corpus."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import pathlib
import sys
from typing import List, Optional

from .train import MODES, DemoConfig, run_demo

logger = logging.getLogger("megatron_lighthouse.demo")


def parse_args(argv: Optional[List[str]] = None) -> DemoConfig:
    defaults = DemoConfig()
    p = argparse.ArgumentParser(prog="python -m megatron_lighthouse.demo", description=__doc__.strip(),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mode", choices=MODES, default=defaults.mode,
                   help="two-stage: Lighthouse then dense; dense: dense from scratch; lighthouse: throughout")
    p.add_argument("--baseline", action="store_true", help="shorthand for --mode dense")
    for field in dataclasses.fields(DemoConfig):
        if field.name in ("mode", "resume", "dense_layers"):
            continue
        value = getattr(defaults, field.name)
        kind = type(value) if value is not None else str
        p.add_argument("--" + field.name.replace("_", "-"), type=kind, default=value)
    p.add_argument("--dense-layers", default=",".join(map(str, defaults.dense_layers)),
                   help="comma-separated layers kept dense (negative: from the end)")
    p.add_argument("--resume", action="store_true", help="continue from --out/checkpoint.pt")
    p.add_argument("--no-save", action="store_true", help="keep no checkpoints, metrics or plot (overrides --out)")
    args = vars(p.parse_args(argv))
    if args.pop("baseline"):
        args["mode"] = "dense"
    if args.pop("no_save"):
        args["out"] = None
    try:
        args["dense_layers"] = tuple(int(x) for x in args["dense_layers"].split(",") if x.strip())
    except ValueError:
        p.error(f"--dense-layers {args['dense_layers']!r}: must be comma-separated ints")
    if args["resume"] and not args["out"]:
        p.error("--resume needs --out (the directory holding checkpoint.pt), not --no-save")
    return DemoConfig(**args)


def print_summary(metrics: dict) -> None:
    print(f"\n{'stage':<11} {'steps':>6} {'final val loss (dense)':>23} {'wall s':>8} {'tokens/s':>10}")
    for s in metrics["stages"]:
        loss = "-" if s["final_val_loss"] is None else f"{s['final_val_loss']:.4f}"
        print(f"{s['stage']:<11} {s['steps']:>6} {loss:>23} {s['seconds']:>8.1f} {s['tokens_per_s']:>10.0f}")
    print(f"final validation loss: {metrics['final_val_loss']:.4f}")


def plot(metrics: dict, path: pathlib.Path) -> Optional[pathlib.Path]:
    """Training and validation loss curves with the switch marked (needs matplotlib)."""
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
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    for noisy in ("megatron", "matplotlib"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        cfg = parse_args(argv)
        metrics = run_demo(cfg)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print_summary(metrics)
    if cfg.out:
        out = pathlib.Path(cfg.out)
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
        png = plot(metrics, out / "loss.png")
        print(f"wrote {out / 'metrics.json'}" + (f" and {png}" if png else "") + f"; checkpoints in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
