"""The rules table as the one source of every sharding (parameters of every released recipe, batches,
activations), and sharded creation and training math on 8 simulated CPU devices (run in a subprocess,
since the device count is fixed when jax starts)."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec

from conftest import abstract_model, recipe_config

from m3d_jax.errors import ConfigError
from m3d_jax.layers.params import param, zeros
from m3d_jax.models.unetr import UnetrConfig
from m3d_jax.sharding import (
    LOGICAL_RULES, MESH_AXES, MeshConfig, UnknownLogicalAxisError, batch_sharding, batch_ways, check_batch_sizes,
    logical_axes, spec_for,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _unetr_backbone(config):
    config.model.backbone_kind = "unetr"
    config.model.backbone = dataclasses.asdict(UnetrConfig())


# (config file, variant, change): the released recipes' full-size models (LoRA applied where the recipe has it).
RECIPES = [("lamed", "stage2_phi3", None), ("lamed", "stage2_llama2", None), ("clip", "m3d", None),
           ("med2e3", "stage2", None), ("med3dinsight", "pretrain", None),
           ("med3dinsight", "pretrain", _unetr_backbone), ("med3dinsight_finetune", "segment", None),
           ("med3dinsight_finetune", "classify", None)]


def _recipe_model_state(name: str, variant: str, change) -> nnx.State:
    config = recipe_config(name, variant)
    if change is not None:
        change(config)
    return nnx.state(abstract_model(config))


@pytest.mark.parametrize("name,variant,change", RECIPES,
                         ids=[f"{n}:{v}" + ("+unetr" if c else "") for n, v, c in RECIPES])
def test_every_released_recipe_parameter_has_a_rule(name, variant, change):
    """Abstractly built (eval_shape): every array of the model names its dimensions, each name in the table."""
    known = dict(LOGICAL_RULES)
    unnamed, unknown = [], []
    for path, variable in nnx.to_flat_state(_recipe_model_state(name, variant, change)):
        axes = logical_axes(variable)
        if axes is None or len(axes) != len(variable.shape):
            unnamed.append((path, axes, variable.shape))
        unknown += [(path, axis) for axis in axes or () if axis is not None and axis not in known]
    assert unnamed == [] and unknown == [], (unnamed[:5], unknown[:5])


def test_param_refuses_a_logical_name_missing_from_the_rules_table():
    with pytest.raises(UnknownLogicalAxisError, match=r"\['conv_output'\] of a parameter of shape \(4, 8\).*"
                                                      r"known names: \[.*'conv_out'"):
        param(nnx.Rngs(0), zeros, (4, 8), jnp.float32, ("embed", "conv_output"))
    with pytest.raises(UnknownLogicalAxisError, match="not in the rules table"):
        spec_for(("batch", "features"), (8, 4), AbstractMesh((2, 2, 2), MESH_AXES))


def test_batches_follow_the_rules_batch_entry():
    mesh = AbstractMesh((2, 2, 2), MESH_AXES)
    assert batch_sharding(mesh, 3).spec == PartitionSpec(("data", "fsdp"), None, None) and batch_ways(mesh) == 4
    assert batch_sharding(AbstractMesh((1, 4, 2), MESH_AXES), 2).spec == PartitionSpec("fsdp", None)
    data_only = tuple((name, "data" if name == "batch" else axes) for name, axes in LOGICAL_RULES)
    assert batch_sharding(mesh, 2, data_only).spec == PartitionSpec("data", None)
    assert batch_ways(mesh, data_only) == 2
    check_batch_sizes(mesh, {"data.batch_size": 6}, data_only)
    with pytest.raises(ConfigError, match=r"data.batch_size=6: .* 4 data-parallel ways \(data × fsdp of mesh"):
        check_batch_sizes(mesh, {"data.batch_size": 6})


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
        # under rules keeping the vocabulary whole (given to activation_mesh), constrain keeps it whole
        assert outcome["vocab_whole_spec"] == [*expected_activations[mesh][:2], None], (mesh, outcome)
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
