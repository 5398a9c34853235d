"""Shared helpers for the model-config dataclasses and the training configs."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, TypeVar

T = TypeVar("T")


def dataclass_from_mapping(cls: type[T], values: Mapping[str, Any]) -> T:
    """Builds a config dataclass from a mapping (e.g. an ml_collections ConfigDict), naming unknown keys."""
    values = dict(values)
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; known keys: {sorted(known)}")
    return cls(**values)


def run_options(*, log_every: int = 10, checkpoint_every: int = 1000, keep: int = 3) -> dict[str, Any]:
    """The run section every training config shares (checkpoints, logging, export, platform), for
    `config.update(...)`."""
    from ml_collections import ConfigDict

    return dict(
        checkpoint=ConfigDict(dict(every=checkpoint_every, keep=keep, async_save=True)),
        log_every=log_every,
        log_samples=False,  # write each step's sample indices to samples.jsonl
        progress=True,
        peak_flops_per_device=0.0,  # 0 = look the accelerator up (MFU is left out where unknown)
        export_pytorch=True,
        platform="",  # "" = JAX's default; "cpu" forces CPU
        cpu_devices=0,  # > 0: simulate this many CPU devices (set before JAX starts)
        # guarded keys (data position, state structure) a resume may change: "data.batch_size,seed"
        resume=ConfigDict(dict(allow_changes="")),
    )
