"""Multi-process start-up: which environment gives which launch, the errors that name the variable to fix, and
two real processes on localhost forming one 4-device mesh."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import pytest

from m3d_jax.train import distributed

REPO = Path(__file__).resolve().parents[1]

SLURM_STEP = {"SLURM_JOB_ID": "4242", "SLURM_STEP_NODELIST": "gpu[001-002]", "SLURM_NTASKS": "2",
              "SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_STEP_NUM_NODES": "2"}

# Everything `initialize` reads, cleared so the machine running the tests cannot steer them.
READ_VARS = (distributed.COORDINATOR, distributed.NUM_PROCESSES, distributed.PROCESS_ID, distributed.MODE,
             distributed.CPU_COLLECTIVES, distributed.JAX_COORDINATOR, "OMPI_MCA_orte_hnp_uri",
             "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "JAX_LOCAL_DEVICE_IDS",
             "SLURM_GPUS_ON_NODE", *SLURM_STEP)


@pytest.fixture
def fresh(monkeypatch):
    """`initialize` as in a new process: no cached result, no cluster variables, not on a TPU VM."""
    for name in READ_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(distributed, "_info", None)
    monkeypatch.setattr(distributed, "_on_cloud_tpu_vm", lambda: False)
    monkeypatch.setattr(distributed, "_distributed_started", lambda: False)
    return monkeypatch


@pytest.fixture
def jax_distributed_calls(fresh):
    """Records jax.distributed.initialize calls instead of starting anything."""
    calls = []
    fresh.setattr(jax.distributed, "initialize", lambda *args, **kwargs: calls.append((args, kwargs)))
    return calls


@pytest.mark.parametrize("given, missing", [
    ({"M3D_NUM_PROCESSES": "2"}, ["M3D_COORDINATOR_ADDRESS", "M3D_PROCESS_ID"]),
    ({"M3D_COORDINATOR_ADDRESS": "10.0.0.1:1234", "M3D_NUM_PROCESSES": "2"}, ["M3D_PROCESS_ID"]),
    ({"M3D_PROCESS_ID": "0", "M3D_NUM_PROCESSES": "2"}, ["M3D_COORDINATOR_ADDRESS"]),
])
def test_partial_explicit_vars_name_the_missing_ones(given, missing):
    with pytest.raises(ValueError) as error:
        distributed.resolve(given)
    unset_part = str(error.value).split(" set but ")[1].split(" not:")[0]
    assert all(name in unset_part for name in missing), str(error.value)


@pytest.mark.parametrize("name, value, expected", [
    ("M3D_NUM_PROCESSES", "two", "M3D_NUM_PROCESSES='two': expected an integer"),
    ("M3D_PROCESS_ID", "1.0", "M3D_PROCESS_ID='1.0': expected an integer"),
    ("M3D_PROCESS_ID", "2", "M3D_PROCESS_ID=2 is outside 0..1"),
    ("M3D_NUM_PROCESSES", "0", "M3D_NUM_PROCESSES=0: expected at least 1"),
    ("M3D_COORDINATOR_ADDRESS", "10.0.0.1", "M3D_COORDINATOR_ADDRESS='10.0.0.1': expected host:port"),
    ("M3D_COORDINATOR_ADDRESS", "10.0.0.1:http", "M3D_COORDINATOR_ADDRESS='10.0.0.1:http': expected host:port"),
])
def test_bad_explicit_values_are_rejected_naming_the_variable(name, value, expected):
    environ = {"M3D_COORDINATOR_ADDRESS": "10.0.0.1:1234", "M3D_NUM_PROCESSES": "2", "M3D_PROCESS_ID": "1",
               name: value}
    with pytest.raises(ValueError, match=expected.replace(".", r"\.")):
        distributed.resolve(environ)


def test_explicit_vars_resolve_and_jax_coordinator_address_stands_in():
    explicit = {"M3D_COORDINATOR_ADDRESS": "[::1]:1234", "M3D_NUM_PROCESSES": "4", "M3D_PROCESS_ID": "3"}
    assert distributed.resolve(explicit) == distributed.Launch("explicit", "[::1]:1234", 4, 3)
    via_jax = {"JAX_COORDINATOR_ADDRESS": "node0:5678", "M3D_NUM_PROCESSES": "2", "M3D_PROCESS_ID": "0"}
    assert distributed.resolve(via_jax) == distributed.Launch("explicit", "node0:5678", 2, 0)
    # Explicit variables win over a detected cluster.
    assert distributed.resolve({**SLURM_STEP, **explicit}).source == "explicit"


def test_clusters_jax_knows_are_detected():
    assert distributed.resolve(SLURM_STEP) == distributed.Launch("slurm")
    assert distributed.resolve({**SLURM_STEP, "SLURM_NTASKS": "1"}).source == "single"
    assert distributed.resolve({"OMPI_MCA_orte_hnp_uri": "x", "OMPI_COMM_WORLD_SIZE": "8"}).source == "openmpi"
    assert distributed.resolve({"TPU_WORKER_HOSTNAMES": "w-0,w-1", "TPU_WORKER_ID": "1"}).source == "gke-tpu"
    assert distributed.resolve({}, on_cloud_tpu_vm=True).source == "cloud-tpu"
    assert distributed.resolve({}).source == "single"
    # Empty values count as unset (e.g. `export M3D_PROCESS_ID=` in a script).
    assert distributed.resolve({"M3D_PROCESS_ID": ""}).source == "single"


def test_slurm_tasks_outside_a_job_step_are_told_to_use_srun():
    outside_step = {key: value for key, value in SLURM_STEP.items() if key not in ("SLURM_STEP_NODELIST",
                                                                                   "SLURM_PROCID")}
    with pytest.raises(ValueError, match="SLURM_STEP_NODELIST, SLURM_PROCID unset.*srun"):
        distributed.resolve(outside_step)


def test_jax_coordinator_address_alone_needs_a_cluster_or_the_counts():
    with pytest.raises(ValueError, match="M3D_NUM_PROCESSES and M3D_PROCESS_ID"):
        distributed.resolve({"JAX_COORDINATOR_ADDRESS": "node0:5678"})
    assert distributed.resolve({"JAX_COORDINATOR_ADDRESS": "node0:5678", **SLURM_STEP}).source == "slurm"


def test_distributed_off_forces_one_process_and_bad_modes_are_named():
    assert distributed.resolve({**SLURM_STEP, "M3D_DISTRIBUTED": "off"}).source == "single"
    with pytest.raises(ValueError, match="M3D_DISTRIBUTED='no'"):
        distributed.resolve({"M3D_DISTRIBUTED": "no"})


def test_single_process_fallback_never_starts_jax_distributed(fresh):
    def forbidden(*args, **kwargs):
        raise AssertionError("jax.distributed.initialize must not run for a single process")

    fresh.setattr(jax.distributed, "initialize", forbidden)
    info = distributed.initialize()
    assert (info.process_index, info.process_count, info.coordinator, info.source) == (0, 1, "single", "single")
    assert (info.local_device_count, info.device_count) == (jax.local_device_count(), jax.device_count())
    assert distributed.initialize() is info
    assert distributed.is_primary()


def test_detected_cluster_calls_jax_distributed_without_arguments(fresh, jax_distributed_calls):
    for name, value in SLURM_STEP.items():
        fresh.setenv(name, value)
    info = distributed.initialize()
    assert jax_distributed_calls == [((), {})]
    assert (info.source, info.coordinator) == ("slurm", "auto")


def test_one_task_per_node_with_one_visible_gpu_is_warned_about(fresh, jax_distributed_calls, caplog):
    for name, value in {**SLURM_STEP, "SLURM_GPUS_ON_NODE": "8"}.items():
        fresh.setenv(name, value)
    fresh.setattr(jax, "local_device_count", lambda: 1)
    distributed.initialize()
    assert "JAX_LOCAL_DEVICE_IDS=0,...,7" in caplog.text


def test_detection_failure_inside_jax_says_what_to_set(fresh):
    def cannot_configure(*args, **kwargs):
        raise ValueError("coordinator_address should be defined.")

    fresh.setattr(jax.distributed, "initialize", cannot_configure)
    fresh.setenv("TPU_WORKER_HOSTNAMES", "w-0,w-1")
    with pytest.raises(RuntimeError, match="gke-tpu cluster.*M3D_COORDINATOR_ADDRESS"):
        distributed.initialize()


def test_explicit_vars_switch_off_cluster_detection(fresh, jax_distributed_calls):
    fresh.setenv("M3D_COORDINATOR_ADDRESS", "127.0.0.1:1234")
    fresh.setenv("M3D_NUM_PROCESSES", "1")
    fresh.setenv("M3D_PROCESS_ID", "0")
    info = distributed.initialize()
    assert jax_distributed_calls == [((), dict(coordinator_address="127.0.0.1:1234", num_processes=1,
                                               process_id=0, cluster_detection_method="deactivate"))]
    assert (info.source, info.coordinator) == ("explicit", "127.0.0.1:1234")


def test_unknown_cpu_collectives_are_rejected_before_jax_starts(fresh, jax_distributed_calls):
    fresh.setenv("M3D_CPU_COLLECTIVES", "nccl")
    with pytest.raises(ValueError, match="M3D_CPU_COLLECTIVES='nccl'"):
        distributed.initialize()
    assert jax_distributed_calls == []


TWO_PROCESS_SCRIPT = textwrap.dedent("""
    import numpy as np
    from m3d_jax.train import distributed

    info = distributed.initialize()
    assert distributed.initialize() is info
    import jax
    import jax.numpy as jnp
    from jax.sharding import NamedSharding, PartitionSpec

    assert jax.config.jax_cpu_collectives_implementation == "gloo"
    mesh = jax.make_mesh((4,), ("data",))
    rows = np.arange(4, dtype=np.int32) + 4 * info.process_index  # process 0: 0..3, process 1: 4..7
    global_rows = jax.make_array_from_process_local_data(NamedSharding(mesh, PartitionSpec("data")), rows, (8,))
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, PartitionSpec()))(global_rows)
    print(f"RESULT process={info.process_index} processes={info.process_count} devices={jax.device_count()} "
          f"local={info.local_device_count} primary={distributed.is_primary()} sum={int(total)}", flush=True)
""")


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_two_processes_form_one_mesh_and_agree_on_a_global_sum():
    env = {key: value for key, value in os.environ.items() if key not in READ_VARS}
    env.update(M3D_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}", M3D_NUM_PROCESSES="2",
               M3D_CPU_COLLECTIVES="gloo", XLA_FLAGS="--xla_force_host_platform_device_count=2",
               JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    workers = [subprocess.Popen([sys.executable, "-c", TWO_PROCESS_SCRIPT], env={**env, "M3D_PROCESS_ID": str(i)},
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for i in range(2)]
    outputs = []
    try:
        for worker in workers:
            outputs.append(worker.communicate(timeout=60)[0])
    except subprocess.TimeoutExpired:
        for worker in workers:
            worker.kill()
        pytest.fail("two-process run did not finish in 60 s:\n" + "\n".join(w.communicate()[0] for w in workers))
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
    for i, (worker, output) in enumerate(zip(workers, outputs)):
        assert worker.returncode == 0, output
        expected = (f"RESULT process={i} processes=2 devices=4 local=2 primary={i == 0} "
                    f"sum={sum(range(8))}")
        assert expected in output, output
