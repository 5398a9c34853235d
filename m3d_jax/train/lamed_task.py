"""The M3D-LaMed task: model and tokenizer from the config, pretrained parts, the LM (+ seg) loss, samples
from the LaMed mixture, closed-VQA accuracy by greedy decoding, and export in the released layout."""

from __future__ import annotations

import dataclasses

import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from m3d_jax import convert
from m3d_jax.data.phantoms import phantom_tokenizer
from m3d_jax.data.lamed_samples import LamedSampleSpec
from m3d_jax.data.pipeline import build_source
from m3d_jax.data.prompts import prompt_ids
from m3d_jax.data.volume import load_volume, prepare
from m3d_jax.generate import SamplingConfig, left_pad
from m3d_jax.models.decoder_presets import PRESETS, TOKENIZER_SIZES
from m3d_jax.models.lamed import ADDED_TOKENS, Lamed, LamedConfig, generate_lamed, lamed_loss
from m3d_jax.models.vit3d import ViT3DConfig
from m3d_jax.sharding import on_host
from m3d_jax.tokenizer import LamedTokenIds, add_lamed_tokens, load_lamed_tokenizer, resize_token_embeddings
from m3d_jax.train.lora import merge_lora
from m3d_jax.train.tasks import (
    Task, augment_config, decoder_config, load_vision_tower, place, place_checkpoint, volume_batch,
)

# The batch entries the model takes, with their ranks: [B, C, D, H, W] volumes, [B, L] token arrays.
INPUTS = {"images": 5, "input_ids": 2, "attention_mask": 2, "labels": 2, "seg_masks": 5, "image_starts": 1}


def build_tokenizer(name: str):
    """"phantoms" (the offline word tokenizer of the phantom set) or a tokenizer folder; the LaMed tokens
    are added. Returns (tokenizer, LamedTokenIds)."""
    if name == "phantoms":
        tokenizer = phantom_tokenizer()
        return tokenizer, add_lamed_tokens(tokenizer)
    return load_lamed_tokenizer(name)


def lamed_config(model: ConfigDict, ids, vocab_size: int) -> LamedConfig:
    """The model section → LamedConfig. `decoder.preset` names a decoder preset whose fields the other
    decoder keys override; the vocabulary is sized to the tokenizer (as LaMed resizes its embeddings) and
    the image / [SEG] ids come from it."""
    values = model.to_dict()
    decoder = decoder_config(values.pop("decoder", {}), vocab_size=vocab_size)
    vision = ViT3DConfig.from_dict(values.pop("vision", {}))
    return dataclasses.replace(LamedConfig.from_dict(values), vision=vision, decoder=decoder,
                               image_token_id=ids.image, seg_token_id=ids.seg)


def build(config: ConfigDict, without_tokenizer: bool = False):
    """(tokenizer, LamedConfig, model factory) of a training config. `without_tokenizer`: the vocabulary
    and token ids are those of the released checkpoints (the preset's tokenizer plus LaMed's four tokens);
    the phantom tokenizer, built offline, is still used where the config names it."""
    if without_tokenizer and config.tokenizer != "phantoms":
        tokenizer, ids, vocab = None, *released_token_ids(config.model.decoder.get("preset", ""))
    else:
        tokenizer, ids = build_tokenizer(config.tokenizer)
        vocab = len(tokenizer)
    model_config = lamed_config(config.model, ids, vocab)
    return tokenizer, model_config, lambda: Lamed(model_config, rngs=nnx.Rngs(config.seed))


def released_token_ids(preset: str) -> tuple[LamedTokenIds, int]:
    """(token ids, vocabulary size) of a released LaMed on the preset's LLM: its tokenizer grown by
    `<im_patch>`, `<bx_start>`, `<bx_end>` and `[SEG]`, in that order (REFERENCE §1.3)."""
    base = TOKENIZER_SIZES.get(preset) or PRESETS[preset]().vocab_size
    pad = PRESETS[preset]().pad_token_id
    return LamedTokenIds(base, base + 1, base + 2, base + 3, pad=pad), base + len(ADDED_TOKENS)


def batch_shapes(config: ConfigDict, model_config: LamedConfig) -> dict:
    """Volumes and seg masks [B, C|1, D, H, W] float32; ids, mask and labels [B, max_length] int32; the
    image blocks' starts [B] int32."""
    tokens = ((int(config.data.max_length),), np.int32)
    vision = model_config.vision
    return volume_batch(config, vision.in_channels, vision.image_size, input_ids=tokens, attention_mask=tokens,
                        labels=tokens, seg_masks=((1, *vision.image_size), np.float32), image_starts=((), np.int32))


