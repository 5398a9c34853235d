"""A dense layer over groups of axes, so fused projections keep their heads as separate (shardable) axes."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from m3d_jax.layers.params import DType, Initializer, param, zeros


def _as_tuple(value: int | Sequence[int]) -> tuple[int, ...]:
    return (value,) if isinstance(value, int) else tuple(value)


class Dense(nnx.Module):
    """y = x · kernel + bias, contracting the trailing `in_features` axes of x.

    The kernel has shape (*in_features, *out_features); e.g. a fused qkv projection is
    Dense(768, (3, 12, 64)) with axes ("embed", None, "heads", "head_dim"). Parameters are stored in
    `param_dtype` and cast to `dtype` for the computation. `lora`, when set (by
    `m3d_jax.train.lora.apply_lora`), is a low-rank adapter module called on the cast inputs and added.
    """

    lora: nnx.Module | None = None

    def __init__(
        self,
        in_features: int | Sequence[int],
        out_features: int | Sequence[int],
        *,
        axes: Sequence[str | None],
        use_bias: bool = True,
        dtype: DType = jnp.float32,
        param_dtype: DType = jnp.float32,
        kernel_init: Initializer | None = None,
        precision: jax.lax.PrecisionLike = None,
        rngs: nnx.Rngs,
    ):
        self.in_features = _as_tuple(in_features)
        self.out_features = _as_tuple(out_features)
        self.dtype = dtype
        self.precision = precision
        kernel_init = kernel_init or nnx.initializers.lecun_normal()
        kernel_shape = self.in_features + self.out_features
        self.kernel = param(rngs, _flatten_init(kernel_init, len(self.in_features)), kernel_shape, param_dtype, axes)
        out_axes = tuple(axes)[len(self.in_features):]
        self.bias = param(rngs, zeros, self.out_features, param_dtype, out_axes) if use_bias else None

    def __call__(self, inputs: jax.Array) -> jax.Array:
        n_in = len(self.in_features)
        if inputs.shape[-n_in:] != self.in_features:
            raise ValueError(f"Dense expects trailing input axes {self.in_features}, got input shape {inputs.shape}")
        kernel = self.kernel[...].astype(self.dtype)
        inputs = inputs.astype(self.dtype)

        def product(x: jax.Array, accumulation: DType | None) -> jax.Array:
            contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
            return jax.lax.dot_general(x, kernel, (contract, ((), ())), precision=self.precision,
                                       preferred_element_type=accumulation)

        outputs = over_merged_tokens(product, inputs, n_in)
        if self.bias is not None:
            outputs = outputs + self.bias[...].astype(self.dtype)
        if self.lora is not None:
            outputs = outputs + self.lora(inputs)
        return outputs


def over_merged_tokens(product: Callable[[jax.Array, DType | None], jax.Array], x: jax.Array,
                       n_features: int) -> jax.Array:
    """`product(x, accumulation)` for a product that contracts x's trailing `n_features` axes (`accumulation`
    is its `preferred_element_type`, None for the inputs' own), as XLA's CPU compiler runs it best:

    - x's leading (token) axes merged into one. A weight gradient that contracts over two token axes (batch
      and length) is otherwise lowered to a generic dot over a transposed copy of the output gradient: in a
      mid-size LaMed training step that was a quarter of the step.
    - bf16/fp16 products accumulated in fp32, then rounded to the input dtype (the value the product would
      have given). A bf16 product with a bf16 result runs at fp32 speed (168 GFLOP/s for a 2048 × 768 × 3072
      product on a 2-core Xeon with AMX), one with an fp32 result on the bf16 units (648 GFLOP/s). This is
      the forward product's speed-up: in the backward pass the fp32 cotangent makes fp32 products.

    Programs lowered for TPU or GPU keep the plain product (their compilers handle both, and a merge could
    cross a sharded axis)."""
    lead = x.ndim - n_features
    low_precision = x.dtype in (jnp.bfloat16, jnp.float16)
    if lead <= 1 and not low_precision:
        return product(x, None)

    def plain(x: jax.Array) -> jax.Array:
        return product(x, None)

    # the plain product's dtype, for the fp32-accumulated one to round to (traced only where it is needed)
    out_dtype = jax.eval_shape(plain, x).dtype if low_precision else None

    def on_cpu(x: jax.Array) -> jax.Array:
        merged = x.reshape((-1,) + x.shape[lead:]) if lead > 1 else x
        out = product(merged, jnp.float32).astype(out_dtype) if low_precision else product(merged, None)
        return out.reshape(x.shape[:lead] + out.shape[1:]) if lead > 1 else out

    return jax.lax.platform_dependent(x, cpu=on_cpu, default=plain)


def _flatten_init(init: Initializer, n_in: int) -> Initializer:
    """Runs a 2D initialiser on the (fan_in, fan_out) view of a grouped kernel, so fan sizes are right."""

    def grouped_init(key, shape, dtype):
        fan_in, fan_out = math.prod(shape[:n_in]), math.prod(shape[n_in:])
        return init(key, (fan_in, fan_out), dtype).reshape(shape)

    return grouped_init
