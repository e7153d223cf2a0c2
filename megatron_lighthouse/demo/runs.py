"""A finished demo run loaded back for analysis: its model (with Lighthouse layers), settings and step."""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Iterator, NamedTuple, Optional, Sequence, Tuple

import torch

from .corpus import load_corpus
from .train import (CHECKPOINT, OLD_CHECKPOINT_SETTINGS, DemoConfig, _init_runtime, build_model, byte_windows,
                    validation_offsets)


class TrainedRun(NamedTuple):
    model: torch.nn.Module
    cfg: DemoConfig
    trained_as: str  # the run's --mode
    step: int


def load_trained_run(run_dir: str, device: Optional[str] = None) -> TrainedRun:
    """The model of ``run_dir/checkpoint.pt`` (a demo ``--out`` directory), built with Lighthouse layers even for a
    dense run (same weights), so it can be scored in both modes; ``device`` overrides the run's ``--device``.

    ``ValueError`` naming the directory when it holds no checkpoint."""
    path = os.path.join(run_dir, CHECKPOINT)
    if not os.path.exists(path):
        raise ValueError(f"--run-dir {run_dir}: no {CHECKPOINT} (the --out directory of a demo run)")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    cfg = DemoConfig(**{**OLD_CHECKPOINT_SETTINGS, **ckpt["config"],
                        "dense_layers": tuple(ckpt["config"]["dense_layers"])})
    if device:
        cfg = dataclasses.replace(cfg, device=device)
    if cfg.mode == "dense":
        cfg = dataclasses.replace(cfg, mode="lighthouse")
    dev = torch.device(cfg.device)
    _init_runtime(dev)
    model = build_model(cfg, dev)
    model.load_state_dict(ckpt["model"])
    return TrainedRun(model, cfg, ckpt["config"]["mode"], ckpt["state"]["step"])


def runs_with_validation(run_dirs: Sequence[str], device: Optional[str] = None) -> Iterator[Tuple[str, TrainedRun,
                                                                                                  torch.Tensor]]:
    """``(run_dir, run, val)`` per directory: :func:`load_trained_run` and the run's validation bytes (1-D uint8),
    the corpus read once for runs that share it. ``ValueError`` as :func:`load_trained_run`."""
    corpus = functools.lru_cache(maxsize=1)(load_corpus)
    for run_dir in run_dirs:
        run = load_trained_run(run_dir, device)
        yield run_dir, run, corpus(run.cfg.corpus, run.cfg.corpus_bytes)[1]


def validation_windows(val: torch.Tensor, seq_len: int, windows: int) -> torch.Tensor:
    """The demo's evaluation windows of ``val``: int64 ``[windows, seq_len + 1]`` (inputs ``[:, :-1]``, labels
    ``[:, 1:]``)."""
    return byte_windows(val, validation_offsets(len(val), seq_len, windows), seq_len)
