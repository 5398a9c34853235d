"""The decoder LLM family of M3D-LaMed and Med-2E3: Phi-3 and Llama (2 and 3) in one NNX module.

Pre-norm blocks x + attn(rmsnorm(x)); x + mlp(rmsnorm(x)) with grouped-query attention, rotate-half RoPE
(none / longrope / llama3 scaling), a SiLU-gated MLP, a final RMSNorm and a tied or separate LM head.
Phi-3 and Llama differ only in their checkpoint layout (fused qkv / gate_up), handled by the converter.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from m3d_jax.config import ComputeOptions, dataclass_from_mapping
from m3d_jax.layers import Dense, run_stack, stacked
from m3d_jax.layers.stack import unstack
from m3d_jax.layers.attention import CausalSelfAttention, KVCache, causal_mask
from m3d_jax.layers.embed import Embed
from m3d_jax.layers.mlp import GatedMlp
from m3d_jax.layers.norms import RMSNorm
from m3d_jax.layers.params import canonical_dtype
from m3d_jax.layers.rope import RopeConfig, rope_tables
from m3d_jax.sharding import RESIDUAL, constrain


@dataclasses.dataclass(frozen=True)
class DecoderConfig(ComputeOptions):
    """Decoder hyper-parameters; `from_hf` reads a transformers `config.json`, `to_hf` writes one."""

    architecture: Literal["phi3", "llama"] = "phi3"
    vocab_size: int = 32064
    hidden_size: int = 3072
    intermediate_size: int = 8192
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 96
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    sliding_window: int = 0  # 0 = full causal attention
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    hidden_act: str = "silu"
    rope_type: str = "default"  # default | longrope | llama3
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 1.0
    rope_attention_factor: float = 1.0
    rope_original_max_position_embeddings: int = 0
    rope_short_factor: tuple[float, ...] = ()
    rope_long_factor: tuple[float, ...] = ()
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0
    rope_high_freq_factor: float = 4.0
    bos_token_id: int = 1
    eos_token_ids: tuple[int, ...] = (32000,)
    pad_token_id: int = 32000

    def __post_init__(self):
        super().__post_init__()
        for name in ("rope_short_factor", "rope_long_factor", "eos_token_ids"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.architecture not in ("phi3", "llama"):
            raise ValueError(f"architecture must be 'phi3' or 'llama', got {self.architecture!r}")
        self.rope  # validates the RoPE fields

    @property
    def rope(self) -> RopeConfig:
        return RopeConfig(
            rotary_dim=int(self.head_dim * self.partial_rotary_factor), theta=self.rope_theta,
            rope_type=self.rope_type, attention_factor=self.rope_attention_factor,
            original_max_position_embeddings=self.rope_original_max_position_embeddings,
            short_factor=self.rope_short_factor, long_factor=self.rope_long_factor, factor=self.rope_factor,
            low_freq_factor=self.rope_low_freq_factor, high_freq_factor=self.rope_high_freq_factor,
        )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> DecoderConfig:
        """From a mapping of this class's fields (e.g. a ConfigDict), naming unknown keys."""
        return dataclass_from_mapping(cls, values)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **overrides: Any) -> DecoderConfig:
        """From a transformers Phi-3 / Llama `config.json` dict (rope_scaling or rope_parameters form)."""
        model_type = hf.get("model_type", "")
        if model_type in ("phi3", "lamed_phi3") or "phi3" in model_type:
            architecture = "phi3"
        elif "llama" in model_type:
            architecture = "llama"
        else:
            raise ValueError(f"unsupported decoder model_type {model_type!r} (phi3 or llama)")
        num_heads = hf["num_attention_heads"]
        head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
        rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        rope_type = {"su": "longrope"}.get(rope_type, rope_type)
        theta = float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
        partial = float(rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
        fields: dict[str, Any] = {}
        if rope_type == "longrope":
            original = rope.get("original_max_position_embeddings") or hf["original_max_position_embeddings"]
            factor = rope.get("factor") or hf["max_position_embeddings"] / original
            attention_factor = rope.get("attention_factor")
            if attention_factor is None:
                attention_factor = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
            fields = dict(rope_original_max_position_embeddings=original, rope_factor=float(factor),
                          rope_attention_factor=float(attention_factor),
                          rope_short_factor=tuple(rope["short_factor"]), rope_long_factor=tuple(rope["long_factor"]))
        elif rope_type == "llama3":
            fields = dict(rope_original_max_position_embeddings=rope["original_max_position_embeddings"],
                          rope_factor=float(rope["factor"]), rope_low_freq_factor=float(rope["low_freq_factor"]),
                          rope_high_freq_factor=float(rope["high_freq_factor"]))
        elif rope_type != "default":
            raise ValueError(f"unsupported RoPE scaling {rope_type!r} (default, longrope, llama3)")
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        pad = hf.get("pad_token_id")
        values = dict(
            architecture=architecture, vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"], num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads, head_dim=head_dim,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6), max_position_embeddings=hf["max_position_embeddings"],
            sliding_window=hf.get("sliding_window") or 0, tie_word_embeddings=hf.get("tie_word_embeddings", False),
            attention_bias=hf.get("attention_bias", False), mlp_bias=hf.get("mlp_bias", False),
            hidden_act=hf.get("hidden_act", "silu"), rope_type=rope_type, rope_theta=theta,
            partial_rotary_factor=partial, bos_token_id=hf.get("bos_token_id", 1), eos_token_ids=eos_ids,
            pad_token_id=pad if pad is not None else (eos_ids[0] if eos_ids else 0), **fields,
        )
        values.update(overrides)
        return cls(**values)

    def to_hf(self) -> dict[str, Any]:
        """A transformers `config.json` dict (Phi3ForCausalLM or LlamaForCausalLM)."""
        hf: dict[str, Any] = dict(
            vocab_size=self.vocab_size, hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads, head_dim=self.head_dim, rms_norm_eps=self.rms_norm_eps,
            max_position_embeddings=self.max_position_embeddings, tie_word_embeddings=self.tie_word_embeddings,
            hidden_act=self.hidden_act, rope_theta=self.rope_theta, bos_token_id=self.bos_token_id,
            eos_token_id=(list(self.eos_token_ids) if len(self.eos_token_ids) > 1
                          else self.eos_token_ids[0] if self.eos_token_ids else None),
            pad_token_id=self.pad_token_id, torch_dtype="float32",
        )
        if self.partial_rotary_factor != 1.0:
            hf["partial_rotary_factor"] = self.partial_rotary_factor
        if self.rope_type == "longrope":
            hf["original_max_position_embeddings"] = self.rope_original_max_position_embeddings
            hf["rope_scaling"] = dict(
                rope_type="longrope", short_factor=list(self.rope_short_factor),
                long_factor=list(self.rope_long_factor), factor=self.rope_factor,
                attention_factor=self.rope_attention_factor,
                original_max_position_embeddings=self.rope_original_max_position_embeddings,
            )
        elif self.rope_type == "llama3":
            hf["rope_scaling"] = dict(
                rope_type="llama3", factor=self.rope_factor, low_freq_factor=self.rope_low_freq_factor,
                high_freq_factor=self.rope_high_freq_factor,
                original_max_position_embeddings=self.rope_original_max_position_embeddings,
            )
        if self.architecture == "phi3":
            hf.update(model_type="phi3", architectures=["Phi3ForCausalLM"],
                      sliding_window=self.sliding_window or None,
                      original_max_position_embeddings=self.rope_original_max_position_embeddings
                      or self.max_position_embeddings)
        else:
            hf.update(model_type="llama", architectures=["LlamaForCausalLM"], attention_bias=self.attention_bias,
                      mlp_bias=self.mlp_bias)
        return hf


class DecoderOutput(NamedTuple):
    logits: jax.Array  # [B, T, vocab] float32 (T = 1 with logits_at)
    hidden_states: tuple[jax.Array, ...] | None  # HF convention: embeddings, layers 1..L-1, final-normed output
    cache: KVCache | None
    last_hidden_state: jax.Array  # [B, T, D] after the final norm (the LM head's input)


class DecoderLayer(nnx.Module):
    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
        dtypes = config.dtypes()
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, rngs=rngs, **dtypes)
        self.self_attn = CausalSelfAttention(
            config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim,
            use_bias=config.attention_bias, implementation=config.attention_impl, rngs=rngs, **dtypes,
        )
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, rngs=rngs, **dtypes)
        self.mlp = GatedMlp(config.hidden_size, config.intermediate_size, act=config.hidden_act,
                            use_bias=config.mlp_bias, rngs=rngs, **dtypes)

    def __call__(self, x, layer_cache=None, *, cos, sin, mask, cache_index):
        """Returns x, or (x, updated layer cache) when a layer cache (key, value) is given."""
        attended, new_cache = self.self_attn(
            self.input_layernorm(x), cos=cos, sin=sin, mask=mask, cache=layer_cache, cache_index=cache_index
        )
        x = constrain(x + attended, RESIDUAL)
        x = constrain(x + self.mlp(self.post_attention_layernorm(x)), RESIDUAL)
        return x if layer_cache is None else (x, new_cache)


