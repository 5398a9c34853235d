"""SegVol mask decoder against segment_anything's TwoWayTransformer and an independent torch composition
(m3d_jax.parity.torch_reference: MONAI ViT + SAM modules + torch ConvTranspose3d / LayerNorm /
interpolate) in the released key layout."""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import save_file

from m3d_jax.convert import write_state
from m3d_jax.convert.keymap import load_model, torch_shapes
from m3d_jax.convert.segvol import segvol_keymap, two_way_transformer_keymap
from m3d_jax.convert.torch_io import CheckpointReader
from m3d_jax.models.segvol import SegVol, SegVolConfig, TwoWayTransformer
from m3d_jax.models.vit3d import ViT3DConfig
from m3d_jax.parity.torch_reference import TorchSegVol, load_sam_modeling

TINY_SEGVOL = SegVolConfig(
    encoder=ViT3DConfig(image_size=(16, 64, 64), hidden_size=64, mlp_dim=128, num_layers=2, num_heads=4,
                        cls_token=False),
    decoder_heads=4, decoder_mlp_dim=96, iou_head_hidden=32,
)


def _relative_error(ours, ref) -> float:
    ours = np.asarray(ours, np.float32)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def test_two_way_transformer_matches_segment_anything(tmp_path, rng):
    sam = load_sam_modeling()
    config = dataclasses.replace(TINY_SEGVOL, decoder_heads=8)
    dim = config.dim
    reference = sam.transformer.TwoWayTransformer(depth=2, embedding_dim=dim, num_heads=8, mlp_dim=96).eval()
    randomised(reference, 0)
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, str(tmp_path / "t.safetensors"))
    model, _ = load_model(tmp_path / "t.safetensors", two_way_transformer_keymap(2), lambda: TwoWayTransformer(
        config, dtypes=dict(dtype=jnp.float32, param_dtype=jnp.float32), rngs=nnx.Rngs(0)))

    grid = (4, 4, 4)  # a 3D grid, flattened in the same (d, h, w) order the module uses
    image = rng.normal(size=(2, dim, *grid)).astype(np.float32)
    pe = rng.normal(size=(1, dim, *grid)).astype(np.float32)
    tokens = rng.normal(size=(2, 6, dim)).astype(np.float32)
    with torch.no_grad():
        ref_queries, ref_keys = reference(torch.from_numpy(image).flatten(3), torch.from_numpy(pe).flatten(3),
                                          torch.from_numpy(tokens))
    keys = jnp.asarray(image.reshape(2, dim, -1).transpose(0, 2, 1))
    key_pe = jnp.asarray(pe.reshape(1, dim, -1).transpose(0, 2, 1))
    queries, out_keys = model(keys, key_pe, jnp.asarray(tokens))
    assert _relative_error(queries, ref_queries.numpy()) <= 1e-5
    assert _relative_error(out_keys, ref_keys.numpy()) <= 1e-5


def randomised(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every parameter random (norms around 1), so no term of the computation is trivially zero."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            scale = 1.0 / math.sqrt(parameter.shape[-1]) if parameter.ndim > 1 else 0.1
            offset = 1.0 if "norm" in name and name.endswith("weight") else 0.0
            parameter.copy_(torch.randn_like(parameter) * scale + offset)
    return module.eval()


def tiny_torch_segvol(seed: int = 0) -> TorchSegVol:
    e = TINY_SEGVOL.encoder
    return randomised(TorchSegVol(e.image_size, e.patch_size, dim=e.hidden_size, mlp_dim=e.mlp_dim,
                                  num_layers=e.num_layers, num_heads=e.num_heads, decoder_heads=4,
                                  decoder_mlp_dim=96, iou_hidden=32), seed)


@pytest.fixture(scope="module")
def torch_segvol():
    return tiny_torch_segvol()


def _released_state(module: torch.nn.Module, config: SegVolConfig) -> dict[str, torch.Tensor]:
    keymap = segvol_keymap(config)
    state = {"model.seg_module." + k: v.contiguous() for k, v in module.state_dict().items()}
    return {k: v for k, v in state.items() if not keymap.ignored_reason(k)}  # MONAI's extras


def test_segvol_matches_torch_composition(torch_segvol, tmp_path, rng):
    save_file(_released_state(torch_segvol, TINY_SEGVOL), str(tmp_path / "seg.safetensors"))
    model, report = load_model(tmp_path / "seg.safetensors", segvol_keymap(TINY_SEGVOL),
                               lambda: SegVol(TINY_SEGVOL, rngs=nnx.Rngs(0)))
    assert report.ignored == []
    images = rng.random((2, 1, 16, 64, 64), dtype=np.float32)
    text = rng.normal(size=(2, TINY_SEGVOL.dim)).astype(np.float32)
    ref = torch_segvol(torch.from_numpy(images), torch.from_numpy(text)).numpy()
    out = model(jnp.asarray(images), jnp.asarray(text))
    assert out.shape == (2, 1, 16, 64, 64) and np.isfinite(np.asarray(out)).all()
    assert _relative_error(out, ref) <= 1e-5, _relative_error(out, ref)


def test_segvol_round_trip_is_bit_identical(torch_segvol, tmp_path):
    original = _released_state(torch_segvol, TINY_SEGVOL)
    save_file(original, str(tmp_path / "seg.safetensors"))
    model, _ = load_model(tmp_path / "seg.safetensors", segvol_keymap(TINY_SEGVOL),
                          lambda: SegVol(TINY_SEGVOL, rngs=nnx.Rngs(0)))
    write_state(tmp_path / "out", segvol_keymap(TINY_SEGVOL), nnx.state(model))
    reader = CheckpointReader(tmp_path / "out")
    assert sorted(reader.keys()) == sorted(original)
    for key, tensor in original.items():
        np.testing.assert_array_equal(reader.read(key), tensor.numpy(), err_msg=key)


def test_full_size_segvol_has_the_released_tensors():
    config = SegVolConfig()
    abstract = nnx.eval_shape(lambda: SegVol(config, rngs=nnx.Rngs(0)))
    shapes = {key.removeprefix("model.seg_module."): shape
              for key, shape in torch_shapes(segvol_keymap(config), nnx.state(abstract)).items()}
    assert len(shapes) == 276
    assert shapes["mask_decoder.output_upscaling.1.weight"] == (192, 16, 32, 32)
    assert shapes["mask_decoder.transformer.layers.0.cross_attn_token_to_image.q_proj.weight"] == (384, 768)
    assert shapes["prompt_encoder.pe_layer.positional_encoding_gaussian_matrix"] == (3, 384)
    assert shapes["mask_decoder.output_upscaling.0.weight"] == (768, 192, 2, 2, 2)
