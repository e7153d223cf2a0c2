"""``python -m megatron_lighthouse.demo``: the demo's command line (:mod:`megatron_lighthouse.demo.cli`).

Ctrl-C while torch and the rest are imported (the first seconds) is held until the import is done
(:class:`~megatron_lighthouse.demo.interrupts.HeldInterrupts`), then ends the run with one line and exit status 130,
as Ctrl-C later does.
"""

import sys

from . import EXIT_INTERRUPTED, INTERRUPTED_BEFORE_TRAINING
from .interrupts import HeldInterrupts


def _run() -> int:
    """Import the command line with Ctrl-C held, then run it."""
    held = HeldInterrupts()
    try:
        from .cli import main
    finally:
        held.release(check=False)
    if held.pending:
        print(INTERRUPTED_BEFORE_TRAINING, file=sys.stderr)
        return EXIT_INTERRUPTED
    return main()


if __name__ == "__main__":
    sys.exit(_run())
