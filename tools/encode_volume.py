"""Encode a 3D volume with the M3D 3D ViT and report the feature shape and timing.

With no flags it encodes the MNI152 T1 template shipped inside the nilearn wheel with the full-size
M3D-CLIP ViT (random weights unless --ckpt is given):

  python tools/encode_volume.py
  python tools/encode_volume.py --volume=CT.nii.gz --ckpt=pretrained_ViT.bin
  python tools/encode_volume.py --config=configs/vit3d_tiny.py --config.model.scan_layers=True
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx
from ml_collections import config_flags

from m3d_jax.cli import run
from m3d_jax.data.volume import load_volume, preprocess
from m3d_jax.errors import InputError
from m3d_jax.models.vit3d import ViT3D, ViT3DConfig

_CONFIG = config_flags.DEFINE_config_file("config", "configs/m3d_clip_vit3d.py", "Model config file.")
_VOLUME = flags.DEFINE_string("volume", None, "NIfTI (.nii/.nii.gz), .npy or DICOM series folder; default: nilearn's MNI152 T1.")
_CKPT = flags.DEFINE_string("ckpt", None, "PyTorch checkpoint (file or folder) in the config's checkpoint_layout.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed forward passes after compilation.")


def _default_volume() -> str:
    try:
        from nilearn.datasets import MNI152_FILE_PATH
    except ImportError:
        raise InputError("no --volume given and nilearn is not installed (pip install -e '.[demo]')") from None
    return MNI152_FILE_PATH


def main(argv: list[str]) -> None:
    del argv
    config = _CONFIG.value
    model_config = ViT3DConfig.from_dict(config.model)
    volume = load_volume(_VOLUME.value or _default_volume(), channels=model_config.in_channels)
    images = preprocess(volume.array, model_config.image_size)[None]  # [1, C, D, H, W]
    images = np.repeat(images, config.batch_size, axis=0)
    print(f"volume   {volume.path}  raw {tuple(volume.array.shape)} -> input {images.shape}, range "
          f"[{images.min():.3f}, {images.max():.3f}]")

    if _CKPT.value:
        from m3d_jax.convert.vit3d import load_vit3d

        model, report = load_vit3d(_CKPT.value, model_config, config.checkpoint_layout)
        print(f"weights  {_CKPT.value}: {report.converted} tensors, {len(report.ignored)} ignored")
    else:
        model = ViT3D(model_config, rngs=nnx.Rngs(0))
        print("weights  random (pass --ckpt to load released weights)")
    num_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(f"model    ViT3D {model_config.num_layers}x{model_config.hidden_size}, {num_params / 1e6:.1f} M params, "
          f"{model_config.num_tokens} tokens, dtype {model_config.dtype}, devices {jax.devices()}")

    graphdef, state = nnx.split(model)
    encode = jax.jit(lambda state, images: nnx.merge(graphdef, state)(images).features)
    images = jnp.asarray(images)
    start = time.perf_counter()
    features = jax.block_until_ready(encode(state, images))
    first = time.perf_counter() - start
    times = []
    for _ in range(_REPEATS.value):
        start = time.perf_counter()
        features = jax.block_until_ready(encode(state, images))
        times.append(time.perf_counter() - start)
    features = np.asarray(features, dtype=np.float32)
    print(f"features {features.shape} {model_config.dtype}, mean {features.mean():+.4f}, std {features.std():.4f}")
    print(f"timing   first call (compile + run) {first:.2f} s, forward median {np.median(times):.3f} s "
          f"over {len(times)} runs")


if __name__ == "__main__":
    run(main)
