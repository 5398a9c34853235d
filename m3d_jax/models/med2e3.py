"""Med-2E3: M3D-CLIP's 3D ViT and a 2D SigLIP slice encoder, fused by text-guided inter-slice scoring
(TG-IS), in front of a Phi-3 decoder.

volume [B, 1, D, H, W]
  3D: ViT (last block, BEFORE its final norm, cls dropped) → spatial pooling → MLP → x3d [B, 256, E]
  2D: every depth slice (channel ×3, raw [0, 1]) → SigLIP (last layer, before post_layernorm) → MLP
      → v2d [B, D, 256, E]
  TG-IS: question → BERT pooler → text_mlp → t [B, E]; slice j's summary = mean over [x3d tokens of its
      depth group ; v2d[j]]; scores = softmax_j(summary_j · t / temperature) (dropout in training);
      fused 2D = Σ_j scores_j · v2d[j] → [B, 256, E]
  visual tokens [x3d ; fused 2D] (512) replace a block of image placeholders in the prompt → Phi-3.

Module names follow the released folders (`llm`, `vision2d_model`, `vision2d_connector`,
`vision3d_model`, `vision3d_connector`), so the converter maps each folder to one sub-module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m3d_jax.config import dataclass_from_mapping
from m3d_jax.generate import SamplingConfig, generate
from m3d_jax.layers import Dense
from m3d_jax.models.clip import ClipConfig, M3DClip
from m3d_jax.models.decoder import Decoder, DecoderConfig
from m3d_jax.models.decoder_presets import phi3_mini_128k
from m3d_jax.models.lamed import causal_lm_loss, placeholder_starts, splice, visual_starts
from m3d_jax.models.projector import ProjectorConfig, SpatialPoolingProjector, mlp_layers, run_mlp
from m3d_jax.models.slice_encoder import SiglipVision, SiglipVisionConfig, encode_slices


@dataclasses.dataclass(frozen=True)
class Med2E3Config:
    """Sizes of the parts and of TG-IS (defaults: the released Med-2E3-M3D, exp_id 4).

    image_token_id: the placeholder id filling the visual block of a prompt (`<unk>`, 0, never produced by
      tokenizing text; the reference uses a sentinel −201 that it swaps for the 512 rows).
    vision3d_select_layer: which ViT block feeds the 3D branch (its output before the final norm).
    """

    vision3d: ClipConfig = ClipConfig()
    vision2d: SiglipVisionConfig = SiglipVisionConfig(select_post_norm=False)
    decoder: DecoderConfig = phi3_mini_128k()
    vision3d_select_layer: int = -1
    pooling_size: int = 2
    connector_layers: int = 2  # "mlp2x_gelu": Linear, GELU (erf), Linear
    score_temperature: float = 5.0
    score_dropout: float = 0.1
    image_token_id: int = 0
    max_length: int = 768

    def __post_init__(self):
        vision = self.vision3d.vision
        depth, height, width = vision.image_size
        if self.vision2d.image_size != height or height != width:
            raise ValueError(f"the slice encoder's image_size {self.vision2d.image_size} must equal the volume's "
                             f"H = W ({height} × {width})")
        if depth % self.num_slice_groups:
            raise ValueError(f"{depth} slices do not split into {self.num_slice_groups} depth groups")

    @property
    def projector(self) -> ProjectorConfig:
        vision = self.vision3d.vision
        return ProjectorConfig(grid=vision.grid, in_dim=vision.hidden_size, out_dim=self.decoder.hidden_size,
                               layer_type="mlp", layer_num=self.connector_layers, pooling_type="spatial",
                               pooling_size=self.pooling_size, dtype=self.decoder.dtype,
                               param_dtype=self.decoder.param_dtype)

    @property
    def num_slices(self) -> int:
        return self.vision3d.vision.image_size[0]

    @property
    def num_slice_groups(self) -> int:
        """Pooled depth positions of the 3D tokens (4): slice j belongs to group j // (slices / groups)."""
        return self.vision3d.vision.grid[0] // self.pooling_size

    @property
    def num_3d_tokens(self) -> int:
        return self.projector.proj_out_num

    @property
    def num_2d_tokens(self) -> int:
        return self.vision2d.num_patches

    @property
    def num_visual_tokens(self) -> int:
        """Rows spliced into the prompt (512)."""
        return self.num_3d_tokens + self.num_2d_tokens

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Med2E3Config:
        """From nested mappings (`vision3d` as ClipConfig's, `vision2d`, `decoder`)."""
        values = dict(values)
        values["vision3d"] = ClipConfig.from_dict(values.get("vision3d", {}))
        values["vision2d"] = SiglipVisionConfig.from_dict({"select_post_norm": False, **values.get("vision2d", {})})
        values["decoder"] = DecoderConfig.from_dict(values.get("decoder", {}))
        return dataclass_from_mapping(cls, values)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **decoder_overrides: Any) -> Med2E3Config:
        """From the released root `config.json` (or `args/config.json`): MedMLLMConfig with nested
        `llm_config`, `vision2d_model_config`, `vision3d_model_config` and connector configs."""
        missing = [k for k in ("llm_config", "vision2d_model_config", "vision3d_model_config") if k not in hf]
        if missing:
            raise ValueError(f"Med-2E3 config lacks {missing}; expected the MedMLLMConfig with nested configs")
        connector = hf.get("vision3d_connector_config", {}).get("connector_type", hf.get("vision3d_connector_type"))
        if connector and connector != "spatial_pooling_score15_mlp2x_gelu":
            raise ValueError(f"unsupported Med-2E3 3D connector {connector!r} (spatial_pooling_score15_mlp2x_gelu)")
        if hf.get("vision2d_select_feature", "cls_patch") != "cls_patch" or hf.get(
                "vision3d_select_feature", "patch") != "patch":
            raise ValueError("Med-2E3 config: only vision2d_select_feature=cls_patch and "
                             "vision3d_select_feature=patch (the released setting) are supported")
        extra = hf.get("m3d_jax", {})  # what the reference hard-codes, written by to_hf for other sizes
        return cls(
            vision3d=ClipConfig.from_hf(hf["vision3d_model_config"]),
            vision2d=SiglipVisionConfig.from_hf(hf["vision2d_model_config"], select_layer=hf.get("vision2d_select_layer", -1),
                                                select_post_norm=False),
            decoder=DecoderConfig.from_hf(hf["llm_config"], **decoder_overrides),
            vision3d_select_layer=hf.get("vision3d_select_layer", -1),
            max_length=hf.get("llm_max_length", 768), **extra,
        )

    def to_hf(self) -> dict[str, Any]:
        """The released root `config.json` (MedMLLMConfig, exp_id 4) with nested configs."""
        hidden = self.decoder.hidden_size
        return dict(
            model_type="medmllm", exp_id=4, llm_type="phi3", llm_max_length=self.max_length, llm_padding_side="right",
            vision2d_model_type="siglip", vision2d_select_layer=self.vision2d.select_layer,
            vision2d_select_feature="cls_patch", vision2d_connector_type="mlp2x_gelu",
            vision3d_model_type="m3d", vision3d_select_layer=self.vision3d_select_layer,
            vision3d_select_feature="patch", vision3d_connector_type="spatial_pooling_score15_mlp2x_gelu",
            hidden_size=hidden, llm_config=self.decoder.to_hf(), vision2d_model_config=self.vision2d.to_hf(),
            vision3d_model_config=self.vision3d.to_hf(),
            vision2d_connector_config=dict(connector_type="mlp2x_gelu", input_dim=self.vision2d.hidden_size,
                                           output_dim=hidden),
            vision3d_connector_config=dict(connector_type="spatial_pooling_score15_mlp2x_gelu",
                                           input_dim=self.vision3d.vision.hidden_size, output_dim=hidden,
                                           img_size=list(self.vision3d.vision.image_size),
                                           patch_size=list(self.vision3d.vision.patch_size)),
            m3d_jax=dict(pooling_size=self.pooling_size, connector_layers=self.connector_layers,
                         score_temperature=self.score_temperature, score_dropout=self.score_dropout,
                         image_token_id=self.image_token_id),
        )


