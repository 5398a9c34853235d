"""The training entry point end to end on the demo config (tiny LaMed on phantoms): the short demo, exact
resume after SIGKILL (also mid-checkpoint-write), restore onto another mesh, non-finite handling, two real
processes matching one, and one process resuming their run."""

from __future__ import annotations

import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).parent.parent
DEMO = ROOT / "configs" / "demo.py"
QUICK = ["--config.data.batch_size=8", "--config.log_every=1", "--config.log_samples=True",
         "--config.checkpoint.every=1", "--config.checkpoint.keep=0", "--config.eval.loss_batches=0",
         "--config.eval.vqa_samples=0", "--config.export_pytorch=False", "--config.progress=False"]


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory):
    from m3d_jax.data.phantoms import write_phantoms

    return write_phantoms(tmp_path_factory.mktemp("phantoms"), num_cases=24, seed=0)


def _train(workdir, root, *overrides, env=None, check=True, devices=8):
    command = _command(workdir, root, devices, *overrides)
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT,
                            env={**os.environ, "XLA_FLAGS": "", **(env or {})})
    if check and result.returncode != 0:
        raise AssertionError(f"training failed ({result.returncode}):\n{result.stderr[-4000:]}")
    return result


def _command(workdir, root, devices, *overrides) -> list[str]:
    return [sys.executable, "-m", "m3d_jax.train", f"--config={DEMO}", f"--workdir={workdir}",
            f"--config.data.root={root}", f"--config.cpu_devices={devices}", *overrides]


def _losses(workdir) -> dict[int, float]:
    rows = [json.loads(line) for line in open(pathlib.Path(workdir) / "metrics.jsonl")]
    return {row["step"]: row["loss"] for row in rows if row["split"] == "train"}


def _samples(workdir, process: int = 0) -> dict[int, list[int]]:
    lines = open(pathlib.Path(workdir) / f"samples_p{process}.jsonl")
    return {row["step"]: row["samples"] for row in map(json.loads, lines)}


def _finished_steps(workdir) -> list[int]:
    return sorted(int(p.name) for p in (pathlib.Path(workdir) / "checkpoints").iterdir() if p.name.isdigit())


def test_demo_short_run_from_prepared_shards_trains_evaluates_and_exports(phantom_root, tmp_path_factory):
    """The README's main job, a few steps, reading prepared shards (`data.shards`; the other tests here read
    the raw files): loss falls, eval runs, Orbax checkpoint and PyTorch export exist."""
    from m3d_jax.data.shard_writer import prepare_shards
    from m3d_jax.data.shards import Settings

    shards = tmp_path_factory.mktemp("shards")
    sources = [dict(kind="vqa_closed", path=name, split="") for name in ("vqa_train.csv", "vqa_validation.csv")]
    prepare_shards(sources, str(phantom_root), str(shards), Settings((32, 64, 64)))
    tmp_path = tmp_path_factory.mktemp("run")
    result = _train(tmp_path, phantom_root, "--config.total_steps=12", "--config.log_every=4",
                    "--config.eval.vqa_samples=6", "--config.eval.loss_batches=1", "--config.progress=False",
                    "--config.peak_flops_per_device=1e9", f"--config.data.shards={shards}")
    losses = _losses(tmp_path)
    assert losses[12] < losses[4], losses
    # MFU from model FLOPs, HFU from hardware FLOPs, both against the given peak on 8 devices
    found = re.search(r"FLOPs per step: model ([\d.e+]+), hardware ([\d.e+]+)", result.stdout + result.stderr)
    model, hardware = float(found.group(1)), float(found.group(2))
    assert model > 0 and hardware > 0
    row = [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if '"train"' in line][-1]
    assert row["mfu"] == pytest.approx(model / (row["step_time_s"] * 1e9 * 8), rel=1e-3)
    assert row["hfu"] / row["mfu"] == pytest.approx(hardware / model, rel=1e-3)
    assert "final eval: lm_loss" in result.stdout + result.stderr
    evals = [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if '"eval"' in line]
    assert 0.0 <= evals[-1]["vqa_closed_accuracy"] <= 1.0 and np.isfinite(evals[-1]["lm_loss"])
    assert _finished_steps(tmp_path)[-1] == 12
    export = tmp_path / "pytorch"
    config = json.loads((export / "config.json").read_text())
    assert config["model_type"] == "lamed_phi3" and (export / "tokenizer.json").exists()
    assert any(export.glob("*.safetensors"))
    assert list((tmp_path / "tensorboard").iterdir())


