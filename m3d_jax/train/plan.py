"""Plan a training run before renting it: the run's model, LoRA, optimizer state and global batch built
abstractly (no parameter is allocated, no file read), the trainer's own step compiled ahead of time for a
target (a TPU topology, simulated CPU devices, or the local devices), and a report of per-device memory,
whether it fits, parameter counts, step FLOPs, time per step at a given MFU and a sharding audit.

  target "v5e:4x4", "v5p:2x2x2", "2xv5e:16x16" (two slices over the dcn_* mesh axes; TPU compilation
  needs libtpu: pip install 'm3d_jax[tpu]'), "cpu:8" (needs 8 host devices: XLA_FLAGS), "local".
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from ml_collections import ConfigDict

from m3d_jax.errors import InputError
from m3d_jax.sharding import (
    MeshConfig, allowed_mesh_axes, batch_sharding, check_batch_sizes, logical_axes, make_mesh, state_shardings,
)
from m3d_jax.train.flops import hardware_flops, peak_flops, step_flops
from m3d_jax.train.lora import apply_lora
from m3d_jax.train.optim import make_optimizer
from m3d_jax.train.step import lora_of, optimizer_of, task_step
from m3d_jax.train.tasks import get_task

GIB = 1024**3
# Usable HBM per device as the TPU compiler reports it ("exceeds available HBM (15.75G)"), by device_kind.
TPU_MEMORY_BYTES = {"TPU v5 lite": 15.75 * GIB, "TPU v5": 95.74 * GIB, "TPU v5p": 95.74 * GIB,
                    "TPU v6 lite": 31.25 * GIB, "TPU v4": 15.25 * GIB}
HEADROOM = 0.05  # a plan fits when its total stays under 95% of device memory (runtime, fragmentation)
AUDIT_BYTES = 64 * 1024**2
MFUS = (0.4, 0.5, 0.6)
_TPU_TARGET = re.compile(r"^(?:(\d+)x)?(v\d+[a-z]*):(\d+(?:x\d+)*)$")


class PlanError(InputError):
    """A target, mesh or batch that cannot be planned (one line for the user)."""


@dataclasses.dataclass(frozen=True)
class Target:
    """Devices to plan for: `chips` counts physical chips (a v4 chip holds two devices), None off TPU."""

    name: str
    devices: Sequence[jax.Device]
    slices: int = 1
    chips: int | None = None
    memory_bytes: float | None = None

    @property
    def device_kind(self) -> str:
        return self.devices[0].device_kind

    @property
    def devices_per_chip(self) -> int:
        return len(self.devices) // self.chips if self.chips else 1


def resolve_target(name: str) -> Target:
    """The devices of a target name (see the module docstring)."""
    if name == "local":
        devices = jax.devices()
        return Target(name, devices, memory_bytes=_local_memory(devices[0], len(devices)))
    if name.startswith("cpu:"):
        count = _positive_int(name[4:], name)
        devices = jax.devices("cpu")
        if len(devices) < count:
            raise PlanError(f"target {name} needs {count} CPU devices, this process has {len(devices)}: set "
                            f"XLA_FLAGS=--xla_force_host_platform_device_count={count} before JAX starts "
                            "(tools/plan_run.py does)")
        return Target(name, devices[:count], memory_bytes=_local_memory(devices[0], count))
    match = _TPU_TARGET.match(name)
    if not match:
        raise PlanError(f"unknown target {name!r}: use a TPU topology (v5e:4x4, v5p:2x2x2, 2xv5e:16x16), cpu:N "
                        "or local")
    slices = int(match.group(1) or 1)
    topology = f"{match.group(2)}:{match.group(3)}"
    try:
        from jax.experimental import topologies

        devices = topologies.get_topology_desc(platform="tpu", topology_name=topology, chip_config_name="default",
                                               num_slices=slices).devices
    except Exception as error:  # noqa: BLE001 — libtpu missing or the name unknown to it
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        if "tpu" in first.lower() and ("plugin" in first.lower() or "backend" in first.lower()):
            first += "; TPU planning needs libtpu: pip install 'm3d_jax[tpu]'"
        raise PlanError(f"TPU target {name!r}: {first}") from None
    chips = slices * math.prod(int(size) for size in match.group(3).split("x"))
    return Target(name, devices, slices=slices, chips=chips, memory_bytes=TPU_MEMORY_BYTES.get(devices[0].device_kind))


def _positive_int(text: str, name: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise PlanError(f"target {name!r}: cpu:N needs a positive device count")
    return int(text)


def _local_memory(device: jax.Device, count: int) -> float | None:
    try:
        stats = device.memory_stats() or {}
    except Exception:  # noqa: BLE001 — CPU devices have none
        stats = {}
    if stats.get("bytes_limit"):
        return float(stats["bytes_limit"])
    if device.platform == "cpu":
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / count  # host RAM, shared
    return None


@dataclasses.dataclass
class AbstractRun:
    """A run built abstractly: every array a ShapeDtypeStruct laid out on the mesh."""

    task: Any
    mesh: jax.sharding.Mesh
    model_config: Any
    graphdef: nnx.GraphDef
    state: nnx.State  # (model, optimizer), ShapeDtypeStructs with shardings
    wrt: Any
    batch: dict[str, jax.ShapeDtypeStruct]
    shardings: nnx.State

    def step(self) -> Any:
        """A fresh jit of the trainer's step (train/step.py:task_step): a fresh trace each time it is lowered,
        so a lowering under `unrolled_scans` is not served from the cache of a scanned one."""
        return task_step(self.task, self.graphdef, self.wrt, self.shardings, self.mesh)


def abstract_run(config: ConfigDict, target: Target) -> AbstractRun:
    """The config's model (LoRA applied), optimizer and global batch as sharded ShapeDtypeStructs on the
    target's mesh, and the trainer's step for them."""
    task = get_task(config.get("task", "lamed"))
    mesh = make_mesh(_mesh_config(config, target), target.devices)
    check_batch_sizes(mesh, {"data.batch_size": config.data.batch_size})
    _, model_config, make_model = task.build(config, without_tokenizer=True)
    lora = lora_of(config)
    optim, wrt = optimizer_of(config)

    def build():
        model = make_model()
        if lora is not None:
            apply_lora(model, lora, rngs=nnx.Rngs(config.seed + 1))
        return model, nnx.Optimizer(model, make_optimizer(optim), wrt=wrt)

    graphdef, abstract = nnx.split(nnx.eval_shape(build))
    shardings = state_shardings(abstract, mesh)
    state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
    batch = {key: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sharding(mesh, len(x.shape)))
             for key, x in task.batch_shapes(config, model_config).items()}
    missing = sorted(set(task.inputs) - set(batch))
    if missing:
        raise PlanError(f"task {task.name}: batch_shapes lacks the step's inputs {missing}")
    return AbstractRun(task, mesh, model_config, graphdef, state, wrt, batch, shardings)


def unsharded_hardware_flops(config: ConfigDict) -> float | None:
    """Hardware FLOPs of the config's step lowered for one CPU device (XLA's count of the global program
    does not depend on the mesh), for backends that cannot analyse a lowered program (TPU)."""
    single = ConfigDict(config.to_dict())
    single.mesh = ConfigDict(dict(data=1, fsdp=1, tensor=1, dcn_data=1, dcn_fsdp=1, dcn_tensor=1))
    run = abstract_run(single, Target("cpu:1", jax.devices("cpu")[:1]))
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype)
    return hardware_flops(run.step, run.state, run.batch, key)


def _mesh_config(config: ConfigDict, target: Target) -> MeshConfig:
    mesh = MeshConfig(**config.mesh)
    dcn = (mesh.dcn_data, mesh.dcn_fsdp, mesh.dcn_tensor)
    if target.slices > 1 and math.prod(dcn) == 1:
        mesh = dataclasses.replace(mesh, dcn_data=target.slices)  # slices replicate over data by default
    elif math.prod(dcn) != target.slices:
        raise PlanError(f"the mesh's dcn axes {dcn} make {math.prod(dcn)} slices, target {target.name} has "
                        f"{target.slices}")
    try:
        mesh.shapes(len(target.devices))
    except ValueError as error:
        raise PlanError(f"mesh {dataclasses.asdict(mesh)} does not fit target {target.name} "
                        f"({len(target.devices)} devices): {error}") from None
    return mesh


def plan(config: ConfigDict, target: Target, *, headroom: float = HEADROOM,
         audit_bytes: int = AUDIT_BYTES) -> dict[str, Any]:
    """Compiles the run's step for the target and reports (the keys are described in the README,
    "Planning a run"). `config.peak_flops_per_device` > 0 overrides the device's peak."""
    run = abstract_run(config, target)
    key = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=NamedSharding(run.mesh, PartitionSpec()))
    lowered = run.step().lower(run.state, run.batch, key)
    memory, compile_error = None, None
    try:
        memory = lowered.compile().memory_analysis()
    except Exception as error:  # noqa: BLE001 — the compiler's out-of-memory verdict is a result here
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        compile_error = str(error).strip().splitlines()[0]
    flops = step_flops(run.task.loss, run.graphdef, run.state, run.batch, key, run.step)
    if flops.hardware is None:  # TPU: XLA analyses no program before compiling it
        flops = dataclasses.replace(flops, hardware=unsharded_hardware_flops(config))
    parts = state_bytes(run)
    device_memory = target.memory_bytes
    if memory is not None:
        per_device = {"arguments": memory.argument_size_in_bytes, "temporaries": memory.temp_size_in_bytes,
                      "outputs": memory.output_size_in_bytes, "aliased": memory.alias_size_in_bytes,
                      "code": memory.generated_code_size_in_bytes}
        per_device["total"] = (per_device["arguments"] + per_device["temporaries"] + per_device["outputs"]
                               - per_device["aliased"] + per_device["code"])
    else:  # the compiler names the temporaries it needed; the arguments are the state and the batch
        temporaries = _required_bytes(compile_error) or 0
        arguments = sum(_shard_bytes(x) for x in jax.tree.leaves((run.state, run.batch)))
        per_device = {"arguments": arguments, "temporaries": temporaries, "total": arguments + temporaries}
    fits = memory is not None and (device_memory is None or per_device["total"] <= (1 - headroom) * device_memory)
    peak = peak_flops(target.devices[0], override=config.get("peak_flops_per_device", 0.0),
                      devices_per_chip=target.devices_per_chip)
    seconds = {str(m): (flops.model / (m * peak * len(target.devices)) if peak else None) for m in MFUS}
    total_steps = int(config.total_steps)
    report = {
        "target": target.name, "device_kind": target.device_kind, "num_devices": len(target.devices),
        "chips": target.chips, "mesh": {axis: int(size) for axis, size in run.mesh.shape.items()},
        "global_batch": int(config.data.batch_size), "per_device_bytes": per_device,
        "device_memory_bytes": device_memory, "headroom": headroom, "fits": bool(fits),
        "compile_error": compile_error, "params": parts["params_count"],
        "trainable_params": parts["trainable_count"], "state_bytes_per_device": parts["per_device"],
        "model_flops_per_step": flops.model, "hardware_flops_per_step": flops.hardware,
        "peak_flops_per_device": peak, "seconds_per_step_at_mfu": seconds, "total_steps": total_steps,
        "days_for_total_steps_at_mfu_0.5": (total_steps * seconds["0.5"] / 86400 if seconds["0.5"] else None),
        "audit_bytes": audit_bytes, "audit": audit(run, audit_bytes),
    }
    report["advice"] = [] if fits else advice(report, config)
    return report


