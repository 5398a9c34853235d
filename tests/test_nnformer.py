"""nnFormer (Med3DInsight's 3D backbone): window helpers, the relative-position index (reference quirk and
corrected), shifted-window attention against a dense masked attention, convolutions against torch, a tiny
forward/backward, and the full-size parameter count against the research note's checkpoint table."""

from __future__ import annotations

import dataclasses
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from m3d_jax.convert.keymap import Conv3dKernel, ConvTranspose3dKernel
from m3d_jax.models.nnformer import (
    Conv3d,
    ConvTranspose3d,
    NnFormer,
    NnFormerConfig,
    SwinBlock,
    drop_path,
    flatten_tokens,
    relative_position_index,
    shifted_window_mask,
    window_partition,
    window_reverse,
)

# 3 stages at crop 16 (token grids 4³, 2³, 1³): stage 0 (window 2 at 4³) alternates unshifted / shifted
# windows, stage 1's window 4 shrinks to its 2³ grid; decoder stage 0 has the skip-attention block and a
# shifted block, decoder stage 1 only the skip-attention block. The XLA compile of the forward and backward
# dominates the test time (about one second per block on a busy 2-core CPU), hence so few blocks; the
# full-size model is traced (shapes and parameters) in the last test.
TINY = NnFormerConfig(
    crop_size=(16, 16, 16), embed_dim=16, depths=(2, 1, 1), num_heads=(1, 2, 2), window_sizes=(2, 4, 1),
    num_classes=3,
)


# --- window helpers --------------------------------------------------------------------------------


def test_window_partition_reverse_is_identity_and_orders_windows(rng):
    x = jnp.asarray(rng.standard_normal((2, 8, 4, 12, 3)), jnp.float32)
    windows = window_partition(x, 4)
    assert windows.shape == (2 * 2 * 1 * 3, 64, 3)
    np.testing.assert_array_equal(np.asarray(window_reverse(windows, 4, (8, 4, 12))), np.asarray(x))
    # windows run (batch, s, h, w) block-major; tokens inside a window (s, h, w) row-major
    np.testing.assert_array_equal(windows[1, 0], x[0, 0, 0, 4])  # second window starts at w = 4
    np.testing.assert_array_equal(windows[3, 0], x[0, 4, 0, 0])  # fourth window: next s block
    np.testing.assert_array_equal(windows[6, 1 * 16 + 2 * 4 + 3], x[1, 1, 2, 3])  # batch 1, token (1, 2, 3)


def test_flatten_tokens_matches_channels_first_flatten(rng):
    neck = rng.standard_normal((2, 4, 4, 4, 5)).astype(np.float32)  # channels-last, as `encode` returns it
    channels_first = neck.transpose(0, 4, 1, 2, 3)  # the reference's (B, C, s, h, w)
    expected = channels_first.reshape(2, 5, 64).transpose(0, 2, 1)  # torch neck.flatten(2).transpose(1, 2)
    np.testing.assert_array_equal(np.asarray(flatten_tokens(jnp.asarray(neck))), expected)


