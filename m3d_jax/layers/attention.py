"""Attention. Every attention in m3d-jax goes through `attend`: on GPU, `jax.nn.dot_product_attention` (XLA
picks cuDNN flash attention for bf16/fp16 inputs); on CPU, explicit heads-first products in query blocks,
which keep each block's scores in cache (about 2x faster than `dot_product_attention` at 2k tokens)."""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m3d_jax.layers.linear import Dense
from m3d_jax.layers.params import DType
from m3d_jax.layers.rope import apply_rope

AttentionImpl = Literal["auto", "xla", "cudnn"]


# On CPU, queries are attended in blocks of 256, one batch row and key head at a time, once a sequence is this
# long: a block's [256, T] scores stay in cache (measured on a 2-core Xeon at 2049 tokens, 12 heads: 256 best
# in bf16, 128-384 alike in fp32; at 512 tokens one block was faster).
_CPU_QUERY_BLOCK = 256
_CPU_BLOCK_MIN_LENGTH = 1024
# Without query blocks (the decoder's attention), batch rows and key heads still go one at a time from this
# length (forward and backward at 8 × 512 causal tokens: 209 → 171 ms; at 8 × 256 it was no faster).
_CPU_ROWS_MIN_LENGTH = 512


# Name scopes that FLOP counting (train/flops.py) reads: products under ATTENTION_SCOPE are attention's
# score and value products, halved under CAUSAL_SCOPE (only the lower triangle is useful work).
ATTENTION_SCOPE = "attention"
CAUSAL_SCOPE = "causal_attention"
_PLAIN_XLA = contextvars.ContextVar("plain_xla_attention", default=False)


@contextlib.contextmanager
def plain_xla_attention() -> Iterator[None]:
    """While tracing inside this context, every attention is `dot_product_attention`'s XLA einsums (no fused
    cuDNN call, no CPU path), so a jaxpr walk sees its products once."""
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
    kv_heads_first: bool = False,
) -> jax.Array:
    """Scaled dot-product attention on [B, T, N, H] tensors (K/V may have fewer heads: grouped-query).

    implementation: "auto" = cuDNN fused (flash) attention on GPU for bf16/fp16 with a head size it supports,
      XLA otherwise (JAX's own default is always XLA); "xla" or "cudnn" force one. XLA's path is chosen per
      platform when the program is lowered, so a TPU program compiled from a CPU host gets the TPU path.
    query_chunk: attend queries in blocks of this many (0 = one block; -1 = auto: 256 on CPU for sequences
      of 1024 and more, one block elsewhere).
    mask: boolean, broadcastable to [B, N, T_q, T_k].
    kv_heads_first: key and value are [B, K, S, H] (a KV cache's layout: the CPU path reads it as it is).
    """
    if implementation not in ("auto", "xla", "cudnn"):
        raise ValueError(f"attention implementation must be auto, xla or cudnn, got {implementation!r}")
    impl = _auto_implementation(query) if implementation == "auto" else implementation
    if _PLAIN_XLA.get():
        impl = "xla"
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    length = query.shape[1]
    if is_causal:
        causal = jnp.tril(jnp.ones((length, key.shape[2 if kv_heads_first else 1]), bool))
        mask = causal if mask is None else mask & causal
    auto = query_chunk < 0
    block = 0 if auto else query_chunk

    def library(query, key, value, mask):
        if kv_heads_first:
            key, value = key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3)
        return _library_attention(query, key, value, mask, scale=scale, implementation=impl, block=block)

    with jax.named_scope(CAUSAL_SCOPE if is_causal else ATTENTION_SCOPE):
        if impl == "cudnn" or _PLAIN_XLA.get():
            return library(query, key, value, mask)
        cpu_block = (_CPU_QUERY_BLOCK if length >= _CPU_BLOCK_MIN_LENGTH else 0) if auto else block
        explicit = functools.partial(_explicit_attention, scale=scale, block=cpu_block, kv_heads_first=kv_heads_first)
        return jax.lax.platform_dependent(query, key, value, mask, cpu=explicit, default=library)


