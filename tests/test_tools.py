"""The command-line tools run end to end."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from safetensors.torch import save_file

from conftest import TINY, make_monai_vit, prefixed_state_dict, word_tokenizer

ROOT = pathlib.Path(__file__).parent.parent


def _run(*args):
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_encode_volume_tiny_with_converted_weights(tmp_path):
    import dataclasses
    monai_model = make_monai_vit(dataclasses.replace(TINY, num_layers=2))
    save_file(prefixed_state_dict(monai_model), str(tmp_path / "vit.safetensors"))
    out = _run("tools/encode_volume.py", "--config=configs/vit3d_tiny.py", f"--ckpt={tmp_path / 'vit.safetensors'}",
               "--repeats=1")
    assert "features (1, 64, 64) float32" in out
    assert re.search(r"weights .*: 28 tensors, 6 ignored", out), out


def test_generate_tool_matches_transformers_greedy(tmp_path):
    import torch

    from test_decoder import VOCAB, _hf_model

    hf = _hf_model("llama_gqa")
    hf.save_pretrained(tmp_path)
    tokenizer = word_tokenizer(tmp_path, VOCAB)
    prompts = ["w5 w17 w200 w9", "w44 w3"]
    out = _run("tools/generate.py", f"--ckpt={tmp_path}", *(f"--prompt={p}" for p in prompts), "--max_new_tokens=12")
    for prompt in prompts:
        ids = torch.tensor([tokenizer(prompt)["input_ids"]])
        with torch.no_grad():
            ref = hf.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=2, pad_token_id=0)
        expected = tokenizer.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
        assert f"--- {prompt}\n{expected}\n" in out, (expected, out)


def test_benchmarks_run_at_small_sizes(tmp_path):
    vit = _run("tools/bench/vit3d.py", "--image_size=16,64,64", "--batch_sizes=1", "--repeats=1", "--parts")
    assert re.search(r"^\s+1\s+[\d.]+\s+[\d.]+\s+[\d.]+x", vit, re.M), vit
    assert len(re.findall(r"jax\s+[\d.]+ ms\s+torch\s+[\d.]+ ms\s+torch/jax", vit)) == 3, vit
    decode = _run("tools/bench/decode.py", "--layers=1", "--prompt_len=16", "--new_tokens=4", "--repeats=1")
    assert "greedy tokens identical to transformers: 100.0%" in decode, decode
    data = _run("tools/bench/data.py", "--cases=8", "--shape=16,32,32")
    assert re.search(r"reader threads\) [\d.]+ volumes/s = [\d.]+x", data), data
    convert = _run("tools/bench/convert.py", "--tiny", f"--dir={tmp_path / 'bench'}")
    assert re.search(r"^torch2jax\s+[\d.]+\s+\d+", convert, re.M), convert
    step = _run("tools/bench/train_step.py", "--config=configs/demo.py", "--config.mesh.data=1", "--config.mesh.fsdp=1",
                "--config.mesh.tensor=1", "--config.cpu_devices=0", "--config.data.batch_size=2", "--repeats=1")
    assert re.search(r"JAX step [\d.]+ ms, \d+ tokens/s, model [\d.]+ GFLOP/step = [\d.]+ GFLOP/s, hardware "
                     r"[\d.]+ GFLOP/step", step), step
    assert re.search(r"JAX is [\d.]+× PyTorch", step), step


def _assert_same_tensors(folder_a, folder_b):
    from m3d_jax.convert.torch_io import CheckpointReader

    a, b = CheckpointReader(folder_a), CheckpointReader(folder_b)
    assert sorted(a.keys()) == sorted(b.keys())
    for key in a.keys():
        np.testing.assert_array_equal(a.read(key), b.read(key), err_msg=key)


def test_convert_checkpoint_lamed_round_trip_and_load(tmp_path, rng):
    import jax.numpy as jnp

    from m3d_jax.convert import load, read_released
    from test_lamed import IMAGE_ID, NUM_IMAGE_TOKENS, _save_released, tiny_torch_lamed

    _save_released(tiny_torch_lamed("phi3", segmentation=True), tmp_path / "released")
    out = _run("tools/convert_checkpoint.py", "torch2jax", str(tmp_path / "released"), str(tmp_path / "jax"))
    assert re.search(r"lamed: converted \d+ tensors", out), out
    out = _run("tools/convert_checkpoint.py", "jax2torch", str(tmp_path / "jax"), str(tmp_path / "back"),
               "--max_shard_gb=0.001")
    assert (tmp_path / "back" / "model.safetensors.index.json").is_file()
    _assert_same_tensors(tmp_path / "released", tmp_path / "back")
    model = load(tmp_path / "jax")
    reference, _ = read_released(tmp_path / "released")
    images = jnp.asarray(rng.random((1, 1, 16, 64, 64), dtype=np.float32))
    ids = jnp.asarray([[1, *[IMAGE_ID] * NUM_IMAGE_TOKENS, 5, 6, 7]])
    np.testing.assert_array_equal(np.asarray(model(images, ids).logits), np.asarray(reference(images, ids).logits))


def test_convert_checkpoint_decoder_and_bare_vit(tmp_path):
    import torch
    from transformers import LlamaForCausalLM

    from test_decoder import _hf_model

    hf = _hf_model("llama_gqa")
    hf.save_pretrained(tmp_path / "llama")
    _run("tools/convert_checkpoint.py", "torch2jax", str(tmp_path / "llama"), str(tmp_path / "llama_jax"))
    _run("tools/convert_checkpoint.py", "jax2torch", str(tmp_path / "llama_jax"), str(tmp_path / "llama_back"))
    reloaded = LlamaForCausalLM.from_pretrained(tmp_path / "llama_back")
    for key, tensor in hf.state_dict().items():
        assert torch.equal(reloaded.state_dict()[key], tensor), key

    vit = make_monai_vit(TINY)
    (tmp_path / "vit").mkdir()
    torch.save({k: v for k, v in prefixed_state_dict(vit).items() if "norm_cross" not in k and "classif" not in k},
               tmp_path / "vit" / "pretrained_ViT.bin")
    with pytest.raises(AssertionError, match="does not match the default image/patch size"):
        _run("tools/convert_checkpoint.py", "torch2jax", str(tmp_path / "vit"), str(tmp_path / "vit_jax"))
    # With a config.json naming the sizes, the same bare checkpoint converts and round-trips.
    import dataclasses
    import json

    (tmp_path / "vit" / "config.json").write_text(json.dumps({"m3d_jax_kind": "vit3d",
                                                              "vit3d": dataclasses.asdict(TINY)}))
    _run("tools/convert_checkpoint.py", "torch2jax", str(tmp_path / "vit"), str(tmp_path / "vit_jax"))
    _run("tools/convert_checkpoint.py", "jax2torch", str(tmp_path / "vit_jax"), str(tmp_path / "vit_back"))
    _assert_same_tensors(tmp_path / "vit", tmp_path / "vit_back")
    _run("tools/convert_checkpoint.py", "torch2jax", str(tmp_path / "vit_back"), str(tmp_path / "vit_jax2"))


def test_parity_tool_passes_on_converted_weights_and_fails_on_a_perturbed_one(tmp_path):
    import jax.numpy as jnp

    from m3d_jax.convert import load, save_jax
    from m3d_jax.parity.reference import load_reference
    from test_lamed import _save_released, tiny_torch_lamed

    _save_released(tiny_torch_lamed("phi3", segmentation=True), tmp_path / "released")
    out = _run("tools/dump_reference.py", f"--ckpt={tmp_path / 'released'}", f"--out={tmp_path / 'ref.npz'}",
               "--seg", "--generate=6")
    assert "seg_logits (1, 1, 16, 64, 64)" in out and "generated_ids (1, 6)" in out
    assert set(load_reference(tmp_path / "ref.npz")) >= {"logits", "seg_logits", "generated_ids"}
    _run("tools/convert_checkpoint.py", "torch2jax", str(tmp_path / "released"), str(tmp_path / "jax"))
    out = _run("tools/parity.py", f"--ckpt={tmp_path / 'jax'}", f"--ref={tmp_path / 'ref.npz'}")
    assert "parity ok" in out and "100.0% equal" in out, out

    model = load(tmp_path / "jax")
    kernel = model.mm_projector.layers[1].kernel
    kernel[...] = jnp.asarray(kernel[...]).at[0, 0].add(0.5)
    save_jax(model, tmp_path / "perturbed")
    result = subprocess.run([sys.executable, "tools/parity.py", f"--ckpt={tmp_path / 'perturbed'}",
                             f"--ref={tmp_path / 'ref.npz'}"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 1 and "parity FAILED" in result.stdout, result.stdout + result.stderr[-2000:]
