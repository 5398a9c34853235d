"""Key map between transformers `SiglipVisionModel` state dicts and the JAX SigLIP vision tower
(`m3d_jax.models.slice_encoder`).

Prefixes: transformers 4.x checkpoints and Med-2E3's released `vision2d_model/pytorch_model.bin` hold keys under
"vision_model." (the default); transformers >= 5 `save_pretrained` writes them at the root (prefix="").
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from flax import nnx

from m3d_jax.convert.keymap import (
    IDENTITY, LINEAR, ConversionReport, FusedBias, FusedLinear, KeyMap, Linear, Reshape, Rule, Shape, Transform,
    load_model, norm_rules, write_state,
)
from m3d_jax.models.slice_encoder import SiglipVision, SiglipVisionConfig

SIGLIP_EXTRAS = (
    ("embeddings.position_ids", "index buffer [1, num_patches] saved by some transformers versions; recomputed"),
)


class PatchConv(Transform):
    """torch Conv2d weight [out, in_channels, patch_h, patch_w] (kernel = stride = patch) ↔ JAX Dense kernel
    [patch_h, patch_w, in_channels, out] over the patch's pixels."""

    def torch_shape(self, jax_shapes: Sequence[Shape]) -> Shape:
        ((patch_h, patch_w, channels, out),) = jax_shapes
        return (out, channels, patch_h, patch_w)

    def to_jax(self, tensor: np.ndarray, jax_shapes: Sequence[Shape]) -> list[np.ndarray]:
        return [np.ascontiguousarray(tensor.transpose(2, 3, 1, 0)).reshape(jax_shapes[0])]

    def to_torch(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        return np.ascontiguousarray(arrays[0].transpose(3, 2, 0, 1))


def _mlp(torch_name: str, jax_name: str) -> list[Rule]:
    return [
        Rule(f"{torch_name}.fc1.weight", f"{jax_name}.linear1.kernel", LINEAR),
        Rule(f"{torch_name}.fc1.bias", f"{jax_name}.linear1.bias"),
        Rule(f"{torch_name}.fc2.weight", f"{jax_name}.linear2.kernel", LINEAR),
        Rule(f"{torch_name}.fc2.bias", f"{jax_name}.linear2.bias"),
    ]


def siglip_vision_keymap(config: SiglipVisionConfig, prefix: str = "vision_model.") -> KeyMap:
    """The torch ↔ JAX map of a `SiglipVisionModel` with this config, keys under `prefix`."""
    layer = "encoder.layers.{layer}."
    rules = [
        Rule("embeddings.patch_embedding.weight", "embeddings.patch_embedding.kernel", PatchConv()),
        Rule("embeddings.patch_embedding.bias", "embeddings.patch_embedding.bias"),
        Rule("embeddings.position_embedding.weight", "embeddings.position_embedding"),
        *norm_rules(f"{layer}layer_norm1", "layers.layer_norm1"),
    ]
    for name in ("q_proj", "k_proj", "v_proj"):
        rules += [Rule(f"{layer}self_attn.{name}.weight", f"layers.self_attn.{name}.kernel", LINEAR),
                  Rule(f"{layer}self_attn.{name}.bias", f"layers.self_attn.{name}.bias", Reshape(flatten=True))]
    rules += [
        Rule(f"{layer}self_attn.out_proj.weight", "layers.self_attn.out_proj.kernel", Linear(n_in=2)),
        Rule(f"{layer}self_attn.out_proj.bias", "layers.self_attn.out_proj.bias"),
        *norm_rules(f"{layer}layer_norm2", "layers.layer_norm2"),
        *_mlp(f"{layer}mlp", "layers.mlp"),
        *norm_rules("post_layernorm", "post_layernorm"),
    ]
    if config.use_head:
        # torch MultiheadAttention packs q, k, v into one in_proj (rows q, k, v); the module keeps them apart
        # because the query (the probe) and the keys/values (the tokens) come from different inputs.
        head_qkv = tuple(f"head.attention.{name}" for name in ("q_proj", "k_proj", "v_proj"))
        rules += [
            Rule("head.probe", "head.probe", Reshape(leading_ones=2)),
            Rule("head.attention.in_proj_weight", tuple(f"{p}.kernel" for p in head_qkv), FusedLinear()),
            Rule("head.attention.in_proj_bias", tuple(f"{p}.bias" for p in head_qkv), FusedBias()),
            Rule("head.attention.out_proj.weight", "head.attention.out_proj.kernel", Linear(n_in=2)),
            Rule("head.attention.out_proj.bias", "head.attention.out_proj.bias", IDENTITY),
            *norm_rules("head.layernorm", "head.layernorm"),
            *_mlp("head.mlp", "head.mlp"),
        ]
    return KeyMap("siglip_vision", tuple(rules), prefix=prefix, ignored=SIGLIP_EXTRAS)


def load_siglip_vision(
    path: str | os.PathLike, config: SiglipVisionConfig, prefix: str = "vision_model."
) -> tuple[SiglipVision, ConversionReport]:
    """Loads the JAX SigLIP vision tower from a transformers `SiglipVisionModel` checkpoint (file or folder)."""
    return load_model(path, siglip_vision_keymap(config, prefix), lambda: SiglipVision(config, rngs=nnx.Rngs(0)))


def export_siglip_vision(
    model: SiglipVision, out_dir: str | os.PathLike, *, prefix: str = "vision_model.", dtype=None
) -> None:
    """Writes the model as a `SiglipVisionModel` checkpoint (config.json + safetensors), keys under `prefix`."""
    write_state(out_dir, siglip_vision_keymap(model.config, prefix), nnx.state(model, nnx.Param), dtype=dtype,
                config=model.config.to_hf())
