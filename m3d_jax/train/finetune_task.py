"""Fine-tuning a pretrained Med3DInsight backbone (nnFormer): task `segment` (label maps, Dice + CE loss,
per-class Dice on held-out cases) and task `classify` (class ids, CE on the pooled bottleneck, accuracy).
`init.backbone` is a pretraining checkpoint (the reference's `.pth`, or an m3d-jax Med3DInsight folder);
the export is the nnFormer state dict in the reference's key layout (plus `head.*` for the classifier)."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from ml_collections import ConfigDict

from m3d_jax.convert.med3dinsight import load_backbone, save_state_dict, torch_state_dict
from m3d_jax.data.insight_samples import FinetuneSampleSpec
from m3d_jax.data.pipeline import build_source, iterate, source_dataset, to_global_arrays
from m3d_jax.eval.metrics import per_class_dice
from m3d_jax.losses.segmentation import dice_ce_loss
from m3d_jax.models.finetune import VolumeClassifier, VolumeSegmenter
from m3d_jax.models.nnformer import NnFormerConfig
from m3d_jax.sharding import on_host
from m3d_jax.train.tasks import Task, augment_config, count_samples, place, volume_batch


def _backbone_config(config: ConfigDict) -> NnFormerConfig:
    values = dict(config.model.backbone.to_dict(), num_classes=int(config.model.num_classes))
    return NnFormerConfig.from_dict(values)


def build_segmenter(config: ConfigDict, without_tokenizer: bool = False):
    model_config = _backbone_config(config)
    return None, model_config, lambda: VolumeSegmenter(model_config, rngs=nnx.Rngs(config.seed))


def build_classifier(config: ConfigDict, without_tokenizer: bool = False):
    model_config = _backbone_config(config)
    return None, model_config, lambda: VolumeClassifier(model_config, model_config.num_classes,
                                                        rngs=nnx.Rngs(config.seed))


def segment_batch(config: ConfigDict, model_config: NnFormerConfig) -> dict:
    """Crops [B, C, *crop] float32 and label maps [B, *crop] int32."""
    crop = model_config.crop_size
    return volume_batch(config, model_config.in_channels, crop, labels=(crop, np.int32))


def classify_batch(config: ConfigDict, model_config: NnFormerConfig) -> dict:
    """Crops [B, C, *crop] float32 and class ids [B] int32."""
    return volume_batch(config, model_config.in_channels, model_config.crop_size, labels=((), np.int32))


def load_pretrained(model: VolumeSegmenter | VolumeClassifier, init: ConfigDict, mesh) -> None:
    """`backbone`: a Med3DInsight pretraining checkpoint (the reference's `.pth` state dict, as the
    pretraining run exports it) whose nnFormer starts the fine-tuning; a segmentation head with another
    class count is initialised afresh."""
    if not init.get("backbone"):
        return
    with on_host():
        loaded, _ = load_backbone(init.backbone, model.config, seed=0)
        place(model.backbone, loaded, "nnFormer backbone", init.backbone, mesh)


def segment_loss(model: VolumeSegmenter, batch, rngs: nnx.Rngs | None = None):
    loss, parts = dice_ce_loss(model(batch["images"], rngs), batch["labels"])
    return loss, {"loss": loss, **parts}


def classify_loss(model: VolumeClassifier, batch, rngs: nnx.Rngs | None = None):
    logits = model(batch["images"], rngs).astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["labels"]).mean()
    accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["labels"])
    return loss, {"loss": loss, "accuracy": accuracy}


def _spec(task: str):
    def sample_spec(config: ConfigDict, model_config: NnFormerConfig, *, train: bool) -> FinetuneSampleSpec:
        data = config.data
        return FinetuneSampleSpec(image_size=model_config.crop_size, task=task, num_classes=model_config.num_classes,
                                  in_channels=model_config.in_channels,
                                  augment=augment_config(data.get("augment", False)) if train else None,
                                  window=tuple(data.window) if data.get("window") else None,
                                  skip_bad_records=bool(data.get("skip_bad_records", False)))
    return sample_spec


def _eval_batches(config: ConfigDict, spec: FinetuneSampleSpec, mesh):
    """Every full batch of the eval sources, once, as global arrays."""
    sources = [build_source(entry, config.data.get("root")) for entry in config.eval.sources]
    for source in sources:
        dataset = source_dataset(source, None, spec, seed=config.seed, batch_size=config.eval.batch_size, num_epochs=1,
                                 process_index=jax.process_index(), process_count=jax.process_count())
        for host in iterate(dataset):
            yield to_global_arrays({"images": host["images"], "labels": host["labels"]}, mesh)


def evaluate_segmenter(model: VolumeSegmenter, run, config: ConfigDict) -> dict[str, float]:
    """Per-class Dice (argmax prediction vs labels; cases without a class skip it) over the eval sources."""
    if not config.eval.get("sources"):
        return {}
    names = build_source(config.eval.sources[0], config.data.get("root")).class_names
    predict = nnx.jit(lambda model, images: jnp.argmax(model(images), axis=1))
    spec = _spec("segment")(config, model.config, train=False)
    scores = [per_class_dice(np.asarray(predict(model, batch["images"])), np.asarray(batch["labels"]), len(names))
              for batch in _eval_batches(config, spec, run.mesh)]
    if not scores:
        raise ValueError(f"the eval sources hold fewer cases than eval.batch_size {config.eval.batch_size}")
    dice = np.nanmean(np.concatenate(scores), axis=0)
    results = {f"dice_{name}": float(value) for name, value in zip(names, dice)}
    results["dice_mean_foreground"] = float(np.nanmean(dice[1:]))
    return results


def evaluate_classifier(model: VolumeClassifier, run, config: ConfigDict) -> dict[str, float]:
    """Accuracy over the eval sources."""
    if not config.eval.get("sources"):
        return {}
    predict = nnx.jit(lambda model, images: jnp.argmax(model(images), axis=-1))
    spec = _spec("classify")(config, model.config, train=False)
    hits = [np.asarray(predict(model, batch["images"]) == batch["labels"])
            for batch in _eval_batches(config, spec, run.mesh)]
    if not hits:
        raise ValueError(f"the eval sources hold fewer cases than eval.batch_size {config.eval.batch_size}")
    return {"accuracy": float(np.concatenate(hits).mean())}


def export(model: VolumeSegmenter | VolumeClassifier, tokenizer, folder: str) -> None:
    """`folder/model.pth`: the nnFormer state dict in the reference's layout (`final.0.up.*` for the
    segmenter), plus `head.weight` [K, C] and `head.bias` for the classifier."""
    tensors = torch_state_dict(model.backbone)
    if isinstance(model, VolumeClassifier):
        tensors["head.weight"] = np.asarray(model.head.kernel[...]).T
        tensors["head.bias"] = np.asarray(model.head.bias[...])
    save_state_dict(tensors, os.path.join(folder, "model.pth"))


SEGMENT = Task(name="segment", inputs={"images": 5, "labels": 4}, build=build_segmenter, batch_shapes=segment_batch,
               load_pretrained=load_pretrained, loss=segment_loss, sample_spec=_spec("segment"), eval_metric="loss",
               evaluate=evaluate_segmenter, export=export, unit="samples", count=count_samples)
CLASSIFY = Task(name="classify", inputs={"images": 5, "labels": 1}, build=build_classifier, batch_shapes=classify_batch,
                load_pretrained=load_pretrained, loss=classify_loss, sample_spec=_spec("classify"),
                eval_metric="loss", evaluate=evaluate_classifier, export=export, unit="samples", count=count_samples)