def test_sigkill_mid_save_then_resume_replays_the_same_losses_and_samples(phantom_root, tmp_path):
    steps = 8
    reference = tmp_path / "uninterrupted"
    _train(reference, phantom_root, f"--config.total_steps={steps}", *QUICK)
    expected_losses, expected_samples = _losses(reference), _samples(reference)

    kill_step = int(np.random.default_rng().integers(3, 7))
    killed = tmp_path / "killed"
    result = _train(killed, phantom_root, f"--config.total_steps={steps}", *QUICK,
                    env={"M3D_JAX_FAULT_KILL_AT_SAVE": str(kill_step)}, check=False)
    assert result.returncode == -9, result.stderr[-2000:]
    # The step being written when the process died is not a checkpoint; the one before it is.
    assert _finished_steps(killed)[-1] == kill_step - 1, (kill_step, _finished_steps(killed))

    _train(killed, phantom_root, f"--config.total_steps={steps}", *QUICK)
    resumed_losses, resumed_samples = _losses(killed), _samples(killed)  # the last line per step wins
    for step in range(1, steps + 1):
        assert resumed_losses[step] == expected_losses[step], (step, kill_step)
        assert resumed_samples[step] == expected_samples[step]
    consumed = [i for step in range(1, steps + 1) for i in resumed_samples[step]]
    assert consumed == list(range(steps * 8)), "samples repeated or skipped across the restart"

    # The same run restored onto a different mesh shape continues with the same losses (fp32 tolerance).
    other = tmp_path / "other_mesh"
    shutil.copytree(reference / "checkpoints", other / "checkpoints")
    for step in (7, 8):
        shutil.rmtree(other / "checkpoints" / str(step))
    _train(other, phantom_root, f"--config.total_steps={steps}", *QUICK, "--config.mesh.data=1",
           "--config.mesh.fsdp=4", "--config.mesh.tensor=2")
    other_losses = _losses(other)
    for step in (7, 8):
        assert abs(other_losses[step] - expected_losses[step]) <= 1e-5 * abs(expected_losses[step]), step
    assert _samples(other)[7] == expected_samples[7]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_match_one_process_and_one_process_resumes_their_run(phantom_root, tmp_path):
    """Two processes train steps 1–3 with the losses and samples of one process; then one process resumes their
    checkpoint (the data position is saved for the whole run) and steps 4–5 match the uninterrupted run, with no
    sample repeated or skipped. With skip_bad_records (no record is bad here) each process's position counts its
    own rows, so the save gathers them."""
    mesh = ["--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=1",
            "--config.data.skip_bad_records=True",
            "--config.optim.end_learning_rate_fraction=1.0"]  # no decay: the same rates for total_steps 3 and 5
    single = tmp_path / "single"
    _train(single, phantom_root, *QUICK, *mesh, "--config.total_steps=5", devices=4)
    port = _free_port()
    multi = tmp_path / "multi"
    command = _command(multi, phantom_root, 2, *QUICK, *mesh, "--config.total_steps=3")
    processes = [subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env={**os.environ, "XLA_FLAGS": "", "M3D_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                                       "M3D_NUM_PROCESSES": "2", "M3D_PROCESS_ID": str(index),
                                       "M3D_CPU_COLLECTIVES": "gloo"})
                 for index in range(2)]
    try:
        outputs = [process.communicate(timeout=600) for process in processes]
    finally:
        for process in processes:
            process.kill()
    for process, (_, stderr) in zip(processes, outputs):
        assert process.returncode == 0, stderr[-4000:]
    one, two = _losses(single), _losses(multi)
    assert sorted(two) == [1, 2, 3]
    for step in (1, 2, 3):
        assert abs(one[step] - two[step]) <= 1e-6 * abs(one[step]), (step, one[step], two[step])
    rows = [_samples(multi, 0), _samples(multi, 1)]
    expected = _samples(single)
    assert {step: rows[0][step] + rows[1][step] for step in (1, 2, 3)} == {step: expected[step] for step in (1, 2, 3)}
    position = json.loads((multi / "checkpoints" / "3" / "data" / "position.json").read_text())
    assert position == {"version": 2, "global_batch_size": 8, "processes": 2, "batches": 3, "rows": [12, 12]}

    _train(multi, phantom_root, *QUICK, *mesh, "--config.total_steps=5", devices=4)
    resumed, samples = _losses(multi), _samples(multi)
    logged = [row["step"] for row in map(json.loads, open(multi / "metrics.jsonl")) if row["split"] == "train"]
    assert logged == [1, 2, 3, 4, 5]  # resumed at step 3, not started afresh
    for step in (4, 5):
        assert abs(one[step] - resumed[step]) <= 1e-6 * abs(one[step]), (step, one[step], resumed[step])
    consumed = [i for step in (1, 2, 3) for i in rows[0][step] + rows[1][step]] + samples[4] + samples[5]
    assert consumed == [i for step in range(1, 6) for i in expected[step]] == list(range(40))


