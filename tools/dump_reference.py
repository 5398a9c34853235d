"""Run the PyTorch oracle of a released M3D-LaMed folder on given inputs and write a reference .npz
for tools/parity.py.

The oracle (m3d_jax.parity.torch_reference) is composed from MONAI's ViT, transformers' Phi-3 / Llama
and segment_anything's decoder modules with the released weights loaded strictly; it needs no remote
code. Fields written: image, input_ids, logits, attention_mask, image_features (the projected image
tokens as spliced), and with --seg seg_logits, with --generate=N generated_ids (see the README, "Check
parity").

  python tools/dump_reference.py --ckpt=M3D-LaMed-Phi-3-4B/ --out=ref.npz --volume=ct.npy \\
      --question="What is the organ?" --generate=16
  python tools/dump_reference.py --ckpt=FOLDER --out=ref.npz --text_len=8 --seg   # random volume and text
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from absl import flags

from m3d_jax.cli import run
from m3d_jax.convert import kind
from m3d_jax.data.volume import load_volume, preprocess
from m3d_jax.errors import InputError
from m3d_jax.models.lamed import LamedConfig
from m3d_jax.parity.torch_reference import TorchLamed
from m3d_jax.tokenizer import add_lamed_tokens, lamed_prompt_ids, load_tokenizer

_CKPT = flags.DEFINE_string("ckpt", None, "Released M3D-LaMed folder (config.json + weights).", required=True)
_OUT = flags.DEFINE_string("out", None, "Reference .npz to write.", required=True)
_VOLUME = flags.DEFINE_string("volume", None, "Volume (.nii/.nii.gz/.npy or a DICOM series folder); default: a seeded random one.")
_QUESTION = flags.DEFINE_string("question", None, "Question text (needs the tokenizer files in --ckpt).")
_TEXT_LEN = flags.DEFINE_integer("text_len", 8, "Without --question: this many random text token ids.")
_SEG = flags.DEFINE_bool("seg", False, "Append a [SEG] token and record seg_logits.")
_GENERATE = flags.DEFINE_integer("generate", 0, "Record this many greedy tokens as generated_ids.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random volume / text.")


def main(argv: list[str]) -> None:
    del argv
    folder = Path(_CKPT.value)
    hf = kind.read_config_json(folder / "config.json")
    reference = TorchLamed.from_folder(folder)
    rng = np.random.default_rng(_SEED.value)
    size = tuple(hf["image_size"])
    if _VOLUME.value:
        image = preprocess(load_volume(_VOLUME.value).array, size)[None]
    else:
        image = rng.random((1, 1, *size), dtype=np.float32)
    config = LamedConfig.from_hf(hf)
    num_image_tokens, image_token_id = config.proj_out_num, config.image_token_id
    if _QUESTION.value:
        tokenizer = load_tokenizer(folder)
        add_lamed_tokens(tokenizer)
        ids = lamed_prompt_ids(tokenizer, _QUESTION.value, num_image_tokens)
    else:
        ids = [hf.get("bos_token_id", 1), *[image_token_id] * num_image_tokens,
               *rng.integers(3, min(hf["vocab_size"], image_token_id), _TEXT_LEN.value).tolist()]
    if _SEG.value:
        ids.append(hf["seg_token_id"])
    input_ids = np.asarray([ids], np.int64)
    images, id_tensor = torch.from_numpy(image), torch.from_numpy(input_ids)
    logits, _ = reference(images, id_tensor)
    fields = dict(image=image, input_ids=input_ids, attention_mask=np.ones_like(input_ids),
                  logits=logits.float().numpy(), image_features=reference.image_features(images).float().numpy())
    if _SEG.value:
        if reference.seg_module is None:
            raise InputError(f"{folder}: no segmentation module; drop --seg")
        fields["seg_logits"] = reference.segment_from_ids(images, id_tensor).float().numpy()
    if _GENERATE.value:
        fields["generated_ids"] = reference.greedy(images, id_tensor, _GENERATE.value).numpy()
    np.savez(_OUT.value, **fields)
    print(f"wrote {_OUT.value}: " + ", ".join(f"{k} {tuple(v.shape)}" for k, v in fields.items()))


if __name__ == "__main__":
    run(main)
