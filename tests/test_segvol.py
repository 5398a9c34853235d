"""SegVol mask decoder against segment_anything's TwoWayTransformer and an independent torch composition
(MONAI ViT + SAM modules + torch ConvTranspose3d / LayerNorm / interpolate) in the released key layout."""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from safetensors.torch import save_file

from conftest import make_monai_vit
from m3d_jax.convert import write_state
from m3d_jax.convert.keymap import load_model, torch_shapes
from m3d_jax.convert.segvol import segvol_keymap, two_way_transformer_keymap
from m3d_jax.convert.torch_io import CheckpointReader
from m3d_jax.models.segvol import SegVol, SegVolConfig, TwoWayTransformer
from m3d_jax.models.vit3d import ViT3DConfig
from sam_oracle import load_sam_modeling

TINY_SEGVOL = SegVolConfig(
    encoder=ViT3DConfig(image_size=(16, 64, 64), hidden_size=64, mlp_dim=128, num_layers=2, num_heads=4,
                        cls_token=False),
    decoder_heads=4, decoder_mlp_dim=96, iou_head_hidden=32,
)


def _randomise(module: torch.nn.Module, seed: int) -> None:
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            scale = 1.0 / math.sqrt(parameter.shape[-1]) if parameter.ndim > 1 else 0.1
            parameter.copy_(torch.randn_like(parameter) * scale + (1.0 if name.endswith("norm1.weight") else 0.0))


def _relative_error(ours, ref) -> float:
    ours = np.asarray(ours, np.float32)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def test_two_way_transformer_matches_segment_anything(tmp_path, rng):
    sam = load_sam_modeling()
    config = dataclasses.replace(TINY_SEGVOL, decoder_heads=8)
    dim = config.dim
    reference = sam.transformer.TwoWayTransformer(depth=2, embedding_dim=dim, num_heads=8, mlp_dim=96).eval()
    _randomise(reference, 0)
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


class TorchSegVol(torch.nn.Module):
    """The reference computation, composed from MONAI and segment_anything modules, with the released
    `seg_module` submodule names (so its state dict is the released layout)."""

    def __init__(self, config: SegVolConfig):
        super().__init__()
        sam = load_sam_modeling()
        dim, grid, chans = config.dim, config.encoder.grid, config.mask_in_chans
        self.config = config
        self.image_encoder = make_monai_vit(config.encoder, seed=1)
        self.prompt_encoder = torch.nn.Module()
        self.prompt_encoder.pe_layer = torch.nn.Module()
        self.prompt_encoder.pe_layer.register_buffer("positional_encoding_gaussian_matrix", torch.randn(3, dim // 2))
        self.prompt_encoder.point_embeddings = torch.nn.ModuleList(torch.nn.Embedding(1, dim) for _ in range(4))
        self.prompt_encoder.not_a_point_embed = torch.nn.Embedding(1, dim)
        self.prompt_encoder.no_mask_embed = torch.nn.Embedding(1, dim)
        self.prompt_encoder.mask_downscaling = torch.nn.Sequential(
            torch.nn.Conv2d(1, chans // 4, 2, 2), sam.common.LayerNorm2d(chans // 4), torch.nn.GELU(),
            torch.nn.Conv2d(chans // 4, chans, 2, 2), sam.common.LayerNorm2d(chans), torch.nn.GELU(),
            torch.nn.Conv2d(chans, dim, 1))
        decoder = torch.nn.Module()
        decoder.transformer = sam.transformer.TwoWayTransformer(
            depth=config.decoder_depth, embedding_dim=dim, num_heads=config.decoder_heads,
            mlp_dim=config.decoder_mlp_dim)
        decoder.iou_token = torch.nn.Embedding(1, dim)
        decoder.mask_tokens = torch.nn.Embedding(config.num_mask_tokens, dim)
        decoder.output_upscaling = torch.nn.Sequential(
            torch.nn.ConvTranspose3d(dim, dim // 4, 2, 2), torch.nn.LayerNorm((dim // 4, *(2 * g for g in grid))),
            torch.nn.GELU(), torch.nn.ConvTranspose3d(dim // 4, dim // 8, 2, 2), torch.nn.GELU())
        decoder.output_hypernetworks_mlps = torch.nn.ModuleList(
            sam.mask_decoder.MLP(dim, dim, dim // 8, 3) for _ in range(config.num_mask_tokens))
        decoder.iou_prediction_head = sam.mask_decoder.MLP(dim, config.iou_head_hidden, config.num_mask_tokens,
                                                           config.iou_head_depth)
        decoder.txt_align_upscaled_embedding = torch.nn.Linear(dim, dim // 8)
        self.mask_decoder = decoder
        _randomise(self.prompt_encoder, 2)
        _randomise(self.mask_decoder, 3)

    @torch.no_grad()
    def forward(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        b, dim, grid = images.shape[0], self.config.dim, self.config.encoder.grid
        features = self.image_encoder.patch_embedding(images)
        for block in self.image_encoder.blocks:
            features = block(features)
        embedding = self.image_encoder.norm(features).transpose(1, 2).reshape(b, dim, *grid)
        # Random-Fourier PE with coordinates (x, y, z) = (axis 1, axis 0, axis 2) of the grid.
        axes = [(torch.arange(n, dtype=torch.float32) + 0.5) / n for n in grid]
        a0, a1, a2 = torch.meshgrid(*axes, indexing="ij")
        coords = 2 * torch.stack([a1, a0, a2], dim=-1) - 1
        angles = 2 * math.pi * coords @ self.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
        pe = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1).permute(3, 0, 1, 2)[None]
        decoder = self.mask_decoder
        tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight])[None].expand(b, -1, -1)
        tokens = torch.cat([tokens, text[:, None]], dim=1)
        src = embedding + self.prompt_encoder.no_mask_embed.weight.reshape(1, dim, 1, 1, 1)
        hs, keys = decoder.transformer(src.flatten(3), pe.expand(b, -1, -1, -1, -1).flatten(3), tokens)
        upscaled = decoder.output_upscaling(keys.transpose(1, 2).reshape(b, dim, *grid))
        flat = upscaled.flatten(2)
        hyper = torch.stack([mlp(hs[:, 1 + i]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], 1)
        masks = hyper @ flat + decoder.txt_align_upscaled_embedding(text)[:, None] @ flat
        low_res = masks[:, :1].reshape(b, 1, *upscaled.shape[2:])
        return F.interpolate(low_res, size=images.shape[2:], mode="trilinear", align_corners=False)


@pytest.fixture(scope="module")
def torch_segvol():
    return TorchSegVol(TINY_SEGVOL).eval()


def _released_state(module: torch.nn.Module, config: SegVolConfig) -> dict[str, torch.Tensor]:
    keymap = segvol_keymap(config)
    state = {"model.seg_module." + k: v.contiguous() for k, v in module.state_dict().items()}
    return {k: v for k, v in state.items() if not keymap.ignored_reason(k)}


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
