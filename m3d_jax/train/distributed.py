"""Joins this process to its multi-process JAX job. Call `initialize()` once, before any other JAX use.

Where the job's shape comes from, first match wins:

1. `M3D_DISTRIBUTED=off`: one process, whatever else is set.
2. Explicit variables, all three or none: `M3D_COORDINATOR_ADDRESS` (host:port of process 0; JAX's own
   `JAX_COORDINATOR_ADDRESS` is accepted in its place), `M3D_NUM_PROCESSES`, `M3D_PROCESS_ID`. JAX's cluster
   detection is switched off so these win, and each process sees all its local devices (restrict them with
   JAX's `JAX_LOCAL_DEVICE_IDS=0,1,...`).
3. A cluster JAX detects by itself, started with `jax.distributed.initialize()` and no arguments: Open MPI or
   SLURM with more than one task, a GKE TPU slice (`TPU_WORKER_HOSTNAMES`), a Cloud TPU VM (single- or
   multi-host; multi-slice through the `MEGASCALE_*` variables that queued resources and GKE set).
4. Otherwise one process; `jax.distributed` is not started.

`M3D_CPU_COLLECTIVES=gloo` (or `mpi`) picks the cross-process collectives of CPU devices, which multi-process
runs on CPU (tests, debugging) need.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import jax
from absl import logging

COORDINATOR = "M3D_COORDINATOR_ADDRESS"
NUM_PROCESSES = "M3D_NUM_PROCESSES"
PROCESS_ID = "M3D_PROCESS_ID"
MODE = "M3D_DISTRIBUTED"
CPU_COLLECTIVES = "M3D_CPU_COLLECTIVES"
JAX_COORDINATOR = "JAX_COORDINATOR_ADDRESS"

# What JAX's SLURM detection reads; srun sets them for every task of a job step.
_SLURM_STEP_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
_MODES = ("auto", "off")
_CPU_COLLECTIVES = ("gloo", "mpi")


@dataclasses.dataclass(frozen=True)
class Launch:
    """How this process joins its job, before JAX starts: `source` is "explicit", "openmpi", "slurm",
    "gke-tpu", "cloud-tpu" or "single"; the numbers are set only when explicit."""

    source: str
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None


@dataclasses.dataclass(frozen=True)
class DistributedInfo:
    process_index: int
    process_count: int
    local_device_count: int
    device_count: int
    coordinator: str  # host:port when explicit, "auto" when JAX found it, "single" for one process
    source: str  # as Launch.source, or "preinitialized" when jax.distributed was started elsewhere


_info: DistributedInfo | None = None


def resolve(environ: Mapping[str, str], *, on_cloud_tpu_vm: bool = False) -> Launch:
    """The launch these environment variables describe (no side effects); raises ValueError naming the
    variable to fix."""
    env = {key: value for key, value in environ.items() if value != ""}
    mode = env.get(MODE, "auto").lower()
    if mode not in _MODES:
        raise ValueError(f"{MODE}={env[MODE]!r}: expected one of {', '.join(_MODES)}")
    if mode == "off":
        return Launch("single")

    if any(name in env for name in (COORDINATOR, NUM_PROCESSES, PROCESS_ID)):
        return _explicit(env)

    cluster = _detected_cluster(env, on_cloud_tpu_vm)
    if cluster is not None:
        return Launch(cluster)
    if JAX_COORDINATOR in env:
        raise ValueError(f"{JAX_COORDINATOR} is set but no cluster was detected to give the process count and "
                         f"index: also set {NUM_PROCESSES} and {PROCESS_ID}")
    return Launch("single")


def _explicit(env: dict[str, str]) -> Launch:
    coordinator = env.get(COORDINATOR, env.get(JAX_COORDINATOR))
    missing = [name for name, value in ((COORDINATOR, coordinator), (NUM_PROCESSES, env.get(NUM_PROCESSES)),
                                        (PROCESS_ID, env.get(PROCESS_ID))) if value is None]
    if missing:
        given = [name for name in (COORDINATOR, NUM_PROCESSES, PROCESS_ID) if name in env]
        raise ValueError(f"{' and '.join(given)} {'is' if len(given) == 1 else 'are'} set but "
                         f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not: set all of "
                         f"{COORDINATOR} (host:port of process 0), {NUM_PROCESSES} and {PROCESS_ID}, or none "
                         "of them to let JAX detect the cluster")
    num_processes = _integer(env, NUM_PROCESSES)
    process_id = _integer(env, PROCESS_ID)
    if num_processes < 1:
        raise ValueError(f"{NUM_PROCESSES}={num_processes}: expected at least 1")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"{PROCESS_ID}={process_id} is outside 0..{num_processes - 1} "
                         f"({NUM_PROCESSES}={num_processes})")
    source_name = COORDINATOR if COORDINATOR in env else JAX_COORDINATOR
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{source_name}={coordinator!r}: expected host:port (the address of process 0 and a "
                         "port free on it), e.g. 10.0.0.1:1234")
    return Launch("explicit", coordinator, num_processes, process_id)


def _integer(env: dict[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise ValueError(f"{name}={env[name]!r}: expected an integer") from None


def _detected_cluster(env: dict[str, str], on_cloud_tpu_vm: bool) -> str | None:
    """The cluster jax.distributed.initialize() would detect (checked in JAX's order), if it has more than
    one process or is a TPU slice."""
    if "OMPI_MCA_orte_hnp_uri" in env and "OMPI_COMM_WORLD_SIZE" in env:
        if _integer(env, "OMPI_COMM_WORLD_SIZE") > 1:
            return "openmpi"
    if "SLURM_NTASKS" in env and _integer(env, "SLURM_NTASKS") > 1:
        missing = [name for name in _SLURM_STEP_VARS if name not in env]
        if missing:
            raise ValueError(f"SLURM_NTASKS={env['SLURM_NTASKS']} but {', '.join(missing)} unset: this process "
                             f"is not a task of a job step; start it with srun (or set {MODE}=off for one process)")
        return "slurm"
    if "TPU_WORKER_HOSTNAMES" in env or "TPU_PROCESS_ADDRESSES" in env:
        return "gke-tpu"
    if on_cloud_tpu_vm:
        return "cloud-tpu"
    return None


def _on_cloud_tpu_vm() -> bool:
    """Whether JAX found TPU chips and libtpu when it was imported (decided in `import jax`, before any
    backend starts). The flag is JAX-internal, hence the guarded lookup."""
    try:
        from jax._src import cloud_tpu_init
    except ImportError:
        return False
    return bool(getattr(cloud_tpu_init, "running_in_cloud_tpu_vm", False))


def _distributed_started() -> bool:
    is_initialized = getattr(jax.distributed, "is_initialized", None)
    return bool(is_initialized and is_initialized())


def _set_cpu_collectives(environ: Mapping[str, str]) -> None:
    value = environ.get(CPU_COLLECTIVES, "").lower()
    if not value:
        return
    if value not in _CPU_COLLECTIVES:
        raise ValueError(f"{CPU_COLLECTIVES}={environ[CPU_COLLECTIVES]!r}: expected one of "
                         f"{', '.join(_CPU_COLLECTIVES)}")
    jax.config.update("jax_cpu_collectives_implementation", value)


def initialize() -> DistributedInfo:
    """Starts jax.distributed as the environment says (module docstring) and returns where this process
    stands. Idempotent: later calls return the first result."""
    global _info
    if _info is not None:
        return _info
    launch = resolve(os.environ, on_cloud_tpu_vm=_on_cloud_tpu_vm())
    _set_cpu_collectives(os.environ)

    coordinator, source = launch.coordinator or "auto", launch.source
    if _distributed_started():
        source = "preinitialized"
    elif launch.source == "single":
        coordinator = "single"
    elif launch.source == "explicit":
        jax.distributed.initialize(coordinator_address=launch.coordinator, num_processes=launch.num_processes,
                                   process_id=launch.process_id, cluster_detection_method="deactivate")
    else:
        try:
            jax.distributed.initialize()
        except ValueError as error:
            raise RuntimeError(f"detected a {launch.source} cluster, but jax.distributed.initialize() could not "
                               f"configure itself from it ({error}); set {COORDINATOR}, {NUM_PROCESSES} and "
                               f"{PROCESS_ID} explicitly, or {MODE}=off for one process") from error

    info = DistributedInfo(process_index=jax.process_index(), process_count=jax.process_count(),
                           local_device_count=jax.local_device_count(), device_count=jax.device_count(),
                           coordinator=coordinator, source=source)
    if source == "explicit" and info.process_count != launch.num_processes:
        raise RuntimeError(f"{NUM_PROCESSES}={launch.num_processes} but JAX reports {info.process_count} "
                           "processes")
    if info.process_index == 0:
        logging.info("JAX distributed: process %d of %d (%s, coordinator %s), %d local of %d %s devices",
                     info.process_index, info.process_count, info.source, info.coordinator,
                     info.local_device_count, info.device_count, jax.default_backend())
    _warn_one_gpu_per_node(info)
    _info = info
    return info


def _warn_one_gpu_per_node(info: DistributedInfo) -> None:
    """JAX's SLURM detection gives each task only GPU number SLURM_LOCALID, meant for one task per GPU; with
    one task per node that leaves the node's other GPUs idle."""
    env = os.environ
    if info.source != "slurm" or "JAX_LOCAL_DEVICE_IDS" in env or info.local_device_count != 1:
        return
    try:
        gpus = int(env.get("SLURM_GPUS_ON_NODE", "0"))
        tasks_per_node = int(env["SLURM_NTASKS"]) // int(env["SLURM_STEP_NUM_NODES"])
    except (KeyError, ValueError):
        return
    if gpus > 1 and tasks_per_node == 1:
        logging.warning("one JAX process per node sees 1 of this node's %d GPUs: JAX's SLURM detection restricts "
                        "each task to GPU SLURM_LOCALID. Export JAX_LOCAL_DEVICE_IDS=0,...,%d, or launch one task "
                        "per GPU", gpus, gpus - 1)


def is_primary() -> bool:
    """Whether this is process 0, the one that logs and writes shared files. Call after `initialize()`."""
    return jax.process_index() == 0
