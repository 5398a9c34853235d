"""PyTorch ↔ JAX checkpoint conversion: streaming torch I/O (torch_io), declarative key maps (keymap), one
kind per checkpoint family (kind, and each family module's `KIND`), and the generic entry points
(checkpoint): `load`, `read_released`, `save_jax`, `export`, `torch_to_jax`, `jax_to_torch`, `detect`."""

from m3d_jax.convert import clip, decoder, lamed, med2e3, med3dinsight, text_encoder, vit3d
from m3d_jax.convert.checkpoint import export, jax_to_torch, load, read_released, save_jax, torch_to_jax
from m3d_jax.convert.keymap import CheckpointMismatchError, ConversionReport, KeyMap, Rule, read_state, write_state
from m3d_jax.convert.kind import KIND_KEY, Kind, Part, detect, is_jax_folder, kind_of, kinds, register
from m3d_jax.convert.torch_io import CheckpointReadError, CheckpointReader, write_checkpoint

# Recognition order: Med-2E3's root or args/ MedMLLMConfig first, then the config.json model types, then the
# key-only layouts without config.json (Med3DInsight's psat.*, then a bare ViT).
register(med2e3.KIND, lamed.KIND, clip.KIND, decoder.KIND, text_encoder.KIND, med3dinsight.KIND, vit3d.KIND)

__all__ = [
    "KIND_KEY", "CheckpointMismatchError", "CheckpointReadError", "CheckpointReader", "ConversionReport", "Kind",
    "KeyMap", "Part", "Rule", "detect", "export", "is_jax_folder", "jax_to_torch", "kind_of", "kinds", "load",
    "read_released", "read_state", "register", "save_jax", "torch_to_jax", "write_checkpoint", "write_state",
]
