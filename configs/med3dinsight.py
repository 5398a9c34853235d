"""Med3DInsight pretraining: nnFormer + PSAT aligned by partial OT to a frozen 2D CLIP's slice embeddings.

  configs/med3dinsight.py:pretrain   the reference recipe (task_pretrain.py / run.sh): nnFormer at 128³,
                                     PSAT 6 × 768 with 300 queries, OT reg 0.03 mass 0.95 × 1000 iterations,
                                     torch Adam (coupled L2 1e-5) at a constant 1e-5, batch 10, 100 epochs,
                                     no clipping, the segmentation head `final` left out of the optimiser.
  configs/med3dinsight.py:phantoms   the same code at tiny widths (32³ crop) on the phantom set's synthetic
                                     slice embeddings, 8 simulated CPU devices; ≈ 3 min on 2 cores.

  python tools/slice_embeddings.py --slices=/data/insight/slices.json --model=/models/BiomedCLIP \
      --out=/data/insight/embeddings
  python -m m3d_jax.train --config=configs/med3dinsight.py:pretrain --workdir=gs://BUCKET/med3dinsight \
      --config.data.root=/data/insight/embeddings

The data is a slice list (`insight.json` from tools/slice_embeddings.py): one record per (volume, plane,
slice) with the cached 512-d image and text embeddings. The export (`WORKDIR/pytorch/model.pth`) is the
reference's state dict; fine-tune it with configs/med3dinsight_finetune.py.
"""

import dataclasses

from ml_collections import ConfigDict

from m3d_jax.config import data_section, run_options
from m3d_jax.models.nnformer import NnFormerConfig
from m3d_jax.models.psat import PsatConfig

REFERENCE_EPOCH_STEPS = 1000  # set total_steps = epochs × slices / batch for your data (the reference: 100 epochs)


def get_config(variant: str = "pretrain") -> ConfigDict:
    if variant not in ("pretrain", "phantoms"):
        raise ValueError(f"unknown variant {variant!r}; use pretrain or phantoms")
    config = ConfigDict()
    config.task = "med3dinsight"
    config.seed = 0
    # Everything but the segmentation head (nnFormer's `final`, UNETR's `out`), which the reference's torch
    # Adam skips (it gets no gradient). Regexes, each matching a whole module path (m3d_jax/train/step.py).
    config.trainable = ("(?!backbone$)[^/]+",  # every top-level part but the backbone: psat, L (UNETR: res)
                        "backbone/(?!final$|out$)[^/]+")  # every part of the backbone but its head
    config.model = ConfigDict(dict(backbone=dataclasses.asdict(NnFormerConfig(remat="full")),
                                   psat=dataclasses.asdict(PsatConfig()), ot_reg=0.03, ot_mass=0.95,
                                   ot_iterations=1000, full_metric=False))
    config.init = ConfigDict(dict(med3dinsight=""))
    config.lora = ConfigDict(dict(rank=0))
    config.optim = ConfigDict(dict(learning_rate=1e-5, schedule="constant", weight_decay=1e-5,
                                   weight_decay_mode="coupled", decay_all=True, b1=0.9, b2=0.999, eps=1e-8,
                                   clip_norm=0.0, accumulation_steps=1, nonfinite="skip",
                                   max_consecutive_nonfinite=10))
    config.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1))
    config.data = data_section(
        root="data/insight", batch_size=10, skip_bad_records=True,
        sources=[ConfigDict(dict(kind="slices", path="insight.json", split="train", weight=1.0))])
    config.total_steps = 100 * REFERENCE_EPOCH_STEPS
    config.update(run_options())
    config.eval = ConfigDict(dict(
        every=5000, loss_batches=10, plan_batches=10, batch_size=10,
        sources=[ConfigDict(dict(kind="slices", path="insight.json", split="validation", weight=1.0))]))
    if variant == "phantoms":
        _phantoms(config)
    return config


def _phantoms(config: ConfigDict) -> None:
    from m3d_jax.data.phantoms import PHANTOM_EMBEDDING_DIM

    config.model.backbone = dataclasses.asdict(NnFormerConfig(
        crop_size=(32, 32, 32), embed_dim=16, depths=(2, 2, 1, 1), num_heads=(1, 2, 2, 4), window_sizes=(4, 2, 4, 1),
        num_classes=3))
    config.model.psat = dataclasses.asdict(PsatConfig(hidden_size=128, num_heads=4, num_layers=2, num_queries=8,
                                                      out_dim=PHANTOM_EMBEDDING_DIM))
    config.model.ot_iterations = 300
    config.optim.learning_rate = 1e-3
    config.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1))
    config.data.root = "data/phantoms"
    config.data.phantom_cases = 64
    config.data.batch_size = 8
    config.data.skip_bad_records = False
    config.total_steps = 150
    config.checkpoint = ConfigDict(dict(every=100, keep=2, async_save=True))
    config.log_every = 25
    config.eval = ConfigDict(dict(
        every=0, loss_batches=4, plan_batches=4, batch_size=8,
        sources=[ConfigDict(dict(kind="slices", path="slices.json", split="validation", weight=1.0))]))
    config.data.sources = [ConfigDict(dict(kind="slices", path="slices.json", split="train", weight=1.0))]
    config.platform = "cpu"
    config.cpu_devices = 8
