"""Generate text with a Phi-3 / Llama checkpoint in a transformers folder (config.json, safetensors or
.bin, tokenizer files), converted to JAX on load.

  python tools/generate.py --ckpt=Phi-3-mini-4k-instruct/ --prompt="The liver is" --max_new_tokens=32
  python tools/generate.py --ckpt=FOLDER --prompt="..." --prompt="..." --temperature=0.7 --top_p=0.9 --seed=1
  python tools/generate.py --ckpt=FOLDER --chat --prompt="What does a CT scan show?"
"""

from __future__ import annotations

import time

from absl import flags

from m3d_jax.cli import run
from m3d_jax.errors import InputError

_CKPT = flags.DEFINE_string("ckpt", None, "transformers model folder (Phi-3 or Llama).", required=True)
_PROMPTS = flags.DEFINE_multi_string("prompt", [], "Prompt text; repeat the flag for a batch.")
_CHAT = flags.DEFINE_bool("chat", False, "Wrap each prompt with the tokenizer's chat template.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 64, "Tokens to generate at most.")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample among the k most likely tokens (0 = all).")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1 = off).")
_SEED = flags.DEFINE_integer("seed", 42, "Sampling seed.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")


def main(argv):
    del argv
    from m3d_jax.convert import read_released
    from m3d_jax.generate import SamplingConfig, generate, left_pad
    from m3d_jax.tokenizer import load_tokenizer

    if not _PROMPTS.value:
        raise InputError("give at least one --prompt")
    model, report = read_released(_CKPT.value, expect="decoder", dtype=_DTYPE.value)  # names a bad folder first
    tokenizer = load_tokenizer(_CKPT.value)
    config = model.config
    print(f"loaded {_CKPT.value}: {config.architecture}, {config.num_layers} layers, {report.converted} tensors")
    if _CHAT.value:
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True)
                   for p in _PROMPTS.value]
    else:
        prompts = [tokenizer(p)["input_ids"] for p in _PROMPTS.value]
    ids, mask = left_pad(prompts, config.pad_token_id)
    sampling = SamplingConfig(max_new_tokens=_MAX_NEW.value, temperature=_TEMPERATURE.value, top_k=_TOP_K.value,
                              top_p=_TOP_P.value, seed=_SEED.value)
    start = time.perf_counter()
    out = generate(model, ids, attention_mask=mask, config=sampling)
    tokens, lengths = out.tokens.tolist(), out.lengths.tolist()
    elapsed = time.perf_counter() - start
    for prompt, row, length in zip(_PROMPTS.value, tokens, lengths):
        print(f"--- {prompt}\n{tokenizer.decode(row[:length], skip_special_tokens=True)}")
    print(f"({sum(lengths)} tokens in {elapsed:.2f} s including compilation)")


if __name__ == "__main__":
    run(main)
