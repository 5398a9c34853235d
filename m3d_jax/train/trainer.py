"""The training loop, shared by every model family (`config.task`: lamed, clip; see `tasks.py`): a mesh
from the config, the model created sharded (and filled from pretrained checkpoints), LoRA, the config's
trainable filter, one jitted step with donated state, Orbax checkpoints (async every K steps, keep N,
saved on preemption, restored onto any mesh) that include the data position (one for the whole run, so it
resumes on any number of processes: see `position.py`), metrics with tokens/s and MFU, periodic eval (loss on
the eval sources plus the task's own metrics), and at the end a final checkpoint plus a PyTorch export in the
released layout.

Run it with `python -m m3d_jax.train --config=configs/NAME.py --workdir=DIR`.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import nnx
from ml_collections import ConfigDict

from m3d_jax.convert.torch_io import CheckpointReadError
from m3d_jax.data.phantoms import ensure_phantoms
from m3d_jax.data.pipeline import build_mixture, iterate, to_global_arrays
from m3d_jax.errors import first_line
from m3d_jax.sharding import MeshConfig, check_batch_sizes, create_sharded, make_mesh, replicate_strays, shard_model
from m3d_jax.storage import RunFolder, local_copy
from m3d_jax.train.checkpoints import Checkpoints, abstract_like
from m3d_jax.train.flops import peak_flops, step_flops, utilisation
from m3d_jax.train.lora import apply_lora
from m3d_jax.train.metrics import MetricWriter
from m3d_jax.train.optim import OptimConfig, make_optimizer, schedule
from m3d_jax.train.plan import unsharded_hardware_flops
from m3d_jax.train.position import DataLayout, resume_state
from m3d_jax.train.resume import check_resume
from m3d_jax.train.step import lora_of, optimizer_of, task_step, unmatched_patterns
from m3d_jax.train.tasks import Task, get_task

KILL_AT_SAVE = "M3D_JAX_FAULT_KILL_AT_SAVE"  # fault injection for tests: SIGKILL right after this step's save starts


class TrainingStopped(RuntimeError):
    """Training stopped on purpose (non-finite loss per the config); the saved state is clean."""


class StoppedWaitingForData(RuntimeError):
    """SIGTERM or Ctrl-C arrived while the loop waited for data; what was consistent is saved. The data
    reader threads may still be blocked in a read, so the caller should end the process (`os._exit`)."""


@dataclasses.dataclass
class Setup:
    """Everything `train` builds from a config (also used by benchmarks and tests)."""

    task: Task
    mesh: jax.sharding.Mesh
    tokenizer: Any
    model_config: Any
    model: nnx.Module
    optimizer: nnx.Optimizer
    optim_config: OptimConfig
    wrt: Any


def setup(config: ConfigDict) -> Setup:
    """Mesh, tokenizer, sharded model (pretrained parts loaded, LoRA applied) and optimizer of a config."""
    task = get_task(config.get("task", "lamed"))
    mesh = make_mesh(MeshConfig(**config.mesh))
    check_batch_sizes(mesh, {"data.batch_size": config.data.get("batch_size"),
                             "eval.batch_size": config.get("eval", {}).get("batch_size")})
    tokenizer, model_config, make_model = task.build(config)
    lora = lora_of(config)
    model = create_sharded(make_model, mesh)
    task.load_pretrained(model, local_init(config.get("init", ConfigDict())), mesh)
    if lora is not None:
        apply_lora(model, lora, rngs=nnx.Rngs(config.seed + 1))
        model = shard_model(model, mesh)
    optim, wrt = optimizer_of(config)
    for pattern in unmatched_patterns(config.trainable, model):
        logging.warning("config.trainable: %r selects no parameter of this model (a typo, or a part it lacks)",
                        pattern)
    optimizer = nnx.Optimizer(model, make_optimizer(optim), wrt=wrt)
    replicate_strays(optimizer, mesh)
    return Setup(task, mesh, tokenizer, model_config, model, optimizer, optim, wrt)


def local_init(init: ConfigDict) -> ConfigDict:
    """`config.init` with every URL (gs://, s3://, ...) replaced by its local copy (`storage.local_copy`),
    since the checkpoint readers read local files."""
    return ConfigDict({key: local_copy(value) if isinstance(value, str) else value for key, value in init.items()})


def compiled_step(run: Setup) -> tuple[nnx.GraphDef, nnx.State, Any]:
    """The run's (model, optimizer) split into graph and state, and its `task_step` laid out by the state's
    shardings."""
    graphdef, state = nnx.split((run.model, run.optimizer))
    shardings = jax.tree.map(lambda x: x.sharding, state)
    return graphdef, state, task_step(run.task, graphdef, run.wrt, shardings, run.mesh)


def train(config: ConfigDict, workdir: str) -> dict[str, float]:
    """Trains to `config.total_steps` (resuming from the latest checkpoint in `workdir`) and returns the
    final evaluation metrics."""
    process, processes = jax.process_index(), jax.process_count()
    primary = process == 0
    run = setup(config)
    mesh, model_config = run.mesh, run.model_config
    graphdef, state, step_fn = compiled_step(run)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    del run.model, run.optimizer

    _ensure_phantoms(config.data, primary)
    spec = run.task.sample_spec(config, model_config, train=True)
    dataset = build_mixture(config.data, run.tokenizer, spec, seed=config.seed, process_index=process,
                            process_count=processes)
    layout = DataLayout(batch_size=int(config.data.batch_size), per_row=spec.skip_bad_records, process=process,
                        processes=processes)
    ckpt = Checkpoints(os.path.join(workdir, "checkpoints"), every=config.checkpoint.every, keep=config.checkpoint.keep,
                       async_save=config.checkpoint.get("async_save", True), layout=layout)
    preempted = _Preemption(ckpt, processes)  # before the readers start: a signal from here on stops the run cleanly
    try:
        iterator = iterate(dataset, threads=config.data.get("threads") or None)
        start = _resume(ckpt, config, state, iterator)
    except BaseException:
        preempted.restore()
        ckpt.close()
        raise

    folder = RunFolder(workdir)  # metrics, samples logs, TensorBoard and the export; staged and uploaded for a URL
    writer = MetricWriter(folder, config.total_steps, start, enabled=primary, progress=config.get("progress", True))
    writer.message(f"training {type(model_config).__name__}: {_count(state, run.wrt, graphdef)} on mesh "
                   f"{dict(mesh.shape)} ({jax.device_count()} devices, {processes} processes), steps {start}→"
                   f"{config.total_steps}")
    lr = schedule(run.optim_config)
    base_key = jax.random.key(config.seed + 2)
    samples_name = f"samples_p{process}.jsonl"  # this process's rows
    samples_log = folder.open_log(samples_name) if config.get("log_samples") else None
    peak = peak_flops(override=config.get("peak_flops_per_device", 0.0))
    flops = None
    window = _Window()
    nonfinite_streak = 0
    pending = None
    step = start
    meta = {"config": config.to_json()}  # saved with every checkpoint
    try:
        while step < config.total_steps:
            host_batch, position = preempted.next_batch(iterator)
            if host_batch is None:
                saved = ckpt.save(step, nnx.to_pure_dict(state), position, meta, force=True) if step > start else False
                ckpt.wait()
                raise StoppedWaitingForData(
                    f"stopped while waiting for data at step {step}"
                    + (f": saved step {step} to {ckpt.directory}" if saved else "; nothing new to save")
                    + "; rerun the same command to resume")
            sample_index = host_batch.pop("sample_index", None)
            batch = to_global_arrays({k: host_batch[k] for k in run.task.inputs}, mesh)
            key = jax.random.fold_in(base_key, step)
            if flops is None:
                flops = step_flops(run.task.loss, graphdef, state, batch, key,
                                   lambda: task_step(run.task, graphdef, run.wrt, shardings, mesh))
                if flops.hardware is None:  # TPU: XLA analyses no program before compiling it
                    flops = dataclasses.replace(flops, hardware=unsharded_hardware_flops(config))
                writer.message(f"FLOPs per step: model {flops.model:.6g}, hardware {flops.hardware or 0:.6g}")
            state, metrics = step_fn(state, batch, key)
            step += 1
            window.add(run.task.count(host_batch) * processes)
            if samples_log is not None and sample_index is not None:
                samples_log.write(f'{{"step": {step}, "samples": {sample_index.tolist()}}}\n')
                samples_log.flush()
            # Check the previous step's finiteness now that this one is queued (no host-device bubble).
            if pending is not None:
                nonfinite_streak = _check_finite(pending, config, writer, nonfinite_streak)
            pending = (step, metrics)
            writer.advance()
            if step % config.log_every == 0 or step == config.total_steps:
                nonfinite_streak = _check_finite(pending, config, writer, nonfinite_streak)
                pending = None
                seconds = window.seconds_per_step()
                scalars = {k: float(v) for k, v in metrics.items() if k != "finite"}
                scalars.update(lr=float(lr(max(0, (step - 1) // run.optim_config.accumulation_steps))),
                               step_time_s=seconds, **{f"{run.task.unit}_per_s": window.per_s()},
                               mfu=utilisation(flops.model, seconds, jax.device_count(), peak),
                               hfu=utilisation(flops.hardware, seconds, jax.device_count(), peak))
                writer.write(step, scalars)
                if samples_log is not None:
                    folder.upload(samples_name)
                window.reset()
            if ckpt.due(step) and ckpt.save(step, nnx.to_pure_dict(state), iterator, meta):
                if os.environ.get(KILL_AT_SAVE) == str(step):
                    os.kill(os.getpid(), signal.SIGKILL)
            if preempted(step):
                ckpt.save(step, nnx.to_pure_dict(state), iterator, meta, force=True)
                ckpt.wait()
                writer.message(f"preempted: saved step {step} to {ckpt.directory}; rerun the same command to resume")
                return {}
            if config.eval.every and step % config.eval.every == 0 and step < config.total_steps:
                writer.write(step, evaluate(graphdef, state, run, config), prefix="eval")
        if pending is not None:
            _check_finite(pending, config, writer, nonfinite_streak)
        ckpt.save(step, nnx.to_pure_dict(state), iterator, meta, force=True)
        ckpt.wait()
        results = evaluate(graphdef, state, run, config)
        writer.write(step, results, prefix="eval")
        writer.message("final eval: " + ", ".join(f"{k} {v:.4g}" for k, v in results.items()))
        if config.get("export_pytorch", True):
            export_pytorch(run.task, nnx.merge(graphdef, state)[0], run.tokenizer, folder.local("pytorch"), primary)
            if primary:
                folder.upload("pytorch")
            writer.message(f"wrote the PyTorch export (released {run.task.name} layout) to {folder.url('pytorch')}")
        return results
    finally:
        ckpt.close()
        writer.close()
        if samples_log is not None:
            samples_log.close()
            folder.upload(samples_name)
        folder.close()
        preempted.restore()


def _resume(ckpt: Checkpoints, config: ConfigDict, state: nnx.State, iterator) -> int:
    """Restores the newest checkpoint that reads (falling back past a corrupt one, with a warning) into
    `state` and `iterator`, after checking the saved config against this one; returns its step (0: none).
    The saved data position is global, so the iterator resumes with any process count (`resume_state`)."""
    steps = ckpt.steps()
    failures = []
    for step in steps:
        where = os.path.join(ckpt.directory, str(step))
        try:
            saved = ckpt.meta(step).get("config")
        except Exception as error:  # noqa: BLE001 — any unreadable checkpoint is reported and skipped
            failures.append(f"{where}: {_one_line(error)}")
            logging.warning("checkpoint %s cannot be read (%s); trying the previous one", where, _one_line(error))
            continue
        batch_change = check_resume(saved, config, where) if saved else None
        try:
            position = ckpt.position(step)
            restored, _ = ckpt.restore(step, nnx.to_pure_dict(abstract_like(state)))
        except Exception as error:  # noqa: BLE001
            failures.append(f"{where}: {_one_line(error)}")
            logging.warning("checkpoint %s cannot be restored (%s); trying the previous one", where, _one_line(error))
            continue
        nnx.replace_by_pure_dict(state, restored)
        if position is not None:
            iterator.set_state(resume_state(position, ckpt.layout, iterator.get_state(), change=batch_change,
                                            config=config, checkpoint=where))
        if failures:
            logging.warning("resumed from step %d, an older checkpoint: %s", step, "; ".join(failures))
        logging.info("resumed from step %d of %s", step, ckpt.directory)
        return step
    if failures:
        raise CheckpointReadError(f"{ckpt.directory}: no checkpoint can be restored ({'; '.join(failures)}); "
                                  "move the folder away to start afresh")
    return 0


def _one_line(error: Exception) -> str:
    return first_line(error)[:300]


def _ensure_phantoms(data: ConfigDict, primary: bool) -> None:
    """`ensure_phantoms` on process 0; the others wait."""
    if primary:
        ensure_phantoms(data)
    if data.get("phantom_cases", 0) and jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("phantoms written")


def _count(state, wrt, graphdef) -> str:
    model = nnx.merge(graphdef, state)[0]
    total = trained = 0
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        total += variable[...].size
        trained += variable[...].size if wrt(path, variable) else 0
    return f"{total / 1e6:.2f} M parameters, {trained / 1e6:.2f} M trained"


def _check_finite(pending, config, writer, streak: int) -> int:
    step, metrics = pending
    if bool(metrics["finite"]):
        return 0
    loss = float(metrics["loss"])
    if config.optim.get("nonfinite", "skip") == "stop":
        raise TrainingStopped(f"step {step}: the loss or gradients are not finite (loss {loss}); the update was "
                              f"not applied and training stops (optim.nonfinite='stop'). The last checkpoint is "
                              f"clean; lower the learning rate or check the data, then rerun to resume.")
    streak += 1
    writer.message(f"step {step}: non-finite loss or gradients (loss {loss}); update skipped ({streak} in a row)")
    limit = config.optim.get("max_consecutive_nonfinite", 10)
    if streak >= limit:
        raise TrainingStopped(f"step {step}: {streak} non-finite steps in a row (optim.max_consecutive_nonfinite="
                              f"{limit}); stopping. No non-finite update was applied; the last checkpoint is clean.")
    return streak


class _Window:
    """Steps and throughput units (tokens, samples) since the last log line, for step time and units/s."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.start, self.steps, self.units = time.perf_counter(), 0, 0

    def add(self, units: int) -> None:
        self.steps += 1
        self.units += units

    def seconds_per_step(self) -> float:
        return (time.perf_counter() - self.start) / max(1, self.steps)

    def per_s(self) -> float:
        return self.units / max(1e-9, time.perf_counter() - self.start)


class _Interrupted(Exception):
    """SIGTERM or Ctrl-C arrived while the loop was waiting for data."""


class _Preemption:
    """SIGTERM or Ctrl-C → save and exit at the next step boundary, or at once while the loop waits for
    data (`next_batch`); a second Ctrl-C stops without saving. With several processes, JAX's preemption
    sync point (via Orbax) makes every process agree on the step."""

    def __init__(self, ckpt: Checkpoints, processes: int):
        self.ckpt, self.processes, self.flag, self.waiting = ckpt, processes, False, False
        self.previous = {}
        if processes == 1:
            for signum in (signal.SIGTERM, signal.SIGINT):
                self.previous[signum] = signal.signal(signum, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.flag and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.flag = True
        if self.waiting:
            raise _Interrupted

    def next_batch(self, iterator) -> tuple[dict | None, Any]:
        """(the next batch, the iterator's position before it); (None, position) when interrupted while
        waiting for it."""
        position = _Position(iterator.get_state())
        self.waiting = True
        try:
            if self.flag:
                raise _Interrupted
            return next(iterator), position
        except _Interrupted:
            return None, position
        finally:
            self.waiting = False

    def __call__(self, step: int) -> bool:
        if self.processes > 1:
            return self.ckpt.manager.reached_preemption(step)
        return self.flag

    def restore(self) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)


class _Position:
    """A data iterator's state taken earlier, checkpointed in place of the iterator."""

    def __init__(self, state: dict):
        self.state = state

    def get_state(self) -> dict:
        return self.state


def evaluate(graphdef, state, run: Setup, config: ConfigDict) -> dict[str, float]:
    """The task's loss metric over `eval.loss_batches` batches of `eval.sources`, plus the task's own
    metrics (closed-VQA accuracy for LaMed, retrieval recall for CLIP)."""
    model = nnx.merge(graphdef, state)[0]
    task, eval_config = run.task, config.eval
    results: dict[str, float] = {}
    if eval_config.get("loss_batches"):
        data = ConfigDict(dict(config.data.to_dict(), sources=eval_config.sources, batch_size=eval_config.batch_size))
        spec = task.sample_spec(config, run.model_config, train=False)
        iterator = iterate(build_mixture(data, run.tokenizer, spec, seed=config.seed, name="eval data",
                                         process_index=jax.process_index(), process_count=jax.process_count()))
        eval_loss = nnx.jit(lambda model, batch: task.loss(model, batch)[1][task.eval_metric])
        losses = []
        for _ in range(eval_config.loss_batches):
            host = next(iterator)
            losses.append(float(eval_loss(model, to_global_arrays({k: host[k] for k in task.inputs}, run.mesh))))
        results[task.eval_metric] = float(np.mean(losses))
    results.update(task.evaluate(model, run, config))
    return results


def export_pytorch(task: Task, model: nnx.Module, tokenizer, folder: str, primary: bool = True) -> None:
    """The task's released PyTorch layout; with several processes the parameters are gathered and
    process 0 writes."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        graphdef, state = nnx.split(model)
        state = jax.tree.map(lambda x: multihost_utils.process_allgather(x, tiled=True), state)
        model = nnx.merge(graphdef, state)
    if primary:
        task.export(model, tokenizer, folder)
