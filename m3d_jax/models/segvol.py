"""The SegVol-derived segmentation module of M3D-LaMed.

image [B, 1, D, H, W] → its own ViT3D (no cls; final-normed) → [B, C, d, h, w] image embedding;
prompt = the projected [SEG] hidden state [B, C] as one sparse token, dense prompt = `no_mask_embed`;
mask decoder: [iou token; 4 mask tokens; prompt] ↔ image tokens in a two-way transformer (SAM's, with
downsampled cross-attention) → upscaling ×4 (two stride-2 transposed convs, a LayerNorm over the whole
(C/4, 2d, 2h, 2w) block, GELU) → mask 0 = hypernetwork(mask token 0) · features + text-alignment(prompt)
· features → trilinear resize to (D, H, W). Random-Fourier position encoding on the (d, h, w) grid with
coordinates ordered (x = axis 1, y = axis 0, z = axis 2), as the reference builds it.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from m3d_jax.config import Precision
from m3d_jax.layers import Dense, LayerNorm, Mlp, attend
from m3d_jax.layers.params import Buffer, canonical_dtype, normal, param, zeros
from m3d_jax.resize import resize_trilinear
from m3d_jax.models.vit3d import ViT3D, ViT3DConfig


@dataclasses.dataclass(frozen=True)
class SegVolConfig(Precision):
    encoder: ViT3DConfig = ViT3DConfig(cls_token=False)
    decoder_depth: int = 2
    decoder_heads: int = 8
    decoder_mlp_dim: int = 2048
    attention_downsample: int = 2
    num_mask_tokens: int = 4  # 3 multimask outputs + 1; the module returns mask 0
    iou_head_depth: int = 3
    iou_head_hidden: int = 256
    mask_in_chans: int = 16  # only sizes the unused mask_downscaling weights

    @property
    def dim(self) -> int:
        return self.encoder.hidden_size



def dense_positional_encoding(gaussian: jax.Array, grid: tuple[int, int, int]) -> jax.Array:
    """[C, d, h, w] random-Fourier encoding of the grid's cell centres (reference coordinate order)."""
    centres = [(jnp.arange(n, dtype=jnp.float32) + 0.5) / n for n in grid]
    axis0, axis1, axis2 = jnp.meshgrid(*centres, indexing="ij")
    coords = jnp.stack([axis1, axis0, axis2], axis=-1)  # (x, y, z) = (axis 1, axis 0, axis 2)
    angles = 2 * math.pi * ((2 * coords - 1) @ gaussian.astype(jnp.float32))
    encoding = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    return jnp.moveaxis(encoding, -1, 0)


class TokenAttention(nnx.Module):
    """SAM's attention: q/k/v project to dim / downsample, split into heads, attend, project back."""

    def __init__(self, dim: int, heads: int, downsample: int = 1, *, dtypes: dict, rngs: nnx.Rngs):
        internal = dim // downsample
        self.head_dim = internal // heads
        shape = (heads, self.head_dim)
        self.q_proj = Dense(dim, shape, axes=("embed", "heads", "head_dim"), rngs=rngs, **dtypes)
        self.k_proj = Dense(dim, shape, axes=("embed", "heads", "head_dim"), rngs=rngs, **dtypes)
        self.v_proj = Dense(dim, shape, axes=("embed", "heads", "head_dim"), rngs=rngs, **dtypes)
        self.out_proj = Dense(shape, dim, axes=("heads", "head_dim", "embed"), rngs=rngs, **dtypes)

    def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
        context = attend(self.q_proj(q), self.k_proj(k), self.v_proj(v), scale=self.head_dim**-0.5, query_chunk=0)
        return self.out_proj(context)


