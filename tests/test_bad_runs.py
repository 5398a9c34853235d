"""Bad data, interruptions and changed configs in training: each stops with one line naming the problem, or
recovers, and nothing is silently skipped or lost. The end-to-end cases run `python -m m3d_jax.train` on the
demo config (tiny LaMed on phantoms); the decisions behind them are also tested in-process."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import grain.python as grain
import pytest

from m3d_jax.data.pipeline import BadDataError, BadRecordLog
from m3d_jax.errors import ConfigError
from m3d_jax.train.resume import BatchChange, check_resume, guarded_changes, rescale_position

ROOT = pathlib.Path(__file__).parent.parent
DEMO = ROOT / "configs" / "demo.py"
QUICK = ["--config.data.batch_size=8", "--config.log_every=1", "--config.log_samples=True",
         "--config.checkpoint.every=1", "--config.checkpoint.keep=0", "--config.checkpoint.async_save=False",
         "--config.eval.loss_batches=0", "--config.eval.vqa_samples=0", "--config.export_pytorch=False",
         "--config.progress=False"]


@pytest.fixture(scope="module")
def phantom_root(tmp_path_factory):
    from m3d_jax.data.phantoms import write_phantoms

    return write_phantoms(tmp_path_factory.mktemp("phantoms"), num_cases=16, seed=0)


@pytest.fixture(scope="module")
def bad_root(phantom_root, tmp_path_factory):
    """The phantom set with every volume replaced by garbage."""
    root = tmp_path_factory.mktemp("bad") / "phantoms"
    shutil.copytree(phantom_root, root)
    for volume in root.glob("cases/*/*.nii.gz"):
        volume.write_bytes(b"not a volume")
    return root


def _command(workdir, root, *overrides) -> list[str]:
    return [sys.executable, "-m", "m3d_jax.train", f"--config={DEMO}", f"--workdir={workdir}",
            f"--config.data.root={root}", "--config.cpu_devices=8", *overrides]


def _run(workdir, root, *overrides, timeout=600):
    return subprocess.run(_command(workdir, root, *overrides), capture_output=True, text=True, timeout=timeout,
                          cwd=ROOT, env={**os.environ, "XLA_FLAGS": ""})


def _one_line_error(result, *fragments) -> str:
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def _samples(workdir) -> dict[int, list[int]]:
    rows = map(json.loads, open(pathlib.Path(workdir) / "samples_p0.jsonl"))
    return {row["step"]: row["samples"] for row in rows}


# ---- the decisions, in-process ----

def test_bad_record_log_stops_after_the_consecutive_limit_and_names_the_source():
    log = BadRecordLog("train data", max_consecutive=5)
    for index in range(4):
        log.bad("a.csv:closed", 0, 100, index, ValueError(f"case {index}: unreadable"))
    log.good("a.csv:closed", 0, 100)  # a good record resets the streak
    for index in range(4):
        log.bad("a.csv:closed", 0, 100, 5 + index, ValueError("unreadable"))
    with pytest.raises(BadDataError, match=r"train data: 5 records in a row were bad \(9 skipped from a\.csv:closed; "
                                           r"data\.max_consecutive_skips=5\); first errors: case 0: unreadable"):
        log.bad("a.csv:closed", 0, 100, 9, ValueError("unreadable"))


def test_a_source_whose_whole_epoch_is_bad_stops_the_mixture():
    """Mixed with a good source, a bad one never makes a long streak; its empty epoch still stops the run."""
    log = BadRecordLog("train data", max_consecutive=1000)
    with pytest.raises(BadDataError, match="every record of bad.json was bad in epoch 0 \\(3 skipped\\)"):
        for index in range(3):
            log.good("good.csv", 0, 50)
            log.bad("bad.json", 0, 3, index, ValueError("unreadable"))
    # several processes each see part of an epoch: it is judged once the source is two epochs on
    log = BadRecordLog("train data", max_consecutive=1000)
    log.bad("bad.json", 0, 4, 0, ValueError("unreadable"))
    log.good("good.csv", 0, 50)
    log.bad("bad.json", 1, 4, 5, ValueError("unreadable"))
    with pytest.raises(BadDataError, match="every record of bad.json was bad in epoch 0"):
        log.bad("bad.json", 2, 4, 9, ValueError("unreadable"))


def _config(**changes):
    from configs.demo import get_config

    config = get_config()
    for key, value in changes.items():
        node = config
        *parents, last = key.split(".")
        for parent in parents:
            node = node[parent]
        node[last] = value
    return config


def test_resume_refuses_changed_data_position_and_state_keys_naming_them():
    saved = _config().to_json()
    with pytest.raises(ConfigError, match=r"ckpt/7: the config changed .*model\.decoder\.hidden_size: 96 → 48; "
                                          r"seed: \d+ → 5.*--config\.resume\.allow_changes=model\.decoder\."
                                          r"hidden_size,seed"):
        check_resume(saved, _config(**{"model.decoder.hidden_size": 48, "seed": 5}), "ckpt/7")
    sources = [dict(kind="cap", path="cap.json", split="", weight=1.0)]
    assert "data.sources" in guarded_changes(json.loads(saved), json.loads(_config(**{"data.sources": sources})
                                                                            .to_json()))
    # harmless keys change freely; listed keys are allowed; the batch size is handled by rescale_position
    assert check_resume(saved, _config(**{"optim.learning_rate": 1e-4, "log_every": 3}), "c") is None
    assert check_resume(saved, _config(**{"seed": 5, "resume.allow_changes": "seed"}), "c") is None
    assert check_resume(saved, _config(**{"data.batch_size": 16}), "c") == BatchChange(32, 16)


def test_a_changed_batch_size_resumes_at_the_same_global_sample_or_is_refused():
    config = _config()
    # map path: next_index counts batches; 3 batches of 16 = 48 samples = 2 batches of 24
    assert rescale_position({"next_index": 3}, BatchChange(16, 24), per_row=False, processes=1, config=config,
                            checkpoint="c") == {"next_index": 2}
    # skipping path: next_index counts this process's rows; 2 processes, 24 rows = 3 batches of 16 = 1 of 48
    assert rescale_position({"next_index": 24}, BatchChange(16, 48), per_row=True, processes=2, config=config,
                            checkpoint="c") == {"next_index": 24}
    with pytest.raises(ConfigError, match=r"c: data\.batch_size changed 16 → 32, and the data position \(48 samples\) "
                                          r"is not a whole number of new batches"):
        rescale_position({"next_index": 3}, BatchChange(16, 32), per_row=False, processes=1, config=config,
                         checkpoint="c")
    allowed = _config(**{"resume.allow_changes": "data.batch_size"})
    assert rescale_position({"next_index": 3}, BatchChange(16, 32), per_row=False, processes=1, config=allowed,
                            checkpoint="c") == {"next_index": 1}


def test_resume_falls_back_past_unreadable_checkpoints_and_names_them(tmp_path):
    import jax.numpy as jnp
    from flax import nnx

    from m3d_jax.convert.torch_io import CheckpointReadError
    from m3d_jax.train.checkpoints import Checkpoints
    from m3d_jax.train.trainer import _resume

    config = _config()
    ckpt = Checkpoints(str(tmp_path / "checkpoints"), every=1, keep=0, async_save=False)
    data = grain.MapDataset.range(100).batch(4).to_iter_dataset()
    iterator = iter(data)
    for step in (1, 2, 3):
        next(iterator)
        ckpt.save(step, {"w": jnp.full(3, float(step))}, iterator, {"config": config.to_json()}, force=True)
    ckpt.wait()
    (tmp_path / "checkpoints/3/data/position.json").write_text("{not json")  # a corrupt data position
    for data_file in (tmp_path / "checkpoints/2/state").rglob("d/*"):  # truncated array data
        data_file.write_bytes(data_file.read_bytes()[:7])
    state = nnx.State({"w": nnx.Param(jnp.zeros(3))})
    fresh = iter(data)
    assert _resume(ckpt, config, state, fresh) == 1
    assert float(state["w"][...][0]) == 1.0 and next(fresh)[0] == 4  # step 1's weights and data position
    for data_file in (tmp_path / "checkpoints/1/state").rglob("d/*"):
        data_file.write_bytes(b"")
    with pytest.raises(CheckpointReadError, match=r"checkpoints: no checkpoint can be restored \(.*/3: .*; .*/2: .*; "
                                                  r".*/1: "):
        _resume(ckpt, config, state, iter(data))
    ckpt.close()


# ---- end to end ----

def test_all_bad_data_stops_with_one_line_instead_of_spinning(bad_root, tmp_path):
    start = time.perf_counter()
    result = _run(tmp_path, bad_root, *QUICK, "--config.total_steps=3", "--config.data.skip_bad_records=True",
                  "--config.data.max_consecutive_skips=12", timeout=300)
    _one_line_error(result, "train data: 12 records in a row were bad", "vqa_train.csv", "cannot read NIfTI")
    assert result.stderr.count("skipping record") == 10  # the first ten, then counts only
    assert time.perf_counter() - start < 240
    assert not (tmp_path / "checkpoints").exists() or not any((tmp_path / "checkpoints").iterdir())


# The trainer with every volume read stalled (a hung network mount), for interrupting a run that waits for data.
_STALLED = """
import runpy, sys, time
import m3d_jax.data.prepared as prepared
def stalled(path, **options):
    print("reading", path, file=sys.stderr, flush=True)
    time.sleep(3600)
