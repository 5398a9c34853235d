"""LoRA (Hu et al. 2021) for the LLM's Dense layers, as M3D-LaMed's stage 2 (PEFT r=16, α=32, dropout 0.05
on every LLM Linear except lm_head).

`apply_lora` attaches a `LoraAdapter` to each target `Dense` (as `dense.lora`), which adds
scale · dropout(x) · A · B to its output; A and B are `LoraParam`s, so `wrt=LoraParam` trains the adapters
alone. Stacked layers get adapters with the same leading "layers" axis, sliced per layer by `run_stack`
like every other parameter. `merge_lora` folds the adapters into the kernels for export and inference.

Dropout keeps no RNG state in the model (a state update would not come back out of `run_stack`'s
split / merge): inside `with lora_dropout(key):` each adapter draws its mask from the (salted) key folded
with its `dropout_id`, a Buffer numbering every module and stacked layer.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Iterator

import jax
import jax.numpy as jnp
from flax import nnx

from m3d_jax.layers.linear import Dense
from m3d_jax.layers.params import Buffer
from m3d_jax.sharding import logical_axes

_DROPOUT_KEY: contextvars.ContextVar[jax.Array | None] = contextvars.ContextVar("lora_dropout_key", default=None)
# Salts the key, so the masks do not repeat the keys nnx.Rngs(dropout=key) hands out (fold_in(key, 0, 1, ...)).
_DROPOUT_SALT = 0x4C6F5241  # "LoRA"


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    """rank r, scale alpha / r, dropout on the adapter input; `targets` are Dense attribute names searched
    under the path `under` (the LLM: "language_model" in LaMed, "llm" in Med-2E3; "" = the whole model).
    In training, the base weights under `under` are frozen except `fully_trained` (module paths relative to
    `under`, patterns as in `config.trainable`: the recipe's input embeddings and lm_head)."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    under: str = "language_model"
    fully_trained: tuple[str, ...] = ("embed_tokens", "lm_head")

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "fully_trained", tuple(self.fully_trained))
        if self.rank < 1 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoRA needs rank >= 1 and 0 <= dropout < 1, got rank={self.rank}, "
                             f"dropout={self.dropout}")


class LoraParam(nnx.Param):
    """A LoRA factor: select the adapters with `wrt=LoraParam` (they are also `nnx.Param`s)."""


@contextlib.contextmanager
def lora_dropout(key: jax.Array) -> Iterator[None]:
    """Enables adapter dropout while tracing the enclosed code (e.g. the training loss). Enter it inside
    the jitted function with `key` an argument: a jit cache entry traced without it would not see it."""
    token = _DROPOUT_KEY.set(jax.random.fold_in(key, _DROPOUT_SALT))
    try:
        yield
    finally:
        _DROPOUT_KEY.reset(token)


