"""The Med3DInsight pretraining task: nnFormer + PSAT + learnable metric from the config (no tokenizer:
the 2D side arrives as cached embeddings), a pretraining checkpoint to resume from (the reference's
`.pth` state dict), the OT + OT + reconstruction loss, (volume, slice) samples, the OT plan's mass on the
true pairs of held-out batches as the task metric, and export as the reference's state dict."""

from __future__ import annotations

import os

import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from m3d_jax import convert
from m3d_jax.data.insight_samples import InsightSampleSpec
from m3d_jax.data.pipeline import build_mixture, iterate, to_global_arrays
from m3d_jax.models.med3dinsight import Med3DInsight, Med3DInsightConfig, med3dinsight_loss, plan_diagonal_mass
from m3d_jax.train.tasks import Task, count_samples, place_checkpoint, volume_batch

INPUTS = {"images": 5, "plane": 1, "slice_index": 1, "image_embedding": 2, "text_embedding": 2}


def build(config: ConfigDict, without_tokenizer: bool = False):
    """(None, Med3DInsightConfig, model factory) of a training config (it has no tokenizer)."""
    model_config = Med3DInsightConfig.from_dict(config.model.to_dict())
    return None, model_config, lambda: Med3DInsight(model_config, rngs=nnx.Rngs(config.seed))


def batch_shapes(config: ConfigDict, model_config: Med3DInsightConfig) -> dict:
    """Crops [B, C, *crop] float32; plane and slice index [B] int32; 2D embeddings [B, out_dim] float32."""
    index, embedding = ((), np.int32), ((model_config.psat.out_dim,), np.float32)
    return volume_batch(config, model_config.in_channels, model_config.crop_size, plane=index, slice_index=index,
                        image_embedding=embedding, text_embedding=embedding)


def load_pretrained(model: Med3DInsight, init: ConfigDict, mesh) -> None:
    """`med3dinsight`: a pretraining state dict (`.pth`, or an m3d-jax folder of that kind) to start from."""
    if not init.get("med3dinsight"):
        return
    # the task's config: the crop size and PSAT heads leave no trace in a .pth
    place_checkpoint(model, init.med3dinsight, "Med3DInsight", mesh, expect="med3dinsight", config=model.config)


def sample_spec(config: ConfigDict, model_config: Med3DInsightConfig, *, train: bool) -> InsightSampleSpec:
    psat = model_config.psat
    return InsightSampleSpec(image_size=model_config.crop_size, embedding_dim=psat.out_dim,
                             slice_limit=psat.slice_bins * psat.slice_stride, in_channels=model_config.in_channels,
                             window=tuple(config.data.window) if config.data.get("window") else None,
                             skip_bad_records=bool(config.data.get("skip_bad_records", False)))


def evaluate(model: Med3DInsight, run, config: ConfigDict) -> dict[str, float]:
    """Mean mass the OT plans (3D ↔ slice image, 3D ↔ slice text) put on the true pairs, over
    `eval.plan_batches` batches of the eval sources (of the `ot_mass` transported; chance is ot_mass / B)."""
    import jax

    batches = config.eval.get("plan_batches", 0)
    if not batches:
        return {}
    data = ConfigDict(dict(config.data.to_dict(), sources=config.eval.sources, batch_size=config.eval.batch_size))
    spec = sample_spec(config, model.config, train=False)
    iterator = iterate(build_mixture(data, None, spec, seed=config.seed, name="eval data",
                                     process_index=jax.process_index(), process_count=jax.process_count()))
    masses = nnx.jit(plan_diagonal_mass)
    image, text = [], []
    for _ in range(batches):
        host = next(iterator)
        mass = masses(model, to_global_arrays({k: host[k] for k in INPUTS}, run.mesh))
        image.append(float(mass["image"]))
        text.append(float(mass["text"]))
    return {"plan_diagonal_image": float(np.mean(image)), "plan_diagonal_text": float(np.mean(text))}


def export(model: Med3DInsight, tokenizer, folder: str) -> None:
    """The reference's checkpoint: `folder/model.pth`, a plain state dict (363 entries at full size)."""
    convert.export(model, os.path.join(folder, "model.pth"), overwrite=True)  # a rerun replaces its own export


TASK = Task(name="med3dinsight", inputs=INPUTS, build=build, batch_shapes=batch_shapes, load_pretrained=load_pretrained,
            loss=med3dinsight_loss, sample_spec=sample_spec, eval_metric="loss", evaluate=evaluate, export=export,
            unit="samples", count=count_samples)
