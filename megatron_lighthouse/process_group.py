"""A torch.distributed world of one process and Megatron's parallel state on it, for the demo, the patch check and
the tests."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from typing import Optional

import torch.distributed as dist


def init_single_process_group(backend: str, prefix: str = "lighthouse_pg_") -> Optional[str]:
    """Initialise a world of size 1 on ``backend`` (``"gloo"`` or ``"nccl"``) unless one is already initialised.

    The rendezvous is a file store in a fresh temporary directory (no port to collide on), removed when the process
    exits. Returns that directory, or ``None`` when a process group already existed and nothing was done.
    """
    if dist.is_initialized():
        return None
    directory = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    dist.init_process_group(backend, init_method=f"file://{os.path.join(directory, 'store')}", rank=0, world_size=1)
    atexit.register(_destroy_process_group)  # before the store goes (atexit runs last-registered first)
    return directory


def _destroy_process_group() -> None:
    """Tear the world down at exit: a process that leaves an NCCL world to the interpreter's teardown can hang."""
    if dist.is_initialized():
        dist.destroy_process_group()


def init_single_process_megatron(backend: str, prefix: str = "lighthouse_pg_") -> None:
    """:func:`init_single_process_group`, then Megatron's model-parallel state (every parallel size 1) unless it is
    already initialised."""
    from megatron.core import parallel_state

    init_single_process_group(backend, prefix)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
        atexit.register(parallel_state.destroy_model_parallel)  # its groups first, then the world