def test_shifted_window_mask_matches_hand_counts():
    mask = shifted_window_mask((8, 8, 8), 4, 2)  # 2³ windows of 64 tokens
    assert mask.shape == (8, 64, 64)
    assert set(np.unique(mask)) == {0.0, -100.0}
    np.testing.assert_array_equal(mask, np.swapaxes(mask, 1, 2))
    masked = (mask != 0).sum(axis=(1, 2))
    # Along each axis the rolled grid splits [0, 4) | [4, 6) | [6, 8): window 0 lies in one region;
    # window 1 (w block 1) in 2 regions of 32 tokens; window 3 (h, w blocks 1) in 4 of 16; window 7 in 8 of 8.
    assert masked[0] == 0
    assert masked[1] == 64 * 64 - 2 * 32 * 32 == 2048
    assert masked[3] == 64 * 64 - 4 * 16 * 16 == 3072
    assert masked[7] == 64 * 64 - 8 * 8 * 8 == 3584
    token = lambda s, h, w: 16 * s + 4 * h + w  # noqa: E731
    # window 7, local (0,0,0) is grid (4,4,4) in region (1,1,1); local (0,0,2) is (4,4,6) in region (1,1,2)
    assert mask[7, token(0, 0, 0), token(0, 0, 2)] == -100.0
    assert mask[7, token(0, 0, 0), token(1, 1, 1)] == 0.0  # (5,5,5): same region
    assert mask[7, token(2, 3, 2), token(3, 2, 3)] == 0.0  # both in region (2,2,2)
    assert mask[1, token(3, 3, 1), token(0, 0, 2)] == -100.0  # w 5 vs w 6
    assert mask[2, token(0, 1, 0), token(3, 0, 3)] == 0.0  # window 2 splits along h only; h 4 and 5


def _reference_index_by_loops(window: int) -> np.ndarray:
    """nnFormer's index written out pair by pair: the offset per axis, shifted to start at 0, times 3w−1 for
    the first axis and 2w−1 for the second."""
    tokens = list(itertools.product(range(window), repeat=3))
    index = np.zeros((len(tokens), len(tokens)), np.int64)
    for i, (s1, h1, w1) in enumerate(tokens):
        for j, (s2, h2, w2) in enumerate(tokens):
            ds, dh, dw = s1 - s2 + window - 1, h1 - h2 + window - 1, w1 - w2 + window - 1
            index[i, j] = ds * (3 * window - 1) + dh * (2 * window - 1) + dw
    return index


@pytest.mark.parametrize("window", [2, 4])
def test_reference_relative_index_matches_loop_formula(window):
    index = relative_position_index(window, "reference")
    assert index.shape == (window**3, window**3)
    np.testing.assert_array_equal(index, _reference_index_by_loops(window))


def test_reference_relative_index_collisions_and_used_rows():
    index = relative_position_index(2, "reference")  # w=2: rows d_s·5 + d_h·3 + d_w of a 27-row table
    token = lambda s, h, w: 4 * s + 2 * h + w  # noqa: E731
    assert index[token(0, 0, 0), token(1, 1, 1)] == 0  # offsets (−1,−1,−1)
    assert index[token(1, 1, 1), token(0, 0, 0)] == 18  # (+1,+1,+1): 2·5 + 2·3 + 2
    # the collision: offset (−1, 0, +1) → 0·5 + 1·3 + 2 = 5, offset (0, −1, −1) → 1·5 + 0·3 + 0 = 5
    assert index[token(0, 0, 1), token(1, 0, 0)] == 5
    assert index[token(0, 0, 0), token(0, 1, 1)] == 5
    # research note quirk 12: rows used out of (2w − 1)³
    assert len(np.unique(relative_position_index(4, "reference"))) == 115  # of 343
    assert len(np.unique(relative_position_index(8, "reference"))) == 547  # of 3375
    assert relative_position_index(8, "reference").max() < 15**3


@pytest.mark.parametrize("window", [2, 4])
def test_corrected_relative_index_is_a_bijection_on_offsets(window):
    index = relative_position_index(window, "corrected")
    tokens = list(itertools.product(range(window), repeat=3))
    row_of_offset: dict[tuple[int, int, int], int] = {}
    for i, a in enumerate(tokens):
        for j, b in enumerate(tokens):
            offset = tuple(x - y for x, y in zip(a, b))
            assert row_of_offset.setdefault(offset, int(index[i, j])) == index[i, j], "same offset, two rows"
    rows = (2 * window - 1) ** 3
    assert len(row_of_offset) == rows
    assert sorted(row_of_offset.values()) == list(range(rows))  # distinct offsets, distinct rows, all used


# --- attention, convolutions, drop path ------------------------------------------------------------


