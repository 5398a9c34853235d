"""A tiny 3D ViT of the same code, for tests and quick runs: 16×64×64 volumes, 64 patches, width 64.

  python tools/encode_volume.py --config=configs/vit3d_tiny.py
"""

import dataclasses

from ml_collections import ConfigDict

from m3d_jax.models.vit3d import ViT3DConfig


def get_config() -> ConfigDict:
    model = ViT3DConfig(image_size=(16, 64, 64), patch_size=(4, 16, 16), hidden_size=64, mlp_dim=128,
                        num_layers=2, num_heads=4)
    config = ConfigDict()
    config.model = ConfigDict(dataclasses.asdict(model))
    config.checkpoint_layout = "m3d_clip_vision"
    config.batch_size = 1
    return config
