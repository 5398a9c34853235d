"""Orbax training checkpoints: model + optimiser state, the data iterator's position (one JSON per process,
grain's handler) and a small JSON of metadata, saved together under `workdir/checkpoints/<step>`.

Saves are asynchronous (training continues while the arrays are written) and atomic: a step's folder is
written under a temporary name and renamed when complete, so a process killed mid-write leaves the
previous checkpoint as the latest. Restoring takes the target shardings, so a checkpoint saved on one mesh
resumes on any other.
"""

from __future__ import annotations

import os
from typing import Any

import grain.python as grain
import jax
import orbax.checkpoint as ocp


class Checkpoints:
    def __init__(self, directory: str, *, every: int, keep: int, async_save: bool = True):
        directory = directory if "://" in directory else os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(save_interval_steps=max(1, every), max_to_keep=keep or None,
                                               enable_async_checkpointing=async_save, create=True)
        self.directory = directory
        self._last_saved: int | None = None
        self.manager = ocp.CheckpointManager(directory, options=options, item_names=("state", "data", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def due(self, step: int) -> bool:
        """Whether the save interval asks for a checkpoint at `step` (cheap; call before building the state)."""
        return self.manager.should_save(step)

    def save(self, step: int, state: Any, data_iterator=None, meta: dict | None = None, *, force: bool = False) -> bool:
        """Starts saving `state` (a pytree of arrays) at `step` if the interval says so (or `force`);
        returns whether a save started. The data iterator's state is captured before this returns.
        A step saved already (e.g. by the interval, then forced at the end) is not saved again."""
        if step == self._last_saved or step in self.manager.all_steps():
            return False
        items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta or {}, step=step)))
        if data_iterator is not None:
            items["data"] = grain.PyGrainCheckpointSave(data_iterator)
        started = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        if started:
            self._last_saved = step
        return started

    def restore(self, step: int, abstract_state: Any, data_iterator=None) -> tuple[Any, dict]:
        """The state at `step` laid out as `abstract_state` says (jax.ShapeDtypeStruct leaves with
        shardings), the iterator moved to its saved position, and the metadata."""
        items = dict(state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore())
        if data_iterator is not None:
            items["data"] = grain.PyGrainCheckpointRestore(data_iterator)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return restored["state"], restored["meta"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(state: Any) -> Any:
    """ShapeDtypeStructs (with each array's sharding) for restoring into the layout of `state`."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