def _query_blocks(attend_block, query: jax.Array, mask: jax.Array | None, block: int, axis: int) -> jax.Array:
    """`attend_block(query_block, mask_block)` over blocks of `block` queries along `axis` (padded at the end),
    one after another (`lax.map`), concatenated back."""
    length = query.shape[axis]
    if block == 0 or length <= block:
        return attend_block(query, mask)
    num_blocks = -(-length // block)
    pad = num_blocks * block - length

    def split(x, x_axis):
        x = jnp.pad(x, [(0, pad if i == x_axis else 0) for i in range(x.ndim)])
        x = x.reshape(*x.shape[:x_axis], num_blocks, block, *x.shape[x_axis + 1:])
        return jnp.moveaxis(x, x_axis, 0)

    if mask is None:
        outputs = jax.lax.map(lambda q: attend_block(q, None), split(query, axis))
    else:
        mask = jnp.broadcast_to(mask, (*mask.shape[:-2], length, mask.shape[-1]))
        outputs = jax.lax.map(lambda pair: attend_block(*pair), (split(query, axis), split(mask, mask.ndim - 2)))
    outputs = jnp.moveaxis(outputs, 0, axis)
    outputs = outputs.reshape(*outputs.shape[:axis], num_blocks * block, *outputs.shape[axis + 2:])
    return jax.lax.slice_in_dim(outputs, 0, length, axis=axis)


def _library_attention(query, key, value, mask, *, scale: float, implementation: str, block: int) -> jax.Array:
    """`jax.nn.dot_product_attention`, in query blocks when `block` > 0."""

    def attend_block(block_query, block_mask):
        with jax.named_scope(ATTENTION_SCOPE):
            return jax.nn.dot_product_attention(block_query, key, value, mask=block_mask, scale=scale,
                                                implementation=implementation)

    return _query_blocks(attend_block, query, mask, block, axis=1)


def _explicit_attention(query, key, value, mask, *, scale: float, block: int, kv_heads_first: bool) -> jax.Array:
    """Attention as explicit products on heads-first [B, K, G, T, H] tensors (G query heads per key head), in
    query blocks. The softmax is normalised after the value product (one pass less over the scores); scores
    and softmax are fp32, as in `dot_product_attention`, and masked scores get its large negative value."""
    batch, length, heads, head_dim = query.shape
    if not kv_heads_first:
        key, value = key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3)  # [B, K, S, H]
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    grouped_query = query.reshape(batch, length, kv_heads, groups, head_dim).transpose(0, 2, 3, 1, 4)  # [B,K,G,T,H]
    if mask is not None:
        mask = jnp.asarray(mask)
        mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
        if mask.shape[1] == 1:
            mask = mask[:, :, None]  # [B, 1, 1, T, S]
        else:
            mask = mask.reshape(mask.shape[0], kv_heads, groups, *mask.shape[2:])

    def attend_head(head_query, head_keys, head_values, head_mask):
        def attend_block(block_query, block_mask):
            return _block_attention(block_query, head_keys, head_values, block_mask, scale)

        return _query_blocks(attend_block, head_query, head_mask, block, axis=3)

    if (0 < block < length) or length >= _CPU_ROWS_MIN_LENGTH:
        # one batch row and key head at a time: the scores in flight are one head's ([G, block or T, S]), not
        # every head's (with blocks of 256 at 2049 keys, 2 MB: this CPU's L2)
        context = _over_rows_and_heads(attend_head, grouped_query, key, value, mask)
    else:
        context = attend_head(grouped_query, key, value, mask)
    return context.transpose(0, 3, 1, 2, 4).reshape(batch, length, heads, head_dim)


def _over_rows_and_heads(attend_head, query, key, value, mask):
    """`attend_head` on each (batch row, key head) in turn (`lax.map` in `lax.map`): query [B, K, G, T, H],
    key and value [B, K, S, H], mask [B|1, K|1, G|1, T, S] (an axis of 1 is shared, not copied). Measured
    on a 2-core Xeon against all heads at once: ViT3D's 2049 tokens, 12 heads of 64, in blocks of 256
    queries: 181 → 157 ms (fp32), 163 → 117 ms (bf16); causal forward and backward at 8 × 512 tokens, 8
    heads of 64: 209 → 171 ms, at 4 × 1024: 429 → 257 ms."""

    def over_axis(fn, query, key, value, mask):
        arrays = (query, key, value)
        if mask is not None and mask.shape[0] > 1:
            return jax.lax.map(lambda xs: fn(*xs), (*arrays, mask))
        shared = None if mask is None else mask[0]
        return jax.lax.map(lambda xs: fn(*xs, shared), arrays)

    def one_head(query, key, value, mask):  # [G, T, H], [S, H], [S, H], [G|1, T, S]
        expand = None if mask is None else mask[None, None]
        return attend_head(query[None, None], key[None, None], value[None, None], expand)[0, 0]

    return over_axis(lambda *row: over_axis(one_head, *row), query, key, value, mask)