class Connector(nnx.Module):
    """Linear → (GELU → Linear)*: the reference's `mlpNx_gelu` connectors (Sequential indices 0, 2, ...)."""

    def __init__(self, in_dim: int, out_dim: int, num_layers: int, *, rngs: nnx.Rngs, **dtypes):
        self.layers = mlp_layers(in_dim, out_dim, num_layers, rngs=rngs, **dtypes)

    def __call__(self, x: jax.Array) -> jax.Array:
        return run_mlp(self.layers, x)


class Vision3DConnector(nnx.Module):
    """Spatial pooling + MLP (`_connector`), and `text_mlp` projecting the question for TG-IS."""

    def __init__(self, config: Med2E3Config, *, rngs: nnx.Rngs):
        dtypes = config.decoder.dtypes()
        self.projector = SpatialPoolingProjector(config.projector, rngs=rngs)
        self.text_mlp = Dense(config.vision3d.text.hidden_size, config.decoder.hidden_size, axes=("mlp2", "embed"),
                              rngs=rngs, **dtypes)


class VisualTokens(NamedTuple):
    tokens: jax.Array  # [B, 512, E]: [x3d ; fused 2D]
    slice_scores: jax.Array  # [B, num_slices], summing to 1 (before dropout)


class Med2E3Output(NamedTuple):
    logits: jax.Array  # [B, L, vocab] float32
    slice_scores: jax.Array  # [B, num_slices]


