"""The command-line tools run end to end."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

from flax import nnx
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


def test_benchmarks_run_at_small_sizes():
    vit = _run("tools/bench/vit3d.py", "--image_size=16,64,64", "--batch_sizes=1", "--repeats=1")
    assert re.search(r"^\s+1\s+[\d.]+\s+[\d.]+\s+[\d.]+x", vit, re.M), vit
    decode = _run("tools/bench/decode.py", "--layers=1", "--prompt_len=16", "--new_tokens=4", "--repeats=1")
    assert "greedy tokens identical to transformers: 100.0%" in decode, decode
