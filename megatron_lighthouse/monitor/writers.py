"""Where aggregated records go: JSONL, TensorBoard, Weights & Biases and a one-line console summary.

Every writer takes the records of :mod:`~megatron_lighthouse.monitor.aggregate` (``kind`` ``"run"`` once,
then ``"interval"`` per log interval) through ``write(record)`` and is released with ``close()``.
:class:`WriterThread` runs them off the training thread.
"""

from __future__ import annotations

import atexit
import importlib.util
import json
import logging
import os
import queue
import threading
import time
from typing import Any, Dict, List, Optional, Protocol, Sequence, Set, Tuple

from .config import MonitorConfig

logger = logging.getLogger(__name__)

#: Per-rank series that TensorBoard / W&B get one scalar per rank for (everything else: min/mean/max).
PER_RANK_SCALARS = ("gpu_util_pct", "mem_used_mib", "power_w", "step_time_s")
#: Tag prefix of every TensorBoard / W&B scalar.
TAG = "gpu_monitor"


class MonitorWriter(Protocol):
    """A record sink. :class:`WriterThread` calls it on its own thread, unless the writer has a true
    attribute ``on_caller_thread`` (then on the thread of :meth:`GPUMonitor.step`)."""

    def write(self, record: Dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def _write_all(fd: int, data: bytes) -> None:
    """Write ``data`` to file descriptor ``fd``: one ``os.write`` call unless the OS writes less."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


class JSONLWriter:
    """Appends one JSON object per line to ``path`` (the file and its directory are made at the first record).

    Each line goes to the file whole, in one ``os.write``, and is fsynced: a process killed at any point
    leaves whole lines behind (at worst one torn last line, which
    :func:`~megatron_lighthouse.monitor.report.load_run` tolerates). Appending to a file whose last line a
    killed run left torn first ends that line, so new records start on a line of their own. The fsync waits
    for the disk: :class:`GPUMonitor` runs this writer on its :class:`WriterThread`.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: Optional[int] = None

    def _open(self) -> int:
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            _write_all(fd, b"\n")
        return fd

    def write(self, record: Dict[str, Any]) -> None:
        if self._fd is None:
            self._fd = self._open()
        _write_all(self._fd, (json.dumps(record, allow_nan=False, separators=(",", ":")) + "\n").encode("utf-8"))
        os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def scalars(record: Dict[str, Any]) -> Dict[str, float]:
    """Flat ``{tag: value}`` of an interval record: min/mean/max per metric, a few per-rank series and the
    straggler count."""
    out: Dict[str, float] = {}
    for name, stat in record["stats"].items():
        for key in ("min", "mean", "max"):
            out[f"{TAG}/{name}/{key}"] = stat[key]
    for entry in record["ranks"]:
        for name in PER_RANK_SCALARS:
            if entry.get(name) is not None:
                out[f"{TAG}/{name}/rank{entry['rank']}"] = entry[name]
    out[f"{TAG}/stragglers"] = float(len(record["stragglers"]))
    return out


def summary_writer_class() -> type:
    """``torch.utils.tensorboard.SummaryWriter``; ``ImportError`` that says ``pip install tensorboard`` when
    tensorboard is not installed (it is optional)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise ImportError(f"TensorBoard output needs tensorboard ({exc}): pip install tensorboard") from exc
    return SummaryWriter


class TensorBoardWriter:
    """Scalars of each interval record (see :func:`scalars`) at step = iteration.

    Pass ``writer`` to add to an existing ``SummaryWriter`` (e.g. Megatron's, left open on close), or
    ``log_dir`` to have one opened there at the first record (on the writer's thread). With ``log_dir`` and
    no tensorboard installed, the constructor raises ``ImportError`` (see :func:`summary_writer_class`).
    """

    def __init__(self, log_dir: Optional[str] = None, writer: Any = None) -> None:
        if (log_dir is None) == (writer is None):
            raise ValueError("TensorBoardWriter needs exactly one of log_dir and writer")
        self.log_dir = log_dir
        #: ``SummaryWriter`` to open ``log_dir`` with (and close on :meth:`close`); ``None`` for a given ``writer``.
        self._owned_class = summary_writer_class() if writer is None else None
        self.writer = writer

    def write(self, record: Dict[str, Any]) -> None:
        if record.get("kind") != "interval":
            return
        if self.writer is None:
            self.writer = self._owned_class(log_dir=self.log_dir)
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, record["iteration"])
        self.writer.flush()

    def close(self) -> None:
        if self._owned_class is not None and self.writer is not None:
            self.writer.close()
            self.writer = None


class WandbWriter:
    """Scalars of each interval record to a Weights & Biases run (``wandb.run`` unless ``run`` is given).

    Writes on the caller's thread (``on_caller_thread``): ``run.log`` only queues the data, and a W&B run
    drops a step logged after a later one, which a delayed write from another thread could be.
    """

    on_caller_thread = True

    def __init__(self, run: Any) -> None:
        self.run = run

    def write(self, record: Dict[str, Any]) -> None:
        if record.get("kind") == "interval":
            self.run.log(scalars(record), step=record["iteration"])

    def close(self) -> None:
        """The run belongs to the caller; nothing to release."""


def _fmt(stat: Optional[Dict[str, Any]], scale: float = 1.0, digits: int = 0) -> str:
    if stat is None:
        return "n/a"
    return "/".join(f"{stat[k] * scale:.{digits}f}" for k in ("min", "mean", "max"))


def summary_line(record: Dict[str, Any]) -> str:
    """One line: min/mean/max of utilization, memory, power and step time, and the stragglers."""
    stats = record["stats"]
    parts = [
        f"gpu-monitor it {record['iteration']} ({record['world_size']} ranks, min/mean/max)",
        f"util {_fmt(stats.get('gpu_util_pct'))} %",
        f"mem {_fmt(stats.get('mem_used_mib'), 1 / 1024, 1)} GiB",
        f"power {_fmt(stats.get('power_w'))} W",
        f"step {_fmt(stats.get('step_time_s'), 1.0, 3)} s",
    ]
    stragglers = record["stragglers"]
    if stragglers:
        parts.append("STRAGGLERS: " + "; ".join(f"rank {s['rank']} {s['where']} {s['detail']}" for s in stragglers))
    stale = [e for e in record["ranks"] if e.get("stale")]
    if stale:
        parts.append("STALE SAMPLES: " + "; ".join(
            f"rank {e['rank']} {e['host']}:gpu{e['local_gpu']} ({e['sample_age_s']:.1f} s old)" for e in stale
        ))
    return " | ".join(parts)


class ConsoleWriter:
    """:func:`summary_line` through ``logging`` (warning level when there is a straggler)."""

    def write(self, record: Dict[str, Any]) -> None:
        if record.get("kind") == "interval":
            level = logging.WARNING if record["stragglers"] else logging.INFO
            logger.log(level, summary_line(record))

    def close(self) -> None:
        """Nothing to release."""


def active_wandb_run() -> Any:
    """The active W&B run when ``wandb`` is installed and a run was started, else ``None``."""
    if importlib.util.find_spec("wandb") is None:
        return None
    import wandb

    return wandb.run


def default_writers(config: MonitorConfig) -> List[MonitorWriter]:
    """The writers ``config`` asks for, skipping (with one log line) those whose package is missing."""
    writers: List[MonitorWriter] = []
    if config.jsonl_path:
        writers.append(JSONLWriter(config.jsonl_path))
    if config.tensorboard_dir:
        try:
            writers.append(TensorBoardWriter(log_dir=config.tensorboard_dir))
        except ImportError as exc:
            logger.warning("GPU monitor: no TensorBoard output in tensorboard_dir=%s: %s", config.tensorboard_dir, exc)
    if config.wandb:
        run = active_wandb_run()
        if run is not None:
            writers.append(WandbWriter(run))
    if config.console:
        writers.append(ConsoleWriter())
    return writers


#: Records that may wait for the writer thread; when it is this far behind, new records are dropped.
MAX_QUEUED = 64
_CLOSE = object()


class WriterThread:
    """Runs writers off the caller's thread: one daemon thread, fed by a bounded queue, writes the records
    in the order :meth:`write` got them.

    Writers with a true ``on_caller_thread`` attribute (:class:`WandbWriter`) write at once on the caller's
    thread instead. A failing writer is logged once per writer and method and never raises. When the
    thread is ``max_queued`` records behind (a stuck file system), :meth:`write` drops the record with a
    warning rather than wait. :meth:`close` (also called at interpreter exit, when not called before) lets
    the thread write what is queued, closes every writer and joins the thread.

    Args:
        writers: the writers (``write(record)``, ``close()``), each called from one thread only.
        max_queued: records that may wait for the thread (>= 1).
    """

    def __init__(self, writers: Sequence[MonitorWriter], max_queued: int = MAX_QUEUED) -> None:
        if max_queued < 1:
            raise ValueError(f"WriterThread max_queued={max_queued}: must be >= 1")
        self._now = [w for w in writers if getattr(w, "on_caller_thread", False)]
        self._later = [w for w in writers if not getattr(w, "on_caller_thread", False)]
        self._queue: "queue.Queue[Any]" = queue.Queue(max_queued)
        self._warned: Set[Tuple[str, str]] = set()
        self.dropped = 0
        self._thread: Optional[threading.Thread] = None
        if self._later:
            self._thread = threading.Thread(target=self._run, name="lighthouse-monitor-writer", daemon=True)
            self._thread.start()
        self._closed = False
        atexit.register(self.close)

    def _call(self, writer: MonitorWriter, method: str, *args: Any) -> None:
        try:
            getattr(writer, method)(*args)
        except Exception as exc:  # noqa: BLE001 - a broken writer must never stop training
            key = (type(writer).__name__, method)
            if key not in self._warned:
                self._warned.add(key)
                logger.warning("GPU monitor: %s.%s failed (warned once): %r", *key, exc)

    def _run(self) -> None:
        for record in iter(self._queue.get, _CLOSE):
            for writer in self._later:
                self._call(writer, "write", record)
        for writer in self._later:
            self._call(writer, "close")

    def write(self, record: Dict[str, Any]) -> None:
        """Hand ``record`` to every writer; returns without waiting for the background writers' I/O.

        The record is shared with the writer thread: do not change it afterwards.
        """
        for writer in self._now:
            self._call(writer, "write", record)
        if self._thread is None:
            return
        try:
            self._queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1:
                logger.warning(
                    "GPU monitor: the writer thread is %d records behind (a slow or stuck file system?); "
                    "records are dropped until it catches up", self._queue.maxsize,
                )

    def close(self, timeout_s: float = 30.0) -> None:
        """Write what is queued, close the writers and join the thread (at most ``timeout_s`` seconds)."""
        atexit.unregister(self.close)
        if self._closed:
            return
        self._closed = True
        for writer in self._now:
            self._call(writer, "close")
        if self._thread is None:
            return
        deadline = time.monotonic() + timeout_s
        try:
            self._queue.put(_CLOSE, timeout=timeout_s)
        except queue.Full:
            pass  # the thread is stuck: the join below times out and says so
        self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            logger.warning("GPU monitor: the writer thread did not finish within %.0f s (a stuck file system?); "
                           "the last records may be missing", timeout_s)
        if self.dropped:
            logger.warning("GPU monitor: %d record(s) were dropped while the writer thread was behind", self.dropped)