def test_the_saved_data_position_resumes_on_any_process_count(caplog):
    from m3d_jax.train.position import DataLayout, resume_state, saved_position
    from m3d_jax.train.resume import BatchChange

    def on(processes, process=0, batch_size=8, per_row=False):
        return DataLayout(batch_size=batch_size, per_row=per_row, process=process, processes=processes)

    fresh = {"next_index": 0}
    # without skipping, every process's state counts global batches: batch 3 on 2 processes is batch 3 on 1
    position = saved_position({"next_index": 3}, on(2, 1))
    assert position == {"version": 2, "global_batch_size": 8, "processes": 2, "batches": 3}
    assert resume_state(position, on(1), fresh, checkpoint="c") == {"next_index": 3}
    # a batch size change composes: 3 batches of 8 = 24 samples = 2 batches of 12
    assert resume_state(position, on(1, batch_size=12), fresh, change=BatchChange(8, 12), config={},
                        checkpoint="c") == {"next_index": 2}
    # skipping, states count a process's rows (4 per global batch on 2 processes); one process saves its own
    assert saved_position({"next_index": 14}, on(1, per_row=True)) == {
        "version": 2, "global_batch_size": 8, "processes": 1, "batches": 2, "rows": [14]}
    # process 1 had read 2 rows into global batch 3 when process 0 had finished batch 2
    skipping = {"version": 2, "global_batch_size": 8, "processes": 2, "batches": 4, "rows": [12, 14]}
    assert [resume_state(skipping, on(2, process, per_row=True), fresh, checkpoint="c") for process in (0, 1)] == [
        {"next_index": 12}, {"next_index": 14}]  # the same count: exact
    with caplog.at_level("WARNING"):
        # another count: at global batch 4, which no process had started; 4 + 2 rows of batch 3 are skipped
        assert resume_state(skipping, on(1, per_row=True), fresh, checkpoint="c") == {"next_index": 32}
        assert resume_state(skipping, on(4, 3, batch_size=16, per_row=True), fresh, change=BatchChange(8, 16),
                            config={}, checkpoint="c") == {"next_index": 8}  # 32 samples = 2 batches of 16
    assert caplog.text.count("c: saved by 2 processes that had read different numbers of rows") == 2
    assert "6 samples of the global stream are skipped" in caplog.text
    # a non-skipping run resumes a skipping one at its first unstarted batch too, and the reverse exactly
    assert resume_state(skipping, on(2), fresh, checkpoint="c") == {"next_index": 4}
    assert resume_state(position, on(4, per_row=True), fresh, checkpoint="c") == {"next_index": 6}


