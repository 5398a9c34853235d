"""M3D-LaMed training, the released recipe (REFERENCE §1.7) on M3D-Data, one variant per stage and LLM:

  configs/lamed.py:stage1_phi3    projector (+ input embeddings) on M3D-Cap; ViT from M3D-CLIP, LLM from
                                  Phi-3-mini-4k-instruct, both frozen. lr 1e-4, 3 epochs.
  configs/lamed.py:stage2_phi3    everything on the full mixture (Cap, VQA, Seg, RefSeg): LLM by LoRA
                                  (r 16, α 32, dropout 0.05; embeddings and lm_head fully), vision tower,
                                  projector and the SegVol parts fully. lr 5e-5.
  configs/lamed.py:stage1_llama2, stage2_llama2   the same with Llama-2-7B.

  python -m m3d_jax.train --config=configs/lamed.py:stage2_phi3 --workdir=gs://BUCKET/lamed-stage2 \
      --config.tokenizer=/models/Phi-3-mini-4k-instruct --config.init.lamed=gs://BUCKET/lamed-stage1/pytorch \
      --config.data.root=/data/M3D-Data

Stage 1 needs `init.language_model` (a transformers LLM folder) and `init.vision_tower` (the M3D-CLIP
checkpoint); stage 2 starts from stage 1's export (`<stage-1 workdir>/pytorch`) through `init.lamed` — the
embeddings trained in stage 1 come with it (the reference never reloads them; we do).
Batch sizes are GLOBAL (the reference ran 16 resp. 8 per GPU on 8 GPUs); steps are for M3D-Data's sizes.
"""

import dataclasses

from ml_collections import ConfigDict

from m3d_jax.config import data_section, run_options
from m3d_jax.models.vit3d import ViT3DConfig

LLMS = {"phi3": "phi3_mini_4k", "llama2": "llama2_7b"}


def get_config(variant: str = "stage2_phi3") -> ConfigDict:
    stage, _, llm = variant.partition("_")
    if stage not in ("stage1", "stage2") or llm not in LLMS:
        raise ValueError(f"unknown variant {variant!r}; use stage1_phi3, stage2_phi3, stage1_llama2 or stage2_llama2")
    config = ConfigDict()
    config.seed = 42
    # What trains: regexes over parameter paths, each matching a whole module path (m3d_jax/train/step.py).
    # With LoRA the LLM (lora.under) keeps only its adapters and lora.fully_trained parts trainable.
    config.trainable = (("mm_projector", "language_model/embed_tokens") if stage == "stage1" else
                        ("vision_tower", "mm_projector", "language_model", "seg_projector", "seg_module"))
    config.tokenizer = "/path/to/llm"  # the LLM's tokenizer folder; LaMed's four tokens are added
    config.model = ConfigDict(dict(
        vision=dataclasses.asdict(ViT3DConfig(dtype="bfloat16", remat="dots_no_batch", scan_layers=True)),
        decoder=dict(preset=LLMS[llm], dtype="bfloat16", remat="dots_no_batch", scan_layers=True),
        proj_layer_type="mlp", proj_layer_num=2, proj_pooling_type="spatial", proj_pooling_size=2,
        segmentation_module="segvol", seg_decoder_heads=8, seg_decoder_mlp_dim=2048, seg_iou_head_hidden=256,
    ))
    config.init = ConfigDict(dict(lamed="", language_model="", vision_tower="", vision_layout="m3d_clip_vision"))
    if stage == "stage1":
        config.init.language_model = "/path/to/llm"
        config.init.vision_tower = "/path/to/M3D-CLIP"
    else:
        config.init.lamed = "/path/to/stage1-workdir/pytorch"
    config.lora = ConfigDict(dict(rank=16 if stage == "stage2" else 0, alpha=32.0, dropout=0.05,
                                  targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                                  under="language_model", fully_trained=("embed_tokens", "lm_head")))
    config.optim = ConfigDict(dict(learning_rate=1e-4 if stage == "stage1" else 5e-5, warmup_fraction=0.03,
                                   end_learning_rate_fraction=0.0, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-8,
                                   clip_norm=1.0, accumulation_steps=1, nonfinite="skip",
                                   max_consecutive_nonfinite=10))
    config.mesh = ConfigDict(dict(data=1, fsdp=-1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1))

    config.data = data_section(root="data/M3D-Data", batch_size=128 if stage == "stage1" else 64, max_length=512,
                               skip_bad_records=True, augment=True)
    if stage == "stage1":
        config.data.sources = [ConfigDict(dict(kind="cap", path="M3D_Cap/M3D_Cap.json", split="train", weight=1.0))]
    else:
        config.data.sources = [ConfigDict(dict(kind=k, path=p, split=s, weight=w)) for k, p, s, w in (
            ("cap", "M3D_Cap/M3D_Cap.json", "train", 1.0), ("vqa_closed", "M3D_VQA/M3D_VQA_train.csv", "", 1.0),
            ("vqa_open", "M3D_VQA/M3D_VQA_train.csv", "", 1.0), ("seg", "M3D_Seg/0011/0011.json", "training", 0.5),
            ("refseg", "M3D_RefSeg/M3D_RefSeg.csv", "", 0.5))]
    # M3D-Cap ≈ 120k pairs: 3 epochs at 128; stage 2 ≈ 4 epochs of the mixture at 64.
    config.total_steps = 3 * 120_000 // 128 if stage == "stage1" else 30_000

    config.update(run_options())
    config.eval = ConfigDict(dict(
        every=2000, loss_batches=20, batch_size=8, vqa_samples=256, max_new_tokens=256,
        vqa_path="M3D_VQA/M3D_VQA_val.csv",
        sources=[ConfigDict(dict(kind="cap", path="M3D_Cap/M3D_Cap.json", split="validation", weight=1.0))]))
    return config
