"""Attention. Every attention in m3d-jax goes through `attend`, i.e. `jax.nn.dot_product_attention`,
so XLA picks cuDNN flash attention on GPU for bf16/fp16 inputs."""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from m3d_jax.layers.linear import Dense
from m3d_jax.layers.params import DType

AttentionImpl = Literal["auto", "xla", "cudnn"]


# On CPU, attending in query blocks keeps each [block, T] score slab in cache: ~2x faster at T≈2k.
_CPU_QUERY_CHUNK = 128
_CPU_CHUNK_MIN_LENGTH = 1024


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
    length = query.shape[1]
    if query_chunk < 0:
        on_cpu = jax.default_backend() == "cpu"
        query_chunk = _CPU_QUERY_CHUNK if on_cpu and length >= _CPU_CHUNK_MIN_LENGTH and not is_causal else 0

    def attend_block(block_query, block_mask):
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
