"""Shared helpers for the model-config dataclasses."""

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
