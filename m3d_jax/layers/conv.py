"""torch's Conv3d and stride = kernel ConvTranspose3d on channels-last volumes [B, D, H, W, C], with
kernels stored (k, k, k, I, O) and torch's default initialisation (nnFormer, UNETR)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from einops import rearrange
from flax import nnx

from m3d_jax.layers.params import DType, param, zeros

# torch's default Linear / Conv init: kaiming_uniform(a=√5) = U(±1/√fan_in), i.e. variance 1/(3·fan_in).
torch_default_init = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")

_KERNEL_AXES = (None, None, None, "embed", "conv_out")


class Conv3d(nnx.Module):
    """torch Conv3d (cross-correlation, symmetric zero padding). `padding` defaults to (k − 1) / 2, which
    keeps the size at stride 1 for odd k (MONAI's `get_padding`)."""

    def __init__(self, in_features: int, out_features: int, *, kernel: int, stride: int = 1,
                 padding: int | None = None, use_bias: bool = True, dtype: DType, param_dtype: DType,
                 rngs: nnx.Rngs):
        if padding is None:
            if kernel % 2 == 0:
                raise ValueError(f"Conv3d pads (k - 1) / 2 by default: the kernel size must be odd, got {kernel}")
            padding = (kernel - 1) // 2
        self.stride, self.padding, self.dtype = stride, padding, dtype
        self.kernel = param(rngs, torch_default_init, (kernel,) * 3 + (in_features, out_features), param_dtype,
                            _KERNEL_AXES)
        self.bias = param(rngs, zeros, (out_features,), param_dtype, ("conv_out",)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:  # [B, D, H, W, I] → [B, D', H', W', O]
        out = jax.lax.conv_general_dilated(
            x.astype(self.dtype), self.kernel[...].astype(self.dtype), (self.stride,) * 3,
            [(self.padding, self.padding)] * 3, dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
        )
        return out if self.bias is None else out + self.bias[...].astype(self.dtype)


class ConvTranspose3d(nnx.Module):
    """torch ConvTranspose3d with stride = kernel = k and no padding: every input voxel writes its own k³
    block, out[k·d + a, k·h + b, k·w + c] = x[d, h, w] · kernel[a, b, c] (+ bias) — an einsum then a pixel
    shuffle (no overlap, so no kernel flip to get wrong)."""

    def __init__(self, in_features: int, out_features: int, *, kernel: int, use_bias: bool = True, dtype: DType,
                 param_dtype: DType, rngs: nnx.Rngs):
        self.dtype = dtype
        self.kernel = param(rngs, torch_default_init, (kernel,) * 3 + (in_features, out_features), param_dtype,
                            _KERNEL_AXES)
        self.bias = param(rngs, zeros, (out_features,), param_dtype, ("conv_out",)) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:  # [B, D, H, W, I] → [B, kD, kH, kW, O]
        blocks = jnp.einsum("bdhwi,pqrio->bdhwpqro", x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        out = rearrange(blocks, "b d h w p q r o -> b (d p) (h q) (w r) o")
        return out if self.bias is None else out + self.bias[...].astype(self.dtype)
