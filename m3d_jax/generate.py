"""Batched text generation with a preallocated KV cache: one jitted prefill + `lax.while_loop` decode.

Shapes are fixed by (batch, prompt length, max_new_tokens), so decoding never recompiles per step.
Prompts are LEFT-padded to a common length (use `left_pad`); the prompt may be given as token ids or
as `inputs_embeds` (how images enter M3D-LaMed and Med-2E3).

LongRoPE models (Phi-3-128k) follow transformers' Phi-3 `generate`: when the sequence first grows past
`original_max_position_embeddings`, the cache is rebuilt by one full forward over the sequence so far,
so every key is rotated with the long factors from then on.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m3d_jax.models.decoder import Decoder


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0  # 1 = no nucleus filter
    eos_token_ids: tuple[int, ...] | None = None  # None = the model config's
    pad_token_id: int | None = None  # None = the model config's
    seed: int = 42


class GenerateOutput(NamedTuple):
    tokens: jax.Array  # [B, max_new_tokens] int32, pad_token_id after a row's EOS
    lengths: jax.Array  # [B] generated tokens per row, EOS included


PROMPT_BUCKET = 64
"""Prompts for generation are left-padded to a multiple of this many tokens (`left_pad(..., multiple=)`): one
compiled program per bucket, not per prompt length."""


def left_pad(prompts: Sequence[Sequence[int]], pad_token_id: int, multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Token lists → (ids [B, P], attention_mask [B, P]) padded on the left, P the longest prompt rounded up
    to a multiple of `multiple` (a few prompt-length buckets: a jitted generate compiles once per bucket)."""
    length = -(-max(len(p) for p in prompts) // multiple) * multiple
    ids = np.full((len(prompts), length), pad_token_id, np.int32)
    mask = np.zeros((len(prompts), length), np.int32)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            ids[row, length - len(prompt):] = prompt
            mask[row, length - len(prompt):] = 1
    return ids, mask


def sample_logits(logits: jax.Array, rng: jax.Array, config: SamplingConfig) -> jax.Array:
    """[B, V] float logits → [B] int32 tokens by greedy, temperature, top-k and top-p sampling."""
    if config.temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / config.temperature
    if config.top_k > 0:
        kth = jax.lax.top_k(logits, config.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if config.top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        remove_sorted = cumulative - jax.nn.softmax(sorted_logits, axis=-1) >= config.top_p  # keeps ≥ 1 token
        remove = jnp.zeros_like(remove_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(remove_sorted)
        logits = jnp.where(remove, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def generate(
    model: Decoder,
    input_ids: jax.Array | np.ndarray | None = None,
    *,
    attention_mask: jax.Array | np.ndarray | None = None,
    inputs_embeds: jax.Array | None = None,
    config: SamplingConfig = SamplingConfig(),
) -> GenerateOutput:
    """Generates up to `config.max_new_tokens` tokens after left-padded prompts."""
    prompt = input_ids if inputs_embeds is None else inputs_embeds
    if prompt is None or (input_ids is not None and inputs_embeds is not None):
        raise ValueError("pass exactly one of input_ids and inputs_embeds")
    mask, resolved = prepare_prompts(prompt.shape[:2], attention_mask, config, model.config)
    graphdef, state = nnx.split(model)
    return _generate(graphdef, resolved, inputs_embeds is not None, state, jnp.asarray(prompt), jnp.asarray(mask))


def prepare_prompts(shape: tuple[int, int], attention_mask, config: SamplingConfig,
                    decoder_config) -> tuple[np.ndarray, SamplingConfig]:
    """(the [B, T] int32 mask, checked left-padded; `config` with the decoder's EOS and pad ids filled in)."""
    mask = np.ones(shape, np.int32) if attention_mask is None else np.asarray(attention_mask, np.int32)
    if np.any(np.diff(mask, axis=1) < 0):
        raise ValueError("prompts must be left-padded (attention_mask rows 0…0 1…1); see generate.left_pad")
    eos = config.eos_token_ids if config.eos_token_ids is not None else decoder_config.eos_token_ids
    pad = config.pad_token_id if config.pad_token_id is not None else decoder_config.pad_token_id
    return mask, dataclasses.replace(config, eos_token_ids=tuple(eos), pad_token_id=pad)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _generate(graphdef, config: SamplingConfig, from_embeds: bool, state, prompt, mask) -> GenerateOutput:
    return decode(nnx.merge(graphdef, state), config, from_embeds, prompt, mask)


def decode(model: Decoder, config: SamplingConfig, from_embeds: bool, prompt, mask) -> GenerateOutput:
    """`generate`'s traced body (inside a jit): prefill, then one `lax.while_loop` of decoding steps.
    `config` comes from `prepare_prompts`; `model` is a traced copy (its layers get unstacked)."""
    model.unstack_layers()  # slice the stacked parameters once, not at every decode step
    batch, length = mask.shape
    max_new = config.max_new_tokens
    slots = length + max_new
    cache = model.init_cache(batch, slots)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    prompt_embeds = prompt if from_embeds else model.embed_tokens(prompt)
    out = model(inputs_embeds=prompt_embeds, attention_mask=mask, position_ids=positions, cache=cache, logits_at=-1)
    eos = jnp.asarray(config.eos_token_ids, jnp.int32)
    rope = model.config.rope
    switch_slot = rope.original_max_position_embeddings if rope.rope_type == "longrope" else -1
    rebuild_possible = length <= switch_slot < slots

    def incremental(step, tokens, cache, next_position):
        token = tokens[:, step]
        out = model(token[:, None], attention_mask=jnp.ones((batch, 1), jnp.int32),
                    position_ids=next_position[:, None], cache=cache, logits_at=-1)
        return out.logits[:, -1], out.cache

    def rebuild(step, tokens, cache, next_position):
        # One full forward over prompt + tokens[:step + 1] (fixed shape: later slots are masked out).
        embeds = jnp.concatenate([prompt_embeds, model.embed_tokens(tokens)], axis=1)
        full_mask = jnp.concatenate([mask, jnp.broadcast_to(jnp.arange(max_new) <= step, (batch, max_new))], axis=1)
        full_positions = jnp.maximum(jnp.cumsum(full_mask, axis=1) - 1, 0)
        out = model(inputs_embeds=embeds, attention_mask=full_mask, position_ids=full_positions,
                    cache=model.init_cache(batch, slots), logits_at=length + step)
        fresh = out.cache._replace(index=jnp.asarray(length + step + 1, jnp.int32))
        return out.logits[:, -1], fresh

    def keep_going(carry):
        step, _, _, done, _, _ = carry
        return (step < max_new) & ~jnp.all(done)

    def decode_step(carry):
        step, tokens, cache, done, logits, next_position = carry
        token = sample_logits(logits, jax.random.fold_in(jax.random.key(config.seed), step), config)
        token = jnp.where(done, config.pad_token_id, token)
        tokens = tokens.at[:, step].set(token)
        done = done | jnp.isin(token, eos)
        if rebuild_possible:
            logits, cache = jax.lax.cond(cache.index == switch_slot, rebuild, incremental,
                                         step, tokens, cache, next_position)
        else:
            logits, cache = incremental(step, tokens, cache, next_position)
        return step + 1, tokens, cache, done, logits, next_position + 1

    tokens = jnp.full((batch, max_new), config.pad_token_id, jnp.int32)
    carry = (jnp.int32(0), tokens, out.cache, jnp.zeros((batch,), bool), out.logits[:, -1], positions[:, -1] + 1)
    _, tokens, _, _, _, _ = jax.lax.while_loop(keep_going, decode_step, carry)
    is_eos = jnp.isin(tokens, eos)
    first_eos = jnp.where(is_eos.any(axis=1), jnp.argmax(is_eos, axis=1) + 1, max_new)
    return GenerateOutput(tokens, first_eos.astype(jnp.int32))
