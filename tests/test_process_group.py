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