prepared.load_volume = stalled
sys.argv[0] = "m3d_jax.train"
runpy.run_module("m3d_jax.train", run_name="__main__")
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_interrupts_the_wait_for_a_batch_and_keeps_the_position(signum):
    import threading

    from m3d_jax.train.trainer import _Preemption

    class Stalled:
        def get_state(self):
            return {"next_index": 7}

        def __next__(self):
            time.sleep(60)

    preemption = _Preemption(ckpt=None, processes=1)
    try:
        threading.Timer(0.5, os.kill, (os.getpid(), signum)).start()
        start = time.perf_counter()
        batch, position = preemption.next_batch(Stalled())
        assert batch is None and position.get_state() == {"next_index": 7}
        assert time.perf_counter() - start < 10 and preemption(0)
        if signum == signal.SIGINT:  # a second Ctrl-C does not wait for a step boundary
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(1)
    finally:
        preemption.restore()


def test_sigterm_while_waiting_for_data_stops_the_run(phantom_root, tmp_path):
    signum = signal.SIGTERM
    log = tmp_path / "stderr.txt"
    command = [sys.executable, "-c", _STALLED, *_command(tmp_path, phantom_root, *QUICK, "--config.total_steps=3")[3:]]
    with open(log, "w") as stderr:
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True,
                                   env={**os.environ, "XLA_FLAGS": ""})
        deadline = time.time() + 300
        while time.time() < deadline and "reading" not in log.read_text() and process.poll() is None:
            time.sleep(0.5)
        time.sleep(1.0)
        process.send_signal(signum)
        stdout, _ = process.communicate(timeout=60)
    output = stdout + log.read_text()
    assert process.returncode == 0, output[-3000:]
    assert "stopped while waiting for data at step 0; nothing new to save" in output