class TwoWayBlock(nnx.Module):
    """Queries self-attend, attend to the image, MLP; then the image attends to the queries."""

    def __init__(self, config: SegVolConfig, skip_first_layer_pe: bool, *, dtypes: dict, rngs: nnx.Rngs):
        dim, heads, down = config.dim, config.decoder_heads, config.attention_downsample
        self.skip_first_layer_pe = skip_first_layer_pe
        self.self_attn = TokenAttention(dim, heads, dtypes=dtypes, rngs=rngs)
        self.norm1 = LayerNorm(dim, eps=1e-5, axes=("embed",), rngs=rngs, **dtypes)
        self.cross_attn_token_to_image = TokenAttention(dim, heads, down, dtypes=dtypes, rngs=rngs)
        self.norm2 = LayerNorm(dim, eps=1e-5, axes=("embed",), rngs=rngs, **dtypes)
        self.mlp = Mlp(dim, config.decoder_mlp_dim, act="relu", rngs=rngs, **dtypes)
        self.norm3 = LayerNorm(dim, eps=1e-5, axes=("embed",), rngs=rngs, **dtypes)
        self.norm4 = LayerNorm(dim, eps=1e-5, axes=("embed",), rngs=rngs, **dtypes)
        self.cross_attn_image_to_token = TokenAttention(dim, heads, down, dtypes=dtypes, rngs=rngs)

    def __call__(self, queries, keys, query_pe, key_pe):
        if self.skip_first_layer_pe:
            queries = self.self_attn(queries, queries, queries)  # no residual, no PE (SAM's first layer)
        else:
            q = queries + query_pe
            queries = queries + self.self_attn(q, q, queries)
        queries = self.norm1(queries)
        queries = self.norm2(queries + self.cross_attn_token_to_image(queries + query_pe, keys + key_pe, keys))
        queries = self.norm3(queries + self.mlp(queries))
        keys = self.norm4(keys + self.cross_attn_image_to_token(keys + key_pe, queries + query_pe, queries))
        return queries, keys


class TwoWayTransformer(nnx.Module):
    def __init__(self, config: SegVolConfig, *, dtypes: dict, rngs: nnx.Rngs):
        self.layers = nnx.List([TwoWayBlock(config, i == 0, dtypes=dtypes, rngs=rngs)
                                for i in range(config.decoder_depth)])
        self.final_attn_token_to_image = TokenAttention(config.dim, config.decoder_heads, config.attention_downsample,
                                                        dtypes=dtypes, rngs=rngs)
        self.norm_final_attn = LayerNorm(config.dim, eps=1e-5, axes=("embed",), rngs=rngs, **dtypes)

    def __call__(self, keys: jax.Array, key_pe: jax.Array, queries: jax.Array) -> tuple[jax.Array, jax.Array]:
        """keys [B, N, C] image tokens, key_pe [B or 1, N, C], queries [B, Q, C] → (queries, keys)."""
        query_pe = queries
        for layer in self.layers:
            queries, keys = layer(queries, keys, query_pe, key_pe)
        attended = self.final_attn_token_to_image(queries + query_pe, keys + key_pe, keys)
        return self.norm_final_attn(queries + attended), keys


class UpConv3d(nnx.Module):
    """ConvTranspose3d with kernel = stride = 2 on channels-first volumes (kernel in torch layout)."""

    def __init__(self, in_channels: int, out_channels: int, *, dtypes: dict, rngs: nnx.Rngs):
        self.dtype = dtypes["dtype"]
        self.kernel = param(rngs, normal(0.02), (in_channels, out_channels, 2, 2, 2), dtypes["param_dtype"],
                            ("embed", "mlp", None, None, None))
        self.bias = param(rngs, zeros, (out_channels,), dtypes["param_dtype"], ("mlp",))

    def __call__(self, x: jax.Array) -> jax.Array:
        b, _, d, h, w = x.shape
        y = jnp.einsum("bcdhw,coijk->bodihjwk", x.astype(self.dtype), self.kernel[...].astype(self.dtype))
        y = y.reshape(b, -1, 2 * d, 2 * h, 2 * w)
        return y + self.bias[...].astype(self.dtype)[None, :, None, None, None]


