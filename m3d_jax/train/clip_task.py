"""The M3D-CLIP task: the contrastive model from the config and a BERT tokenizer, pretrained parts (a
whole M3D-CLIP, or BERT and/or the 3D ViT), the global-batch contrastive loss, image–report samples,
retrieval recall on held-out pairs, and export in the released M3D-CLIP layout."""

from __future__ import annotations

import dataclasses
import os

import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from m3d_jax import convert
from m3d_jax.convert.text_encoder import load_bert
from m3d_jax.data.clip_samples import ClipSampleSpec
from m3d_jax.data.pipeline import build_source
from m3d_jax.errors import ConfigError
from m3d_jax.eval.retrieval import retrieval_metrics
from m3d_jax.models.clip import ClipConfig, M3DClip, clip_loss
from m3d_jax.models.text_encoder import BertConfig
from m3d_jax.sharding import on_host
from m3d_jax.tokenizer import load_tokenizer, tokenizer_folder
from m3d_jax.train.tasks import Task, augment_config, load_vision_tower, place, place_checkpoint, volume_batch

INPUTS = {"images": 5, "input_ids": 2, "attention_mask": 2}
def build(config: ConfigDict, without_tokenizer: bool = False):
    """(BERT tokenizer, ClipConfig, model factory) of a training config (no tokenizer with
    `without_tokenizer`: the text encoder's vocabulary is the config's)."""
    model_config = ClipConfig.from_dict(config.model.to_dict())
    if without_tokenizer:
        return None, model_config, lambda: M3DClip(model_config, rngs=nnx.Rngs(config.seed))
    tokenizer = load_tokenizer(tokenizer_folder(config.tokenizer))
    if len(tokenizer) > model_config.text.vocab_size:
        raise ConfigError(f"tokenizer {config.tokenizer} has {len(tokenizer)} tokens but the text encoder's "
                         f"vocabulary is {model_config.text.vocab_size}")
    return tokenizer, model_config, lambda: M3DClip(model_config, rngs=nnx.Rngs(config.seed))


def batch_shapes(config: ConfigDict, model_config: ClipConfig) -> dict:
    """Volumes [B, C, D, H, W] float32; report ids and mask [B, max_text_len] int32."""
    text = ((model_config.max_text_len,), np.int32)
    vision = model_config.vision
    return volume_batch(config, vision.in_channels, vision.image_size, input_ids=text, attention_mask=text)


def load_pretrained(model: M3DClip, init: ConfigDict, mesh) -> None:
    """`clip` (a released M3D-CLIP folder or an m3d-jax one), else `text_encoder` (a transformers
    BertModel folder, e.g. bert-base-uncased) and/or `vision_tower` (a 3D ViT checkpoint)."""
    if init.get("clip"):
        place_checkpoint(model, init.clip, "M3D-CLIP", mesh, expect="clip")
        return
    if init.get("text_encoder"):
        with on_host():
            hf = BertConfig.from_hf(convert.kind.read_config_json(os.path.join(init.text_encoder, "config.json")))
            config = dataclasses.replace(model.config.text, **{f: getattr(hf, f) for f in (
                "vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads")})
            loaded, _ = load_bert(init.text_encoder, config)
            place(model.language_encoder, loaded, "text encoder", init.text_encoder, mesh)
    load_vision_tower(model.vision_encoder, model.config.vision, init, mesh)


def sample_spec(config: ConfigDict, model_config: ClipConfig, *, train: bool) -> ClipSampleSpec:
    """The data spec of a CLIP config (augmentation only when `train`)."""
    data = config.data
    return ClipSampleSpec(image_size=model_config.vision.image_size, max_text_len=model_config.max_text_len,
                          excerpt_tokens=int(data.get("excerpt_tokens", 512)),
                          in_channels=model_config.vision.in_channels,
                          augment=augment_config(data.get("augment", True)) if train else None,
                          window=tuple(data.window) if data.get("window") else None,
                          skip_bad_records=bool(data.get("skip_bad_records", False)))


def evaluate(model: M3DClip, run, config: ConfigDict) -> dict[str, float]:
    """Retrieval R@1/5/10 both ways on the first `eval.retrieval_pairs` pairs of `eval.retrieval_source`."""
    pairs = config.eval.get("retrieval_pairs", 0)
    if not pairs:
        return {}
    source = build_source(config.eval.retrieval_source, config.data.get("root"))
    return retrieval_metrics(model, run.tokenizer, source.records[:pairs], batch_size=config.eval.batch_size,
                             excerpt_tokens=int(config.data.get("excerpt_tokens", 512)),
                             window=tuple(config.data.window) if config.data.get("window") else None)


def export(model: M3DClip, tokenizer, folder: str) -> None:
    """The released M3D-CLIP layout (config.json + safetensors) and the tokenizer."""
    convert.export(model, folder, overwrite=True)  # a rerun of the same run replaces its export
    tokenizer.save_pretrained(folder)


TASK = Task(name="clip", inputs=INPUTS, build=build, batch_shapes=batch_shapes, load_pretrained=load_pretrained, loss=clip_loss,
            sample_spec=sample_spec, eval_metric="clip_loss", evaluate=evaluate, export=export)