class LoraAdapter(nnx.Module):
    """scale · dropout(x) · A · B for one Dense, A [*stack, *in, r], B [*stack, r, *out]. `stack` is the
    kernel's leading "layers" axis of stacked layers (empty otherwise), sliced off before each call."""

    def __init__(self, dense: Dense, config: LoraConfig, first_id: int, *, rngs: nnx.Rngs):
        kernel = dense.kernel
        n_in = len(dense.in_features)
        n_stack = kernel.ndim - n_in - len(dense.out_features)
        axes = logical_axes(kernel)
        axes = axes if axes is not None and len(axes) == kernel.ndim else (None,) * kernel.ndim
        stack, shape = kernel.shape[:n_stack], kernel.shape
        # PEFT's default: kaiming_uniform(a=√5) on A, i.e. U(±1/√fan_in); B = 0, so training starts from the
        # base model. One draw over the whole stack: every layer gets its own A.
        bound = 1.0 / math.sqrt(math.prod(dense.in_features))
        self.a = LoraParam(
            jax.random.uniform(rngs.params(), shape[:n_stack + n_in] + (config.rank,), kernel.dtype, -bound, bound),
            sharding=(*axes[:n_stack + n_in], None), eager_sharding=False)
        self.b = LoraParam(jnp.zeros(stack + (config.rank,) + shape[n_stack + n_in:], kernel.dtype),
                           sharding=(*axes[:n_stack], None, *axes[n_stack + n_in:]), eager_sharding=False)
        ids = jnp.arange(first_id, first_id + math.prod(stack), dtype=jnp.uint32).reshape(stack)
        self.dropout_id = Buffer(ids, sharding=axes[:n_stack], eager_sharding=False)
        self.n_in = n_in
        self.scale = config.alpha / config.rank
        self.rate = config.dropout

    def __call__(self, x: jax.Array) -> jax.Array:
        """x [..., *in] in the Dense compute dtype → [..., *out]."""
        key = _DROPOUT_KEY.get()
        if key is not None and self.rate > 0:
            if self.dropout_id.ndim:
                raise ValueError("a stacked LoRA adapter runs one layer at a time (through run_stack)")
            keep = jax.random.bernoulli(jax.random.fold_in(key, self.dropout_id[...]), 1.0 - self.rate, x.shape)
            x = jnp.where(keep, x / (1.0 - self.rate), 0).astype(x.dtype)
        low = jnp.tensordot(x, self.a[...].astype(x.dtype), axes=self.n_in)  # [..., r]
        return jnp.tensordot(low, self.b[...].astype(x.dtype), axes=1) * jnp.asarray(self.scale, x.dtype)

    def delta(self) -> jax.Array:
        """scale · A · B in the kernel's layout [*stack, *in, *out], float32."""
        a, b = self.a[...].astype(jnp.float32), self.b[...].astype(jnp.float32)
        stack, rank = a.shape[:self.dropout_id.ndim], a.shape[-1]
        product = jnp.einsum("...ir,...ro->...io", a.reshape(*stack, -1, rank), b.reshape(*stack, rank, -1))
        return (product * self.scale).reshape(a.shape[:-1] + b.shape[len(stack) + 1:])


def _targets(model: nnx.Module, config: LoraConfig) -> list[Dense]:
    prefix = tuple(part for part in config.under.split("/") if part)
    return [node for path, node in nnx.iter_graph(model)
            if isinstance(node, Dense) and path and path[-1] in config.targets
            and tuple(map(str, path[:len(prefix)])) == prefix]


def apply_lora(model: nnx.Module, config: LoraConfig = LoraConfig(), *, rngs: nnx.Rngs) -> int:
    """Attaches a fresh adapter (B = 0: the outputs are unchanged) to every target Dense, in place.

    Returns the number of adapted weight matrices, counting each layer of a stacked Dense (as PEFT counts
    Linear modules): 7 × num_layers for the default targets on the decoder."""
    targets = _targets(model, config)
    if not targets:
        raise ValueError(f"no Dense named one of {config.targets} under {config.under!r}; set LoraConfig.targets "
                         "/ LoraConfig.under to the layers to adapt")
    if any(dense.lora is not None for dense in targets):
        raise ValueError("apply_lora found a Dense that already has an adapter; merge_lora the model first")
    count = 0
    for dense in targets:
        dense.lora = LoraAdapter(dense, config, count, rngs=rngs)
        count += dense.lora.dropout_id.size
    return count


def merge_lora(model: nnx.Module) -> nnx.Module:
    """Folds every adapter into its kernel (kernel += scale · A · B) and removes it, in place: the model
    then has plain Dense layers again, as the exporters expect. Returns the model."""
    for _, node in list(nnx.iter_graph(model)):
        if isinstance(node, Dense) and node.lora is not None:
            kernel = node.kernel[...]
            node.kernel[...] = (kernel.astype(jnp.float32) + node.lora.delta()).astype(kernel.dtype)
            del node.lora
    return model
