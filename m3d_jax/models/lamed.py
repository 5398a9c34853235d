"""M3D-LaMed: 3D ViT → spatial-pooling projector → image tokens spliced into a Phi-3 / Llama decoder;
optionally a `[SEG]` token whose hidden state prompts the SegVol mask decoder.

Prompt layout (as released): BOS, `proj_out_num` × `<im_patch>`, text. The image features replace the
`<im_patch>` embeddings by position; unlike the reference, the ids there are validated, and a left-padded
row is spliced after its padding, so batched prompts of different lengths work.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m3d_jax.config import dataclass_from_mapping
from m3d_jax.generate import SamplingConfig, decode, prepare_prompts
from m3d_jax.models.decoder import Decoder, DecoderConfig
from m3d_jax.models.projector import ProjectorConfig, SpatialPoolingProjector
from m3d_jax.models.segvol import SegProjector, SegVol, SegVolConfig
from m3d_jax.models.vit3d import ViT3D, ViT3DConfig

ADDED_TOKENS = ("<im_patch>", "<bx_start>", "<bx_end>", "[SEG]")  # the first three are special tokens


@dataclasses.dataclass(frozen=True)
class LamedConfig:
    vision: ViT3DConfig = ViT3DConfig()
    decoder: DecoderConfig = DecoderConfig(vocab_size=32015)
    proj_layer_type: str = "mlp"
    proj_layer_num: int = 2
    proj_pooling_type: str = "spatial"
    proj_pooling_size: int = 2
    segmentation_module: str = "segvol"  # "segvol" or "" (none)
    image_token_id: int = 32011  # <im_patch>
    seg_token_id: int = 32014  # [SEG]
    # Fixed in the reference code (not in its config.json); written to config.json by `to_hf` so that
    # other sizes round-trip.
    seg_decoder_heads: int = 8
    seg_decoder_mlp_dim: int = 2048
    seg_iou_head_hidden: int = 256

    def __post_init__(self):
        if self.segmentation_module not in ("segvol", ""):
            raise ValueError(f"segmentation_module must be 'segvol' or '', got {self.segmentation_module!r}")

    @property
    def projector(self) -> ProjectorConfig:
        return ProjectorConfig(
            grid=self.vision.grid, in_dim=self.vision.hidden_size, out_dim=self.decoder.hidden_size,
            layer_type=self.proj_layer_type, layer_num=self.proj_layer_num, pooling_type=self.proj_pooling_type,
            pooling_size=self.proj_pooling_size, dtype=self.decoder.dtype, param_dtype=self.decoder.param_dtype,
        )

    @property
    def proj_out_num(self) -> int:
        return self.projector.proj_out_num

    @property
    def segvol(self) -> SegVolConfig | None:
        if not self.segmentation_module:
            return None
        encoder = dataclasses.replace(self.vision, cls_token=False, select_layer=-1, select_final_norm=True,
                                      select_feature="patch")
        return SegVolConfig(encoder=encoder, decoder_heads=self.seg_decoder_heads,
                            decoder_mlp_dim=self.seg_decoder_mlp_dim, iou_head_hidden=self.seg_iou_head_hidden,
                            dtype=self.vision.dtype, param_dtype=self.vision.param_dtype)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> LamedConfig:
        """From nested mappings (e.g. a ConfigDict with `vision` and `decoder` sections)."""
        values = dict(values)
        values["vision"] = ViT3DConfig.from_dict(values.get("vision", {}))
        values["decoder"] = DecoderConfig.from_dict(values.get("decoder", {}))
        return dataclass_from_mapping(cls, values)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **decoder_overrides: Any) -> LamedConfig:
        """From a released M3D-LaMed `config.json` (model_type lamed_phi3 / lamed_llama)."""
        if hf.get("vision_tower", "vit3d") != "vit3d" or hf.get("mm_projector_type", "spp") != "spp":
            raise ValueError(f"unsupported LaMed vision tower {hf.get('vision_tower')!r} / projector "
                             f"{hf.get('mm_projector_type')!r} (vit3d + spp)")
        select_layer = hf.get("vision_select_layer", -1)
        vision = ViT3DConfig(
            image_size=tuple(hf.get("image_size", (32, 256, 256))), patch_size=tuple(hf.get("patch_size", (4, 16, 16))),
            in_channels=hf.get("image_channel", 1), hidden_size=hf.get("mm_hidden_size", 768), cls_token=True,
            mlp_dim=hf.get("vision_mlp_dim", 3072), num_layers=hf.get("vision_num_layers", 12),
            num_heads=hf.get("vision_num_heads", 12),
            select_layer=select_layer, select_final_norm=hf.get("vision_select_final_norm", select_layer == -1),
            select_feature=hf.get("vision_select_feature", "patch"), dtype=decoder_overrides.get("dtype", "float32"),
        )
        seg_token_id = hf.get("seg_token_id")
        if seg_token_id is None:
            raise ValueError("config.json has no seg_token_id; is this an M3D-LaMed checkpoint?")
        return cls(
            vision=vision, decoder=DecoderConfig.from_hf(hf, **decoder_overrides),
            proj_layer_type=hf.get("proj_layer_type", "mlp"), proj_layer_num=hf.get("proj_layer_num", 2),
            proj_pooling_type=hf.get("proj_pooling_type", "spatial"), proj_pooling_size=hf.get("proj_pooling_size", 2),
            segmentation_module=hf.get("segmentation_module") or "",
            # The released configs carry only seg_token_id; the four tokens are added in ADDED_TOKENS order.
            image_token_id=hf.get("img_token_id", seg_token_id - 3), seg_token_id=seg_token_id,
            seg_decoder_heads=hf.get("seg_decoder_heads", 8), seg_decoder_mlp_dim=hf.get("seg_decoder_mlp_dim", 2048),
            seg_iou_head_hidden=hf.get("seg_iou_head_hidden", 256),
        )

    def to_hf(self) -> dict[str, Any]:
        """The released `config.json` fields (LLM fields plus the multimodal ones)."""
        hf = self.decoder.to_hf()
        phi3 = self.decoder.architecture == "phi3"
        hf.update(
            model_type="lamed_phi3" if phi3 else "lamed_llama",
            architectures=["LamedPhi3ForCausalLM" if phi3 else "LamedLlamaForCausalLM"],
            image_channel=self.vision.in_channels, image_size=list(self.vision.image_size),
            patch_size=list(self.vision.patch_size), vision_tower="vit3d",
            vision_select_layer=self.vision.select_layer, vision_select_final_norm=self.vision.select_final_norm,
            vision_select_feature=self.vision.select_feature, mm_projector_type="spp",
            proj_layer_type=self.proj_layer_type, proj_layer_num=self.proj_layer_num,
            proj_pooling_type=self.proj_pooling_type, proj_pooling_size=self.proj_pooling_size,
            mm_hidden_size=self.vision.hidden_size, segmentation_module=self.segmentation_module or None,
            seg_token_id=self.seg_token_id, img_token_id=self.image_token_id,
            vision_mlp_dim=self.vision.mlp_dim, vision_num_layers=self.vision.num_layers,
            vision_num_heads=self.vision.num_heads, seg_decoder_heads=self.seg_decoder_heads,
            seg_decoder_mlp_dim=self.seg_decoder_mlp_dim, seg_iou_head_hidden=self.seg_iou_head_hidden,
        )
        return hf


class LamedOutput(NamedTuple):
    logits: jax.Array  # [B, L, vocab] float32
    last_hidden_state: jax.Array  # [B, L, H] after the final norm


def placeholder_starts(input_ids: np.ndarray, token_id: int, count: int, layout: str) -> np.ndarray:
    """Where each row's block of `count` consecutive `token_id` placeholders starts; raises a ValueError
    naming the row (and the expected prompt `layout`) when a row holds any other arrangement."""
    ids = np.asarray(input_ids)
    is_image = ids == token_id
    starts = np.argmax(is_image, axis=1)
    for row in range(ids.shape[0]):
        start = int(starts[row])
        found = int(is_image[row].sum())
        block = is_image[row, start : start + count]
        if found != count or block.size != count or not block.all():
            raise ValueError(f"input_ids row {row}: expected {count} consecutive image placeholder ids ({token_id}), "
                             f"found {found} starting at position {start}; build prompts as {layout}")
    return starts.astype(np.int32)


def image_token_starts(input_ids: np.ndarray, config: LamedConfig) -> np.ndarray:
    """Where each row's `<im_patch>` block starts (1 for an unpadded row: right after BOS)."""
    return placeholder_starts(input_ids, config.image_token_id, config.proj_out_num,
                              f"BOS + <im_patch> × {config.proj_out_num} + text")


