"""Sharded creation and training math on 8 simulated CPU devices (run in a subprocess, since the device
count is fixed when jax starts)."""

from __future__ import annotations

import json
import pathlib
import subprocess
import sys

import pytest

from m3d_jax.sharding import MeshConfig


def test_mesh_shapes_fill_and_validate():
    assert MeshConfig(data=-1, fsdp=2, tensor=2).shapes(8) == ((2, 2, 2), (1, 1, 1))
    assert MeshConfig(data=1, fsdp=-1, dcn_data=2).shapes(8) == ((1, 4, 1), (2, 1, 1))
    with pytest.raises(ValueError, match="at most one mesh axis may be -1"):
        MeshConfig(data=-1, fsdp=-1).shapes(8)
    with pytest.raises(ValueError, match="needs 6 devices per slice, have 8"):
        MeshConfig(data=3, fsdp=2).shapes(8)


def _sharding_check(model: str) -> dict:
    """Per mesh, with the activation constraints traced in: loss / gradient error vs one device, parameters
    laid out against the rules and an activation's layout (asserted)."""
    script = pathlib.Path(__file__).with_name("sharding_check.py")
    result = subprocess.run([sys.executable, str(script), model, "8x1x1", "2x2x2", "1x4x2"], capture_output=True,
                            text=True, timeout=900, cwd=script.parent.parent)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout.strip().splitlines()[-1])
    # Activations [B, T, vocab]: batch over the data axes present, vocabulary over tensor.
    expected_activations = {"8x1x1": ["data", None, None], "2x2x2": [["data", "fsdp"], None, "tensor"],
                            "1x4x2": ["fsdp", None, "tensor"]}
    for mesh, outcome in results.items():
        assert outcome["activation_spec"] == expected_activations[mesh], (mesh, outcome["activation_spec"])
        assert outcome["wrong"] == [], (mesh, outcome["wrong"][:5])
        assert outcome["loss_err"] <= 1e-5, (mesh, outcome)
        assert outcome["grad_err"] <= 1e-5, (mesh, outcome)
    return results


@pytest.mark.slow
def test_sharded_lamed_matches_single_device_on_three_meshes():
    results = _sharding_check("lamed")
    assert results["2x2x2"]["sharded_params"] > 50 and results["8x1x1"]["sharded_params"] == 0


def test_clip_loss_over_the_sharded_global_batch_matches_single_device():
    """The batch split over 8, 2 and 1 data shards: the contrastive loss still spans all 8 pairs."""
    results = _sharding_check("clip")
    assert results["2x2x2"]["sharded_params"] > 20