class Decoder(nnx.Module):
    """Causal LM. Call with token ids or `inputs_embeds` [B, T, D] (for spliced image features)."""

    def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtypes = config.dtypes()
        self.embed_tokens = Embed(config.vocab_size, config.hidden_size, rngs=rngs, **dtypes)
        self.layers = stacked(lambda layer_rngs: DecoderLayer(config, rngs=layer_rngs), config.num_layers, rngs)
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, rngs=rngs, **dtypes)
        self.lm_head = None if config.tie_word_embeddings else Dense(
            config.hidden_size, config.vocab_size, axes=("embed", "vocab"), use_bias=False, rngs=rngs, **dtypes
        )

    def unstack_layers(self) -> None:
        """Switches to per-layer parameter arrays for decoding (see `layers.stack.unstack`). Use on a
        model merged inside the jitted decode function, before its loop."""
        self.layers = unstack(self.layers, self.config.num_layers)

    def init_cache(self, batch: int, slots: int) -> KVCache:
        """An empty KV cache with `slots` positions per row, in the compute dtype (one buffer per layer
        after `unstack_layers`)."""
        c = self.config
        return KVCache.zeros(c.num_layers, batch, slots, c.num_kv_heads, c.head_dim, canonical_dtype(c.dtype),
                             per_layer=isinstance(self.layers, nnx.List))

    def __call__(
        self,
        input_ids: jax.Array | None = None,
        *,
        inputs_embeds: jax.Array | None = None,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        cache: KVCache | None = None,
        output_hidden_states: bool = False,
        logits_at: int | jax.Array | None = None,
    ) -> DecoderOutput:
        """attention_mask [B, T]: 1 for tokens, 0 for padding (left or right). position_ids default to
        the count of real tokens before each one (so left padding does not shift positions); with a
        cache they must be given. With `cache`, the T new tokens go to slots cache.index .. index+T−1.
        `logits_at` (e.g. -1) computes logits for that one position only: [B, 1, vocab]."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        x = self.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds.astype(self.embed_tokens.dtype)
        x = constrain(x, RESIDUAL)
        batch, length = x.shape[:2]
        token_valid = jnp.ones((batch, length), bool) if attention_mask is None else attention_mask.astype(bool)
        if cache is None:
            if position_ids is None:
                position_ids = jnp.maximum(jnp.cumsum(token_valid, axis=1) - 1, 0)
            slots = jnp.arange(length)
            mask = causal_mask(slots, slots, token_valid, self.config.sliding_window)
            per_layer, cache_index = None, None
        else:
            if position_ids is None:
                raise ValueError("position_ids are required with a KV cache")
            cache_index = cache.index
            valid = jax.lax.dynamic_update_slice_in_dim(cache.valid, token_valid, cache_index, axis=1)
            query_slots = cache_index + jnp.arange(length)
            mask = causal_mask(query_slots, jnp.arange(cache.valid.shape[1]), valid, self.config.sliding_window)
            per_layer = list(zip(cache.key, cache.value)) if isinstance(cache.key, tuple) else (cache.key, cache.value)
        cos, sin = rope_tables(self.config.rope, position_ids)
        embeddings = x

        x, hidden, new_kv = run_stack(
            self.layers, x, num_layers=self.config.num_layers, scan=self.config.scan_layers,
            remat=self.config.remat, collect=output_hidden_states, per_layer=per_layer,
            cos=cos, sin=sin, mask=mask, cache_index=cache_index,
        )
        if isinstance(new_kv, list):
            cache = KVCache(tuple(k for k, _ in new_kv), tuple(v for _, v in new_kv), valid, cache_index + length)
        elif cache is not None:
            cache = KVCache(new_kv[0], new_kv[1], valid, cache_index + length)
        x = self.norm(x)
        last_hidden_state = x
        hidden_states = None
        if output_hidden_states:
            hidden_states = (embeddings, *hidden[:-1], x)
        if logits_at is not None:
            x = jax.lax.dynamic_slice_in_dim(x, jnp.asarray(logits_at) % length, 1, axis=1)
        logits = constrain(self.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x),
                           ("batch", None, "vocab"))
        return DecoderOutput(logits.astype(jnp.float32), hidden_states, cache, last_hidden_state)
