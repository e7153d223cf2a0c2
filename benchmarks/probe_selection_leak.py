"""Does a Lighthouse-trained model read the future through its selection? A probe of a demo run's checkpoint.

Lighthouse selects per tile (``T = topk / 128`` tiles of ``seq_len / T`` tokens): an entry's score is the max norm of
the tokens it covers, and the entries of a tile compete for its top-K, so *which* earlier tokens are resolved
finely depends on later tokens of the same tile (README, "A note on causality"). Attention itself stays causal for
a given selection. This probe measures whether training learned to use that channel: on validation windows it
scores the first half of the first tile twice, once with the window's own second half of the tile and once with
that half taken from another window, the rest unchanged. A causal model (dense attention) gives the same loss both
ways; the difference in Lighthouse mode is what the model gains from bytes it should not yet have seen.

Prints a table and writes JSON (``--out``)::

    python3 benchmarks/probe_selection_leak.py --run-dir RUN [RUN ...] --out leak.json

``RUN``: the ``--out`` directory of a ``python -m megatron_lighthouse.demo`` run (its ``checkpoint.pt``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megatron_lighthouse.demo.runs import runs_with_validation, validation_windows  # noqa: E402
from megatron_lighthouse.demo.train import DemoConfig, token_losses  # noqa: E402
from megatron_lighthouse.switch import lighthouse_enabled  # noqa: E402


@torch.no_grad()
def probe(model: torch.nn.Module, cfg: DemoConfig, val: torch.Tensor, windows: int,
          device: torch.device) -> Dict[str, float]:
    """Mean first-half-of-tile loss of ``windows`` validation windows, own vs swapped continuation, both modes.

    ``val``: 1-D uint8 bytes. Window ``i``'s positions ``[tile/2, tile)`` are swapped with window ``i+1``'s; the
    loss is taken over ``[0, tile/2 - 1)``, whose labels are the same in both versions."""
    tile = cfg.seq_len // cfg.lighthouse().tiles()
    half = tile // 2
    rows = validation_windows(val, cfg.seq_len, windows)
    swapped = rows.clone()
    swapped[:, half:tile] = rows.roll(-1, dims=0)[:, half:tile]
    model.eval()
    result: Dict[str, float] = dict(tile=tile, prefix=half - 1, windows=windows)
    for mode, enabled in (("lighthouse", True), ("dense", False)):
        with lighthouse_enabled(model, enabled):
            own, other = (torch.cat([token_losses(model, r[:, :-1].to(device), r[:, 1:].to(device))[:, :half - 1]
                                     .mean(dim=1) for r in version.split(cfg.batch_size)])
                          for version in (rows, swapped))
        result[f"{mode}_own"] = own.mean().item()
        result[f"{mode}_swapped"] = other.mean().item()
        result[f"{mode}_gain"] = (other - own).mean().item()
        result[f"{mode}_windows_changed"] = int((other != own).sum().item())
    return result


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    logging.getLogger("megatron").setLevel(logging.ERROR)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", nargs="+", required=True, help="demo --out directories holding checkpoint.pt")
    p.add_argument("--windows", type=int, default=32, help="validation windows (>= 2)")
    p.add_argument("--device", default=None, help="default: the run's own --device")
    p.add_argument("--out", default=None, help="JSON file of the results")
    args = p.parse_args(argv)
    if args.windows < 2:
        p.error(f"--windows {args.windows}: must be >= 2 (a window's continuation comes from another)")
    results = []
    try:
        for run_dir, (model, cfg, mode, step), val in runs_with_validation(args.run_dir, args.device):
            results.append(dict(run=run_dir, trained_as=mode, step=step,
                                **probe(model, cfg, val, args.windows, torch.device(cfg.device))))
            logging.info("%s: done", run_dir)
    except ValueError as err:
        p.error(str(err))
    print(f"\n{'run':<28}{'trained':>11}{'step':>6}{'mode':>12}{'own loss':>10}{'swapped':>10}{'gain':>10}"
          f"{'changed':>9}")
    for r in results:
        for mode in ("lighthouse", "dense"):
            print(f"{os.path.basename(r['run'].rstrip('/')):<28}{r['trained_as']:>11}{r['step']:>6}{mode:>12}"
                  f"{r[mode + '_own']:>10.4f}{r[mode + '_swapped']:>10.4f}{r[mode + '_gain']:>+10.5f}"
                  f"{r[mode + '_windows_changed']:>5}/{r['windows']}")
    print("gain: loss with another window's continuation minus loss with the window's own, over the first half "
          "of the first tile (0 for a causal model)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
