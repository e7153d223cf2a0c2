"""Run test functions on ``world`` CPU processes joined by a gloo process group (localhost only).

The ranks of each world size are spawned once per test session and reused (spawning costs seconds); a failed
task tears its ranks down, so the next task starts on fresh ones.
"""

from __future__ import annotations

import atexit
import datetime
import os
import queue
import shutil
import tempfile
import traceback
from typing import Callable, Dict, Tuple

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

#: A rank stuck in a collective raises after this long instead of hanging CI.
_COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=60)
#: How long the other ranks get to report once one rank has failed.
_GRACE_S = 15.0


def _serve(rank: int, world: int, store: str, tasks, results) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{store}", rank=rank, world_size=world, timeout=_COLLECTIVE_TIMEOUT
    )
    try:
        for fn, args in iter(tasks.get, None):
            try:
                fn(rank, world, *args)
                results.put((rank, None))
            except BaseException:  # noqa: BLE001 - reported to the test process
                results.put((rank, traceback.format_exc()))
    finally:
        dist.destroy_process_group()


class _Ranks:
    """``world`` spawned processes serving tasks from per-rank queues."""

    def __init__(self, world: int) -> None:
        ctx = mp.get_context("spawn")
        self.world = world
        self.tmp = tempfile.mkdtemp(prefix="lighthouse-gloo-")
        self.tasks = [ctx.Queue() for _ in range(world)]
        self.results = ctx.Queue()
        store = os.path.join(self.tmp, "store")
        self.procs = [
            ctx.Process(target=_serve, args=(r, world, store, self.tasks[r], self.results), daemon=True)
            for r in range(world)
        ]
        for p in self.procs:
            p.start()

    def run(self, fn: Callable, args: tuple, timeout_s: float) -> Dict[int, str]:
        """Run ``fn(rank, world, *args)`` on every rank; returns ``{rank: traceback}`` of the ranks that failed."""
        for q in self.tasks:
            q.put((fn, args))
        failed: Dict[int, str] = {}
        for done in range(self.world):
            try:
                rank, error = self.results.get(timeout=_GRACE_S if failed else timeout_s)
            except queue.Empty:
                missing = self.world - done
                failed[-1] = f"{missing} rank(s) did not finish (stuck in a collective or dead)"
                break
            if error is not None:
                failed[rank] = error
        return failed

    def close(self) -> None:
        for q, p in zip(self.tasks, self.procs):
            if p.is_alive():
                q.put(None)
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.terminate()
                p.join()
        shutil.rmtree(self.tmp, ignore_errors=True)


_POOLS: Dict[Tuple[str, int], _Ranks] = {}


@atexit.register
def _close_all() -> None:
    while _POOLS:
        _POOLS.popitem()[1].close()


def run_on_ranks(fn: Callable, world: int, *args, pool: str = "default", timeout_s: float = 300.0) -> None:
    """Call ``fn(rank, world, *args)`` on every rank of a gloo group of ``world`` processes.

    ``fn`` must be a module-level function (it is pickled into the ranks) and must leave no global state
    changed behind. Ranks are shared by the calls with the same ``pool`` name and ``world``; a separate
    ``pool`` gives processes whose imports no other test has touched. Any rank's exception fails the caller
    with that rank's traceback.
    """
    key = (pool, world)
    ranks = _POOLS.get(key) or _POOLS.setdefault(key, _Ranks(world))
    failed = ranks.run(fn, args, timeout_s)
    if failed:
        _POOLS.pop(key).close()
        raise AssertionError("\n".join(f"--- rank {r} ---\n{tb}" for r, tb in sorted(failed.items())))