def _required_bytes(message: str | None) -> float | None:
    """The compiler's "required ... (X G) exceeds available HBM" figure, in bytes."""
    found = re.search(r"\(([\d.]+)([KMGT])\) exceeds available", message or "")
    return float(found.group(1)) * 1024 ** "KMGT".index(found.group(2)) * 1024 if found else None


def _shard_bytes(x: jax.ShapeDtypeStruct) -> int:
    shape = x.sharding.shard_shape(x.shape) if x.sharding is not None else x.shape
    return math.prod(shape) * np.dtype(x.dtype).itemsize


def state_bytes(run: AbstractRun) -> dict[str, Any]:
    """Parameter counts and per-device bytes of the state: parameters (frozen and trained), optimizer
    state, and the gradients the step holds (one per trained parameter, in its dtype)."""
    per_device = {"parameters": 0, "optimizer_state": 0, "gradients": 0}
    params = trainable = 0
    for (part, *path), variable in nnx.to_flat_state(run.state):
        value = variable.get_value()
        if part == 1:  # (model, optimizer)
            per_device["optimizer_state"] += _shard_bytes(value)
        elif isinstance(variable, nnx.Param):
            params += math.prod(value.shape)
            per_device["parameters"] += _shard_bytes(value)
            if run.wrt(tuple(path), variable):
                trainable += math.prod(value.shape)
                per_device["gradients"] += _shard_bytes(value)
    return {"params_count": params, "trainable_count": trainable, "per_device": per_device}


