"""m3d-jax: the M3D family of 3D medical multimodal models in JAX/Flax NNX."""

__version__ = "0.1.0"
