"""Shared helpers for the model-config dataclasses and the training configs."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import pathlib
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from m3d_jax.layers.attention import AttentionImpl
from m3d_jax.layers.params import canonical_dtype
from m3d_jax.layers.stack import RematPolicy

T = TypeVar("T")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Precision:
    """A model config's compute and parameter dtypes ("float32", "bfloat16", ...)."""

    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        for field in ("dtype", "param_dtype"):
            try:
                canonical_dtype(getattr(self, field))
            except TypeError:
                raise ValueError(f"{type(self).__name__}.{field}: {getattr(self, field)!r} is not a dtype") from None

    def dtypes(self) -> dict[str, Any]:
        """`dtype=` and `param_dtype=` as the layers take them."""
        return dict(dtype=canonical_dtype(self.dtype), param_dtype=canonical_dtype(self.param_dtype))


@dataclasses.dataclass(frozen=True, kw_only=True)
class ComputeOptions(Precision):
    """How a stack of transformer layers runs: dtypes, rematerialisation, scanned layers, attention kernel."""

    remat: RematPolicy = "none"
    scan_layers: bool = False
    attention_impl: AttentionImpl = "auto"

    def __post_init__(self):
        super().__post_init__()
        for field, kind in (("remat", RematPolicy), ("attention_impl", AttentionImpl)):
            if getattr(self, field) not in typing.get_args(kind):
                raise ValueError(f"{type(self).__name__}.{field} must be one of {typing.get_args(kind)}, "
                                 f"got {getattr(self, field)!r}")


def dataclass_from_mapping(cls: type[T], values: Mapping[str, Any]) -> T:
    """Builds a config dataclass from a mapping (e.g. an ml_collections ConfigDict), naming unknown keys."""
    values = dict(values)
    known = {field.name for field in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys {unknown}; known keys: {sorted(known)}")
    return cls(**values)


def data_section(**fields: Any):
    """A training config's `data` section: the reading options every pipeline shares, then `fields` (root,
    batch_size, sources, ...; a field given here wins)."""
    from ml_collections import ConfigDict

    shared = dict(
        skip_bad_records=False,  # True: skip unreadable records, counted and logged
        max_consecutive_skips=1000,  # ... and stop after this many in a row
        window=None,  # CT (level, width) before min-max; None = M3D's plain min-max
        threads=0,  # reader threads; 0 = one per core
        shards="",  # a prepared shard set (tools/prepare_data.py; folder, gs:// or fsspec URL); "" = raw files
        shards_cache="",  # local folder for shards on URLs other than gs://; "" = $M3D_JAX_CACHE/shards
    )
    return ConfigDict(dict(shared, **fields))


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


def load_config_file(spec: str | os.PathLike, variant: str | None = None):
    """The ConfigDict of a config file, as `--config=FILE.py[:variant]` gives it: `get_config(variant)`,
    or `get_config()` without a variant. `spec` may carry the variant after a colon."""
    path, _, spec_variant = str(spec).partition(":")
    variant = variant or spec_variant or None
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"config_{pathlib.Path(path).stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(variant) if variant else module.get_config()