_NEGATIVE = -0.7 * float(np.finfo(np.float32).max)  # dot_product_attention's value for masked scores


def _scores(query, key, mask, scale: float) -> jax.Array:
    scores = jnp.einsum("bkgth,bksh->bkgts", query, key, preferred_element_type=jnp.float32) * jnp.float32(scale)
    return scores if mask is None else jnp.where(mask, scores, jnp.float32(_NEGATIVE))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _block_attention(query, key, value, mask, scale: float) -> jax.Array:
    """softmax(q·kᵀ·scale, masked)·v for q [B, K, G, T, H] against k, v [B, K, S, H]; scores and softmax in fp32.
    Its backward (below) recomputes the weights from the saved log-sum-exp and uses softmax's closed-form
    gradient: forward and backward measured 173 → 136 ms against differentiating the forward (8 × 256 causal
    tokens, 8 heads of 64, 2-core Xeon, interleaved)."""
    return _block_attention_forward(query, key, value, mask, scale)[0]


def _block_attention_forward(query, key, value, mask, scale):
    with jax.named_scope(ATTENTION_SCOPE):
        scores = _scores(query, key, mask, scale)
        peak = jnp.max(scores, axis=-1, keepdims=True)
        weights = jnp.exp(scores - peak)
        total = jnp.sum(weights, axis=-1, keepdims=True)
        # normalised after the value product: one pass less over the scores
        context = jnp.einsum("bkgts,bksh->bkgth", weights.astype(value.dtype), value,
                             preferred_element_type=jnp.float32)
        context = (context / total).astype(query.dtype)
    return context, (query, key, value, mask, context, peak + jnp.log(total))


def _block_attention_backward(scale, saved, context_grad):
    query, key, value, mask, context, log_total = saved
    with jax.named_scope(ATTENTION_SCOPE):
        weights = jnp.exp(_scores(query, key, mask, scale) - log_total)
        value_grad = jnp.einsum("bkgts,bkgth->bksh", weights.astype(value.dtype), context_grad,
                                preferred_element_type=jnp.float32)
        weights_grad = jnp.einsum("bkgth,bksh->bkgts", context_grad, value, preferred_element_type=jnp.float32)
        row = jnp.sum(context_grad.astype(jnp.float32) * context.astype(jnp.float32), axis=-1, keepdims=True)
        scores_grad = (weights * (weights_grad - row) * jnp.float32(scale)).astype(query.dtype)
        query_grad = jnp.einsum("bkgts,bksh->bkgth", scores_grad, key, preferred_element_type=jnp.float32)
        key_grad = jnp.einsum("bkgts,bkgth->bksh", scores_grad, query, preferred_element_type=jnp.float32)
    return (query_grad.astype(query.dtype), key_grad.astype(key.dtype), value_grad.astype(value.dtype), None)


_block_attention.defvjp(_block_attention_forward, _block_attention_backward)


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

    key, value: [L, B, kv_heads, S, head_dim], or a tuple of L arrays [B, kv_heads, S, head_dim] (for
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
            shape = (batch, kv_heads, slots, head_dim)
            buffers = tuple(jnp.zeros(shape, dtype) for _ in range(num_layers))
            return cls(buffers, tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)), valid, index)
        shape = (num_layers, batch, kv_heads, slots, head_dim)
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
        With `cache` = (key, value) [B, K, S, H] (heads first, as transformers' caches: a decoding step reads
        it without a transpose), the new keys/values are written at `cache_index`."""
        query = apply_rope(self.q_proj(x), cos, sin)
        key = apply_rope(self.k_proj(x), cos, sin)
        value = self.v_proj(x)
        if cache is not None:
            cached_key, cached_value = cache
            key, value = (jax.lax.dynamic_update_slice_in_dim(cached, new.transpose(0, 2, 1, 3).astype(cached.dtype),
                                                              cache_index, axis=2)
                          for cached, new in ((cached_key, key), (cached_value, value)))
            cache = (key, value)
        with jax.named_scope(CAUSAL_SCOPE):
            context = attend(
                query, key.astype(query.dtype), value.astype(query.dtype), mask=mask, scale=self.head_dim**-0.5,
                implementation=self.implementation, query_chunk=0, kv_heads_first=cache is not None,
            )
        return self.o_proj(context), cache