def test_older_per_process_positions_resume_on_their_count_convert_or_are_refused(tmp_path):
    import grain.python as grain
    import jax.numpy as jnp

    from m3d_jax.convert.torch_io import CheckpointReadError
    from m3d_jax.errors import ConfigError
    from m3d_jax.train.checkpoints import Checkpoints
    from m3d_jax.train.position import DataLayout, resume_state

    ckpt = Checkpoints(str(tmp_path / "checkpoints"), every=1, keep=0, async_save=False)
    iterator = iter(grain.MapDataset.range(100).batch(4).to_iter_dataset())
    next(iterator)
    ckpt.save(1, {"w": jnp.zeros(3)}, iterator, {}, force=True)
    data = tmp_path / "checkpoints" / "1" / "data"
    assert json.loads((data / "position.json").read_text())["batches"] == 1
    (data / "position.json").unlink()

    def saved_by(*indices):  # the files of grain's handler, one state per process
        for path in data.glob("process_*"):
            path.unlink()
        for process, index in enumerate(indices):
            (data / f"process_{process}-of-{len(indices)}.json").write_text(json.dumps({"next_index": index}))
        return ckpt.position(1)

    def on(processes, process=0, per_row=False):
        return DataLayout(batch_size=8, per_row=per_row, process=process, processes=processes)

    fresh = {"next_index": 0}
    assert resume_state(saved_by(3, 5), on(2, 1), fresh, checkpoint="c") == {"next_index": 5}  # its own, as before
    assert resume_state(saved_by(3, 3), on(1), fresh, checkpoint="c") == {"next_index": 3}  # one global batch
    with pytest.raises(ConfigError, match=r"^c: its data position was saved per process by 2 processes at different "
                                          r"global batches \(\[3, 5\]\); resume this checkpoint with 2 processes"):
        resume_state(saved_by(3, 5), on(1), fresh, checkpoint="c")
    # skipping: rows 12 and 14 (4 per global batch) → global batch 4, the first none had started → 2 rows each on 4
    assert resume_state(saved_by(12, 14), on(4, 2, per_row=True), fresh, checkpoint="c") == {"next_index": 8}
    (data / "process_0-of-2.json").unlink()
    with pytest.raises(CheckpointReadError, match=r"data: the per-process data positions are incomplete or mixed "
                                                  r"\(process_1-of-2\.json\)"):
        ckpt.position(1)
    saved_by(3)
    (data / "process_0-of-1.json").write_text("{not json")
    with pytest.raises(CheckpointReadError, match=r"process_0-of-1\.json: cannot read this data position"):
        ckpt.position(1)
    ckpt.close()


def _in_process_config(root, **changes):
    from absl import flags
    from ml_collections import config_flags

    argv = ["prog", f"--config={DEMO}", f"--config.data.root={root}", "--config.mesh.data=1", "--config.mesh.fsdp=1",
            "--config.mesh.tensor=1", "--config.total_steps=5", *QUICK]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", str(DEMO), flag_values=flag_values, sys_argv=argv, lock_config=False)
    flag_values(argv)
    config = flag_values.config
    for key, value in changes.items():
        section, _, name = key.rpartition(".")
        setattr(config[section] if section else config, name, value)
    return config


def _poison_step(monkeypatch, bad_step: int):
    """Makes the images of the `bad_step`-th batch NaN (forces a non-finite loss)."""
    import m3d_jax.train.trainer as trainer

    calls = {"n": 0}
    original = trainer.to_global_arrays

    def poisoned(batch, mesh):
        calls["n"] += 1
        if calls["n"] == bad_step:
            batch = dict(batch, images=np.full_like(batch["images"], np.nan))
        return original(batch, mesh)

    monkeypatch.setattr(trainer, "to_global_arrays", poisoned)


