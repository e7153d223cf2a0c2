"""``python -m megatron_lighthouse.demo``: the demo's command line (:mod:`megatron_lighthouse.demo.cli`).

Ctrl-C while torch and the rest are imported (the first seconds) is held until the import is done, then ends the
run with one line and exit status 130, as Ctrl-C later does; a signal taken in the middle of torch's own start-up
would otherwise be a traceback, or an abort inside its C++ code.
"""

import signal
import sys

from . import EXIT_INTERRUPTED, INTERRUPTED_BEFORE_TRAINING


def _run() -> int:
    """Import the command line with Ctrl-C held, then run it."""
    interrupted = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: interrupted.append(signum))
    try:
        from .cli import main
    finally:
        signal.signal(signal.SIGINT, previous)
    if interrupted:
        print(INTERRUPTED_BEFORE_TRAINING, file=sys.stderr)
        return EXIT_INTERRUPTED
    return main()


if __name__ == "__main__":
    sys.exit(_run())
