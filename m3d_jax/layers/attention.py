"""Attention. Every attention in m3d-jax goes through `attend`, i.e. `jax.nn.dot_product_attention`,
so XLA picks cuDNN flash attention on GPU for bf16/fp16 inputs."""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from m3d_jax.layers.linear import Dense
from m3d_jax.layers.params import DType
from m3d_jax.layers.rope import apply_rope

AttentionImpl = Literal["auto", "xla", "cudnn"]


# On CPU, attending in query blocks keeps each [block, T] score slab in cache: ~2x faster at T≈2k.
_CPU_QUERY_CHUNK = 128
_CPU_CHUNK_MIN_LENGTH = 1024


# Name scopes that FLOP counting (train/flops.py) reads: products under ATTENTION_SCOPE are attention's
# score and value products, halved under CAUSAL_SCOPE (only the lower triangle is useful work).
ATTENTION_SCOPE = "attention"
CAUSAL_SCOPE = "causal_attention"
_PLAIN_XLA = contextvars.ContextVar("plain_xla_attention", default=False)


@contextlib.contextmanager
def plain_xla_attention() -> Iterator[None]:
    """While tracing inside this context, every attention is XLA einsums (no fused cuDNN call), so a jaxpr
    walk sees its products."""
    token = _PLAIN_XLA.set(True)
    try:
        yield
    finally:
        _PLAIN_XLA.reset(token)


def _auto_implementation(query: jax.Array) -> str:
    head_dim = query.shape[-1]
    fused_ok = query.dtype in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 128
    return "cudnn" if fused_ok and jax.default_backend() == "gpu" else "xla"


def attend(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    mask: jax.Array | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    implementation: AttentionImpl = "auto",
    query_chunk: int = -1,
) -> jax.Array:
    """Scaled dot-product attention on [B, T, N, H] tensors (K/V may have fewer heads: grouped-query).

    implementation: "auto" = cuDNN fused (flash) attention on GPU for bf16/fp16 with a head size it supports,
      XLA otherwise (JAX's own default is always XLA); "xla" or "cudnn" force one.
    query_chunk: process queries in blocks of this many (0 = never; -1 = auto: blocks of 128 for long
      sequences on CPU, none elsewhere). Each block is still one `jax.nn.dot_product_attention` call.
    mask: boolean, broadcastable to [B, N, T_q, T_k].
    """
    if implementation not in ("auto", "xla", "cudnn"):
        raise ValueError(f"attention implementation must be auto, xla or cudnn, got {implementation!r}")
    impl = _auto_implementation(query) if implementation == "auto" else implementation
    if _PLAIN_XLA.get():
        impl = "xla"
    length = query.shape[1]
    if query_chunk < 0:
        on_cpu = jax.default_backend() == "cpu"
        query_chunk = _CPU_QUERY_CHUNK if on_cpu and length >= _CPU_CHUNK_MIN_LENGTH and not is_causal else 0

    def attend_block(block_query, block_mask):
        with jax.named_scope(CAUSAL_SCOPE if is_causal else ATTENTION_SCOPE), jax.named_scope(ATTENTION_SCOPE):
            return jax.nn.dot_product_attention(
                block_query, key, value, mask=block_mask, is_causal=is_causal, scale=scale, implementation=impl
            )

    if query_chunk == 0 or length <= query_chunk:
        return attend_block(query, mask)
    if is_causal:
        raise ValueError("query_chunk needs an explicit mask instead of is_causal")
    num_blocks = -(-length // query_chunk)
    pad = num_blocks * query_chunk - length
    blocks = jnp.pad(query, ((0, 0), (0, pad), (0, 0), (0, 0)))
    blocks = blocks.reshape(query.shape[0], num_blocks, query_chunk, *query.shape[2:]).swapaxes(0, 1)
    if mask is None:
        outputs = jax.lax.map(lambda block: attend_block(block, None), blocks)
    else:
        mask = jnp.broadcast_to(mask, (*mask.shape[:-2], length, mask.shape[-1]))
        mask = jnp.pad(mask, [(0, 0)] * (mask.ndim - 2) + [(0, pad), (0, 0)])
        mask_blocks = jnp.moveaxis(mask.reshape(*mask.shape[:-2], num_blocks, query_chunk, mask.shape[-1]), -3, 0)
        outputs = jax.lax.map(lambda pair: attend_block(*pair), (blocks, mask_blocks))
    outputs = outputs.swapaxes(0, 1).reshape(query.shape[0], num_blocks * query_chunk, *outputs.shape[3:])
    return outputs[:, :length]


class FusedSelfAttention(nnx.Module):
    """Self-attention with one fused qkv projection whose output splits as (3, heads, head_dim), q first
    (the MONAI/M3D layout), and an output projection over (heads, head_dim)."""

    def __init__(
        self,
        features: int,
        num_heads: int,
        *,
        qkv_bias: bool = False,
        dtype: DType = jnp.float32,
        param_dtype: DType = jnp.float32,
        precision: jax.lax.PrecisionLike = None,
        implementation: AttentionImpl = "auto",
        query_chunk: int = -1,
        rngs: nnx.Rngs,
    ):
        if features % num_heads:
            raise ValueError(f"hidden size {features} is not divisible by {num_heads} heads")
        self.head_dim = features // num_heads
        self.implementation = implementation
        self.query_chunk = query_chunk
        common = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
        self.qkv = Dense(
            features, (3, num_heads, self.head_dim), axes=("embed", None, "heads", "head_dim"),
            use_bias=qkv_bias, **common,
        )
        self.out_proj = Dense((num_heads, self.head_dim), features, axes=("heads", "head_dim", "embed"), **common)

    def __call__(self, x: jax.Array) -> jax.Array:
        qkv = self.qkv(x)  # [B, T, 3, N, H]
        query, key, value = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        context = attend(
            query, key, value, scale=self.head_dim**-0.5, implementation=self.implementation,
            query_chunk=self.query_chunk,
        )
        return self.out_proj(context)


class KVCache(NamedTuple):
    """Preallocated keys/values of every layer plus which slots hold real tokens.

    key, value: [L, B, S, kv_heads, head_dim], or a tuple of L arrays [B, S, kv_heads, head_dim] (for
    decoding with unstacked layers: each layer updates its own buffer in place); valid: [B, S] bool;
    index: int32 scalar, the next slot to write (all rows write the same slot: prompts are left-padded).
    """

    key: jax.Array
    value: jax.Array
    valid: jax.Array
    index: jax.Array

    @classmethod
    def zeros(
        cls, num_layers: int, batch: int, slots: int, kv_heads: int, head_dim: int, dtype, *, per_layer: bool = False
    ) -> KVCache:
        valid, index = jnp.zeros((batch, slots), bool), jnp.zeros((), jnp.int32)
        if per_layer:
            shape = (batch, slots, kv_heads, head_dim)
            buffers = tuple(jnp.zeros(shape, dtype) for _ in range(num_layers))
            return cls(buffers, tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)), valid, index)
        shape = (num_layers, batch, slots, kv_heads, head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), valid, index)


