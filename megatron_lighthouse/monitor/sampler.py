"""Background sampling thread: one per rank, reading its GPU every ``interval_s`` seconds."""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Deque, List, Optional

from .sample import DeviceReader, GPUSample

logger = logging.getLogger(__name__)


class GPUSampler:
    """Reads a :class:`DeviceReader` on a daemon thread and buffers the samples until :meth:`drain`.

    NVML calls go through ctypes, which releases the GIL, so the thread does not hold up the training
    loop while the driver answers. The buffer keeps the newest ``max_buffered`` samples. An error of a
    sample is logged (once, with its traceback) and the thread samples again at the next tick: nothing the
    backend does reaches the caller. Whether samples are fresh: :attr:`running` and :meth:`sample_age_s`.

    Use as a context manager (``with GPUSampler(reader) as s: ...``) or with :meth:`start` / :meth:`stop`.
    """

    def __init__(self, reader: DeviceReader, interval_s: float = 1.0, max_buffered: int = 100_000) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s={interval_s}: the sampling interval must be > 0 seconds")
        if max_buffered < 1:
            raise ValueError(f"max_buffered={max_buffered}: must be >= 1")
        self.reader = reader
        self.interval_s = float(interval_s)
        self._buffer: Deque[GPUSample] = collections.deque(maxlen=max_buffered)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.latest: Optional[GPUSample] = None
        self._started_at = time.time()
        self._failed = False
        #: Samples taken and seconds spent taking them (the sampler's own cost).
        self.samples_taken = 0
        self.seconds_sampling = 0.0

    @property
    def running(self) -> bool:
        """Whether the thread is alive (``False`` before :meth:`start`, after :meth:`stop`, or once it died)."""
        return self._thread is not None and self._thread.is_alive()

    def sample_age_s(self) -> float:
        """Seconds since the newest sample was taken (since :meth:`start` while there is none)."""
        latest = self.latest
        return time.time() - (self._started_at if latest is None else latest.time)

    def sample_now(self) -> GPUSample:
        """Take one sample on the calling thread, buffer it and return it."""
        start = time.perf_counter()
        sample = self.reader.read()
        elapsed = time.perf_counter() - start
        with self._lock:
            self._buffer.append(sample)
            self.latest = sample
            self.samples_taken += 1
            self.seconds_sampling += elapsed
        return sample

    def drain(self) -> List[GPUSample]:
        """Samples buffered since the last drain, oldest first."""
        with self._lock:
            out = list(self._buffer)
            self._buffer.clear()
        return out

    def _run(self) -> None:
        deadline = time.monotonic()
        while not self._stop.is_set():
            try:
                self.sample_now()
            except Exception:  # noqa: BLE001 - the sampler must outlive any backend surprise
                if not self._failed:
                    self._failed = True
                    logger.exception("GPU monitor: sampling GPU %d failed; retrying every tick (logged once)",
                                     self.reader.index)
            now = time.monotonic()
            deadline += self.interval_s
            if deadline <= now:  # a late sample skips the missed ticks rather than catching up in a burst
                deadline = now + self.interval_s
            self._stop.wait(deadline - now)

    def start(self) -> "GPUSampler":
        """Start the thread (no-op when already running)."""
        if not self.running:
            self._stop.clear()
            self._started_at = time.time()
            self._thread = threading.Thread(target=self._run, name="lighthouse-gpu-sampler", daemon=True)
            self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread and wait for it (at most ``timeout`` seconds)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> "GPUSampler":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
