"""PyTorch ↔ JAX checkpoint conversion: streaming torch I/O, declarative key maps, per-model maps."""

from m3d_jax.convert.keymap import (
    CheckpointMismatchError, ConversionReport, KeyMap, Rule, load_model, read_state, write_state,
)
from m3d_jax.convert.torch_io import CheckpointReadError, CheckpointReader, write_checkpoint

__all__ = [
    "CheckpointMismatchError", "CheckpointReadError", "CheckpointReader", "ConversionReport", "KeyMap", "Rule",
    "load_model", "read_state", "write_checkpoint", "write_state",
]
