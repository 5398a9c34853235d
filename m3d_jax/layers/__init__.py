"""Reusable building blocks: dense, norms, MLPs, attention, patch embeddings, stacked layers."""

from m3d_jax.layers.attention import FusedSelfAttention, attend
from m3d_jax.layers.linear import Dense
from m3d_jax.layers.mlp import Mlp, activation
from m3d_jax.layers.norms import LayerNorm
from m3d_jax.layers.params import param
from m3d_jax.layers.patch_embed import PerceptronPatchEmbed3D
from m3d_jax.layers.stack import RematPolicy, StackOutput, run_stack, stacked

__all__ = [
    "Dense", "FusedSelfAttention", "LayerNorm", "Mlp", "PerceptronPatchEmbed3D", "RematPolicy", "StackOutput",
    "activation", "attend", "param", "run_stack", "stacked",
]
