"""Phi-3 / Llama decoder against transformers: logits and every hidden state, padding, KV-cache
generation, inputs_embeds, checkpoint round trips and full-size parameter counts."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

from m3d_jax.convert import read_released
from m3d_jax.convert.decoder import export_hf_decoder
from m3d_jax.generate import SamplingConfig, generate, left_pad, sample_logits
from m3d_jax.models.decoder import Decoder, DecoderConfig
from m3d_jax.models.decoder_presets import PRESETS

VOCAB = 256
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3, max_position_embeddings=128,
              pad_token_id=0, bos_token_id=1, eos_token_id=2)
HF_CASES = {
    "phi3": lambda: Phi3ForCausalLM(Phi3Config(**COMMON, num_attention_heads=4, num_key_value_heads=4)),
    "phi3_longrope": lambda: Phi3ForCausalLM(Phi3Config(
        **COMMON, num_attention_heads=4, num_key_value_heads=4, original_max_position_embeddings=16,
        rope_scaling={"type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(8)],
                      "long_factor": [2.0 + 0.7 * i for i in range(8)]})),
    "phi3_sliding_window": lambda: Phi3ForCausalLM(Phi3Config(
        **COMMON, num_attention_heads=4, num_key_value_heads=4, sliding_window=7)),
    "llama_gqa": lambda: LlamaForCausalLM(LlamaConfig(**COMMON, num_attention_heads=8, num_key_value_heads=2)),
    "llama3_scaling": lambda: LlamaForCausalLM(LlamaConfig(
        **COMMON, num_attention_heads=4, num_key_value_heads=2, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 32})),
    "llama_tied_bias": lambda: LlamaForCausalLM(LlamaConfig(
        **COMMON, num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True, attention_bias=True,
        mlp_bias=True)),
}


def _hf_model(case: str, seed: int = 0) -> torch.nn.Module:
    """A tiny transformers model with weights large enough that greedy decoding is not degenerate."""
    torch.manual_seed(seed)
    model = HF_CASES[case]().eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "norm" in name:
                parameter.copy_(1.0 + 0.1 * torch.randn_like(parameter))
            else:
                parameter.normal_(0.0, 0.2 if "embed" in name or "lm_head" in name else 0.08)
    return model


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """case → (hf model, jax model), converted through a saved transformers folder."""
    cache = {}

    def get(case):
        if case not in cache:
            hf = _hf_model(case)
            folder = tmp_path_factory.mktemp(case)
            hf.save_pretrained(folder)
            model, _ = read_released(folder, expect="decoder")
            cache[case] = (hf, model, folder)
        return cache[case]

    return get


def _max_err(ours, ref) -> float:
    return float(np.max(np.abs(np.asarray(ours, np.float32) - ref.detach().float().numpy())))


@pytest.mark.parametrize("case", sorted(HF_CASES))
def test_logits_and_every_hidden_state_match_transformers(case, converted, rng):
    hf, model, _ = converted(case)
    length = 24  # longer than the longrope switch (16) and the llama3 old context (32 is not reached)
    ids = rng.integers(3, VOCAB, (2, length))
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids), output_hidden_states=True)
    out = model(jnp.asarray(ids), output_hidden_states=True)
    assert len(out.hidden_states) == len(ref.hidden_states) == 4
    for index, (ours, theirs) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        assert _max_err(ours, theirs) <= 1e-4, f"{case}: hidden state {index} differs by {_max_err(ours, theirs)}"
    assert _max_err(out.logits, ref.logits) <= 1e-4


def test_longrope_short_regime_matches_transformers(converted, rng):
    hf, model, _ = converted("phi3_longrope")
    ids = rng.integers(3, VOCAB, (1, 12))  # below original_max_position_embeddings = 16: short factors
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids)).logits
    assert _max_err(model(jnp.asarray(ids)).logits, ref) <= 1e-4


@pytest.mark.parametrize("case", ["phi3", "llama_gqa"])
def test_left_padded_batch_equals_unpadded_rows(case, converted, rng):
    _, model, _ = converted(case)
    prompts = [list(rng.integers(3, VOCAB, 11)), list(rng.integers(3, VOCAB, 6))]
    ids, mask = left_pad(prompts, 0)
    batched = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits)
    for row, prompt in enumerate(prompts):
        single = np.asarray(model(jnp.asarray([prompt])).logits[0])
        np.testing.assert_allclose(batched[row, -len(prompt):], single, atol=1e-5)


def test_bucketed_padding_rounds_the_length_up_and_generates_the_same_tokens(converted, rng):
    _, model, _ = converted("llama_gqa")
    prompts = [[1, *rng.integers(3, VOCAB, 9)], [1, *rng.integers(3, VOCAB, 4)]]
    ids, mask = left_pad(prompts, 0)
    bucket_ids, bucket_mask = left_pad(prompts, 0, multiple=16)
    assert ids.shape == (2, 10) and bucket_ids.shape == (2, 16)
    np.testing.assert_array_equal(bucket_ids[:, -10:], ids)
    assert bucket_mask.sum() == mask.sum()
    config = SamplingConfig(max_new_tokens=12, eos_token_ids=())
    bucketed = generate(model, bucket_ids, attention_mask=bucket_mask, config=config).tokens
    np.testing.assert_array_equal(np.asarray(bucketed),
                                  np.asarray(generate(model, ids, attention_mask=mask, config=config).tokens))


@pytest.mark.parametrize("case", ["phi3_longrope", "llama_gqa", "phi3_sliding_window"])
def test_greedy_generation_matches_transformers_generate(case, converted, rng):
    hf, model, _ = converted(case)
    prompts = [[1, *rng.integers(3, VOCAB, 9)], [1, *rng.integers(3, VOCAB, 4)]]
    ids, mask = left_pad(prompts, 0)
    with torch.no_grad():
        ref = hf.generate(torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long(),
                          max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=0)
    out = generate(model, ids, attention_mask=mask, config=SamplingConfig(max_new_tokens=32, eos_token_ids=()))
    expected = ref[:, ids.shape[1]:].numpy()
    assert len(set(expected.ravel().tolist())) > 5, "degenerate reference; the test would prove little"
    np.testing.assert_array_equal(np.asarray(out.tokens), expected)


@pytest.mark.parametrize("case", ["llama_gqa", "phi3_sliding_window"])
def test_kv_cache_decode_equals_full_recompute_every_step(case, converted, rng):
    # (With LongRoPE the two differ by design after the switch; generate() then rebuilds the cache as
    # transformers does, which test_greedy_generation_matches_transformers_generate pins.)
    _, model, _ = converted(case)
    ids, mask = left_pad([[1, *rng.integers(3, VOCAB, 7)], [1, *rng.integers(3, VOCAB, 3)]], 0)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    cache = model.init_cache(2, ids.shape[1] + 20)
    out = model(ids, attention_mask=mask, position_ids=positions, cache=cache)
    step_logits, cache = out.logits[:, -1], out.cache
    for step in range(20):  # past the sliding window (7) too
        full = model(ids, attention_mask=mask)  # the whole prefix recomputed without a cache
        np.testing.assert_allclose(np.asarray(full.logits[:, -1]), np.asarray(step_logits), atol=2e-5,
                                   err_msg=f"step {step}")
        token = jnp.argmax(step_logits, axis=-1)[:, None]
        ids, mask = jnp.concatenate([ids, token], axis=1), jnp.pad(mask, ((0, 0), (0, 1)), constant_values=1)
        next_positions = positions[:, -1:] + 1
        positions = jnp.concatenate([positions, next_positions], axis=1)
        out = model(token, attention_mask=jnp.ones((2, 1), jnp.int32), position_ids=next_positions, cache=cache)
        step_logits, cache = out.logits[:, -1], out.cache


def test_inputs_embeds_path_equals_token_path(converted, rng):
    _, model, _ = converted("llama_gqa")
    ids, mask = left_pad([list(rng.integers(3, VOCAB, 9)), list(rng.integers(3, VOCAB, 5))], 0)
    embeds = model.embed_tokens(jnp.asarray(ids))
    by_ids = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits
    by_embeds = model(inputs_embeds=embeds, attention_mask=jnp.asarray(mask)).logits
    np.testing.assert_array_equal(np.asarray(by_ids), np.asarray(by_embeds))
    sampling = SamplingConfig(max_new_tokens=8, eos_token_ids=())
    np.testing.assert_array_equal(generate(model, ids, attention_mask=mask, config=sampling).tokens,
                                  generate(model, inputs_embeds=embeds, attention_mask=mask, config=sampling).tokens)


@pytest.mark.parametrize("case", ["phi3_longrope", "llama_gqa", "llama_tied_bias", "llama3_scaling"])
def test_round_trip_is_bit_identical_and_loads_in_transformers(case, converted, tmp_path, rng):
    hf, model, _ = converted(case)
    export_hf_decoder(model, tmp_path / "export", max_shard_bytes=200_000)
    assert (tmp_path / "export" / "model.safetensors.index.json").is_file()
    cls = type(hf)
    reloaded, info = cls.from_pretrained(tmp_path / "export", output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    original = hf.state_dict()
    for key, tensor in reloaded.state_dict().items():
        assert torch.equal(tensor, original[key]), key
    ids = torch.from_numpy(rng.integers(3, VOCAB, (1, 20)))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, hf(ids).logits)


@pytest.mark.parametrize("preset", ["phi3_mini_4k", "phi3_mini_128k", "llama2_7b", "llama3_8b", "llama3_1_8b"])
def test_full_size_parameter_count_equals_transformers(preset):
    config = PRESETS[preset]()
    abstract = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))
    ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    hf_config = config.to_hf()
    cls, config_cls = (Phi3ForCausalLM, Phi3Config) if config.architecture == "phi3" else (LlamaForCausalLM, LlamaConfig)
    with torch.device("meta"):
        hf = cls(config_cls(**hf_config))
    assert ours == sum(p.numel() for p in hf.parameters())
    assert DecoderConfig.from_hf(hf_config) == config  # config.json round trip


def test_scan_and_remat_equal_plain_loop(rng):
    config = PRESETS["tiny_phi3"](num_layers=3)
    ids = jnp.asarray(rng.integers(3, 512, (2, 10)))
    forward = nnx.jit(lambda model, ids: model(ids).logits)  # compiled both ways, as in training
    plain = forward(Decoder(config, rngs=nnx.Rngs(0)), ids)
    for variant in (dict(scan_layers=True), dict(remat="full"), dict(scan_layers=True, remat="dots")):
        other = Decoder(dataclasses.replace(config, **variant), rngs=nnx.Rngs(0))
        atol = 0.0 if jax.default_backend() == "cpu" else 1e-6
        np.testing.assert_allclose(forward(other, ids), plain, rtol=0, atol=atol, err_msg=str(variant))
        cache_out = other(ids, position_ids=jnp.broadcast_to(jnp.arange(10), (2, 10)), cache=other.init_cache(2, 12))
        np.testing.assert_allclose(cache_out.logits, plain, atol=1e-5, err_msg=str(variant))


def test_sampling_filters_and_seed(rng):
    logits = jnp.asarray(rng.normal(size=(4, 50)), jnp.float32)
    greedy = sample_logits(logits, jax.random.key(0), SamplingConfig())
    np.testing.assert_array_equal(sample_logits(logits, jax.random.key(1), SamplingConfig(temperature=1.0, top_k=1)),
                                  greedy)
    np.testing.assert_array_equal(sample_logits(logits, jax.random.key(2), SamplingConfig(temperature=1.0, top_p=1e-6)),
                                  greedy)
    top3 = np.asarray(jax.lax.top_k(logits, 3)[1])
    for seed in range(20):
        picked = np.asarray(sample_logits(logits, jax.random.key(seed), SamplingConfig(temperature=2.0, top_k=3)))
        assert all(picked[row] in top3[row] for row in range(4))
    model = Decoder(PRESETS["tiny_phi3"](), rngs=nnx.Rngs(0))
    ids, mask = left_pad([[1, 5, 6, 7]], 0)
    sample = lambda seed: np.asarray(generate(model, ids, attention_mask=mask, config=SamplingConfig(  # noqa: E731
        max_new_tokens=16, temperature=1.0, seed=seed, eos_token_ids=())).tokens)
    np.testing.assert_array_equal(sample(3), sample(3))
    assert not np.array_equal(sample(3), sample(4))


def test_eos_stops_each_row_and_pads(converted, rng):
    _, model, _ = converted("llama_gqa")
    ids, mask = left_pad([[1, *rng.integers(3, VOCAB, 6)], [1, *rng.integers(3, VOCAB, 3)]], 0)
    free = np.asarray(generate(model, ids, attention_mask=mask, config=SamplingConfig(max_new_tokens=12,
                                                                                         eos_token_ids=())).tokens)
    eos = int(free[0, 4])  # pretend the 5th token of row 0 is EOS
    out = generate(model, ids, attention_mask=mask, config=SamplingConfig(max_new_tokens=12, eos_token_ids=(eos,),
                                                                          pad_token_id=0))
    tokens, lengths = np.asarray(out.tokens), np.asarray(out.lengths)
    first = int(np.argmax(free[0] == eos))
    assert lengths[0] == first + 1
    np.testing.assert_array_equal(tokens[0, : first + 1], free[0, : first + 1])
    assert (tokens[0, first + 1:] == 0).all()
    row1_hits = np.flatnonzero(free[1] == eos)
    assert lengths[1] == (row1_hits[0] + 1 if row1_hits.size else 12)


def test_right_padded_prompts_are_rejected():
    model = Decoder(PRESETS["tiny_phi3"](), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="left-padded"):
        generate(model, np.array([[1, 5, 0]]), attention_mask=np.array([[1, 1, 0]]))


def test_config_without_eos_writes_null():
    config = PRESETS["tiny_phi3"](eos_token_ids=())
    assert config.to_hf()["eos_token_id"] is None
    assert DecoderConfig.from_hf(config.to_hf()).eos_token_ids == ()