def test_shifted_window_attention_matches_dense_masked_attention(rng):
    """A shifted block's attention equals attention over all tokens where a pair may interact only when the
    roll puts them in the same window, with the position bias and −100 across roll regions."""
    side, window, heads, width = 4, 2, 2, 8
    config = dataclasses.replace(TINY, relative_index="reference")
    block = SwinBlock(width, heads, (side,) * 3, window, True, 0.0, config, rngs=nnx.Rngs(0))
    assert (block.window, block.shift) == (2, 1)
    table = rng.standard_normal(block.attn.relative_position_bias_table.shape).astype(np.float32)
    block.attn.relative_position_bias_table[...] = jnp.asarray(table)
    x = jnp.asarray(rng.standard_normal((1, side, side, side, width)), jnp.float32)
    ours = np.asarray(nnx.jit(lambda b, x: b.attention(x))(block, x))[0].reshape(-1, width)

    shift = block.shift
    coords = np.array(list(itertools.product(range(side), repeat=3)))  # token order (s, h, w)
    rolled = (coords - shift) % side  # where each token sits after rolling by −shift
    window_id = [tuple(r) for r in rolled // window]
    local = rolled % window
    region = [tuple(0 if r < side - window else 1 if r < side - shift else 2 for r in p) for p in rolled]
    qkv = np.asarray(block.attn.qkv(x.reshape(1, -1, width)), np.float64)[0]  # [T, 3, N, H]
    q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
    head_dim = width // heads
    tokens = len(coords)
    logits = np.full((heads, tokens, tokens), -np.inf)
    for i in range(tokens):
        for j in range(tokens):
            if window_id[i] != window_id[j]:
                continue
            d = local[i] - local[j] + window - 1
            row = d[0] * (3 * window - 1) + d[1] * (2 * window - 1) + d[2]
            penalty = 0.0 if region[i] == region[j] else -100.0
            logits[:, i, j] = np.einsum("nh,nh->n", q[i], k[j]) / np.sqrt(head_dim) + table[row] + penalty
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    context = np.einsum("nij,jnh->inh", probs, v)
    expected = np.asarray(block.attn.proj(jnp.asarray(context, jnp.float32)))
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5)


