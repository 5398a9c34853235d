"""The command-line tools run end to end."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

from flax import nnx
from safetensors.torch import save_file

from conftest import TINY, make_monai_vit, prefixed_state_dict

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
