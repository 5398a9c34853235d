"""Ask M3D-LaMed a question about a CT/MR volume.

  python tools/infer.py --ckpt=lamed_jax/ --volume=ct.nii.gz --question="Where is the liver?"

--ckpt is an m3d-jax parameter folder or a released PyTorch folder; the tokenizer is read from
--tokenizer (default: --ckpt). The volume gets M3D's preprocessing (min-max, crop to foreground,
trilinear resize to the model's input size). The answer is printed; a box in it
(<bx_start>[...]<bx_end>) is also printed in voxel indices of the input volume (and in scanner mm for
NIfTI); with a [SEG] in the answer the mask is written to --out_dir as NIfTI aligned to the input (or
.npy for .npy input) with an overlay PNG of the middle slices.
"""

from __future__ import annotations

import time
from pathlib import Path

from absl import app, flags

_CKPT = flags.DEFINE_string("ckpt", None, "m3d-jax folder or released M3D-LaMed folder.", required=True)
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Tokenizer folder (default: --ckpt).")
_VOLUME = flags.DEFINE_string("volume", None, "Input volume: .nii, .nii.gz or .npy.", required=True)
_QUESTION = flags.DEFINE_string("question", None, "The question.", required=True)
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 256, "Longest answer in tokens (greedy decoding).")
_OUT_DIR = flags.DEFINE_string("out_dir", "infer_out", "Where masks and overlays are written.")


def main(argv):
    del argv
    import numpy as np
    from transformers import AutoTokenizer

    from m3d_jax.data.volume import load_volume, prepare
    from m3d_jax.generate import SamplingConfig
    from m3d_jax.inference import box_to_input, parse_boxes, save_mask, save_overlay, world_coordinates
    from m3d_jax.models.lamed import generate_lamed
    from m3d_jax.tokenizer import add_lamed_tokens, lamed_prompt_ids

    from m3d_jax.convert.lamed import load_lamed_folder

    start = time.perf_counter()
    model = load_lamed_folder(_CKPT.value)
    tokenizer = AutoTokenizer.from_pretrained(_TOKENIZER.value or _CKPT.value)
    add_lamed_tokens(tokenizer)
    config = model.config
    volume = load_volume(_VOLUME.value)
    image, geometry = prepare(volume.array, config.vision.image_size)
    ids = np.asarray([lamed_prompt_ids(tokenizer, _QUESTION.value, config.proj_out_num)])
    out = generate_lamed(model, image[None], ids, config=SamplingConfig(max_new_tokens=_MAX_NEW.value))
    tokens = np.asarray(out.tokens)[0, : int(out.lengths[0])].tolist()
    raw = tokenizer.decode(tokens, skip_special_tokens=False)
    print(f"Q: {_QUESTION.value}\nA: {tokenizer.decode(tokens, skip_special_tokens=True).strip()}")
    for box in parse_boxes(raw):
        first, last = box_to_input(box, geometry)
        print(f"box (D, H, W voxels of {volume.path.name}, inclusive): {first.tolist()} .. {last.tolist()}")
        corners = [world_coordinates(volume, first), world_coordinates(volume, last)]
        if corners[0] is not None:
            print(f"box (scanner RAS mm): {np.round(corners[0], 1).tolist()} .. {np.round(corners[1], 1).tolist()}")
    if out.seg_logits is not None and np.isfinite(np.asarray(out.seg_logits)).any():
        model_mask = np.asarray(out.seg_logits)[0, 0] > 0  # sigmoid > 0.5
        mask = geometry.mask_to_original(model_mask.astype(np.uint8))
        path = save_mask(mask, volume, _OUT_DIR.value)
        overlay = save_overlay(volume.array[0], mask, Path(_OUT_DIR.value) / "overlay.png")
        print(f"mask: {int(mask.sum())} voxels -> {path} (overlay {overlay})")
    print(f"({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    app.run(main)