def test_convolutions_match_torch_with_the_converter_layouts(rng):
    x = rng.standard_normal((2, 5, 6, 4, 3)).astype(np.float32)  # [B, D, H, W, C]
    conv = Conv3d(3, 7, kernel=3, stride=2, padding=1, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    conv.bias[...] = jnp.asarray(rng.standard_normal(7), jnp.float32)
    weight = torch.from_numpy(Conv3dKernel().to_torch([np.asarray(conv.kernel[...])]))  # → (O, I, k, k, k)
    expected = torch.nn.functional.conv3d(torch.from_numpy(x.transpose(0, 4, 1, 2, 3)), weight,
                                          torch.from_numpy(np.array(conv.bias[...])), stride=2, padding=1)
    np.testing.assert_allclose(np.asarray(conv(jnp.asarray(x))), expected.numpy().transpose(0, 2, 3, 4, 1),
                               rtol=1e-5, atol=1e-5)
    for size in (2, 4):
        up = ConvTranspose3d(3, 5, kernel=size, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(size))
        up.bias[...] = jnp.asarray(rng.standard_normal(5), jnp.float32)
        weight = torch.from_numpy(ConvTranspose3dKernel().to_torch([np.asarray(up.kernel[...])]))  # → (I, O, k, k, k)
        expected = torch.nn.functional.conv_transpose3d(
            torch.from_numpy(x.transpose(0, 4, 1, 2, 3)), weight, torch.from_numpy(np.array(up.bias[...])),
            stride=size)
        ours = np.asarray(up(jnp.asarray(x)))
        assert ours.shape == (2, 5 * size, 6 * size, 4 * size, 5)
        np.testing.assert_allclose(ours, expected.numpy().transpose(0, 2, 3, 4, 1), rtol=1e-5, atol=1e-5)


def test_drop_path_zeroes_whole_samples_and_rescales():
    x = jnp.ones((64, 2, 2, 2, 3))
    assert drop_path(x, 0.5, None) is x
    out = np.asarray(drop_path(x, 0.25, nnx.Rngs(dropout=0)))
    per_sample = out.reshape(64, -1)
    assert np.all((per_sample == 0).all(1) | np.isclose(per_sample, 1 / 0.75).all(1))
    assert 4 <= (per_sample[:, 0] == 0).sum() <= 30  # ≈ 16 of 64 dropped


def test_drop_path_schedules_follow_reference():
    config = NnFormerConfig()
    encoder = np.concatenate([config.encoder_drop_path(stage) for stage in range(4)])
    np.testing.assert_allclose(encoder, np.linspace(0, 0.2, 8))
    # the decoder's 0 → 0.2 runs over its stages deepest first (decoder.layers.2 gets the smallest rates)
    np.testing.assert_allclose(config.decoder_drop_path(2), [0.0, 0.04])
    np.testing.assert_allclose(config.decoder_drop_path(1), [0.08, 0.12])
    np.testing.assert_allclose(config.decoder_drop_path(0), [0.16, 0.2])


def test_config_rejects_inconsistent_sizes():
    with pytest.raises(ValueError, match="patch_size"):
        NnFormerConfig(patch_size=(2, 4, 4))
    with pytest.raises(ValueError, match="divisible by 32"):
        NnFormerConfig(crop_size=(128, 128, 112))
    with pytest.raises(ValueError, match="heads"):
        NnFormerConfig(num_heads=(5, 6, 12, 24))
    with pytest.raises(ValueError, match="window"):
        NnFormerConfig(window_sizes=(5, 4, 8, 4))


# --- the whole model -------------------------------------------------------------------------------


def test_tiny_forward_backward_shapes_finite_and_stem_gradients(rng):
    model = NnFormer(TINY, rngs=nnx.Rngs(0))
    volumes = jnp.asarray(rng.standard_normal((2, 1, 16, 16, 16)), jnp.float32)
    stages = (*model.model_down.layers, *model.decoder.layers)
    windows = [[(b.window, b.shift) for b in layer.blocks] for layer in stages]
    assert windows == [[(2, 0), (2, 1)], [(2, 0)], [(1, 0)], [(2, 0), (2, 1)], [(2, 0)]]

    skips = nnx.eval_shape(lambda m, x: m.encode(x), model, volumes)
    assert [s.shape for s in skips] == [(2, 4, 4, 4, 16), (2, 2, 2, 2, 32), (2, 1, 1, 1, 64)]

    @nnx.jit
    def step(model, volumes, rngs):
        def loss_fn(model, rngs):
            out = model(volumes, rngs=rngs)  # drop path active
            loss = jnp.mean((out.reconstruction - volumes) ** 2) + jnp.mean(out.segmentation**2)
            return loss, out

        return nnx.value_and_grad(loss_fn, has_aux=True)(model, rngs)

    (loss, out), grads = step(model, volumes, nnx.Rngs(dropout=1))
    assert out.neck.shape == (2, 1, 1, 1, 64)
    assert out.decoded.shape == (2, 4, 4, 4, 16)
    assert out.reconstruction.shape == (2, 1, 16, 16, 16)
    assert out.segmentation.shape == (2, 3, 16, 16, 16)
    for name, array in out._asdict().items():
        assert np.isfinite(np.asarray(array)).all(), name
    assert np.isfinite(float(loss)) and float(loss) > 0
    for path, grad in nnx.to_flat_state(nnx.state(grads, nnx.Param)):
        assert np.isfinite(np.asarray(grad[...])).all(), path
    stem = grads.model_down.patch_embed
    for kernel in (stem.proj1.conv1.kernel, stem.proj1.conv2.kernel, stem.proj2.conv1.kernel, stem.proj2.conv2.kernel):
        assert float(jnp.abs(kernel[...]).max()) > 0
    assert float(jnp.abs(grads.final.kernel[...]).max()) > 0
    assert float(jnp.abs(grads.decoder.layers[0].blocks[0].attn.kv.kernel[...]).max()) > 0


def _count(module) -> int:
    return sum(math.prod(v.shape) for _, v in nnx.to_flat_state(nnx.state(module, nnx.Param)))


def test_full_size_parameter_count_matches_checkpoint_table():
    model = nnx.eval_shape(lambda: NnFormer(NnFormerConfig(), rngs=nnx.Rngs(0)))
    total = _count(model)
    assert total == 37_608_983

    # Research note §4: 67,246,151 parameters in the Med3DInsight checkpoint, of which these are not nnFormer.
    mha = 768 * 2304 + 2304 + 768 * 768 + 768  # in_proj weight + bias, out_proj weight + bias
    psat_layer = 2 * mha + 3 * 2 * 768 + (768 * 8 + 8 + 8 * 768 + 768)  # SA, CA, 3 norms, FFN 768→8→768
    psat = 6 * psat_layer + 2 * 768 + 768 * 3 * 128  # 6 layers, final norm, ps_pos
    assert round(psat / 1e6, 2) == 28.75
    queries, proj, mahalanobis = 300 * 768, 768 * 512 + 512, 512 * 512
    assert (queries, proj, mahalanobis) == (230_400, 393_728, 262_144)
    assert total == 67_246_151 - psat - queries - proj - mahalanobis

    parts = {name: _count(getattr(model, name)) for name in ("model_down", "decoder", "res", "final")}
    assert round(parts["model_down"] / 1e6, 2) == 29.84 and round(parts["decoder"] / 1e6, 2) == 7.74
    assert (parts["res"], parts["final"]) == (6_145, 24_580)

    tables = {
        path: variable.shape for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))
        if path[-1] == "relative_position_bias_table"
    }
    assert len(tables) == 14  # one per block, like the 14 relative_position_index buffers
    assert tables[("model_down", "layers", 2, "blocks", 0, "attn", "relative_position_bias_table")] == (3375, 12)
    assert tables[("model_down", "layers", 3, "blocks", 1, "attn", "relative_position_bias_table")] == (343, 24)
    assert tables[("decoder", "layers", 2, "blocks", 1, "attn", "relative_position_bias_table")] == (3375, 24)
    assert tables[("decoder", "layers", 0, "blocks", 0, "attn", "relative_position_bias_table")] == (343, 6)
    windows = [[(b.window, b.shift) for b in layer.blocks] for layer in model.model_down.layers]
    assert windows == [[(4, 0), (4, 2)], [(4, 0), (4, 2)], [(8, 0), (8, 0)], [(4, 0), (4, 0)]]
    windows = [[(b.window, b.shift) for b in layer.blocks] for layer in model.decoder.layers]
    assert windows == [[(4, 0), (4, 2)], [(4, 0), (4, 2)], [(8, 0), (8, 0)]]
    out = nnx.eval_shape(lambda m, x: m(x), model, jax.ShapeDtypeStruct((2, 1, 128, 128, 128), jnp.float32))
    assert out.neck.shape == (2, 4, 4, 4, 768)  # flatten_tokens → the 64 bottleneck tokens PSAT reads
    assert out.decoded.shape == (2, 32, 32, 32, 96)
    assert out.reconstruction.shape == (2, 1, 128, 128, 128)
    assert out.segmentation.shape == (2, 4, 128, 128, 128)
    assert model.decoder.layers[0].blocks[0].attn.qkv is None  # skip attention: kv only, Q unprojected
    assert model.decoder.layers[0].blocks[0].attn.kv.kernel.shape == (96, 2, 6, 16)
