"""Dense against torch.nn.Linear (outputs and weight gradients over two token axes), and its per-platform
product: token axes merged on CPU, the grouped dot_general kept in programs lowered for TPU and GPU."""

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