def audit(run: AbstractRun, threshold: int = AUDIT_BYTES) -> list[dict[str, Any]]:
    """State arrays above `threshold` bytes per device that are replicated, or sharded over fewer mesh
    axes than their logical names allow under the rules table (a dimension the axis does not divide)."""
    findings = []
    for path, variable in nnx.to_flat_state(run.state):
        value = variable.get_value()
        size = _shard_bytes(value)
        if size <= threshold:
            continue
        used = {axis for entry in value.sharding.spec for axis in ((entry,) if isinstance(entry, str) else entry or ())}
        allowed = allowed_mesh_axes(logical_axes(variable), run.mesh)
        if used >= allowed and used:
            continue
        findings.append({"path": "/".join(map(str, path)), "shape": list(value.shape),
                         "logical_axes": list(logical_axes(variable) or ()), "bytes_per_device": size,
                         "sharded_over": sorted(used), "allowed": sorted(allowed)})
    return findings


def advice(report: dict[str, Any], config: ConfigDict) -> list[str]:
    """What takes the memory of a plan that does not fit, largest first, and what to change."""
    state = report["state_bytes_per_device"]
    total = report["per_device_bytes"].get("total") or 0
    parts = dict(state)
    parts["activations and other temporaries"] = max(0, total - sum(state.values()))
    lines = [", ".join(f"{name} {value / GIB:.2f} GiB" for name, value in
                       sorted(parts.items(), key=lambda item: -item[1])) + " per device"]
    mesh = report["mesh"]
    if state["parameters"] + state["optimizer_state"] > 0.3 * total and mesh.get("data", 1) > 1:
        lines.append(f"shard the state: move data-parallel ways to fsdp (--config.mesh.fsdp=-1 "
                     f"--config.mesh.data=1; now data {mesh['data']}, fsdp {mesh['fsdp']})")
    if parts["activations and other temporaries"] > 0.5 * total:
        per_device = report["global_batch"] / max(1, mesh.get("data", 1) * mesh.get("fsdp", 1))
        lines.append(f"cut activations: remat 'full' instead of 'dots_no_batch' in the model's stacks, or a "
                     f"smaller per-device batch ({per_device:g} now) with optim.accumulation_steps to keep the "
                     "global batch")
    lines.append("or use a larger slice")
    return lines


