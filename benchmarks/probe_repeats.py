"""Where does a model's validation loss sit: on bytes that repeat text from earlier in the window, or elsewhere?

Copying a passage seen far back needs attention to find it; Lighthouse reaches it only if the selection picks the
right fine-grained entries. This probe splits the per-byte validation loss of demo runs by how far back the byte's
context last appeared: a target byte ``x[i]`` is a *repeat at distance d* when the ``--ngram`` bytes before it and
the byte itself, ``x[i-n .. i]``, last occurred in the window ending at ``i - d``; bytes whose ``(n+1)``-gram is new
to the window are *new*. Buckets are *new* and distance ranges cut at ``--distances``. Each run is scored with every
layer dense and with its Lighthouse layers on, on the windows the demo's validation uses (``--windows`` evenly
spaced; the run's own ``eval_batches * batch_size`` by default, so the dense total is its final validation loss).

Prints a table and writes JSON (``--out``)::

    python3 benchmarks/probe_repeats.py --run-dir RUN [RUN ...] --out repeats.json

``RUN``: the ``--out`` directory of a ``python -m megatron_lighthouse.demo`` run (its ``checkpoint.pt``).
"""

from __future__ import annotations

import argparse
import bisect
import json
import logging
import os
import sys
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from megatron_lighthouse.demo.runs import runs_with_validation, validation_windows  # noqa: E402
from megatron_lighthouse.demo.train import token_losses  # noqa: E402
from megatron_lighthouse.switch import lighthouse_enabled  # noqa: E402

NEW = "new"


def repeat_distances(window: bytes, ngram: int) -> List[int]:
    """For each target ``window[i]``, ``i = 1 .. len-1``: the distance back to the last earlier end of the
    ``(ngram+1)``-gram ``window[i-ngram .. i]``, or 0 when it is new (also for ``i < ngram``: no full context).
    Returns ``len(window) - 1`` ints, aligned with the loss positions of ``window[:-1] -> window[1:]``."""
    last: Dict[bytes, int] = {}
    out = [0] * (len(window) - 1)
    for i in range(ngram, len(window)):
        key = window[i - ngram : i + 1]
        seen = last.get(key)
        if seen is not None:
            out[i - 1] = i - seen
        last[key] = i
    return out


def bucket_names(distances: Sequence[int]) -> List[str]:
    """``[new, d<D0, D0<=d<D1, ..., d>=Dlast]`` for cut points ``distances``."""
    cuts = list(distances)
    names = [NEW, f"d<{cuts[0]}"] + [f"{a}<=d<{b}" for a, b in zip(cuts, cuts[1:])] + [f"d>={cuts[-1]}"]
    return names


def bucket_ids(dist: List[int], distances: Sequence[int]) -> torch.Tensor:
    """Bucket index per position (0: new, then one per distance range), ``[len(dist)]`` int64."""
    return torch.tensor([0 if d == 0 else 1 + bisect.bisect_right(distances, d) for d in dist], dtype=torch.long)


@torch.no_grad()
def probe(model: torch.nn.Module, rows: torch.Tensor, buckets: torch.Tensor, names: List[str], batch_size: int,
          device: torch.device) -> Dict[str, Dict[str, float]]:
    """Per mode (``dense``, ``lighthouse``) and bucket: ``fraction`` of positions and ``loss`` (mean, nats/byte),
    plus ``all``: the mean over every position. ``rows``: ``[w, s+1]`` int64 windows; ``buckets``: ``[w, s]``."""
    model.eval()
    counts = torch.bincount(buckets.flatten(), minlength=len(names)).double()
    result: Dict[str, Dict[str, float]] = {}
    for mode, enabled in (("dense", False), ("lighthouse", True)):
        with lighthouse_enabled(model, enabled):
            losses = torch.cat([token_losses(model, r[:, :-1].to(device), r[:, 1:].to(device)).cpu()
                                for r in rows.split(batch_size)]).double()
        sums = torch.zeros(len(names), dtype=torch.float64).index_add_(0, buckets.flatten(), losses.flatten())
        row = {name: dict(fraction=(counts[j] / counts.sum()).item(),
                          loss=(sums[j] / counts[j]).item() if counts[j] else float("nan"))
               for j, name in enumerate(names)}
        row["all"] = dict(fraction=1.0, loss=losses.mean().item())
        result[mode] = row
    return result


def main(argv: Optional[List[str]] = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S", stream=sys.stdout)
    logging.getLogger("megatron").setLevel(logging.ERROR)
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run-dir", nargs="+", required=True, help="demo --out directories holding checkpoint.pt")
    p.add_argument("--ngram", type=int, default=32, help="context bytes a repeat must share (>= 1)")
    p.add_argument("--distances", type=int, nargs="+", default=[256, 4096],
                   help="increasing cut points (bytes) of the distance buckets")
    p.add_argument("--windows", type=int, default=None, help="validation windows (default: the run's evaluation)")
    p.add_argument("--device", default=None, help="default: the run's own --device")
    p.add_argument("--out", default=None, help="JSON file of the results")
    args = p.parse_args(argv)
    if args.ngram < 1:
        p.error(f"--ngram {args.ngram}: must be >= 1")
    if any(d < 1 for d in args.distances) or args.distances != sorted(set(args.distances)):
        p.error(f"--distances {' '.join(map(str, args.distances))}: must be positive and strictly increasing")
    if args.windows is not None and args.windows < 1:
        p.error(f"--windows {args.windows}: must be >= 1")
    names = bucket_names(args.distances)
    results = []
    try:
        for run_dir, (model, cfg, mode, step), val in runs_with_validation(args.run_dir, args.device):
            windows = args.windows or cfg.eval_batches * cfg.batch_size
            rows = validation_windows(val, cfg.seq_len, windows)
            buckets = torch.stack([bucket_ids(repeat_distances(bytes(r.to(torch.uint8).tolist()), args.ngram),
                                              args.distances) for r in rows])
            scores = probe(model, rows, buckets, names, cfg.batch_size, torch.device(cfg.device))
            results.append(dict(run=run_dir, trained_as=mode, step=step, windows=windows, ngram=args.ngram,
                                buckets=names, **scores))
            logging.info("%s: done", run_dir)
    except ValueError as err:
        p.error(str(err))
    width = max(len(n) for n in names) + 2
    print(f"\n{'run':<28}{'trained':>11}{'step':>6}{'mode':>12}  " + "".join(f"{n:>{width}}" for n in names)
          + f"{'all':>{width}}")
    for r in results:
        print(f"{'':<28}{'':>11}{'':>6}{'fraction':>12}  " + "".join(
            f"{r['dense'][n]['fraction']:>{width}.3f}" for n in names) + f"{1.0:>{width}.3f}")
        for mode in ("dense", "lighthouse"):
            print(f"{os.path.basename(r['run'].rstrip('/')):<28}{r['trained_as']:>11}{r['step']:>6}{mode:>12}  "
                  + "".join(f"{r[mode][n]['loss']:>{width}.4f}" for n in names + ['all']))
    print(f"loss: mean nats/byte per bucket; a byte is a repeat when it and the {args.ngram} bytes before it "
          f"appeared earlier in the window, d bytes back (new: they did not)")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