def causal_mask(
    query_slots: jax.Array, key_slots: jax.Array, key_valid: jax.Array, sliding_window: int = 0
) -> jax.Array:
    """[B, 1, T, S] boolean mask: key slot s is visible from query slot t when it holds a real token,
    s ≤ t, and (with a sliding window W > 0) t − s < W. Slots count from the start of the padded sequence,
    as transformers' cache positions do."""
    visible = key_slots[None, :] <= query_slots[:, None]
    if sliding_window > 0:
        visible &= key_slots[None, :] > query_slots[:, None] - sliding_window
    return (visible[None] & key_valid[:, None, :])[:, None]


class CausalSelfAttention(nnx.Module):
    """Decoder self-attention with grouped-query heads, rotate-half RoPE and an optional KV cache."""

    def __init__(
        self,
        features: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        use_bias: bool = False,
        dtype: DType = jnp.float32,
        param_dtype: DType = jnp.float32,
        precision: jax.lax.PrecisionLike = None,
        implementation: AttentionImpl = "auto",
        rngs: nnx.Rngs,
    ):
        if num_heads % num_kv_heads:
            raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} key/value heads")
        self.head_dim = head_dim
        self.implementation = implementation
        common = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
        self.q_proj = Dense(features, (num_heads, head_dim), axes=("embed", "q_heads", "head_dim"), **common)
        self.k_proj = Dense(features, (num_kv_heads, head_dim), axes=("embed", "kv_heads", "head_dim"), **common)
        self.v_proj = Dense(features, (num_kv_heads, head_dim), axes=("embed", "kv_heads", "head_dim"), **common)
        self.o_proj = Dense((num_heads, head_dim), features, axes=("q_heads", "head_dim", "embed"), **common)

    def __call__(
        self,
        x: jax.Array,
        *,
        cos: jax.Array,
        sin: jax.Array,
        mask: jax.Array,
        cache: tuple[jax.Array, jax.Array] | None = None,
        cache_index: jax.Array | None = None,
    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """x [B, T, D]; mask [B, 1, T, S] over the keys (S = T without cache, cache slots with one).
        With `cache` = (key, value) [B, S, K, H], the new keys/values are written at `cache_index`."""
        query = apply_rope(self.q_proj(x), cos, sin)
        key = apply_rope(self.k_proj(x), cos, sin)
        value = self.v_proj(x)
        if cache is not None:
            cached_key, cached_value = cache
            key = jax.lax.dynamic_update_slice_in_dim(cached_key, key.astype(cached_key.dtype), cache_index, axis=1)
            value = jax.lax.dynamic_update_slice_in_dim(
                cached_value, value.astype(cached_value.dtype), cache_index, axis=1
            )
            cache = (key, value)
        with jax.named_scope(CAUSAL_SCOPE):
            context = attend(
                query, key.astype(query.dtype), value.astype(query.dtype), mask=mask, scale=self.head_dim**-0.5,
                implementation=self.implementation, query_chunk=0,
            )
        return self.o_proj(context), cache
