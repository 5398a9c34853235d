"""Key maps for HF Phi-3 (fused qkv_proj / gate_up_proj) and HF Llama checkpoints, and folder-level
load/export of a plain transformers causal-LM folder (config.json + safetensors)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from flax import nnx

from m3d_jax.convert.keymap import (
    LINEAR, FusedLinear, KeyMap, Linear, Reshape, Rule, write_state,
)
from m3d_jax.convert.kind import Kind, Part, Source
from m3d_jax.models.decoder import Decoder, DecoderConfig

_ATTN = "layers.self_attn"
_MLP = "layers.mlp"
_FLAT = Reshape(flatten=True)


def decoder_keymap(config: DecoderConfig) -> KeyMap:
    """torch ↔ JAX map of a Phi3ForCausalLM / LlamaForCausalLM state dict."""
    rules = [
        Rule("model.embed_tokens.weight", "embed_tokens.embedding"),
        Rule("model.layers.{layer}.input_layernorm.weight", "layers.input_layernorm.scale"),
        Rule("model.layers.{layer}.post_attention_layernorm.weight", "layers.post_attention_layernorm.scale"),
        Rule("model.layers.{layer}.self_attn.o_proj.weight", f"{_ATTN}.o_proj.kernel", Linear(n_in=2)),
        Rule("model.layers.{layer}.mlp.down_proj.weight", f"{_MLP}.down_proj.kernel", LINEAR),
        Rule("model.norm.weight", "norm.scale"),
    ]
    if config.architecture == "phi3":
        rules += [
            Rule("model.layers.{layer}.self_attn.qkv_proj.weight",
                 (f"{_ATTN}.q_proj.kernel", f"{_ATTN}.k_proj.kernel", f"{_ATTN}.v_proj.kernel"), FusedLinear()),
            Rule("model.layers.{layer}.mlp.gate_up_proj.weight",
                 (f"{_MLP}.gate_proj.kernel", f"{_MLP}.up_proj.kernel"), FusedLinear()),
        ]
        if config.attention_bias or config.mlp_bias:
            raise ValueError("Phi-3 checkpoints have no attention or MLP biases")
    else:
        for name in ("q_proj", "k_proj", "v_proj"):
            rules.append(Rule(f"model.layers.{{layer}}.self_attn.{name}.weight", f"{_ATTN}.{name}.kernel", LINEAR))
        for name in ("gate_proj", "up_proj"):
            rules.append(Rule(f"model.layers.{{layer}}.mlp.{name}.weight", f"{_MLP}.{name}.kernel", LINEAR))
        if config.attention_bias:
            rules += [Rule(f"model.layers.{{layer}}.self_attn.{n}.bias", f"{_ATTN}.{n}.bias", _FLAT)
                      for n in ("q_proj", "k_proj", "v_proj")]
            rules.append(Rule("model.layers.{layer}.self_attn.o_proj.bias", f"{_ATTN}.o_proj.bias"))
        if config.mlp_bias:
            rules += [Rule(f"model.layers.{{layer}}.mlp.{n}.bias", f"{_MLP}.{n}.bias")
                      for n in ("gate_proj", "up_proj", "down_proj")]
    ignored = [("model.layers.{layer}.self_attn.rotary_emb.inv_freq", "RoPE buffer recomputed from the config")]
    if config.tie_word_embeddings:
        ignored.append(("lm_head.weight", "tied to model.embed_tokens.weight"))
    else:
        rules.append(Rule("lm_head.weight", "lm_head.kernel", LINEAR))
    return KeyMap(f"decoder/{config.architecture}", tuple(rules), ignored=tuple(ignored))


def export_hf_decoder(
    model: Decoder, out_dir: str | os.PathLike, *, dtype=None, max_shard_bytes: int = 5 * 2**30
) -> list[Path]:
    """Writes a transformers folder (config.json + sharded safetensors) that `from_pretrained` loads."""
    config = model.config
    hf_config = config.to_hf()
    if dtype is not None:
        hf_config["torch_dtype"] = np.dtype(dtype).name
    return write_state(out_dir, decoder_keymap(config), nnx.state(model, nnx.Param), dtype=dtype,
                       config=hf_config, max_shard_bytes=max_shard_bytes)


def _recognise(source: Source) -> DecoderConfig | None:
    if source.hf is None or source.hf.get("model_type") not in ("phi3", "llama"):
        return None
    return KIND.parse(source.hf, source.path / "config.json")


KIND = Kind(
    "decoder", "Phi-3 / Llama language model", Decoder, DecoderConfig.from_hf, DecoderConfig.to_hf, _recognise,
    released="a transformers folder with model_type phi3 or llama", parts=(Part("", "", decoder_keymap),),
)