class MaskDecoder(nnx.Module):
    def __init__(self, config: SegVolConfig, *, dtypes: dict, rngs: nnx.Rngs):
        dim, pdt = config.dim, dtypes["param_dtype"]
        self.config = config
        self.iou_token = param(rngs, normal(1.0), (1, dim), pdt, (None, "embed"))
        self.mask_tokens = param(rngs, normal(1.0), (config.num_mask_tokens, dim), pdt, (None, "embed"))
        self.transformer = TwoWayTransformer(config, dtypes=dtypes, rngs=rngs)
        self.upscale1 = UpConv3d(dim, dim // 4, dtypes=dtypes, rngs=rngs)
        self.upscale_norm = LayerNorm((dim // 4, *(2 * g for g in config.encoder.grid)), eps=1e-5,
                                      axes=("mlp", None, None, None), rngs=rngs, **dtypes)
        self.upscale2 = UpConv3d(dim // 4, dim // 8, dtypes=dtypes, rngs=rngs)
        self.hypernetworks = nnx.List([
            nnx.List([Dense(dim, dim, axes=("embed", "mlp"), rngs=rngs, **dtypes),
                      Dense(dim, dim, axes=("mlp", "mlp2"), rngs=rngs, **dtypes),
                      Dense(dim, dim // 8, axes=("mlp2", None), rngs=rngs, **dtypes)])
            for _ in range(config.num_mask_tokens)
        ])
        widths = [dim] + [config.iou_head_hidden] * (config.iou_head_depth - 1) + [config.num_mask_tokens]
        self.iou_prediction_head = nnx.List([Dense(a, b, axes=(None, None), rngs=rngs, **dtypes)
                                             for a, b in zip(widths[:-1], widths[1:])])
        self.txt_align_upscaled_embedding = Dense(dim, dim // 8, axes=("embed", None), rngs=rngs, **dtypes)

    def __call__(self, image_embedding, image_pe, text_embedding, dense_prompt):
        """image_embedding [B, C, d, h, w], image_pe [C, d, h, w], text_embedding [B, C] → mask-0 logits
        [B, 1, 4d, 4h, 4w] and the predicted IoUs [B, num_mask_tokens] (unused by LaMed)."""
        b, c = image_embedding.shape[:2]
        dtype = canonical_dtype(self.config.dtype)
        tokens = jnp.concatenate([self.iou_token[...], self.mask_tokens[...]], axis=0).astype(dtype)
        queries = jnp.concatenate([jnp.broadcast_to(tokens, (b, *tokens.shape)),
                                   text_embedding[:, None, :].astype(dtype)], axis=1)  # [B, 6, C]
        src = image_embedding + dense_prompt.astype(dtype)[None, :, None, None, None]
        keys = src.reshape(b, c, -1).swapaxes(1, 2)  # [B, d·h·w, C]
        key_pe = image_pe.reshape(c, -1).T[None].astype(dtype)
        queries, keys = self.transformer(keys, key_pe, queries)
        grid = image_embedding.shape[2:]
        features = keys.swapaxes(1, 2).reshape(b, c, *grid)
        features = jax.nn.gelu(self.upscale_norm(self.upscale1(features)), approximate=False)
        features = jax.nn.gelu(self.upscale2(features), approximate=False)  # [B, C/8, 4d, 4h, 4w]
        hyper = queries[:, 1]  # mask token 0
        for index, layer in enumerate(self.hypernetworks[0]):
            hyper = layer(hyper) if index == 2 else jax.nn.relu(layer(hyper))
        weights = hyper + self.txt_align_upscaled_embedding(text_embedding.astype(dtype))  # both · features
        masks = jnp.einsum("bc,bcdhw->bdhw", weights, features)[:, None]
        iou = queries[:, 0]
        for index, layer in enumerate(self.iou_prediction_head):
            iou = layer(iou) if index == len(self.iou_prediction_head) - 1 else jax.nn.relu(layer(iou))
        return masks, iou


class PromptEncoder(nnx.Module):
    """Dense prompt (`no_mask_embed`) and the position encoding. The point/box/mask-prompt weights of the
    reference are kept (as `unused_*`, torch layout) only so checkpoints round-trip strictly."""

    def __init__(self, config: SegVolConfig, *, dtypes: dict, rngs: nnx.Rngs):
        dim, pdt, chans = config.dim, dtypes["param_dtype"], config.mask_in_chans
        self.grid = config.encoder.grid
        self.positional_encoding_gaussian_matrix = Buffer(
            jax.random.normal(rngs.params(), (3, dim // 2), jnp.float32), sharding=(None, None), eager_sharding=False
        )
        self.no_mask_embed = param(rngs, normal(1.0), (dim,), pdt, ("embed",))
        unused = {"point_embeddings": (4, 1, dim), "not_a_point_embed": (1, dim),
                  "mask_downscaling_0_weight": (chans // 4, 1, 2, 2), "mask_downscaling_0_bias": (chans // 4,),
                  "mask_downscaling_1_weight": (chans // 4,), "mask_downscaling_1_bias": (chans // 4,),
                  "mask_downscaling_3_weight": (chans, chans // 4, 2, 2), "mask_downscaling_3_bias": (chans,),
                  "mask_downscaling_4_weight": (chans,), "mask_downscaling_4_bias": (chans,),
                  "mask_downscaling_6_weight": (dim, chans, 1, 1), "mask_downscaling_6_bias": (dim,)}
        for name, shape in unused.items():
            setattr(self, f"unused_{name}", param(rngs, zeros, shape, pdt, (None,) * len(shape)))

    def dense_pe(self) -> jax.Array:
        return dense_positional_encoding(self.positional_encoding_gaussian_matrix[...], self.grid)


class SegVol(nnx.Module):
    def __init__(self, config: SegVolConfig, *, rngs: nnx.Rngs):
        if config.encoder.cls_token or not config.encoder.select_final_norm:
            raise ValueError("SegVol's image encoder has no cls token and uses the final-normed features")
        self.config = config
        dtypes = config.dtypes()
        self.image_encoder = ViT3D(config.encoder, rngs=rngs)
        self.prompt_encoder = PromptEncoder(config, dtypes=dtypes, rngs=rngs)
        self.mask_decoder = MaskDecoder(config, dtypes=dtypes, rngs=rngs)

    def __call__(self, images: jax.Array, text_embedding: jax.Array) -> jax.Array:
        """images [B, 1, D, H, W], text_embedding [B, C] → mask logits [B, 1, D, H, W] (float32)."""
        b = images.shape[0]
        features = self.image_encoder(images).features  # [B, d·h·w, C]
        grid = self.config.encoder.grid
        image_embedding = features.swapaxes(1, 2).reshape(b, -1, *grid)
        low_res, _ = self.mask_decoder(image_embedding, self.prompt_encoder.dense_pe(), text_embedding,
                                       self.prompt_encoder.no_mask_embed[...])
        return resize_trilinear(low_res.astype(jnp.float32), images.shape[2:], xp=jnp)


class SegProjector(nnx.Module):
    """[SEG] hidden state (LLM width) → Linear, ReLU, Linear → the mask decoder width; dropout 0.1 when
    `rngs` are given (training)."""

    def __init__(self, hidden_size: int, out_dim: int, *, dtypes: dict, rngs: nnx.Rngs):
        self.fc1 = Dense(hidden_size, hidden_size, axes=("embed", "mlp"), rngs=rngs, **dtypes)
        self.fc2 = Dense(hidden_size, out_dim, axes=("mlp", "vision_embed"), rngs=rngs, **dtypes)
        self.dropout = nnx.Dropout(0.1)

    def __call__(self, hidden: jax.Array, rngs: nnx.Rngs | None = None) -> jax.Array:
        out = self.fc2(jax.nn.relu(self.fc1(hidden)))
        return self.dropout(out, deterministic=rngs is None, rngs=rngs)