def _restored_params(workdir, config):
    from flax import nnx

    from m3d_jax.train import trainer
    from m3d_jax.train.checkpoints import Checkpoints, abstract_like

    run = trainer.setup(config)
    state = nnx.state((run.model, run.optimizer))
    checkpoints = Checkpoints(str(pathlib.Path(workdir) / "checkpoints"), every=1, keep=0)
    step = checkpoints.latest_step()
    restored, _ = checkpoints.restore(step, nnx.to_pure_dict(abstract_like(state)))
    checkpoints.close()
    return step, [np.asarray(x) for x in __import__("jax").tree.leaves(restored)]


def test_nonfinite_loss_stops_with_a_clear_message_and_a_clean_checkpoint(phantom_root, tmp_path, monkeypatch):
    from m3d_jax.train.trainer import TrainingStopped, train

    config = _in_process_config(phantom_root, **{"optim.nonfinite": "stop"})
    _poison_step(monkeypatch, 3)
    with pytest.raises(TrainingStopped, match=r"step 3: the loss or gradients are not finite .* was not applied"):
        train(config, str(tmp_path))
    step, leaves = _restored_params(tmp_path, config)
    assert step in (2, 3) and all(np.isfinite(x).all() for x in leaves if np.issubdtype(x.dtype, np.floating))


def test_nonfinite_loss_is_skipped_per_config_and_training_continues(phantom_root, tmp_path, monkeypatch, capsys):
    from m3d_jax.train.trainer import train

    config = _in_process_config(phantom_root, **{"optim.nonfinite": "skip"})
    _poison_step(monkeypatch, 2)
    train(config, str(tmp_path))
    assert "step 2: non-finite loss or gradients (loss nan); update skipped (1 in a row)" in capsys.readouterr().out
    losses = _losses(tmp_path)
    assert np.isnan(losses[2]) and all(np.isfinite(losses[s]) for s in (1, 3, 4, 5))
    step, leaves = _restored_params(tmp_path, config)
    assert step == 5 and all(np.isfinite(x).all() for x in leaves if np.issubdtype(x.dtype, np.floating))


def test_sigterm_saves_at_the_next_step_and_a_rerun_resumes_there(phantom_root, tmp_path):
    import signal
    import time

    process = subprocess.Popen(_command(tmp_path, phantom_root, 8, "--config.total_steps=500", *QUICK,
                                        "--config.checkpoint.every=1000"),
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "XLA_FLAGS": ""})
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-3000:]
    saved = _finished_steps(tmp_path)[-1]
    assert f"preempted: saved step {saved}" in stdout + stderr and 3 <= saved < 500
    _train(tmp_path, phantom_root, f"--config.total_steps={saved + 2}", *QUICK)
    assert _finished_steps(tmp_path)[-1] == saved + 2
    assert sorted(_losses(tmp_path))[-2:] == [saved + 1, saved + 2]


def test_late_read_errors_of_a_reported_checkpoint_are_dropped_and_others_kept(caplog):
    """asyncio logs a failed TensorStore read that finished after Orbax gave up on a step when its task is
    collected; once that step's failure is reported, those logs are dropped, any other stays."""
    import asyncio
    import gc

    from m3d_jax.train import checkpoints

    async def read(path):
        raise ValueError(f'Error reading "{path}"')

    async def reads():
        asyncio.ensure_future(read("/run/checkpoints/3/state/d/0a1b"))
        asyncio.ensure_future(read("/data/other.bin"))
        await asyncio.sleep(0.01)

    checkpoints._REPORTED_FAILURES.folders.add("/run/checkpoints/3/")
    try:
        with caplog.at_level("ERROR", logger="asyncio"):
            asyncio.run(reads())
            gc.collect()
    finally:
        checkpoints._REPORTED_FAILURES.folders.discard("/run/checkpoints/3/")
    assert "/data/other.bin" in caplog.text and "/run/checkpoints/3/" not in caplog.text