def load_pretrained(model: Lamed, init: ConfigDict, mesh) -> None:
    """Fills parts of a sharded model from checkpoints: `lamed` (a whole LaMed: released folder or an
    m3d-jax folder), else `language_model` (a transformers Phi-3 / Llama folder, embeddings resized to the
    tokenizer with mean-initialised new rows) and/or `vision_tower` (an M3D-CLIP / ViT checkpoint). Each part
    is read on the host and placed in the model's layout."""
    if init.get("lamed"):
        place_checkpoint(model, init.lamed, "LaMed", mesh, expect="lamed")
        return
    if init.get("language_model"):
        config = model.config.decoder
        with on_host():
            loaded = convert.load(init.language_model, expect="decoder", dtype=config.dtype, remat=config.remat,
                                  scan_layers=config.scan_layers)
            added = max(0, config.vocab_size - loaded.config.vocab_size)
            loaded = resize_token_embeddings(loaded, config.vocab_size, added)
            place(model.language_model, loaded, "language model", init.language_model, mesh)
    load_vision_tower(model.vision_tower, model.config.vision, init, mesh)


def sample_spec(config: ConfigDict, model_config: LamedConfig, *, train: bool) -> LamedSampleSpec:
    """The data spec of a LaMed config (augmentation only when `train`)."""
    data = config.data
    return LamedSampleSpec(image_size=model_config.vision.image_size, proj_out_num=model_config.proj_out_num,
                      image_token_id=model_config.image_token_id, max_length=int(data.max_length),
                      in_channels=model_config.vision.in_channels,
                      augment=augment_config(data.get("augment", True)) if train else None,
                      window=tuple(data.window) if data.get("window") else None,
                      skip_bad_records=bool(data.get("skip_bad_records", False)))


def evaluate(model: Lamed, run, config: ConfigDict) -> dict[str, float]:
    """Closed-VQA accuracy (the M3D-Bench rule: correct when "{letter}." occurs in the greedy answer) on
    `eval.vqa_samples` questions of `eval.vqa_path`."""
    model_config, tokenizer, eval_config = run.model_config, run.tokenizer, config.eval
    if not eval_config.get("vqa_samples"):
        return {}
    source = build_source(dict(kind="vqa_closed", path=eval_config.vqa_path), config.data.get("root"))
    records = source.records[: eval_config.vqa_samples]
    sampling = SamplingConfig(max_new_tokens=eval_config.max_new_tokens, eos_token_ids=(tokenizer.eos_token_id,),
                              pad_token_id=tokenizer.pad_token_id, seed=42)
    window = tuple(config.data.window) if config.data.get("window") else None
    correct = 0
    for begin in range(0, len(records), eval_config.batch_size):
        chunk = records[begin:begin + eval_config.batch_size]
        images = np.stack([prepare(load_volume(r["image"]).array, model_config.vision.image_size, window)[0]
                           for r in chunk])
        prompts = [prompt_ids(tokenizer, r["question"], proj_out_num=model_config.proj_out_num,
                              image_token_id=model_config.image_token_id) for r in chunk]
        ids, mask = left_pad(prompts, tokenizer.pad_token_id)
        out = generate_lamed(model, images, ids, attention_mask=mask, config=sampling)
        tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
        for row, record in enumerate(chunk):
            answer = tokenizer.decode(tokens[row, : lengths[row]], skip_special_tokens=True)
            correct += f"{record['choice']}." in answer
    return {"vqa_closed_accuracy": correct / max(1, len(records))}


def export(model: Lamed, tokenizer, folder: str) -> None:
    """LoRA merged into the LLM, then the released M3D-LaMed layout (config.json + safetensors) and the
    tokenizer."""
    merge_lora(model)
    convert.export(model, folder, overwrite=True)  # a rerun of the same run replaces its export
    tokenizer.save_pretrained(folder)


TASK = Task(name="lamed", inputs=INPUTS, build=build, batch_shapes=batch_shapes, load_pretrained=load_pretrained, loss=lamed_loss,
            sample_spec=sample_spec, eval_metric="lm_loss", evaluate=evaluate, export=export)
