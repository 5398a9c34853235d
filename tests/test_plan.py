"""tools/plan_run.py: the trainer's step compiled ahead of time for simulated CPU devices and a TPU topology
(libtpu), the report's numbers, the out-of-memory verdict with advice, the sharding audit and one-line
errors for bad targets, meshes and batches."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO = "--config=configs/demo.py"
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu is not installed (pip install 'm3d_jax[tpu]'): "
                                                         "TPU planning not tested")


def _plan(*args, out=None):
    command = [sys.executable, "tools/plan_run.py", *args] + ([f"--out={out}"] if out else [])
    env = {key: value for key, value in os.environ.items() if key not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    report = json.loads(Path(out).read_text()) if out and Path(out).exists() else None
    return result, report


def test_plan_for_simulated_cpu_devices_reports_memory_flops_and_time(tmp_path):
    result, report = _plan(DEMO, "--target=cpu:8", "--config.peak_flops_per_device=1e12", out=tmp_path / "p.json")
    assert result.returncode == 0, result.stderr[-2000:]
    assert report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2} and report["num_devices"] == 8
    assert report["fits"] and report["global_batch"] == 32
    per_device = report["per_device_bytes"]
    assert per_device["total"] > 0 and per_device["arguments"] > 0
    assert 0 < report["trainable_params"] < report["params"]  # the demo's ViT is frozen
    assert report["model_flops_per_step"] > 0 and report["hardware_flops_per_step"] > 0
    seconds = report["seconds_per_step_at_mfu"]
    assert seconds["0.5"] == pytest.approx(report["model_flops_per_step"] / (0.5 * 1e12 * 8))
    days = report["total_steps"] * seconds["0.5"] / 86400
    assert report["days_for_total_steps_at_mfu_0.5"] == pytest.approx(days)
    assert "sharding audit" in result.stdout and "FLOPs per step" in result.stdout


def test_plan_counts_hardware_flops_of_scanned_stacks_once_per_layer(tmp_path):
    _, looped = _plan(DEMO, "--target=cpu:8", out=tmp_path / "looped.json")
    _, scanned = _plan(DEMO, "--target=cpu:8", "--config.model.vision.scan_layers=True",
                       "--config.model.vision.num_layers=4", out=tmp_path / "scanned.json")
    _, deeper = _plan(DEMO, "--target=cpu:8", "--config.model.vision.num_layers=4", out=tmp_path / "deeper.json")
    assert scanned["hardware_flops_per_step"] == pytest.approx(deeper["hardware_flops_per_step"], rel=0.05)
    assert scanned["model_flops_per_step"] == deeper["model_flops_per_step"] > looped["model_flops_per_step"]


def test_plan_counts_the_same_parameters_as_the_trainer(tmp_path):
    """The planner's abstract build (no tokenizer file, LoRA applied) against the trainer's real model."""
    script = (
        "import os; os.environ['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'\n"
        "import sys, json; sys.path.insert(0, 'configs')\n"
        "import demo\n"
        "from flax import nnx\n"
        "from m3d_jax.train.trainer import setup\n"
        "config = demo.get_config(); config.lora = dict(rank=4, alpha=8.0, dropout=0.0, "
        "targets=('q_proj', 'v_proj'), under='language_model')\n"
        "run = setup(config)\n"
        "params = [(p, v) for p, v in nnx.to_flat_state(nnx.state(run.model, nnx.Param))]\n"
        "print(json.dumps([sum(v[...].size for _, v in params), sum(v[...].size for p, v in params if run.wrt(p, v))]))\n"
    )
    real = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert real.returncode == 0, real.stderr[-2000:]
    total, trained = json.loads(real.stdout.strip().splitlines()[-1])
    lora = ["--config.lora.rank=4", "--config.lora.alpha=8.0", "--config.lora.dropout=0.0"]
    result, report = _plan(DEMO, "--target=cpu:8", *lora, "--config.lora.targets=('q_proj', 'v_proj')",
                           out=tmp_path / "p.json")
    assert result.returncode == 0, result.stderr[-2000:]
    assert (report["params"], report["trainable_params"]) == (total, trained)


@needs_libtpu
def test_plan_compiles_for_a_tpu_topology(tmp_path):
    result, report = _plan(DEMO, "--target=v5e:2x2", "--config.mesh.tensor=1", out=tmp_path / "p.json")
    assert result.returncode == 0, result.stderr[-2000:]
    assert report["device_kind"] == "TPU v5 lite" and report["num_devices"] == 4 and report["chips"] == 4
    assert report["device_memory_bytes"] == pytest.approx(15.75 * 1024**3)
    assert report["fits"] and report["per_device_bytes"]["total"] > 0
    assert report["peak_flops_per_device"] == 197e12
    assert report["hardware_flops_per_step"] > 0  # counted on an unsharded CPU lowering of the same step


@needs_libtpu
def test_plan_that_overflows_hbm_names_the_costs_and_what_to_change(tmp_path):
    result, report = _plan(DEMO, "--target=v5e:2x2", "--config.mesh.tensor=1", "--config.data.batch_size=65536",
                           out=tmp_path / "p.json")
    assert result.returncode == 1  # planned, does not fit
    assert not report["fits"] and "exceeds available HBM" in report["compile_error"]
    assert report["per_device_bytes"]["total"] > 15.75 * 1024**3
    advice = " ".join(report["advice"])
    assert "activations and other temporaries" in advice and "accumulation_steps" in advice
    assert "DOES NOT FIT" in result.stdout


def test_sharding_audit_lists_replicated_and_under_sharded_arrays(tmp_path):
    # An MLP width of 129: the tensor axis (2) cannot split it, so those kernels are fsdp-sharded only.
    result, report = _plan(DEMO, "--target=cpu:8", "--audit_mib=0", "--config.model.decoder.intermediate_size=129",
                           out=tmp_path / "p.json")
    assert result.returncode == 0, result.stderr[-2000:]
    found = {entry["path"]: entry for entry in report["audit"]}
    gate = found["0/language_model/layers/mlp/gate_proj/kernel"]
    assert gate["sharded_over"] == ["fsdp"] and gate["allowed"] == ["fsdp", "tensor"] and gate["shape"][-1] == 129
    assert found["1/step"]["sharded_over"] == []  # replicated (a scalar: listed only at threshold 0)
    assert "0/language_model/layers/self_attn/q_proj/kernel" not in found  # fully sharded
    assert "sharding audit: " in result.stdout
    result, report = _plan(DEMO, "--target=cpu:8", out=tmp_path / "default.json")
    assert report["audit"] == []  # nothing of the tiny model reaches 64 MiB


@pytest.mark.parametrize("args, message", [
    (("--target=banana",), "unknown target 'banana'"),
    (("--target=cpu:0",), "positive device count"),
    (("--target=cpu:4",), "needs 8 devices per slice, have 4"),
    (("--target=cpu:8", "--config.data.batch_size=6"), "data.batch_size=6: a global batch must be a positive multiple of the mesh's 4"),
    pytest.param(("--target=v5e:3x3",), "TPU target 'v5e:3x3'", marks=needs_libtpu),
])
def test_bad_targets_meshes_and_batches_are_one_line_errors(args, message):
    result, _ = _plan(DEMO, *args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error: ") and message in result.stderr
