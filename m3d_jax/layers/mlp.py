"""Two-layer feed-forward block."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from m3d_jax.layers.linear import Dense
from m3d_jax.layers.params import DType

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # erf GELU, torch nn.GELU()
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """Looks up an activation by name, with the valid names in the error."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class Mlp(nnx.Module):
    """Dense(embed → mlp) → activation → Dense(mlp → embed)."""

    def __init__(
        self,
        features: int,
        hidden_features: int,
        *,
        act: str = "gelu",
        use_bias: bool = True,
        dtype: DType = jnp.float32,
        param_dtype: DType = jnp.float32,
        precision: jax.lax.PrecisionLike = None,
        rngs: nnx.Rngs,
    ):
        common = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
        self.act = activation(act)
        self.linear1 = Dense(features, hidden_features, axes=("embed", "mlp"), **common)
        self.linear2 = Dense(hidden_features, features, axes=("mlp", "embed"), **common)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear2(self.act(self.linear1(x)))


class GatedMlp(nnx.Module):
    """down(act(gate(x)) · up(x)) — the SiLU-gated MLP of Llama and Phi-3."""

    def __init__(
        self,
        features: int,
        hidden_features: int,
        *,
        act: str = "silu",
        use_bias: bool = False,
        dtype: DType = jnp.float32,
        param_dtype: DType = jnp.float32,
        precision: jax.lax.PrecisionLike = None,
        rngs: nnx.Rngs,
    ):
        common = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
        self.act = activation(act)
        self.gate_proj = Dense(features, hidden_features, axes=("embed", "mlp"), **common)
        self.up_proj = Dense(features, hidden_features, axes=("embed", "mlp"), **common)
        self.down_proj = Dense(hidden_features, features, axes=("mlp", "embed"), **common)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))
