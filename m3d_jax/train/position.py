"""The data position saved with each checkpoint: one JSON for the whole run (`<step>/data/position.json`), so a
run saved with P processes resumes with any number of processes.

A sample is a pure function of (seed, epoch, global index) and global batch b holds samples [b·B, (b+1)·B)
whatever the process count (`m3d_jax/data/pipeline.py`), so a global batch is a position every count reads.
Each process's iterator state (`{"next_index": n}`) counts global batches, the same on every process, or, with
`data.skip_bad_records` (rows filtered before batching), this process's rows of the global stream (`ProcessRows`
indices, bad ones included), which differ between processes that dropped different numbers of bad records:

    {"version": 2, "global_batch_size": 32, "processes": 2, "batches": 7}
    {"version": 2, "global_batch_size": 32, "processes": 2, "batches": 7, "rows": [108, 112]}   (skipping)

`batches` is the first global batch that no process has started; `rows` (each process's state, gathered at save
time) resume the same process count exactly. Another count resumes at `batches`: exact without skipping; with
skipping, what is left of the global batches some processes had started is skipped, and a warning says how many
samples. Checkpoints written before version 2 hold one grain state per process (`data/process_<i>-of-<n>.json`):
n processes resume them exactly; another count converts them (equal batch counters, or rows when skipping) or
is refused with the count to use.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from m3d_jax.errors import ConfigError
from m3d_jax.train.resume import BatchChange, rescale_position

VERSION = 2
FILENAME = "position.json"


@dataclasses.dataclass(frozen=True)
class DataLayout:
    """How this run's data iterators count: the global batch size (needed when `per_row`), whether their
    states count rows (`skip_bad_records`) rather than batches, this process and the process count."""

    batch_size: int | None = None
    per_row: bool = False
    process: int = dataclasses.field(default_factory=jax.process_index)
    processes: int = dataclasses.field(default_factory=jax.process_count)


def saved_position(state: dict, layout: DataLayout) -> dict:
    """The run's global position from this process's iterator `state`. With `per_row` and several processes it
    gathers every process's row (a collective: every process calls it at the same step)."""
    index = _next_index(state)
    position = {"version": VERSION, "global_batch_size": layout.batch_size, "processes": layout.processes}
    if not layout.per_row:
        return dict(position, batches=index)
    rows = [index] if layout.processes == 1 else [
        int(row) for row in multihost_utils.process_allgather(np.asarray(index, np.int32))]
    return dict(position, batches=_first_unstarted(rows, layout.batch_size // layout.processes), rows=rows)


def resume_state(position: dict, layout: DataLayout, state: dict, *, change: BatchChange | None = None, config=None,
                 checkpoint: str) -> dict:
    """This process's iterator state (`state` with `next_index` replaced) at the saved `position` (as
    `Checkpoints.position` reads it), moved to the new global batch size when `change` says it changed
    (`rescale_position`; `config` holds `resume.allow_changes`). Raises ConfigError naming `checkpoint` when
    the position cannot be resumed with this process count."""
    if "states" in position:  # one grain state per process, as saved before version 2
        if position["processes"] == layout.processes:
            return _rescaled(position["states"][layout.process], layout, change, config, checkpoint)
        position = _from_process_states(position, layout, change, checkpoint)
    if layout.per_row and "rows" in position and position["processes"] == layout.processes:
        return _rescaled(dict(state, next_index=position["rows"][layout.process]), layout, change, config, checkpoint)
    batches = position["batches"]
    if "rows" in position:
        local = position["global_batch_size"] // position["processes"]
        skipped = sum(batches * local - row for row in position["rows"])
        if skipped:
            logging.warning("%s: saved by %d processes that had read different numbers of rows (data.skip_bad_records)"
                            "; resuming with %d at global batch %d, the first that none had started: %d samples of "
                            "the global stream are skipped", checkpoint, position["processes"], layout.processes,
                            batches, skipped)
    if change is not None:
        batches = rescale_position({"next_index": batches}, change, per_row=False, processes=1, config=config,
                                   checkpoint=checkpoint)["next_index"]
    return dict(state, next_index=batches * (layout.batch_size // layout.processes) if layout.per_row else batches)


def _rescaled(state: dict, layout: DataLayout, change: BatchChange | None, config, checkpoint: str) -> dict:
    if change is None:
        return state
    return rescale_position(state, change, per_row=layout.per_row, processes=layout.processes, config=config,
                            checkpoint=checkpoint)


def _from_process_states(position: dict, layout: DataLayout, change: BatchChange | None, checkpoint: str) -> dict:
    """A version 2 position from the per-process grain states of an older checkpoint saved by another process
    count, or a ConfigError when they do not give one."""
    count = position["processes"]
    retry = (f"resume this checkpoint with {count} processes (its next checkpoint then resumes on any count), "
             "or start afresh in a new --workdir")
    if not all(list(state) == ["next_index"] for state in position["states"]):
        raise ConfigError(f"{checkpoint}: its data position was saved per process by {count} processes as grain "
                          f"iterator states with worker processes, which {layout.processes} cannot resume; {retry}")
    indices = [int(state["next_index"]) for state in position["states"]]
    if not layout.per_row:
        if len(set(indices)) > 1:
            raise ConfigError(f"{checkpoint}: its data position was saved per process by {count} processes at "
                              f"different global batches ({indices}); {retry}")
        return {"version": VERSION, "processes": count, "batches": indices[0]}
    batch_size = change.old if change is not None else layout.batch_size
    return {"version": VERSION, "global_batch_size": batch_size, "processes": count,
            "batches": _first_unstarted(indices, batch_size // count), "rows": indices}


def _first_unstarted(rows: list[int], local_batch: int) -> int:
    """The first global batch that no process has started, from each process's next row."""
    return max(-(-row // local_batch) for row in rows)


def _next_index(state: dict) -> int:
    if "next_index" not in state:
        raise ValueError(f"the data iterator's state {sorted(state)} has no next_index: checkpoints save the "
                         "position of a single-stream iterator (`iterate(..., workers=0)`)")
    return int(state["next_index"])