def test_resume_with_a_bigger_batch_after_a_corrupt_checkpoint_continues_at_the_same_sample(phantom_root, tmp_path):
    """Steps 1–4 of 8 samples; steps 3 and 4 corrupted → step 2 is restored (a warning names the others); at
    16 per step its 16 samples are one batch, so step 3 draws samples 16–31: none skipped or repeated."""
    result = _run(tmp_path, phantom_root, *QUICK, "--config.total_steps=4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert _samples(tmp_path)[3] == list(range(16, 24))
    (tmp_path / "checkpoints/4/data/position.json").write_text("{not json")
    for data_file in (tmp_path / "checkpoints/3/state").rglob("d/*"):
        data_file.write_bytes(data_file.read_bytes()[:7])
    changed = _run(tmp_path, phantom_root, *QUICK, "--config.total_steps=4", "--config.model.decoder.hidden_size=48")
    _one_line_error(changed, "checkpoints/4: the config changed", "model.decoder.hidden_size: 96 → 48")
    refused = _run(tmp_path, phantom_root, *QUICK, "--config.total_steps=5", "--config.data.batch_size=24")
    _one_line_error(refused, "checkpoints/2: data.batch_size changed 8 → 24", "(16 samples)")
    resumed = _run(tmp_path, phantom_root, *QUICK, "--config.total_steps=3", "--config.data.batch_size=16")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "checkpoints/4 cannot be restored" in resumed.stderr and "checkpoints/3 cannot be restored" in resumed.stderr
    assert _samples(tmp_path)[3][-16:] == list(range(16, 32))


@pytest.mark.parametrize("override, message", [
    ("--config.eval.batch_size=6", "eval.batch_size=6: a global batch must be a positive multiple of the mesh's 4"),
    ("--config.data.batch_sise=8", "--config.data.batch_sise: the config has no such key; did you mean "
                                   "--config.data.batch_size?"),
])
def test_bad_config_values_are_one_line_errors_before_anything_runs(phantom_root, tmp_path, override, message):
    _one_line_error(_run(tmp_path, phantom_root, *QUICK, override, timeout=300), message)
    assert not (tmp_path / "checkpoints").exists()
