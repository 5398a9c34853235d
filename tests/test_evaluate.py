"""tools/evaluate.py end to end on the phantom set: a demo-config LaMed (generation tasks) and a
phantom-config M3D-CLIP (retrieval), both exported in the released layouts by the trainer's task code."""

from __future__ import annotations

import json
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from conftest import recipe_config

from m3d_jax.eval import metrics

ROOT = pathlib.Path(__file__).parent.parent


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    from m3d_jax.data.phantoms import write_phantoms

    return write_phantoms(tmp_path_factory.mktemp("bench") / "phantoms", num_cases=30, seed=1)


def _export(task_name: str, config, folder) -> None:
    from m3d_jax.train.tasks import get_task

    task = get_task(task_name)
    tokenizer, _, make_model = task.build(config)
    task.export(make_model(), tokenizer, str(folder))


def _evaluate(*args):
    return subprocess.run([sys.executable, "tools/evaluate.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=600)


def test_evaluation_bench_runs_both_loops(phantoms, tmp_path):
    """tools/bench/evaluate.py runs: JAX's loop (a batch's answers read after the next is dispatched) and
    the exported checkpoint in PyTorch through the same loop, on an untrained demo-config LaMed."""
    _export("lamed", recipe_config("demo"), tmp_path / "lamed")
    result = subprocess.run([sys.executable, "tools/bench/evaluate.py", f"--ckpt={tmp_path / 'lamed'}",
                             f"--data={phantoms}", "--samples=6", "--batch_size=4", "--max_new_tokens=6",
                             "--repeats=1"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "closed VQA, 6 samples, batch 4" in result.stdout, result.stdout
    # an untrained model's greedy answers hit near-ties, so only the report's form is checked here (parity of
    # the two models is tested in test_lamed and test_inference)
    assert re.search(r"JAX is [\d.]+x PyTorch \(warm\), [\d.]+x counting compilation; answers identical: \d+%",
                     result.stdout), result.stdout
    assert len(re.findall(r"^  (jax|pytorch) .* answers/s  \(accuracy [\d.]+\)$", result.stdout, re.M)) == 2


def test_evaluate_lamed_on_phantoms_writes_outputs_metrics_and_table(phantoms, tmp_path):
    _export("lamed", recipe_config("demo"), tmp_path / "lamed")
    out = tmp_path / "bench"
    result = _evaluate(f"--ckpt={tmp_path / 'lamed'}", "--task=all", f"--data={phantoms}", f"--out_dir={out}",
                       "--max_samples=4", "--batch_size=4", "--max_new_tokens=12")
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads((out / "metrics.json").read_text())
    tasks = ("report", "vqa_closed", "vqa_open", "rec", "reg")  # the demo model has no SegVol module
    assert sorted(report["tasks"]) == sorted(tasks)
    assert all(report["tasks"][t]["samples"] == 4 for t in tasks)
    samples = {t: [json.loads(line) for line in open(out / f"{t}.jsonl")] for t in tasks}
    closed = samples["vqa_closed"]
    assert report["tasks"]["vqa_closed"]["accuracy"] == pytest.approx(
        100 * np.mean([f"{s['answer_choice']}." in s["output"] for s in closed]))
    for task in ("report", "vqa_open", "reg"):
        rows = samples[task]
        assert report["tasks"][task]["bleu1"] == pytest.approx(
            100 * np.mean([metrics.bleu1(s["output"], s["reference"]) for s in rows]))
        assert 0 <= report["tasks"][task]["bertscore_f1"] <= 100
    rec = samples["rec"]
    assert all(s["reference"].startswith("It is at <bx_start>[") for s in rec)
    assert report["tasks"]["rec"]["unparsed"] == sum(s["iou_enclosing"] == -1 for s in rec)
    table = (out / "results.md").read_text()
    assert all(f"| {t} | 4 |" in table for t in tasks) and "BERTScore encoder: all-MiniLM-L6-v2" in table
    assert "METEOR matching: exact+stem" in table


def test_evaluate_clip_retrieval_and_clear_errors(phantoms, tmp_path):
    _export("clip", recipe_config("clip", "phantoms"), tmp_path / "clip")
    out = tmp_path / "bench"
    result = _evaluate(f"--ckpt={tmp_path / 'clip'}", "--task=all", f"--data={phantoms}", f"--out_dir={out}",
                       "--batch_size=4")
    assert result.returncode == 0, result.stderr[-4000:]
    recall = json.loads((out / "metrics.json").read_text())["tasks"]["retrieval"]
    assert recall["samples"] == 4  # the phantom test split of 30 cases (cases 26-29)
    for direction in ("image_to_text", "text_to_image"):
        values = [recall[f"{direction}_R@{k}"] for k in (1, 5, 10)]
        assert 0 <= values[0] <= values[1] <= values[2] == 100  # 4 candidates: R@5 and R@10 are 100
    ranks = [json.loads(line)["text_rank_of_pair"] for line in open(out / "retrieval.jsonl")]
    assert recall["image_to_text_R@1"] == pytest.approx(100 * np.mean([r == 0 for r in ranks]))
    wrong = _evaluate(f"--ckpt={tmp_path / 'clip'}", "--task=vqa_closed", f"--data={phantoms}")
    assert wrong.returncode != 0 and "a clip checkpoint cannot run vqa_closed" in wrong.stderr
    missing = _evaluate(f"--ckpt={tmp_path / 'clip'}", "--task=retrieval", f"--data={tmp_path / 'nowhere.py'}")
    assert missing.returncode != 0 and "neither a data folder nor a bench config" in missing.stderr


def test_evaluate_from_prepared_shards_asks_the_same_questions(phantoms, tmp_path):
    """tools/prepare_data.py on the bench config, then tools/evaluate.py --shards: the same records, questions
    and references (rec's boxes come from the shards' masks) as from the files."""
    _export("lamed", recipe_config("demo"), tmp_path / "lamed")
    prepared = subprocess.run(
        [sys.executable, "tools/prepare_data.py", "--config=configs/bench.py:phantoms", f"--config.root={phantoms}",
         "--image_size=32,64,64", f"--out={tmp_path / 'shards'}"], cwd=ROOT, capture_output=True, text=True,
        timeout=600)
    assert prepared.returncode == 0, prepared.stderr[-4000:]
    runs = {}
    for name, extra in (("files", []), ("shards", [f"--shards={tmp_path / 'shards'}"])):
        out = tmp_path / name
        result = _evaluate(f"--ckpt={tmp_path / 'lamed'}", "--task=rec", f"--data={phantoms}", f"--out_dir={out}",
                           "--max_samples=4", "--batch_size=4", "--max_new_tokens=6", *extra)
        assert result.returncode == 0, result.stderr[-4000:]
        runs[name] = [json.loads(line) for line in open(out / "rec.jsonl")]
    assert len(runs["shards"]) == len(runs["files"]) == 4
    for ours, theirs in zip(runs["shards"], runs["files"]):
        assert (ours["image"], ours["question"], ours["reference"]) == (
            theirs["image"], theirs["question"], theirs["reference"])