def _count(value: int) -> str:
    return f"{value / 1e9:.3f} B" if value >= 1e8 else f"{value / 1e6:.3f} M"


def format_report(report: dict[str, Any]) -> str:
    """The report as a short table for the console."""
    per_device = report["per_device_bytes"]
    memory = report["device_memory_bytes"]

    def gib(value):
        return f"{value / GIB:.2f} GiB" if value is not None else "?"

    verdict = "fits" if report["fits"] else "DOES NOT FIT"
    rows = [
        ("target", f"{report['target']} ({report['num_devices']} × {report['device_kind']})"),
        ("mesh", " × ".join(f"{axis} {size}" for axis, size in report["mesh"].items())),
        ("global batch", str(report["global_batch"])),
        ("parameters", f"{_count(report['params'])} ({_count(report['trainable_params'])} trained)"),
        ("per device", ", ".join(f"{name} {gib(value)}" for name, value in per_device.items())
         + f" of {gib(memory)}: {verdict} (headroom {report['headroom']:.0%})"),
        ("state per device", ", ".join(f"{name} {gib(v)}" for name, v in report["state_bytes_per_device"].items())),
        ("FLOPs per step", f"model {report['model_flops_per_step']:.4g}, hardware "
                           f"{report['hardware_flops_per_step'] or 0:.4g}"),
    ]
    seconds = report["seconds_per_step_at_mfu"]
    if seconds["0.5"]:
        rows.append(("s / step at MFU", ", ".join(f"{m}: {s:.3g}" for m, s in seconds.items())))
        rows.append(("days at MFU 0.5", f"{report['days_for_total_steps_at_mfu_0.5']:.2f} for "
                                        f"{report['total_steps']} steps"))
    if report["compile_error"]:
        rows.append(("compiler", report["compile_error"]))
    width = max(len(name) for name, _ in rows)
    lines = [f"{name:<{width}}  {value}" for name, value in rows]
    for line in report["advice"]:
        lines.append(f"{'advice':<{width}}  {line}")
    if report["audit"]:
        lines.append(f"sharding audit: {len(report['audit'])} arrays above {report['audit_bytes'] / 1024**2:g} MiB per "
                     "device are replicated or under-sharded")
        for finding in report["audit"]:
            lines.append(f"  {finding['path']} {finding['shape']} {finding['bytes_per_device'] / GIB:.2f} GiB: "
                         f"sharded over {finding['sharded_over'] or 'nothing'}, rules allow {finding['allowed']}")
    else:
        lines.append(f"sharding audit: no replicated or under-sharded array above {report['audit_bytes'] / 1024**2:g} "
                     "MiB")
    return "\n".join(lines)