def visual_starts(input_ids: jax.Array, image_starts: jax.Array | None,
                  find: Callable[[np.ndarray], np.ndarray]) -> jax.Array:
    """Where each row's visual block starts: `image_starts` [B] when given; else found (and validated) by
    `find` in concrete `input_ids`. Under jit the ids are abstract, so `image_starts` must be passed (the
    data pipelines put it in every batch); a missing one is an error, never a guess."""
    if image_starts is not None:
        return image_starts
    if isinstance(input_ids, jax.core.Tracer):
        raise ValueError("under jit, pass image_starts (the data pipeline's `image_starts`)")
    return jnp.asarray(find(np.asarray(input_ids)))


def splice(embeds: jax.Array, features: jax.Array, starts: jax.Array) -> jax.Array:
    """embeds [B, T, H] with rows starts[b] … starts[b] + N − 1 replaced by features [B, N, H].

    An elementwise select of gathered rows (not a per-row dynamic_update_slice), which the SPMD
    partitioner keeps in the batch-sharded layout."""
    offsets = jnp.arange(embeds.shape[1])[None] - starts[:, None]  # [B, T]
    inside = (offsets >= 0) & (offsets < features.shape[1])
    gathered = jnp.take_along_axis(features, jnp.clip(offsets, 0, features.shape[1] - 1)[..., None], axis=1)
    return jnp.where(inside[..., None], gathered.astype(embeds.dtype), embeds)


