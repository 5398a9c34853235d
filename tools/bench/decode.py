"""Greedy decoding speed: JAX (jit prefill + while_loop decode over a preallocated KV cache) vs
transformers `generate` in PyTorch, same weights, same machine, same process.

Default: a Phi-3-shaped model of ~106 M parameters (Phi-3 vocabulary, width 768, 8 layers), a 300-token
prompt and 64 new tokens at batch 1, fp32. With --batch > 1 the prompts differ in length (up to 39 tokens
shorter) and are left-padded, as in evaluation. JAX and torch runs are interleaved; medians are reported.

  python tools/bench/decode.py [--prompt_len=300 --new_tokens=64 --batch=1 --layers=8]
"""

from __future__ import annotations

import os
import tempfile
import time

from absl import app, flags
from timing import interleaved_medians, machine_line  # tools/bench/timing.py (on sys.path)

_PROMPT = flags.DEFINE_integer("prompt_len", 300, "Prompt tokens.")
_NEW = flags.DEFINE_integer("new_tokens", 64, "Generated tokens.")
_BATCH = flags.DEFINE_integer("batch", 1, "Prompts per batch.")
_LAYERS = flags.DEFINE_integer("layers", 8, "Decoder layers.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs (median reported).")


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from flax import nnx
    from transformers import Phi3Config, Phi3ForCausalLM

    from m3d_jax.convert import read_released
    from m3d_jax.generate import SamplingConfig, generate, left_pad

    torch.set_num_threads(os.cpu_count())
    hf_config = Phi3Config(vocab_size=32064, hidden_size=768, intermediate_size=2048, num_hidden_layers=_LAYERS.value,
                           num_attention_heads=12, num_key_value_heads=12, max_position_embeddings=4096,
                           pad_token_id=32000, eos_token_id=32000, bos_token_id=1)
    torch.manual_seed(0)
    reference = Phi3ForCausalLM(hf_config).eval()
    with torch.no_grad():
        for parameter in reference.parameters():  # larger weights: varied tokens, no early repetition
            parameter.normal_(0.0, 0.05)
    with tempfile.TemporaryDirectory() as tmp:
        reference.save_pretrained(tmp)
        model, _ = read_released(tmp, expect="decoder")
    num_params = sum(p.numel() for p in reference.parameters())
    print(machine_line())
    print(f"Phi-3-shaped decoder: {num_params / 1e6:.1f} M params, {_LAYERS.value} layers; prompt {_PROMPT.value}, "
          f"{_NEW.value} new tokens, batch {_BATCH.value}; jax {jax.__version__} on {jax.devices()[0].platform}, "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads")

    # Rows of a batch get prompts up to 39 tokens shorter than --prompt_len, left-padded as in evaluation.
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 32000, _PROMPT.value - (row * 13) % 40) for row in range(_BATCH.value)]
    ids, mask = left_pad(prompts, 32000)
    sampling = SamplingConfig(max_new_tokens=_NEW.value, eos_token_ids=())
    start = time.perf_counter()
    jax_tokens = np.asarray(generate(model, ids, attention_mask=mask, config=sampling).tokens)
    compile_time = time.perf_counter() - start
    graphdef, state = nnx.split(model)

    @jax.jit
    def prefill(state, ids, mask):
        decoder = nnx.merge(graphdef, state)
        cache = decoder.init_cache(ids.shape[0], ids.shape[1] + _NEW.value)
        positions = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
        return decoder(ids, attention_mask=mask, position_ids=positions, cache=cache, logits_at=-1).logits

    jax_ids, jax_mask = jnp.asarray(ids), jnp.asarray(mask)
    torch_ids, torch_mask = torch.from_numpy(ids).long(), torch.from_numpy(mask).long()
    kwargs = dict(attention_mask=torch_mask, max_new_tokens=_NEW.value, min_new_tokens=_NEW.value, do_sample=False,
                  pad_token_id=32000)
    with torch.inference_mode():
        torch_tokens = reference.generate(torch_ids, **kwargs)[:, ids.shape[1]:].numpy()
        timed = interleaved_medians({
            "jax": lambda: generate(model, ids, attention_mask=mask, config=sampling).tokens.block_until_ready(),
            "torch": lambda: reference.generate(torch_ids, **kwargs),
            "jax prefill": lambda: prefill(state, jax_ids, jax_mask).block_until_ready(),
            "torch prefill": lambda: reference(torch_ids, attention_mask=torch_mask, use_cache=True)},
            _REPEATS.value)
    jax_total, torch_total, jax_prefill, torch_prefill = (
        timed[name] for name in ("jax", "torch", "jax prefill", "torch prefill"))

    new = _BATCH.value * _NEW.value
    rows = [("jax", jax_total, jax_prefill), ("torch", torch_total, torch_prefill)]
    print(f"{'':6} {'total s':>8} {'prefill s':>9} {'tokens/s':>9} {'decode tokens/s':>15}")
    for name, total, prefill_time in rows:
        decode_rate = (new - _BATCH.value) / max(total - prefill_time, 1e-9)
        print(f"{name:6} {total:>8.3f} {prefill_time:>9.3f} {new / total:>9.1f} {decode_rate:>15.1f}")
    print(f"speed-up: tokens/s {torch_total / jax_total:.2f}x, prefill {torch_prefill / jax_prefill:.2f}x, "
          f"decode-only {((torch_total - torch_prefill) / (jax_total - jax_prefill)):.2f}x; "
          f"jax first call (compile) {compile_time:.1f} s")
    agree = (jax_tokens == torch_tokens).mean()
    print(f"greedy tokens identical to transformers: {agree:.1%}")


if __name__ == "__main__":
    app.run(main)
