"""`attend` against torch's scaled_dot_product_attention (an independent implementation): the CPU path
(heads-first products in query blocks, one batch row and key head at a time; one query against a cache in
its own layout) with masks, grouped-query heads, causal masking and gradients, and the per-platform choice
made when lowering."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from m3d_jax.layers.attention import attend


def _torch_attention(q, k, v, mask=None, is_causal=False, scale=None):
    q, k, v = (torch.from_numpy(np.asarray(x, np.float32)).transpose(1, 2).requires_grad_() for x in (q, k, v))
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k, v, attn_mask=None if mask is None else torch.from_numpy(np.asarray(mask)), is_causal=is_causal,
        scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    return out.transpose(1, 2), (q, k, v)


CASES = {
    "plain": dict(batch=1, length=40, heads=4, kv_heads=4, mask=None),
    "blocks and rows": dict(batch=3, length=70, heads=4, kv_heads=4, mask=None, query_chunk=16),
    "grouped-query, padding mask": dict(batch=2, length=33, heads=6, kv_heads=2, mask="padding", query_chunk=8),
    "per-head mask": dict(batch=2, length=24, heads=4, kv_heads=4, mask="per_head", query_chunk=8),
    "causal": dict(batch=2, length=37, heads=4, kv_heads=2, mask="causal", query_chunk=16),
    "one query against a heads-first cache (decoding), grouped-query, padding mask": dict(
        batch=3, length=1, keys=29, heads=6, kv_heads=2, mask="padding", kv_heads_first=True),
    "one query, per-head mask": dict(batch=2, length=1, keys=20, heads=4, kv_heads=4, mask="per_head"),
    "prefill into a heads-first cache": dict(batch=2, length=12, keys=20, heads=4, kv_heads=2, mask="padding",
                                             kv_heads_first=True),
    # from 512 tokens the CPU path goes one batch row and key head at a time, also without query blocks
    "long: rows and heads, grouped-query, padding mask": dict(batch=2, length=520, heads=4, kv_heads=2,
                                                             mask="padding", query_chunk=0),
    "long: rows and heads, per-head mask": dict(batch=2, length=512, heads=2, kv_heads=2, mask="per_head",
                                                query_chunk=0),
    "long: rows and heads, per-head mask shared by the batch rows": dict(batch=2, length=512, heads=2, kv_heads=2,
                                                                        mask="per_head_shared", query_chunk=0),
}


@pytest.mark.parametrize("case", CASES, ids=list(CASES))
def test_attend_matches_torch_sdpa_outputs_and_gradients(case, rng):
    spec = CASES[case]
    batch, length, heads, kv_heads = spec["batch"], spec["length"], spec["heads"], spec["kv_heads"]
    keys = spec.get("keys", length)
    q = rng.standard_normal((batch, length, heads, 16), dtype=np.float32)
    k, v = (rng.standard_normal((batch, keys, kv_heads, 16), dtype=np.float32) for _ in range(2))
    mask, is_causal = None, spec["mask"] == "causal"
    if spec["mask"] == "padding":  # left padding: the first keys of row 0 hold no token
        mask = np.ones((batch, 1, length, keys), bool)
        mask[0, ..., :5] = False
    elif spec["mask"] in ("per_head", "per_head_shared"):
        mask = rng.random((batch if spec["mask"] == "per_head" else 1, heads, length, keys)) < 0.7
        mask[..., 0] = True  # no fully masked row (torch gives NaN there)
    weights = rng.standard_normal((batch, length, heads, 16), dtype=np.float32)

    heads_first = spec.get("kv_heads_first", False)

    def loss(q, k, v):
        if heads_first:  # [B, K, S, H], as a KV cache holds them
            k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        out = attend(q, k, v, mask=None if mask is None else jnp.asarray(mask), is_causal=is_causal, scale=0.3,
                     query_chunk=spec.get("query_chunk", -1), kv_heads_first=heads_first)
        return jnp.sum(out * weights), out

    (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    ref, inputs = _torch_attention(q, k, v, mask, is_causal, scale=0.3)
    (ref * torch.from_numpy(weights)).sum().backward()
    np.testing.assert_allclose(out, ref.detach().numpy(), rtol=0, atol=2e-6)
    for ours, tensor in zip(grads, inputs):
        np.testing.assert_allclose(ours, tensor.grad.transpose(1, 2).numpy(), rtol=0, atol=1e-5)


def test_bf16_inputs_stay_bf16_and_close_to_fp32(rng):
    q, k, v = (rng.standard_normal((2, 40, 4, 16), dtype=np.float32) for _ in range(3))
    ref, _ = _torch_attention(q, k, v)
    out = attend(*(jnp.asarray(x, jnp.bfloat16) for x in (q, k, v)), query_chunk=16)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), ref.detach().numpy(), rtol=0, atol=3e-2)


def test_the_cpu_path_is_chosen_per_platform_when_lowering():
    """A program lowered for TPU or GPU from a CPU host (the planner's case) gets `dot_product_attention`,
    not the CPU path's block loop."""
    query = jax.ShapeDtypeStruct((1, 1024, 2, 8), jnp.float32)  # long enough for the CPU path's blocks
    traced = jax.jit(lambda q: attend(q, q, q)).trace(query)
    assert "stablehlo.while" in traced.lower(lowering_platforms=("cpu",)).as_text()
    for platform in ("tpu", "cuda"):
        text = traced.lower(lowering_platforms=(platform,)).as_text()
        assert "stablehlo.while" not in text and "dot_general" in text, platform
