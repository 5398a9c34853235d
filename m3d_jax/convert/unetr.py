"""Key map between MONAI `UNETR` state dicts and the JAX UNETR (`m3d_jax.models.unetr`).

torch keys are the module names with MONAI's `Convolution` wrapper (`.conv`) before `weight`; the ViT is
`vit.*` in the M3D-CLIP (root) layout of `vit3d_keymap`. MONAI builds the patch embedding as a Linear
(`proj_type="perceptron"`, `patch_embeddings.1.*`) or as a Conv3d with kernel = stride = patch (`"conv"`,
UNETR's default, `patch_embeddings.*`); both load into the same perceptron projection.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import Literal

import numpy as np
from flax import nnx

from m3d_jax.convert.keymap import (
    ConversionReport, Conv3dKernel, ConvTranspose3dKernel, KeyMap, Rule, Shape, Transform, load_model,
)
from m3d_jax.convert.vit3d import vit3d_keymap
from m3d_jax.models.unetr import Unetr, UnetrConfig

ProjType = Literal["perceptron", "conv"]


class PatchConv3d(Transform):
    """MONAI's "conv" patch embedding, Conv3d weight (hidden, C, p1, p2, p3) with kernel = stride = patch, ↔
    the perceptron kernel (p1·p2·p3·C, hidden) over each patch flattened as (p1 p2 p3 c): the same map."""

    def __init__(self, patch_size: Sequence[int], in_channels: int):
        self.patch_size, self.in_channels = tuple(patch_size), in_channels

    def torch_shape(self, jax_shapes: Sequence[Shape]) -> Shape:
        ((patch_dim, hidden),) = jax_shapes
        if patch_dim != math.prod(self.patch_size) * self.in_channels:
            raise ValueError(f"kernel rows {patch_dim} ≠ patch {self.patch_size} × {self.in_channels} channels")
        return (hidden, self.in_channels, *self.patch_size)

    def to_jax(self, tensor: np.ndarray, jax_shapes: Sequence[Shape]) -> list[np.ndarray]:
        return [np.ascontiguousarray(tensor.transpose(2, 3, 4, 1, 0)).reshape(jax_shapes[0])]

    def to_torch(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        hidden = arrays[0].shape[-1]
        kernel = arrays[0].reshape(*self.patch_size, self.in_channels, hidden)
        return np.ascontiguousarray(kernel.transpose(4, 3, 0, 1, 2))


CONV = Conv3dKernel()
CONV_TRANSPOSE = ConvTranspose3dKernel()


def _conv_block_rules(torch_name: str, jax_name: str, res_block: bool, shortcut: bool) -> list[Rule]:
    """UnetResBlock / UnetBasicBlock: conv1, conv2 (and the 1×1×1 conv3 of a ResBlock that changes width)."""
    convs = ("conv1", "conv2", "conv3") if res_block and shortcut else ("conv1", "conv2")
    return [Rule(f"{torch_name}.{conv}.conv.weight", f"{jax_name}.{conv}.kernel", CONV) for conv in convs]


def _vit_rules(config: UnetrConfig, proj_type: ProjType) -> KeyMap:
    vit = vit3d_keymap(config.vit, "m3d_clip_vision")
    if proj_type == "conv":
        perceptron = ("patch_embedding.patch_embeddings.1.weight", "patch_embedding.patch_embeddings.1.bias")
        rules = [rule for rule in vit.rules if rule.torch not in perceptron] + [
            Rule("patch_embedding.patch_embeddings.weight", "patch_embedding.projection.kernel",
                 PatchConv3d(config.vit.patch_size, config.vit.in_channels)),
            Rule("patch_embedding.patch_embeddings.bias", "patch_embedding.projection.bias"),
        ]
        vit = KeyMap(vit.name, tuple(rules), vit.prefix, vit.ignored)
    elif proj_type != "perceptron":
        raise ValueError(f"proj_type must be 'perceptron' or 'conv', got {proj_type!r}")
    return vit.nested("vit.", "vit.")


def unetr_keymap(config: UnetrConfig, proj_type: ProjType = "perceptron") -> KeyMap:
    """The torch ↔ JAX map of a MONAI `UNETR` with this config; `proj_type` is the MONAI ViT's patch
    embedding the checkpoint was trained with (MONAI_EXTRAS of the ViT, e.g. `norm_cross_attn`, ignored)."""
    f, hidden, res = config.feature_size, config.vit.hidden_size, config.res_block
    rules = _conv_block_rules("encoder1.layer", "encoder1.layer", res, config.vit.in_channels != f)
    for name, steps in (("encoder2", 2), ("encoder3", 1), ("encoder4", 0)):
        rules.append(Rule(f"{name}.transp_conv_init.conv.weight", f"{name}.transp_conv_init.kernel", CONV_TRANSPOSE))
        for step in range(steps):
            torch_step, jax_step = f"{name}.blocks.{step}", f"{name}.blocks.{step}"
            if config.conv_block:  # an nn.Sequential(transposed conv, conv block): items 0 and 1
                rules.append(Rule(f"{torch_step}.0.conv.weight", f"{jax_step}.up.kernel", CONV_TRANSPOSE))
                rules += _conv_block_rules(f"{torch_step}.1", f"{jax_step}.block", res, shortcut=False)
            else:  # the bare transposed conv
                rules.append(Rule(f"{torch_step}.conv.weight", f"{jax_step}.up.kernel", CONV_TRANSPOSE))
    for name, fan_in in (("decoder5", hidden), ("decoder4", 8 * f), ("decoder3", 4 * f), ("decoder2", 2 * f)):
        rules.append(Rule(f"{name}.transp_conv.conv.weight", f"{name}.transp_conv.kernel", CONV_TRANSPOSE))
        rules += _conv_block_rules(f"{name}.conv_block", f"{name}.conv_block", res, shortcut=True)
    rules += [Rule("out.conv.conv.weight", "out.kernel", CONV), Rule("out.conv.conv.bias", "out.bias")]
    head = KeyMap("unetr", tuple(rules))
    return KeyMap.combine(f"unetr/{proj_type}", _vit_rules(config, proj_type), head)


def load_unetr(
    path: str | os.PathLike, config: UnetrConfig, proj_type: ProjType = "perceptron"
) -> tuple[Unetr, ConversionReport]:
    """Loads the JAX UNETR from a MONAI `UNETR` checkpoint (state-dict file or folder)."""
    return load_model(path, unetr_keymap(config, proj_type), lambda: Unetr(config, rngs=nnx.Rngs(0)))
