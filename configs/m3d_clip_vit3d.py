"""The M3D-CLIP 3D ViT-B at its released size: the vision tower of M3D-CLIP and M3D-LaMed.

Input [B, 1, 32, 256, 256] → 2048 patches of 4×16×16 (+ cls) → 12 pre-norm blocks of width 768.
Encode a volume with it (≈0.6 TFLOP per volume; tens of seconds on a 2-core CPU):

  python tools/encode_volume.py --config=configs/m3d_clip_vit3d.py [--ckpt=pretrained_ViT.bin]

Override any field, e.g. `--config.model.dtype=bfloat16 --config.model.scan_layers=True`.
"""

from ml_collections import ConfigDict


def get_config() -> ConfigDict:
    config = ConfigDict()
    config.model = ConfigDict(
        dict(
            image_size=(32, 256, 256),
            patch_size=(4, 16, 16),
            in_channels=1,
            hidden_size=768,
            mlp_dim=3072,
            num_layers=12,
            num_heads=12,
            layer_norm_eps=1e-5,
            qkv_bias=False,
            cls_token=True,
            select_layer=-1,
            select_final_norm=True,
            select_feature="patch",
            dtype="float32",
            param_dtype="float32",
            remat="none",
            scan_layers=False,
            attention_impl="auto",  # auto | xla | cudnn
            attention_query_chunk=-1,  # -1 auto (blocks of 256 queries on CPU), 0 off, N blocks of N
        )
    )
    config.checkpoint_layout = "m3d_clip_vision"
    config.batch_size = 1
    return config
