"""init_single_process_group: a working world of one, idempotent, and no temporary directory left behind."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

_CHILD = textwrap.dedent("""
    import os
    import torch
    import torch.distributed as dist
    from megatron_lighthouse.process_group import init_single_process_group

    directory = init_single_process_group("gloo", prefix="lighthouse_pg_test_")
    assert os.path.isdir(directory), directory
    assert dist.get_world_size() == 1 and dist.get_rank() == 0
    x = torch.tensor([3.0])
    dist.all_reduce(x)
    assert x.item() == 3.0
    assert init_single_process_group("gloo") is None  # already initialised: nothing done
    print(directory)
""")


def test_single_process_group_works_and_cleans_up() -> None:
    done = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    directory = done.stdout.strip().splitlines()[-1]
    assert os.path.basename(directory).startswith("lighthouse_pg_test_")
    assert not os.path.exists(directory), f"{directory} was left behind"


_EXIT_CHILD = textwrap.dedent("""
    import atexit
    import torch.distributed as dist
    from megatron.core import parallel_state
    from megatron_lighthouse.process_group import init_single_process_megatron

    # registered first, so it runs last: what the package's own exit handlers left behind
    atexit.register(lambda: print("at exit:", dist.is_initialized(), parallel_state.model_parallel_is_initialized()))
    init_single_process_megatron("gloo", prefix="lighthouse_pg_test_")
    assert dist.is_initialized() and parallel_state.model_parallel_is_initialized()
""")


def test_world_and_megatron_state_are_torn_down_at_exit() -> None:
    """An NCCL world left to the interpreter's teardown can hang the process after its work is done (seen on the
    GPU machine): the package destroys what it initialised."""
    done = subprocess.run([sys.executable, "-c", _EXIT_CHILD], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "at exit: False False"
