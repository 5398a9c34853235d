"""Med-2E3 training: what trains (frozen parts bit-identical, no optimiser state for them), the chat-template
samples, and a tiny Med-2E3 training on the phantom set (loss falls, slice scores stay a distribution)."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

ROOT = pathlib.Path(__file__).parent.parent


def _config(**changes):
    spec = importlib.util.spec_from_file_location("med2e3_config", ROOT / "configs" / "med2e3.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("phantoms")
    config.mesh.data = config.mesh.fsdp = config.mesh.tensor = 1
    for key, value in changes.items():
        section, _, name = key.rpartition(".")
        setattr(config[section] if section else config, name, value)
    return config


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    from m3d_jax.data.phantoms import write_phantoms

    return write_phantoms(tmp_path_factory.mktemp("med2e3") / "phantoms", num_cases=24, seed=2)


def test_chat_template_supervises_only_the_answer_and_carries_the_question(phantoms):
    from m3d_jax.data.med2e3_samples import SYSTEM
    from m3d_jax.data.pipeline import build_source
    from m3d_jax.train.tasks import get_task

    config = _config(**{"data.root": str(phantoms)})
    task = get_task("med2e3")
    tokenizers, model_config, _ = task.build(config)
    spec = task.sample_spec(config, model_config, train=False)
    record = build_source(dict(kind="vqa_closed", path="vqa_train.csv"), str(phantoms)).records[0]
    sample = spec.transform(tokenizers, 0, 1)(0, record)
    ids, labels, start = sample["input_ids"], sample["labels"], int(sample["image_starts"])
    assert (ids[start:start + model_config.num_visual_tokens] == model_config.image_token_id).all()
    llm = tokenizers.llm
    supervised = ids[labels != -100].tolist()
    assert supervised[-1] == llm.eos_token_id
    assert llm.decode(supervised[:-1], skip_special_tokens=True).strip() == record["answer"]
    prompt = llm.decode(ids[:start], skip_special_tokens=True)
    assert prompt.split()[:3] == SYSTEM.split()[:3]
    question = tokenizers.text.decode(sample["question_ids"][sample["question_mask"] == 1], skip_special_tokens=True)
    assert question.replace(" ", "") == record["question"].lower().replace(" ", "")


def test_stage1_trains_connectors_only(phantoms):
    from m3d_jax.data.pipeline import build_mixture, iterate, to_global_arrays
    from m3d_jax.train import trainer

    config = _config(**{"data.root": str(phantoms), "data.batch_size": 2,
                        "trainable": ("vision2d_connector", "vision3d_connector"),  # stage 1's
                        "optim.learning_rate": 1e-2, "optim.warmup_fraction": 0.0})
    run = trainer.setup(config)
    before = {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(run.model, nnx.Param))}
    moments = ["/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(run.optimizer))
               if "/mu/" in "/".join(map(str, p))]
    graphdef, state, step = trainer.compiled_step(run)
    spec = run.task.sample_spec(config, run.model_config, train=True)
    batches = iterate(build_mixture(config.data, run.tokenizer, spec, seed=0))
    for index in range(2):
        host = next(batches)
        state, metrics = step(state, to_global_arrays({k: host[k] for k in run.task.inputs}, run.mesh),
                              jax.random.key(index))
        assert np.isfinite(float(metrics["loss"]))
    model = nnx.merge(graphdef, state)[0]
    after = {"/".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    frozen = [p for p in before if p.split("/")[0] in ("llm", "vision2d_model", "vision3d_model")]
    trained = [p for p in before if p.split("/")[0] in ("vision2d_connector", "vision3d_connector")]
    assert frozen and all(np.array_equal(before[p], after[p]) for p in frozen)
    assert all(not np.array_equal(before[p], after[p]) for p in trained if p.endswith("kernel"))
    assert any("text_mlp" in p for p in trained)
    # No optimiser state for frozen parameters: Adam's moments exist only for the connectors' parameters.
    owners = {p.split("/mu/")[1].split("/")[0] for p in moments}
    assert owners == {"vision2d_connector", "vision3d_connector"} and len(moments) == len(trained)


def test_tiny_med2e3_trains_on_phantoms_and_exports(phantoms, tmp_path):
    from m3d_jax.convert import read_released

    command = [sys.executable, "-m", "m3d_jax.train", f"--config={ROOT / 'configs' / 'med2e3.py'}:phantoms",
               f"--workdir={tmp_path / 'run'}", f"--config.data.root={phantoms}", "--config.total_steps=24",
               "--config.log_every=6", "--config.data.batch_size=8", "--config.progress=False",
               "--config.eval.vqa_samples=4", "--config.eval.batch_size=4", "--config.eval.loss_batches=1",
               "--config.checkpoint.every=100"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT,
                            env={**os.environ, "XLA_FLAGS": ""})
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    losses = {row["step"]: row["loss"] for row in rows if row["split"] == "train"}
    assert losses[24] < 0.7 * losses[6], losses
    final = [row for row in rows if row["split"] == "eval"][-1]
    assert 1 / 32 <= final["slice_score_peak"] <= 1.0 and 0.0 <= final["vqa_closed_accuracy"] <= 1.0
    model, _ = read_released(tmp_path / "run" / "pytorch")
    assert model.config.num_visual_tokens == 16 + 16  # pooled 3D tokens (4·2·2) + SigLIP patches ((64/16)²)
