"""Ctrl-C held while the demo starts: taken at points of its own choosing, never inside a library's code.

A ``KeyboardInterrupt`` raised in the middle of torch's or Megatron-Core's start-up (importing them, building the
process group) can abort inside C++ code, or make Python end the process by SIGINT even after the demo has caught
it. :class:`HeldInterrupts` records Ctrl-C instead, and :meth:`HeldInterrupts.check` raises it where the demo is
between two steps of its own.
"""

from __future__ import annotations

import signal
import threading
from typing import Any


class HeldInterrupts:
    """From construction until :meth:`release`, SIGINT is recorded, not raised (only where Python's own
    ``KeyboardInterrupt`` handler is in place, on the main thread: a caller that ignores SIGINT keeps ignoring it).
    A second Ctrl-C raises at once: a user who presses it again does not wait."""

    def __init__(self) -> None:
        self.pending = False
        self._previous: Any = None
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._record)

    def _record(self, signum: int, frame: Any) -> None:
        if self.pending:
            raise KeyboardInterrupt
        self.pending = True

    def check(self) -> None:
        """Raise ``KeyboardInterrupt`` here if Ctrl-C came since construction."""
        if self.pending:
            self.pending = False
            raise KeyboardInterrupt

    def release(self, check: bool = True) -> None:
        """Put the previous SIGINT handler back (Ctrl-C raises where it lands from now on); then :meth:`check`."""
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
        if check:
            self.check()
