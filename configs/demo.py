"""The main job on the embedded default: a tiny M3D-LaMed (the real modules at small widths: ViT3D, spatial
pooling projector, Phi-3 decoder; no SegVol module, which would make each step 5× slower on CPU) trained
from scratch (the ViT frozen at its random initialisation) on the phantom set's closed VQA (written on
first use), on 8 simulated CPU devices as a 2 data × 2 fsdp × 2 tensor mesh. It prints the closed-VQA
accuracy on held-out phantoms at the end and leaves an Orbax checkpoint and a PyTorch export (released
LaMed layout) in the workdir. About 7 minutes on 2 cores (writing 3000 phantoms, then 3000 steps of 32).

  python -m m3d_jax.train --config=configs/demo.py --workdir=runs/demo
"""

import dataclasses

from ml_collections import ConfigDict

from configs import lamed
from m3d_jax.config import data_section
from m3d_jax.models.vit3d import ViT3DConfig


def get_config() -> ConfigDict:
    config = lamed.get_config("stage2_phi3")
    # The vision tower stays at its random initialisation (there is no pretrained M3D-CLIP tower to start
    # from here): trained from scratch jointly, it loses the position identity that left/right answers need.
    config.trainable = ("mm_projector", "language_model")  # all but the vision tower (there is no SegVol)
    config.tokenizer = "phantoms"
    # From scratch, the ViT needs position identity from the first step (left/right questions): its
    # learnable position table starts at std 1 instead of MONAI's 0.02. One block, not two: each random global
    # attention layer mixes the patches further, and with two the lesion's side survived in some
    # initialisations only (closed-VQA 89% / 60% / 60% for seeds 42 / 1 / 2; with one: 89% / 84% / 90%).
    config.model.vision = dataclasses.asdict(ViT3DConfig(image_size=(32, 64, 64), patch_size=(4, 16, 16),
                                                         hidden_size=64, mlp_dim=128, num_layers=1, num_heads=4,
                                                         position_init_std=1.0))
    config.model.decoder = dict(preset="tiny_phi3", num_layers=2, hidden_size=96, intermediate_size=192, num_heads=4,
                                num_kv_heads=4, head_dim=24, max_position_embeddings=128)
    config.model.segmentation_module = ""
    config.init = ConfigDict(dict(lamed="", language_model="", vision_tower="", vision_layout="m3d_clip_vision"))
    config.lora.rank = 0
    config.optim.learning_rate = 2e-3
    config.optim.warmup_fraction = 0.05
    config.optim.weight_decay = 0.01
    config.mesh = ConfigDict(dict(data=2, fsdp=2, tensor=2, dcn_data=1, dcn_fsdp=1, dcn_tensor=1))
    # The closed-VQA rows only, 32 per step: mixed with captions and open VQA (4:1:1) at the same step budget,
    # closed-VQA reaches 86% instead of 92% (seed 1); at 16 per step, 89%. In both the lesion count stays
    # at its prior (one lesion, about 80%).
    # Train from prepared shards with --config.data.shards=data/phantom_shards after
    # `python tools/prepare_data.py --config=configs/demo.py --image_size=32,64,64 --out=data/phantom_shards`.
    config.data = data_section(
        root="data/phantoms", phantom_cases=3000, batch_size=32, max_length=64,
        # No rotations and no left-right (W) flips: the questions ask for left / right. Flips of D and H keep
        # the answers true; with them and 3000 cases (not 2000) the count generalises: closed-VQA 92.0% / 93.3% /
        # 95.0% for seeds 42 / 1 / 2, against 90.3% / 89.3% / – with 2000 cases.
        augment=dict(rotate90_prob=0.0, flip_prob=0.5, flip_axes=(1, 2), scale_prob=0.5, scale=0.1, shift_prob=0.5,
                     shift=0.1),
        sources=[ConfigDict(dict(kind="vqa_closed", path="vqa_train.csv", split="", weight=1.0))])
    config.total_steps = 3000
    config.checkpoint = ConfigDict(dict(every=1000, keep=2, async_save=True))
    config.log_every = 100
    config.eval = ConfigDict(dict(
        every=0, loss_batches=4, batch_size=16, vqa_samples=300, max_new_tokens=8, vqa_path="vqa_test.csv",
        sources=[ConfigDict(dict(kind="vqa_closed", path="vqa_validation.csv", split="", weight=1.0))]))
    config.platform = "cpu"
    config.cpu_devices = 8
    return config
