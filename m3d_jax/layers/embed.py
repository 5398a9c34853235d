"""Token embedding table, usable as the (tied) output projection too."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from m3d_jax.layers.linear import over_merged_tokens
from m3d_jax.layers.params import DType, normal, param
from m3d_jax.sharding import constrain


class Embed(nnx.Module):
    """[vocab, embed] table with logical axes ("vocab", "embed")."""

    def __init__(
        self, num_embeddings: int, features: int, *, dtype: DType = jnp.float32, param_dtype: DType = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.dtype = dtype
        self.embedding = param(rngs, normal(0.02), (num_embeddings, features), param_dtype, ("vocab", "embed"))

    def __call__(self, ids: jax.Array) -> jax.Array:
        # The lookup reads whole rows: gather the table's feature dimension (fsdp) first, so the rows come
        # out batch-sharded like the ids instead of being resharded from feature-sharded.
        table = constrain(self.embedding[...], ("vocab", None))
        return jnp.take(table, ids, axis=0).astype(self.dtype)

    def attend(self, x: jax.Array) -> jax.Array:
        """x · tableᵀ: logits over the vocabulary for tied input/output embeddings."""
        table = self.embedding[...].astype(self.dtype)
        return over_merged_tokens(
            lambda x, accumulation: jnp.einsum("...d,vd->...v", x, table, preferred_element_type=accumulation),
            x.astype(self.dtype), 1)
