"""Fine-tuning a pretrained Med3DInsight backbone (nnFormer) for 3D segmentation or classification.

  configs/med3dinsight_finetune.py:segment            a Decathlon-style data set (MSD Task02_Heart by
                                                      default): dataset.json "labels" + "training" label
                                                      maps; Dice + CE, per-class Dice on "validation"
  configs/med3dinsight_finetune.py:classify           {"labels": {...}, "training": [{"image", "label"}]}:
                                                      mean-pooled bottleneck → linear head, CE, accuracy
  configs/med3dinsight_finetune.py:segment_phantoms   the phantom set (background / body / lesion), tiny
  configs/med3dinsight_finetune.py:classify_phantoms  the phantom set's side of the largest lesion, tiny

  python -m m3d_jax.train --config=configs/med3dinsight_finetune.py:segment --workdir=gs://BUCKET/heart \
      --config.init.backbone=gs://BUCKET/med3dinsight/pytorch/model.pth --config.data.root=/data/Task02_Heart

Decathlon's own "test" list has no labels: add a "validation" list of {"image", "label"} entries held out
from "training" to dataset.json (or set eval.sources to another file). The reference's fine-tuning
hyper-parameters were not released; these follow nnU-Net-style practice (AdamW 1e-4, cosine, batch 2).
The phantom variants start from `init.backbone` when it is set (e.g. the phantoms pretraining export).
"""

import dataclasses

from ml_collections import ConfigDict

from configs import med3dinsight

from m3d_jax.config import data_section, run_options
from m3d_jax.models.nnformer import NnFormerConfig

VARIANTS = ("segment", "classify", "segment_phantoms", "classify_phantoms")


def get_config(variant: str = "segment") -> ConfigDict:
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; use one of {', '.join(VARIANTS)}")
    segment = variant.startswith("segment")
    config = ConfigDict()
    config.task = "segment" if segment else "classify"
    config.seed = 0
    config.trainable = (".*",)  # everything; --config.trainable=head: a linear probe (classify)
    config.model = ConfigDict(dict(backbone=dataclasses.asdict(NnFormerConfig(remat="full")),
                                   num_classes=2))  # MSD Heart: background, left atrium
    config.init = ConfigDict(dict(backbone=""))
    config.lora = ConfigDict(dict(rank=0))
    config.optim = ConfigDict(dict(learning_rate=1e-4, warmup_fraction=0.05, end_learning_rate_fraction=0.0,
                                   weight_decay=1e-2, b1=0.9, b2=0.999, eps=1e-8, clip_norm=1.0,
                                   accumulation_steps=1, nonfinite="skip", max_consecutive_nonfinite=10))
    config.mesh = ConfigDict(dict(data=-1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1))
    kind, path = ("label_map", "dataset.json") if segment else ("class_label", "dataset.json")
    config.data = data_section(
        root="data/Task02_Heart" if segment else "data/classification", batch_size=2,
        augment=dict(rotate90_prob=0.0, flip_prob=0.1, scale_prob=0.5, scale=0.1, shift_prob=0.5, shift=0.1),
        sources=[ConfigDict(dict(kind=kind, path=path, split="training", weight=1.0))])
    config.total_steps = 20_000
    config.update(run_options(log_every=20))
    config.eval = ConfigDict(dict(every=2000, loss_batches=0, batch_size=2,
                                  sources=[ConfigDict(dict(kind=kind, path=path, split="validation", weight=1.0))]))
    if variant.endswith("phantoms"):
        _phantoms(config, segment)
    return config


def _phantoms(config: ConfigDict, segment: bool) -> None:
    config.model.backbone = med3dinsight.get_config("phantoms").model.backbone.to_dict()
    config.model.num_classes = 3 if segment else 2  # background / body / lesion, or left / right
    config.optim.learning_rate = 2e-3
    kind, path = ("label_map", "labels.json") if segment else ("class_label", "classes.json")
    config.data.root = "data/phantoms"
    config.data.phantom_cases = 64
    config.data.batch_size = 8
    del config.data["augment"]  # no augmentation
    config.data.sources = [ConfigDict(dict(kind=kind, path=path, split="training", weight=1.0))]
    config.total_steps = 100
    config.checkpoint = ConfigDict(dict(every=100, keep=2, async_save=True))
    config.log_every = 25
    config.eval = ConfigDict(dict(every=0, loss_batches=0, batch_size=8,
                                  sources=[ConfigDict(dict(kind=kind, path=path, split="test", weight=1.0))]))
    config.platform = "cpu"
    config.cpu_devices = 8
