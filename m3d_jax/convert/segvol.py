"""Key map of LaMed's SegVol module (`model.seg_module.*` in the released checkpoints) and `seg_projector`."""

from __future__ import annotations

from m3d_jax.convert.keymap import IDENTITY, LINEAR, KeyMap, Linear, Reshape, Rule, norm_rules
from m3d_jax.convert.vit3d import vit3d_keymap
from m3d_jax.models.segvol import SegVolConfig

_FLAT = Reshape(flatten=True)


def attention_rules(torch: str, jax: str) -> list[Rule]:
    """SAM-style attention: q/k/v/out_proj Linear layers with biases."""
    rules = []
    for name in ("q_proj", "k_proj", "v_proj"):
        rules += [Rule(f"{torch}.{name}.weight", f"{jax}.{name}.kernel", LINEAR),
                  Rule(f"{torch}.{name}.bias", f"{jax}.{name}.bias", _FLAT)]
    return rules + [Rule(f"{torch}.out_proj.weight", f"{jax}.out_proj.kernel", Linear(n_in=2)),
                    Rule(f"{torch}.out_proj.bias", f"{jax}.out_proj.bias")]


def _dense(torch: str, jax: str) -> list[Rule]:
    return [Rule(f"{torch}.weight", f"{jax}.kernel", LINEAR), Rule(f"{torch}.bias", f"{jax}.bias")]


def two_way_transformer_keymap(depth: int) -> KeyMap:
    """segment_anything's TwoWayTransformer state dict ↔ `segvol.TwoWayTransformer`."""
    rules = []
    for i in range(depth):
        t, j = f"layers.{i}", f"layers.{i}"
        for name in ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token"):
            rules += attention_rules(f"{t}.{name}", f"{j}.{name}")
        rules += _dense(f"{t}.mlp.lin1", f"{j}.mlp.linear1") + _dense(f"{t}.mlp.lin2", f"{j}.mlp.linear2")
        for n in range(1, 5):
            rules += norm_rules(f"{t}.norm{n}", f"{j}.norm{n}")
    rules += attention_rules("final_attn_token_to_image", "final_attn_token_to_image")
    rules += norm_rules("norm_final_attn", "norm_final_attn")
    return KeyMap("two_way_transformer", tuple(rules))


def segvol_keymap(config: SegVolConfig, prefix: str = "model.seg_module.") -> KeyMap:
    """The whole seg module: image encoder (ViT3D, no cls), prompt encoder, mask decoder."""
    encoder = vit3d_keymap(config.encoder, "m3d_clip_vision").nested("image_encoder.", "image_encoder.")
    transformer = two_way_transformer_keymap(config.decoder_depth).nested("mask_decoder.transformer.",
                                                                         "mask_decoder.transformer.")
    pe, md = "prompt_encoder", "mask_decoder"
    rules = [
        Rule(f"{pe}.pe_layer.positional_encoding_gaussian_matrix", f"{pe}.positional_encoding_gaussian_matrix"),
        Rule(f"{pe}.no_mask_embed.weight", f"{pe}.no_mask_embed", Reshape(leading_ones=1)),
        Rule(f"{pe}.point_embeddings.{{layer}}.weight", f"{pe}.unused_point_embeddings"),
        Rule(f"{pe}.not_a_point_embed.weight", f"{pe}.unused_not_a_point_embed"),
        *[Rule(f"{pe}.mask_downscaling.{i}.{kind}", f"{pe}.unused_mask_downscaling_{i}_{kind}")
          for i in (0, 1, 3, 4, 6) for kind in ("weight", "bias")],
        Rule(f"{md}.iou_token.weight", f"{md}.iou_token"),
        Rule(f"{md}.mask_tokens.weight", f"{md}.mask_tokens"),
        Rule(f"{md}.output_upscaling.0.weight", f"{md}.upscale1.kernel", IDENTITY),
        Rule(f"{md}.output_upscaling.0.bias", f"{md}.upscale1.bias"),
        *norm_rules(f"{md}.output_upscaling.1", f"{md}.upscale_norm"),
        Rule(f"{md}.output_upscaling.3.weight", f"{md}.upscale2.kernel", IDENTITY),
        Rule(f"{md}.output_upscaling.3.bias", f"{md}.upscale2.bias"),
        *[r for i in range(config.num_mask_tokens) for k in range(3)
          for r in _dense(f"{md}.output_hypernetworks_mlps.{i}.layers.{k}", f"{md}.hypernetworks.{i}.{k}")],
        *[r for k in range(config.iou_head_depth)
          for r in _dense(f"{md}.iou_prediction_head.layers.{k}", f"{md}.iou_prediction_head.{k}")],
        *_dense(f"{md}.txt_align_upscaled_embedding", f"{md}.txt_align_upscaled_embedding"),
    ]
    own = KeyMap("segvol", tuple(rules))
    return KeyMap.combine("segvol", encoder, transformer, own, prefix=prefix)
