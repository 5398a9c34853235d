"""Rotary position embeddings in HF's rotate-half layout, with the scalings of the target checkpoints:
none ("default"), "longrope" (Phi-3-128k) and "llama3".

Inverse frequencies are computed in float32 exactly as transformers computes them, so converted
checkpoints need no q/k permutation and logits match to float rounding.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    rotary_dim: int
    theta: float = 10000.0
    rope_type: str = "default"  # default | longrope | llama3
    attention_factor: float = 1.0  # multiplies cos and sin (longrope)
    original_max_position_embeddings: int = 0  # longrope switch point; llama3 old context length
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    factor: float = 1.0  # llama3
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3

    def __post_init__(self):
        if self.rope_type not in ("default", "longrope", "llama3"):
            raise ValueError(f"unsupported rope_type {self.rope_type!r} (default, longrope, llama3)")
        if self.rope_type == "longrope":
            for name in ("short_factor", "long_factor"):
                if len(getattr(self, name)) != self.rotary_dim // 2:
                    raise ValueError(f"longrope {name} needs {self.rotary_dim // 2} entries, got "
                                     f"{len(getattr(self, name))}")


def _base_exponents(rotary_dim: int) -> np.ndarray:
    return np.arange(0, rotary_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(rotary_dim)


def inverse_frequencies(config: RopeConfig, long: bool = False) -> np.ndarray:
    """[rotary_dim / 2] float32 inverse frequencies (the long set for longrope when `long`)."""
    powers = np.float32(config.theta) ** _base_exponents(config.rotary_dim)
    if config.rope_type == "longrope":
        factors = np.asarray(config.long_factor if long else config.short_factor, dtype=np.float32)
        return (np.float32(1.0) / (factors * powers)).astype(np.float32)
    inv_freq = (np.float32(1.0) / powers).astype(np.float32)
    if config.rope_type == "llama3":
        old_context = config.original_max_position_embeddings
        low_wavelen = old_context / config.low_freq_factor
        high_wavelen = old_context / config.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / config.factor, inv_freq)
        smooth = (old_context / wavelen - config.low_freq_factor) / (config.high_freq_factor - config.low_freq_factor)
        smoothed = (1 - smooth) * scaled / config.factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        inv_freq = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv_freq


def rope_tables(config: RopeConfig, position_ids: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin [B, T, rotary_dim] float32 for integer positions [B, T].

    longrope picks ONE factor set per call: the long factors when max(position_ids) + 1 exceeds
    `original_max_position_embeddings`, else the short ones (transformers' behaviour, also while decoding).
    """
    inv_freq = jnp.asarray(inverse_frequencies(config))
    if config.rope_type == "longrope":
        use_long = jnp.max(position_ids) + 1 > config.original_max_position_embeddings
        inv_freq = jnp.where(use_long, jnp.asarray(inverse_frequencies(config, long=True)), inv_freq)
    freqs = position_ids.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles) * config.attention_factor, jnp.sin(angles) * config.attention_factor


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates the first rotary_dim features of x [B, T, N, H] (rotate-half pairing: i with i + dim/2)."""
    rotary_dim = cos.shape[-1]
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    rotated, passed = x[..., :rotary_dim], x[..., rotary_dim:]
    first, second = jnp.split(rotated, 2, axis=-1)
    rotated = rotated * cos + jnp.concatenate([-second, first], axis=-1) * sin
    return jnp.concatenate([rotated, passed], axis=-1) if passed.shape[-1] else rotated
