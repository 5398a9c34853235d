"""Closed-VQA evaluation throughput: `tools/evaluate.py`'s loop (`m3d_jax.eval.bench.run_generation_task`) vs
the same loop in PyTorch (the exported checkpoint in `TorchLamed`: MONAI ViT + projector splice + transformers
`generate`), on the same records, prompts and prepared volumes, greedy, same batch size.

JAX's first pass includes compilation (one program per prompt-length bucket and batch shape); then the two
loops run in turn (`--repeats` passes each, interleaved) and their medians are compared. Answers per second
are printed with the ratio to PyTorch and how many answers agree.

  python tools/bench/evaluate.py --ckpt=runs/demo/pytorch [--samples=64 --batch_size=8 --layout=phantoms]
  python tools/bench/evaluate.py --ckpt=runs/demo/pytorch --shards=data/bench_shards   # volumes prepared once
"""

from __future__ import annotations

import os
import time

from absl import app, flags
from timing import interleaved_medians, machine_line  # tools/bench/timing.py (on sys.path)

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
_CKPT = flags.DEFINE_string("ckpt", "runs/demo/pytorch", "LaMed checkpoint folder (the demo's export).")
_LAYOUT = flags.DEFINE_enum("layout", "phantoms", ["phantoms", "m3d"], "configs/bench.py layout of the data.")
_DATA = flags.DEFINE_string("data", None, "Data root (default: the layout's).")
_SHARDS = flags.DEFINE_string("shards", None, "Read the volumes prepared from this shard set (tools/prepare_data.py "
                               "--config=configs/bench.py:phantoms) instead of the NIfTI files.")
_SAMPLES = flags.DEFINE_integer("samples", 64, "Closed-VQA samples.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Samples per decoding batch.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 256, "Longest answer in tokens.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed passes of each loop (interleaved; the median is printed).",
                                lower_bound=1)


def main(argv):
    del argv
    import jax
    import numpy as np
    import torch

    from m3d_jax.config import load_config_file
    from m3d_jax.data.pipeline import build_source, head
    from m3d_jax.eval import bench
    from m3d_jax.inference import Answerer
    from m3d_jax.parity.torch_reference import TorchLamed

    torch.set_num_threads(os.cpu_count())
    print(f"{machine_line()}; jax {jax.__version__} on {jax.devices()[0].device_kind}, torch {torch.__version__}")
    answerer = Answerer.load(_CKPT.value)
    if answerer.kind != "lamed":
        raise SystemExit(f"--ckpt {_CKPT.value}: a {answerer.kind} checkpoint; this bench takes a LaMed")
    model, tokenizer = answerer.model, answerer.tokenizer
    bench_config = load_config_file(os.path.join(_ROOT, "configs", "bench.py"), _LAYOUT.value)
    root = _DATA.value or bench_config.root
    entry = dict(bench_config.tasks["vqa_closed"])
    source = bench.shard_records(_SHARDS.value, entry, model) if _SHARDS.value else build_source(entry, root).records
    records = head(source, _SAMPLES.value)
    settings = bench.BenchSettings(batch_size=_BATCH.value, max_new_tokens=_MAX_NEW.value)
    reference = TorchLamed.from_folder(_CKPT.value)

    def torch_answers(questions, images):
        prompts = bench.lamed_prompt_batch(tokenizer, model.config, questions, multiple=1)
        with torch.inference_mode():
            embeds = reference.embed(torch.from_numpy(images), torch.from_numpy(prompts.ids).long())
            tokens = reference.llm.generate(
                inputs_embeds=embeds, attention_mask=torch.from_numpy(prompts.mask).long(),
                max_new_tokens=_MAX_NEW.value, do_sample=False, eos_token_id=prompts.eos_token_id,
                pad_token_id=prompts.pad_token_id)
        texts = [tokenizer.decode(row, skip_special_tokens=True).strip() for row in tokens.numpy()]
        return lambda: (texts, None)

    def run(answer):
        return bench.run_generation_task("vqa_closed", model, tokenizer, records, settings, answer=answer)

    start = time.perf_counter()
    results = {"jax": run(None)}
    first_pass = time.perf_counter() - start
    results["pytorch"] = run(torch_answers)
    timed = interleaved_medians({"jax": lambda: run(None), "pytorch": lambda: run(torch_answers)}, _REPEATS.value,
                                warmup=0)
    count = len(records)
    print(f"closed VQA, {count} samples, batch {_BATCH.value}, checkpoint {_CKPT.value}, volumes from "
          f"{_SHARDS.value or root}; median of {_REPEATS.value} interleaved passes")
    print(f"  {'jax, first pass (compiles)':28s} {first_pass:7.2f} s  {count / first_pass:6.2f} answers/s")
    for name, seconds in timed.items():
        accuracy = ", ".join(f"{k} {v:.1f}" for k, v in results[name].metrics.items())
        print(f"  {name:28s} {seconds:7.2f} s  {count / seconds:6.2f} answers/s  ({accuracy})")
    agree = np.mean([a["output"] == b["output"] for a, b in zip(results["jax"].samples, results["pytorch"].samples)])
    print(f"JAX is {timed['pytorch'] / timed['jax']:.2f}x PyTorch (warm), {timed['pytorch'] / first_pass:.2f}x "
          f"counting compilation; answers identical: {agree:.0%}")


if __name__ == "__main__":
    app.run(main)