class Lamed(nnx.Module):
    def __init__(self, config: LamedConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.vision_tower = ViT3D(config.vision, rngs=rngs)
        self.mm_projector = SpatialPoolingProjector(config.projector, rngs=rngs)
        self.language_model = Decoder(config.decoder, rngs=rngs)
        if config.segvol is not None:
            dtypes = config.decoder.dtypes()
            self.seg_projector = SegProjector(config.decoder.hidden_size, config.vision.hidden_size, dtypes=dtypes,
                                              rngs=rngs)
            self.seg_module = SegVol(config.segvol, rngs=rngs)
        else:
            self.seg_projector = None
            self.seg_module = None

    def encode_images(self, images: jax.Array) -> jax.Array:
        """[B, C, D, H, W] → [B, proj_out_num, H] image tokens in the LLM's embedding space."""
        return self.mm_projector(self.vision_tower(images).features)

    def embed(self, input_ids: jax.Array, images: jax.Array, image_starts: jax.Array | None = None) -> jax.Array:
        """Token embeddings with the image tokens spliced in at each row's `<im_patch>` block.

        `image_starts` [B] as `visual_starts` takes it (found with `image_token_starts` when not given)."""
        starts = visual_starts(input_ids, image_starts, lambda ids: image_token_starts(ids, self.config))
        return splice(self.language_model.embed_tokens(input_ids), self.encode_images(images), starts)

    def __call__(
        self,
        images: jax.Array,
        input_ids: jax.Array,
        *,
        attention_mask: jax.Array | None = None,
        image_starts: jax.Array | None = None,
    ) -> LamedOutput:
        embeds = self.embed(input_ids, images, image_starts)
        out = self.language_model(inputs_embeds=embeds, attention_mask=attention_mask)
        return LamedOutput(out.logits, out.last_hidden_state)

    def seg_prompts(
        self, last_hidden: jax.Array, next_tokens: jax.Array, rngs: nnx.Rngs | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """Mask-decoder prompts from the hidden states whose NEXT token is `[SEG]` (mean over several).

        last_hidden [B, T, H]; next_tokens [B, T] = the token each position predicts (input_ids shifted
        left). Returns (prompts [B, C], has_seg [B]); rows without `[SEG]` get an all-zero prompt that
        bypasses the projector, as in the reference."""
        selected = (next_tokens == self.config.seg_token_id).astype(last_hidden.dtype)
        count = selected.sum(axis=1)
        mean = jnp.einsum("bt,bth->bh", selected, last_hidden) / jnp.maximum(count, 1)[:, None]
        has_seg = count > 0
        prompts = jnp.where(has_seg[:, None], self.seg_projector(mean, rngs), 0.0)
        return prompts, has_seg

    def segment(self, images: jax.Array, prompts: jax.Array) -> jax.Array:
        """[B, 1, D, H, W] float32 mask logits at the input resolution."""
        return self.seg_module(images, prompts)


def shift_left(input_ids: jax.Array, fill: int) -> jax.Array:
    """The token each position predicts: ids[:, 1:] with `fill` appended."""
    return jnp.concatenate([input_ids[:, 1:], jnp.full((input_ids.shape[0], 1), fill, input_ids.dtype)], axis=1)


def causal_lm_loss(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Mean next-token cross-entropy over labels != -100 (transformers' shift), and the token count."""
    targets = labels[:, 1:]
    valid = targets != -100
    log_probs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(log_probs, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
    count = valid.sum()
    return -(picked * valid).sum() / jnp.maximum(count, 1), count


def segmentation_losses(logits: jax.Array, masks: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-sample BCE-with-logits (mean over voxels) and soft Dice loss 1 − 2Σpt / (Σp + Σt + 1)."""
    logits = logits.reshape(logits.shape[0], -1).astype(jnp.float32)
    targets = (masks.reshape(masks.shape[0], -1) > 0).astype(jnp.float32)  # the reference maps −1 to 0
    bce = jnp.mean(jnp.maximum(logits, 0) - logits * targets + jnp.log1p(jnp.exp(-jnp.abs(logits))), axis=1)
    probs = jax.nn.sigmoid(logits)
    dice = 1 - 2 * (probs * targets).sum(axis=1) / (probs.sum(axis=1) + targets.sum(axis=1) + 1)
    return bce, dice


def lamed_loss(model: Lamed, batch: Mapping[str, jax.Array], rngs: nnx.Rngs | None = None):
    """LM cross-entropy + (BCE + Dice) on samples whose mask is non-empty. Returns (loss, metrics).

    batch: images [B,1,D,H,W], input_ids, attention_mask, labels [B,L] (-100 = ignored), optional
    seg_masks [B,1,D,H,W]. Seg logits are computed for the whole batch (fixed shapes) and weighted."""
    out = model(batch["images"], batch["input_ids"], attention_mask=batch["attention_mask"],
                image_starts=batch.get("image_starts"))
    lm_loss, tokens = causal_lm_loss(out.logits, batch["labels"])
    metrics = {"lm_loss": lm_loss, "tokens": tokens}
    loss = lm_loss
    if model.seg_module is not None and "seg_masks" in batch:
        with_mask = batch["seg_masks"].reshape(batch["seg_masks"].shape[0], -1).sum(axis=1) > 0
        prompts, _ = model.seg_prompts(out.last_hidden_state, shift_left(batch["input_ids"], -1), rngs)
        bce, dice = segmentation_losses(model.segment(batch["images"], prompts), batch["seg_masks"])
        weight = with_mask.astype(jnp.float32)
        n = jnp.maximum(weight.sum(), 1)
        metrics.update(bce=(bce * weight).sum() / n, dice_loss=(dice * weight).sum() / n, seg_samples=weight.sum())
        loss = loss + metrics["bce"] + metrics["dice_loss"]
    metrics["loss"] = loss
    return loss, metrics


class LamedGeneration(NamedTuple):
    tokens: jax.Array  # [B, max_new_tokens]
    lengths: jax.Array  # [B]
    seg_logits: jax.Array | None  # [B, 1, D, H, W]; −inf for rows that emitted no [SEG]


def generate_lamed(model: Lamed, images, input_ids, *, attention_mask=None, config=None) -> LamedGeneration:
    """Answers left-padded prompts (BOS + <im_patch> × proj_out_num + text) about `images`.

    With a segmentation module, a `[SEG]` among the generated tokens prompts the mask decoder with the
    hidden state that predicted it (several are averaged), as the reference does — including its
    behaviour that a `[SEG]` emitted as the very first new token is not used. For many batches with one
    model, `LamedGenerator` walks the model once instead of at every call."""
    return LamedGenerator(model)(images, input_ids, attention_mask=attention_mask, config=config)


class LamedGenerator:
    """`generate_lamed` with the model split once (`nnx.split`: about 1–2 ms per call on the demo model),
    for a loop over many batches. The model must not change while the generator is used. Calls return
    as soon as the program is dispatched; reading the outputs waits for it."""

    def __init__(self, model: Lamed):
        self.model = model
        self.graphdef, self.state = nnx.split(model)

    def __call__(self, images, input_ids, *, attention_mask=None, config=None) -> LamedGeneration:
        ids = np.asarray(input_ids)
        mask, config = prepare_prompts(ids.shape, attention_mask, config or SamplingConfig(),
                                       self.model.language_model.config)
        starts = image_token_starts(ids, self.model.config)
        # host arrays go to the device in one call; an image batch already on devices stays as it is
        images = images if isinstance(images, jax.Array) else np.asarray(images)
        images, ids, starts, mask = jax.device_put((images, ids, starts, mask))
        embeds, out = _embed_and_generate(self.graphdef, config, self.state, ids, images, starts, mask)
        if self.model.seg_module is None:
            return LamedGeneration(out.tokens, out.lengths, None)
        seg_logits = _segment_generated(self.graphdef, self.state, images, embeds, mask, out.tokens, out.lengths)
        return LamedGeneration(out.tokens, out.lengths, seg_logits)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _embed_and_generate(graphdef, config: SamplingConfig, state, ids, images, starts, mask):
    """The spliced prompt embeddings and the generation after them, in one program (one dispatch per batch)."""
    model = nnx.merge(graphdef, state)
    embeds = model.embed(ids, images, starts)
    return embeds, decode(model.language_model, config, True, embeds, mask)


@jax.jit
def _segment_generated(graphdef, state, images, prompt_embeds, prompt_mask, tokens, lengths):
    model = nnx.merge(graphdef, state)
    steps = tokens.shape[1]
    generated_valid = jnp.arange(steps)[None] < lengths[:, None]
    embeds = jnp.concatenate([prompt_embeds, model.language_model.embed_tokens(tokens)], axis=1)
    full_mask = jnp.concatenate([prompt_mask, generated_valid.astype(prompt_mask.dtype)], axis=1)
    positions = jnp.maximum(jnp.cumsum(full_mask, axis=1) - 1, 0)
    hidden = model.language_model(inputs_embeds=embeds, attention_mask=full_mask,
                                  position_ids=positions).last_hidden_state[:, -steps:]
    next_tokens = jnp.where(jnp.roll(generated_valid, -1, axis=1), shift_left(tokens, -1), -1)
    prompts, has_seg = model.seg_prompts(hidden, next_tokens)
    logits = model.segment(images, prompts)
    return jnp.where(has_seg[:, None, None, None, None], logits, -jnp.inf)
