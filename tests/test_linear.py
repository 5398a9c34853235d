"""Dense against torch.nn.Linear (outputs and weight gradients over two token axes), and its per-platform
product: token axes merged on CPU, the grouped dot_general kept in programs lowered for TPU and GPU."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from m3d_jax.layers import Dense


def test_dense_matches_torch_linear_with_gradients():
    dense = Dense(12, (2, 5), axes=("embed", None, "mlp"), rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).normal(size=(3, 7, 12)).astype(np.float32)
    linear = torch.nn.Linear(12, 10)
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(np.asarray(dense.kernel[...]).reshape(12, 10).T.copy()))
        linear.bias.copy_(torch.from_numpy(np.array(dense.bias[...]).reshape(10)))
    torch_x = torch.from_numpy(x).requires_grad_()
    torch_out = linear(torch_x)
    (torch_out ** 2).sum().backward()

    def loss(model, x):
        return jnp.sum(model(x) ** 2), model(x)

    (_, out), (grads, x_grad) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(dense, jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(out).reshape(3, 7, 10), torch_out.detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(grads.kernel[...]).reshape(12, 10), linear.weight.grad.numpy().T,
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.asarray(x_grad), torch_x.grad.numpy(), rtol=1e-4, atol=1e-4)


def test_token_axes_are_merged_on_cpu_only():
    dense = Dense(16, 32, axes=("embed", "mlp"), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(dense)
    x = jax.ShapeDtypeStruct((4, 8, 16), jnp.float32)
    traced = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).trace(state, x)
    cpu = traced.lower(lowering_platforms=("cpu",)).as_text()
    assert "tensor<32x16xf32>" in cpu and "dot_general" in cpu
    for platform in ("tpu", "cuda"):
        text = traced.lower(lowering_platforms=(platform,)).as_text()
        assert "tensor<32x16xf32>" not in text and "dot_general" in text, platform


def test_bf16_products_accumulate_in_fp32_on_cpu_only():
    """On CPU a bf16 product is asked for an fp32 result (XLA runs it on the bf16 units then; with a bf16
    result it ran at fp32 speed) and rounded once; TPU and GPU programs keep the bf16 product."""
    dense = Dense(16, 32, axes=("embed", "mlp"), dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(dense)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 8, 16)), jnp.bfloat16)
    traced = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)).trace(state, x)
    products = {platform: re.findall(r"dot_general.*-> (tensor<[^>]*>)", traced.lower(lowering_platforms=(platform,))
                                     .as_text()) for platform in ("cpu", "tpu", "cuda")}
    assert products["cpu"] == ["tensor<32x32xf32>"], products["cpu"]
    for platform in ("tpu", "cuda"):
        assert products[platform] == ["tensor<4x8x32xbf16>"], (platform, products[platform])
    out = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x)
    exact = np.asarray(x, np.float64) @ np.asarray(dense.kernel[...].astype(jnp.bfloat16), np.float64)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), exact, rtol=2**-8, atol=1e-6)
