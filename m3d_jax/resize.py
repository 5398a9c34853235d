"""Trilinear resizing with half-pixel centres (torch `interpolate(mode="trilinear", align_corners=False)`,
no antialiasing), as separable 1D passes. One index/weight rule serves numpy (data pipeline) and jnp
(model outputs, differentiable)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def linear_taps(old: int, new: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each output index: (lower source index, upper source index, weight of the upper one)."""
    source = np.maximum((np.arange(new, dtype=np.float64) + 0.5) * (old / new) - 0.5, 0.0)
    low = np.minimum(np.floor(source).astype(np.int64), old - 1)
    high = np.minimum(low + 1, old - 1)
    return low, high, (source - low).astype(np.float32)


def resize_trilinear(array, size: Sequence[int], xp=np):
    """Resizes the last three axes of `array` to `size`; `xp` is numpy or jax.numpy."""
    out = array
    for offset, new in zip((3, 2, 1), size):
        axis = array.ndim - offset
        old = out.shape[axis]
        if old == new:
            continue
        low, high, weight = linear_taps(old, new)
        weight_shape = [1] * array.ndim
        weight_shape[axis] = new
        weight = xp.asarray(weight.reshape(weight_shape), dtype=out.dtype)
        out = xp.take(out, xp.asarray(low), axis=axis) * (1 - weight) + xp.take(out, xp.asarray(high), axis=axis) * weight
    return out
