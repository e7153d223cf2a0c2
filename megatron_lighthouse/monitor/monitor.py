"""The training-loop hook: :class:`GPUMonitor` (sampler + aggregation + writers of one rank)."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import aggregate
from .backend import GPUBackend, NVMLBackend, resolve_nvml_index
from .config import MonitorConfig, config_from_args, is_finite, is_int
from .sample import DeviceReader
from .sampler import GPUSampler
from .writers import MonitorWriter, TensorBoardWriter, WandbWriter, WriterThread, default_writers

logger = logging.getLogger(__name__)


def _default_cuda_index() -> int:
    """The GPU this process trains on: torch's current device once CUDA is up, else ``LOCAL_RANK``."""
    try:
        import torch

        if torch.cuda.is_available() and torch.cuda.is_initialized():
            return torch.cuda.current_device()
    except (ImportError, RuntimeError):
        pass
    return int(os.environ.get("LOCAL_RANK", "0"))


class GPUMonitor:
    """Per-rank GPU monitor for plain training loops and Megatron-LM.

    Every rank makes one, starts it, and calls :meth:`step` once per training step::

        with GPUMonitor(MonitorConfig(log_interval=10, jsonl_path="run/gpu_monitor.jsonl")) as monitor:
            for it in range(1, steps + 1):
                train_step()
                monitor.step(it)            # step time = wall time since the last call

    A background thread samples the rank's GPU every ``config.interval_s`` seconds. Every
    ``config.log_interval`` steps, :meth:`step` runs one ``all_gather`` of a small vector on ``group``
    (all ranks must call :meth:`step` with the same iterations) and ``config.write_rank`` writes the
    record; nothing else touches the step. Step times are averaged over the interval, so asynchronous
    CUDA launches even out. In synchronous data-parallel training every rank waits for the slowest in the
    gradient reduction, so wall-clock step times look alike: pass ``step_time`` measured before that wait
    where the loop has it; otherwise utilization, SM clock and throttle reasons single out the slow rank.

    Nothing the GPU or the disk does raises out of :meth:`step`: NVML is only read on the sampler thread
    (a failing metric is left out of the sample), and the writers' file I/O (JSONL lines and their fsync,
    TensorBoard events, console lines) runs on a :class:`~megatron_lighthouse.monitor.writers.WriterThread`
    that :meth:`stop` drains and joins. A rank whose newest sample is older than
    ``config.stale_threshold_s`` (its sampler thread died, or NVML stalls) is warned about once and marked
    ``"stale": true`` (with ``"sample_age_s"``) in each record while its metrics repeat that old sample.

    Without NVML (no library, no driver, no permission) a single warning is logged and the monitor does
    nothing; if only some ranks lack it, those ranks still join the collective with step times only.

    Args:
        config: settings; ``config.enabled=False`` gives a monitor whose calls all do nothing.
        backend: metric source (default :class:`NVMLBackend`); tests pass a fake.
        device: CUDA index of this rank's GPU (default: current device, else ``LOCAL_RANK``).
        group: process group to aggregate over (default: the world, when torch.distributed is up).
        writers: output writers of this rank, replacing the default ones (built from ``config`` on
            ``config.write_rank``).
        extra_writers: writers of this rank added to the defaults (e.g. Megatron-LM's TensorBoard writer,
            which lives on its last rank).

    A bad argument is a ``ValueError`` naming it: here, at :meth:`start` (``config.write_rank`` outside the
    group) or at :meth:`step` (an iteration or step time that is no count or duration).
    """

    def __init__(
        self,
        config: MonitorConfig = MonitorConfig(),
        *,
        backend: Optional[GPUBackend] = None,
        device: Optional[int] = None,
        group: Any = None,
        writers: Optional[Sequence[MonitorWriter]] = None,
        extra_writers: Sequence[MonitorWriter] = (),
    ) -> None:
        if not isinstance(config, MonitorConfig):
            raise ValueError(f"GPUMonitor: config={config!r}: must be a MonitorConfig")
        if backend is not None and not isinstance(backend, GPUBackend):
            raise ValueError(f"GPUMonitor: backend={backend!r}: must be a GPUBackend (default: NVML)")
        if device is not None and not (is_int(device) and device >= 0):
            raise ValueError(f"GPUMonitor: device={device!r}: must be a CUDA device index >= 0, or None")
        for name, given in (("writers", writers or ()), ("extra_writers", extra_writers)):
            if isinstance(given, (str, bytes)) or not all(
                    callable(getattr(w, "write", None)) and callable(getattr(w, "close", None)) for w in given):
                raise ValueError(f"GPUMonitor: {name}={given!r}: must be a sequence of writers (objects with "
                                 f"write(record) and close())")
        self.config = config
        self.backend = backend if backend is not None else NVMLBackend()
        self.device = device
        self.group = group
        self.sampler: Optional[GPUSampler] = None
        self.active = False
        self.last_record: Optional[Dict[str, Any]] = None
        self._writers: Optional[List[MonitorWriter]] = None if writers is None else list(writers)
        self._extra_writers = list(extra_writers)
        self._output: Optional[WriterThread] = None
        self._stale_warned = False
        self._identity: Optional[aggregate.RankIdentity] = None
        self._identities: Optional[List[aggregate.RankIdentity]] = None
        self._step_times: List[float] = []
        self._last_step: Optional[float] = None
        self._t0 = 0.0

    @classmethod
    def from_args(cls, args: Any, **kwargs: Any) -> "GPUMonitor":
        """A monitor from flags of :func:`~megatron_lighthouse.monitor.add_monitor_args` (plus Megatron's
        ``--log-interval``, ``--tensorboard-dir``, ``--save``). Disabled unless ``--lighthouse-monitor``.

        Inside Megatron-LM its TensorBoard and W&B writers are reused on the rank that holds them; else a
        ``--tensorboard-dir`` gets its own event files. ``kwargs`` go to the constructor.
        """
        config = config_from_args(args)
        if not config.enabled or "writers" in kwargs:
            return cls(config, **kwargs)
        megatron_writers = _megatron_writers()
        if megatron_writers is None:
            tb_dir = getattr(args, "tensorboard_dir", None)
            if tb_dir:
                config = dataclasses.replace(config, tensorboard_dir=os.path.join(tb_dir, "gpu_monitor"))
            return cls(config, **kwargs)
        config = dataclasses.replace(config, wandb=False)  # Megatron's own W&B writer is used instead
        return cls(config, extra_writers=megatron_writers, **kwargs)

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> "GPUMonitor":
        """Open NVML and start sampling (a warning and no-op without NVML). Returns ``self``."""
        if not self.config.enabled or self.active:
            return self
        rank, world = aggregate.distributed_world(self.group)
        if self.config.write_rank >= world and self._writers is None:
            raise ValueError(f"MonitorConfig.write_rank={self.config.write_rank}: not a rank of this group of {world} "
                             f"(0 to {world - 1}): nothing would be written")
        cuda_index = self.device if self.device is not None else _default_cuda_index()
        gpu_index = gpu_name = None
        try:
            self.backend.init()
            gpu_index = resolve_nvml_index(self.backend, cuda_index)
            gpu_name = self.backend.device_name(gpu_index)
            reader = DeviceReader(self.backend, gpu_index)
            self.sampler = GPUSampler(reader, self.config.interval_s).start()
        except Exception as exc:  # noqa: BLE001 - no GPU metrics must never stop training
            logger.warning("GPU monitor: NVML unavailable on rank %d (%s); GPU monitoring is off", rank, exc)
            self.sampler = None
            self._shutdown_backend()
        has_metrics = self.sampler is not None
        self._identity = aggregate.local_identity(rank, cuda_index, gpu_index, gpu_name, has_metrics)
        # Alone without metrics there is nothing to do; in a group the others decide at the first log.
        self.active = has_metrics or world > 1
        self._t0 = time.time()
        self._last_step = None
        self._step_times.clear()
        return self

    def stop(self) -> None:
        """Stop sampling, write the queued records and close the writers (no collective: safe on any rank
        at any time).

        A stopped monitor can be started again; it then opens the default and extra writers anew.
        """
        if self.sampler is not None:
            self.sampler.stop()
            self.sampler = None
            self._shutdown_backend()
        if self._output is not None:
            self._output.close()
            self._output = None
        self._writers = None
        self._stale_warned = False
        self.active = False

    def __enter__(self) -> "GPUMonitor":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- training-loop hooks -----------------------------------------------------------------------

    def step(self, iteration: int, step_time: Optional[float] = None) -> Optional[Dict[str, Any]]:
        """Record one training step; aggregate and write when ``iteration % log_interval == 0``.

        Args:
            iteration: the step number, the same on every rank.
            step_time: seconds of this step; default: wall time since the previous call (the time taken
                by an aggregation is left out of the next step).

        Returns the interval record on aggregating steps (on every rank), else ``None``. ``ValueError`` for an
        ``iteration`` that is not an int >= 0 or a ``step_time`` that is not a finite number >= 0 (checked even
        while the monitor does nothing, so that a loop is right before the monitor is switched on).
        """
        iteration = _iteration("step", iteration)
        if step_time is not None and not (is_finite(step_time) and step_time >= 0):
            raise ValueError(f"GPUMonitor.step: step_time={step_time!r}: must be a finite number >= 0 (seconds), or "
                             f"None for the time since the previous call")
        if not self.active:
            return None
        now = time.perf_counter()
        if step_time is None and self._last_step is not None:
            step_time = now - self._last_step
        if step_time is not None:
            self._step_times.append(float(step_time))
        self._last_step = now
        if iteration % self.config.log_interval != 0:
            return None
        record = self.log(iteration)
        self._last_step = time.perf_counter()
        return record

    def log(self, iteration: int) -> Optional[Dict[str, Any]]:
        """Aggregate the interval across ranks now (collective: call on every rank) and write it (``iteration``: as
        for :meth:`step`)."""
        iteration = _iteration("log", iteration)
        if not self.active:
            return None
        first = self._identities is None
        if first:
            self._identities = aggregate.exchange_identities(self._identity, self.group)
            if not any(who.has_metrics for who in self._identities):
                self.active = False  # no rank has NVML: nothing to report, ever
                return None
        if self._output is None:  # opened at the first report: a monitor with nothing to say leaves no files
            self._output = WriterThread(self._open_writers())
        if first:
            self._output.write(
                aggregate.run_record(self._identities, self.config.interval_s, self.config.log_interval, self._t0)
            )
        summary = self._summarize()
        summaries = aggregate.gather_summaries(summary, self.group)
        now = time.time()
        record = aggregate.build_record(
            iteration,
            now - self._t0,
            now,
            summaries,
            self._identities,
            self.config,
        )
        self._output.write(record)
        self.last_record = record
        return record

    def _summarize(self) -> Dict[str, float]:
        """This rank's interval summary (see :func:`aggregate.summarize_interval`); never samples here."""
        sampler = self.sampler
        if sampler is None:  # a rank without NVML joins with step times only
            summary = aggregate.summarize_interval([], self._step_times)
        else:
            samples = sampler.drain()
            latest = sampler.latest
            if not samples and latest is not None:  # log interval shorter than the sampling interval
                samples = [latest]
            summary = aggregate.summarize_interval(samples, self._step_times, *self._freshness())
        self._step_times = []
        return summary

    def _freshness(self) -> Tuple[float, bool]:
        """``(seconds since this rank's newest sample, whether that is stale)``; warns once when samples turn
        stale (the sampler thread died, or no fresh sample within ``config.stale_threshold_s``)."""
        age = self.sampler.sample_age_s()
        if not self.sampler.running:
            problem = "its sampler thread has died"
        elif age > self.config.stale_threshold_s:
            problem = f"no fresh sample for {age:.1f} s (NVML stalled?)"
        else:
            problem = None
        who = self._identity
        if problem is not None and not self._stale_warned:
            logger.warning(
                "GPU monitor: rank %d (%s, NVML GPU %s): %s; its records are marked stale and repeat its last "
                "sample", who.rank, who.where, who.gpu_index, problem,
            )
        elif problem is None and self._stale_warned:
            logger.info("GPU monitor: rank %d (%s): samples are fresh again", who.rank, who.where)
        self._stale_warned = problem is not None
        return age, problem is not None

    # -- output ------------------------------------------------------------------------------------

    def _shutdown_backend(self) -> None:
        try:
            self.backend.shutdown()
        except Exception as exc:  # noqa: BLE001 - releasing NVML must never stop training either
            logger.debug("GPU monitor: backend shutdown failed: %r", exc)

    def _open_writers(self) -> List[MonitorWriter]:
        """The given writers, or the defaults of ``config`` on ``config.write_rank``; plus the extra writers."""
        if self._writers is not None:
            return self._writers + self._extra_writers
        writers: List[MonitorWriter] = []
        if self._identity.rank == self.config.write_rank:
            try:
                writers = default_writers(self.config)
            except Exception as exc:  # noqa: BLE001 - e.g. a broken wandb install must never stop training
                logger.warning("GPU monitor: cannot set up its outputs (%r); the defaults write nothing", exc)
        return writers + self._extra_writers


def _iteration(method: str, iteration: Any) -> int:
    """``iteration`` as an ``int``; ``ValueError`` unless it is an integer >= 0 (a training step)."""
    if not is_int(iteration) or iteration < 0:
        raise ValueError(f"GPUMonitor.{method}: iteration={iteration!r}: must be an int >= 0 (the training step)")
    return int(iteration)


def _megatron_writers() -> Optional[List[MonitorWriter]]:
    """Megatron-LM's own TensorBoard / W&B writers on this rank, or ``None`` outside Megatron-LM."""
    try:
        from megatron.training.global_vars import get_tensorboard_writer, get_wandb_writer
    except ImportError:
        return None
    writers: List[MonitorWriter] = []
    tb, wandb_run = get_tensorboard_writer(), get_wandb_writer()
    if tb is not None:
        writers.append(TensorBoardWriter(writer=tb))
    if wandb_run is not None:
        writers.append(WandbWriter(wandb_run))
    return writers