def slice_scores(x3d: jax.Array, v2d: jax.Array, text: jax.Array, groups: int, temperature: float) -> jax.Array:
    """TG-IS scores [B, S]: slice j's summary is the mean over the 3D tokens of its depth group and its
    own 2D tokens; its logit is summary · text / temperature; softmax over the S slices.

    x3d [B, N3, E] (depth-major, `groups` depth positions), v2d [B, S, N2, E], text [B, E]."""
    batch, slices, n2, width = v2d.shape
    group_sums = x3d.astype(jnp.float32).reshape(batch, groups, -1, width).sum(axis=2)  # [B, G, E]
    per_slice_3d = jnp.repeat(group_sums, slices // groups, axis=1)  # slice j ↔ group j // (S / G)
    count = x3d.shape[1] // groups + n2
    summaries = (per_slice_3d + v2d.astype(jnp.float32).sum(axis=2)) / count  # [B, S, E]
    logits = jnp.einsum("bse,be->bs", summaries, text.astype(jnp.float32)) / temperature
    return jax.nn.softmax(logits, axis=1)


class Med2E3(nnx.Module):
    def __init__(self, config: Med2E3Config, *, rngs: nnx.Rngs):
        self.config = config
        dtypes = config.decoder.dtypes()
        self.llm = Decoder(config.decoder, rngs=rngs)
        self.vision2d_model = SiglipVision(config.vision2d, rngs=rngs)
        self.vision2d_connector = Connector(config.vision2d.hidden_size, config.decoder.hidden_size,
                                            config.connector_layers, rngs=rngs, **dtypes)
        self.vision3d_model = M3DClip(config.vision3d, rngs=rngs)
        self.vision3d_connector = Vision3DConnector(config, rngs=rngs)

    def visual_tokens(self, images: jax.Array, question_ids: jax.Array, question_mask: jax.Array,
                      rngs: nnx.Rngs | None = None) -> VisualTokens:
        """images [B, 1, D, H, W] in [0, 1]; question_ids / question_mask [B, Lq] (BERT tokens of the
        question alone). `rngs` (training) applies the score dropout."""
        config = self.config
        hidden = self.vision3d_model.vision_encoder(images, output_hidden_states=True).hidden_states
        x3d = self.vision3d_connector.projector(hidden[config.vision3d_select_layer][:, 1:])  # [B, 256, E]
        slices_2d = encode_slices(self.vision2d_model, images)  # [B, D, 256, C2]
        v2d = self.vision2d_connector(slices_2d)  # [B, D, 256, E]
        pooled = self.vision3d_model.language_encoder(question_ids, question_mask).pooled
        text = self.vision3d_connector.text_mlp(pooled)  # [B, E]
        scores = slice_scores(x3d, v2d, text, config.num_slice_groups, config.score_temperature)
        weights = scores
        if rngs is not None and config.score_dropout > 0:
            keep = jax.random.bernoulli(rngs.dropout(), 1 - config.score_dropout, scores.shape)
            weights = jnp.where(keep, scores / (1 - config.score_dropout), 0.0)
        fused = jnp.einsum("bs,bsne->bne", weights.astype(v2d.dtype), v2d)  # [B, 256, E]
        return VisualTokens(jnp.concatenate([x3d, fused.astype(x3d.dtype)], axis=1), scores)

    def embed(self, input_ids: jax.Array, visual: jax.Array, image_starts: jax.Array | None = None) -> jax.Array:
        """Token embeddings with the visual rows spliced over each row's placeholder block (`image_starts` as
        m3d_jax.models.lamed.visual_starts takes it)."""
        starts = visual_starts(input_ids, image_starts, lambda ids: image_placeholder_starts(ids, self.config))
        return splice(self.llm.embed_tokens(input_ids), visual, starts)

    def __call__(self, images, input_ids, question_ids, question_mask, *, attention_mask=None, image_starts=None,
                 rngs: nnx.Rngs | None = None) -> Med2E3Output:
        visual = self.visual_tokens(images, question_ids, question_mask, rngs)
        embeds = self.embed(input_ids, visual.tokens, image_starts)
        out = self.llm(inputs_embeds=embeds, attention_mask=attention_mask)
        return Med2E3Output(out.logits, visual.slice_scores)


def image_placeholder_starts(input_ids: np.ndarray, config: Med2E3Config) -> np.ndarray:
    """Where each row's block of `num_visual_tokens` placeholder ids starts (ValueError naming the row)."""
    return placeholder_starts(input_ids, config.image_token_id, config.num_visual_tokens,
                              f"prompt text + placeholder ({config.image_token_id}) × {config.num_visual_tokens} + "
                              "text (see m3d_jax.data.med2e3_samples)")


def med2e3_loss(model: Med2E3, batch: Mapping[str, jax.Array], rngs: nnx.Rngs | None = None):
    """Causal-LM cross-entropy over the supervised answer tokens. Returns (loss, metrics)."""
    out = model(batch["images"], batch["input_ids"], batch["question_ids"], batch["question_mask"],
                attention_mask=batch["attention_mask"], image_starts=batch.get("image_starts"), rngs=rngs)
    loss, tokens = causal_lm_loss(out.logits, batch["labels"])
    # How peaked the slice scores are: 0 for uniform, log(S) for one slice.
    entropy = -(out.slice_scores * jnp.log(jnp.maximum(out.slice_scores, 1e-12))).sum(axis=1).mean()
    return loss, {"loss": loss, "lm_loss": loss, "tokens": tokens,
                  "slice_score_sharpness": jnp.log(out.slice_scores.shape[1]) - entropy}


class Med2E3Generation(NamedTuple):
    tokens: jax.Array  # [B, max_new_tokens]
    lengths: jax.Array  # [B]
    slice_scores: jax.Array  # [B, num_slices]


def generate_med2e3(model: Med2E3, images, input_ids, question_ids, question_mask, *, attention_mask=None,
                    config=None) -> Med2E3Generation:
    """Answers left-padded prompts (see `m3d_jax.data.med2e3_samples.prompt_ids`) about `images`; the
    questions alone, in BERT tokens, drive the slice scores."""
    config = config or SamplingConfig()
    ids = np.asarray(input_ids)
    mask = np.ones(ids.shape, np.int32) if attention_mask is None else np.asarray(attention_mask, np.int32)
    starts = jnp.asarray(image_placeholder_starts(ids, model.config))
    graphdef, state = nnx.split(model)
    embeds, scores = _prompt_embeds(graphdef, state, jnp.asarray(images), jnp.asarray(ids), jnp.asarray(question_ids),
                                    jnp.asarray(question_mask), starts)
    out = generate(model.llm, inputs_embeds=embeds, attention_mask=mask, config=config)
    return Med2E3Generation(out.tokens, out.lengths, scores)


@jax.jit
def _prompt_embeds(graphdef, state, images, ids, question_ids, question_mask, starts):
    model = nnx.merge(graphdef, state)
    visual = model.visual_tokens(images, question_ids, question_mask)
    return model.embed(ids, visual.tokens, starts), visual.slice_scores
