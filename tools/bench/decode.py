"""Greedy decoding speed: JAX (jit prefill + while_loop decode over a preallocated KV cache) vs
transformers `generate` in PyTorch, same weights, same machine, same process.

Default: a Phi-3-shaped model of ~106 M parameters (Phi-3 vocabulary, width 768, 8 layers), a 300-token
prompt and 64 new tokens at batch 1, fp32.

  python tools/bench/decode.py [--prompt_len=300 --new_tokens=64 --batch=1 --layers=8]
"""

from __future__ import annotations

import os
import tempfile
import time

from absl import app, flags
from timing import median_seconds  # tools/bench/timing.py (the script's folder is on sys.path)

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
    from m3d_jax.generate import SamplingConfig, generate

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
    print(f"Phi-3-shaped decoder: {num_params / 1e6:.1f} M params, {_LAYERS.value} layers; prompt {_PROMPT.value}, "
          f"{_NEW.value} new tokens, batch {_BATCH.value}; jax {jax.__version__} on {jax.devices()[0].platform}, "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads")

    ids = np.random.default_rng(0).integers(3, 32000, (_BATCH.value, _PROMPT.value)).astype(np.int32)
    sampling = SamplingConfig(max_new_tokens=_NEW.value, eos_token_ids=())
    start = time.perf_counter()
    jax_tokens = np.asarray(generate(model, ids, config=sampling).tokens)
    compile_time = time.perf_counter() - start
    jax_total = median_seconds(lambda: generate(model, ids, config=sampling).tokens.block_until_ready(), _REPEATS.value)

    graphdef, state = nnx.split(model)

    @jax.jit
    def prefill(state, ids):
        decoder = nnx.merge(graphdef, state)
        cache = decoder.init_cache(ids.shape[0], ids.shape[1] + _NEW.value)
        positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
        return decoder(ids, position_ids=positions, cache=cache, logits_at=-1).logits

    jax_ids = jnp.asarray(ids)
    prefill(state, jax_ids).block_until_ready()
    jax_prefill = median_seconds(lambda: prefill(state, jax_ids).block_until_ready(), _REPEATS.value)

    torch_ids = torch.from_numpy(ids).long()
    kwargs = dict(max_new_tokens=_NEW.value, min_new_tokens=_NEW.value, do_sample=False, pad_token_id=32000)
    with torch.inference_mode():
        torch_tokens = reference.generate(torch_ids, **kwargs)[:, _PROMPT.value:].numpy()
        torch_total = median_seconds(lambda: reference.generate(torch_ids, **kwargs), _REPEATS.value)
        torch_prefill = median_seconds(lambda: reference(torch_ids, use_cache=True), _REPEATS.value)

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
