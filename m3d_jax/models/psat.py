"""Med3DInsight's plane-slice-aware transformer (PSAT): a post-norm DETR-style decoder whose learnable
queries attend to the 3D backbone's bottleneck tokens, both shifted by a learned vector for the 2D slice's
(plane, slice index); query 0, projected, is the volume's embedding for that slice.

  queries [Q, d] + pos(plane, slice // 2) ;  memory = bottleneck tokens [64, d] + pos(plane, slice // 2)
  6 × { t = norm1(t + SA(t)) ; t = norm2(t + CA(t, memory)) ; t = norm3(t + W2 relu(W1 t)) }
  final LayerNorm → Linear(d → out_dim) → row 0

Reference quirks kept as defaults (REFERENCE §4, research note §6): the FFN is 8 wide (the head count landed
in the width argument), all layers start from identical weights, the position table is std-1 normal.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from m3d_jax.config import Precision
from m3d_jax.layers import Dense, LayerNorm, param, run_stack, stacked
from m3d_jax.layers.params import normal

PLANES = ("Axial", "Coronal", "Sagittal")


@dataclasses.dataclass(frozen=True)
class PsatConfig(Precision):
    hidden_size: int = 768
    num_heads: int = 8
    num_layers: int = 6
    ffn_dim: int = 8  # reference quirk; DETR uses 2048
    num_queries: int = 300
    out_dim: int = 512
    slice_bins: int = 128  # slice index // slice_stride indexes this many bins per plane
    slice_stride: int = 2
    dropout: float = 0.1  # residual branches and attention probabilities, in training
    layer_init: Literal["identical", "independent"] = "identical"  # reference: deep copies of one layer
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        super().__post_init__()
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by {self.num_heads} heads")
        if self.layer_init not in ("identical", "independent"):
            raise ValueError(f"layer_init must be 'identical' or 'independent', got {self.layer_init!r}")


def _dropout(x: jax.Array, rate: float, rngs: nnx.Rngs | None) -> jax.Array:
    if rngs is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rngs.dropout(), 1 - rate, x.shape)
    return jnp.where(keep, x / (1 - rate), 0.0).astype(x.dtype)


class MultiheadAttention(nnx.Module):
    """torch `nn.MultiheadAttention` semantics (q, k, v and output projections with biases, dropout on the
    attention probabilities), batch-first."""

    def __init__(self, config: PsatConfig, *, rngs: nnx.Rngs, **dtypes):
        heads, width = config.num_heads, config.hidden_size
        self.num_heads, self.rate = heads, config.dropout
        self.query, self.key, self.value = (
            Dense(width, (heads, width // heads), axes=("embed", "heads", "head_dim"), rngs=rngs, **dtypes)
            for _ in range(3))
        self.out = Dense((heads, width // heads), width, axes=("heads", "head_dim", "embed"), rngs=rngs, **dtypes)

    def __call__(self, queries: jax.Array, keys_values: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        q, k, v = self.query(queries), self.key(keys_values), self.value(keys_values)  # [B, T, N, H]
        logits = jnp.einsum("bqnh,bknh->bnqk", q, k).astype(jnp.float32) / jnp.sqrt(q.shape[-1])
        probs = _dropout(jax.nn.softmax(logits, axis=-1), self.rate, rngs)
        return self.out(jnp.einsum("bnqk,bknh->bqnh", probs.astype(v.dtype), v))


class PsatLayer(nnx.Module):
    """Post-norm decoder layer: self-attention, cross-attention to the memory, ReLU FFN."""

    def __init__(self, config: PsatConfig, *, rngs: nnx.Rngs, **dtypes):
        width, eps = config.hidden_size, config.layer_norm_eps
        self.rate = config.dropout
        self.self_attn = MultiheadAttention(config, rngs=rngs, **dtypes)
        self.norm1 = LayerNorm(width, eps=eps, axes=("embed",), rngs=rngs, **dtypes)
        self.cross_attn = MultiheadAttention(config, rngs=rngs, **dtypes)
        self.norm2 = LayerNorm(width, eps=eps, axes=("embed",), rngs=rngs, **dtypes)
        self.linear1 = Dense(width, config.ffn_dim, axes=("embed", "mlp"), rngs=rngs, **dtypes)
        self.linear2 = Dense(config.ffn_dim, width, axes=("mlp", "embed"), rngs=rngs, **dtypes)
        self.norm3 = LayerNorm(width, eps=eps, axes=("embed",), rngs=rngs, **dtypes)

    def __call__(self, x: jax.Array, *, memory: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        x = self.norm1(x + _dropout(self.self_attn(x, x, rngs), self.rate, rngs))
        x = self.norm2(x + _dropout(self.cross_attn(x, memory, rngs), self.rate, rngs))
        hidden = _dropout(jax.nn.relu(self.linear1(x)), self.rate, rngs)
        return self.norm3(x + _dropout(self.linear2(hidden), self.rate, rngs))


class Psat(nnx.Module):
    """Call with memory [B, M, d] (bottleneck tokens), plane [B] (0 axial, 1 coronal, 2 sagittal) and
    slice_index [B]; returns the embeddings [B, out_dim] (from query 0)."""

    def __init__(self, config: PsatConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtypes = config.dtypes()
        width = config.hidden_size
        self.ps_pos = param(rngs, normal(1.0), (width, len(PLANES), config.slice_bins), dtypes["param_dtype"],
                            ("embed", None, None))
        self.queries = param(rngs, normal(1.0), (config.num_queries, width), dtypes["param_dtype"], (None, "embed"))
        self.layers = stacked(lambda layer_rngs: PsatLayer(config, rngs=layer_rngs, **dtypes), config.num_layers, rngs)
        if config.layer_init == "identical":  # every layer a copy of the first, as the reference's deepcopy
            for _, variable in nnx.to_flat_state(nnx.state(self.layers, nnx.Param)):
                variable[...] = jnp.broadcast_to(variable[...][:1], variable.shape)
        self.norm = LayerNorm(width, eps=config.layer_norm_eps, axes=("embed",), rngs=rngs, **dtypes)
        self.proj = Dense(width, config.out_dim, axes=("embed", "mlp2"), rngs=rngs, **dtypes)

    def position(self, plane: jax.Array, slice_index: jax.Array) -> jax.Array:
        """The learned vector of each sample's (plane, slice_index // slice_stride) → [B, d]."""
        bins = slice_index // self.config.slice_stride
        return self.ps_pos[...][:, plane, bins].T

    def __call__(self, memory: jax.Array, plane: jax.Array, slice_index: jax.Array,
                 rngs: nnx.Rngs | None = None) -> jax.Array:
        position = self.position(plane, slice_index)[:, None].astype(memory.dtype)  # [B, 1, d]
        memory = memory + position
        queries = self.queries[...][None].astype(memory.dtype) + position  # [B, Q, d]
        decoded, _, _ = run_stack(self.layers, queries, num_layers=self.config.num_layers, memory=memory, rngs=rngs)
        return self.proj(self.norm(decoded))[:, 0]


def check_slice_indices(plane, slice_index, config: PsatConfig) -> None:
    """Host-side check that planes and slice indices are in range (JAX would clamp silently)."""
    import numpy as np

    plane, slice_index = np.asarray(plane), np.asarray(slice_index)
    limit = config.slice_bins * config.slice_stride
    if plane.min() < 0 or plane.max() >= len(PLANES):
        raise ValueError(f"plane ids must be 0..{len(PLANES) - 1} ({', '.join(PLANES)}), got {plane.tolist()}")
    if slice_index.min() < 0 or slice_index.max() >= limit:
        raise ValueError(f"slice indices must be in [0, {limit}), got min {slice_index.min()} max {slice_index.max()}")
