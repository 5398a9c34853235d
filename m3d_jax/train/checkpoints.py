"""Orbax training checkpoints: model + optimiser state, the data iterator's position (one JSON per process,
grain's handler) and a small JSON of metadata, saved together under `workdir/checkpoints/<step>`.

Saves are asynchronous (training continues while the arrays are written) and atomic: a step's folder is
written under a temporary name and renamed when complete, so a process killed mid-write leaves the
previous checkpoint as the latest. Restoring takes the target shardings, so a checkpoint saved on one mesh
resumes on any other.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import tempfile
import time
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

    def steps(self) -> list[int]:
        """The complete checkpoints' steps, newest first."""
        return sorted(self.manager.all_steps(), reverse=True)

    def meta(self, step: int) -> dict:
        """The metadata saved at `step` alone (the run's config), without reading the arrays."""
        return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

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
        shardings), the iterator moved to its saved position, and the metadata. The small items are read
        first, so a corrupt one fails before any array read is in flight."""
        items = dict(meta=ocp.args.JsonRestore())
        if data_iterator is not None:
            items["data"] = grain.PyGrainCheckpointRestore(data_iterator)
        meta = self.manager.restore(step, args=ocp.args.Composite(**items))["meta"]
        try:
            with _without_closed_loop_noise():
                state = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state)))
        except BaseException:
            _REPORTED_FAILURES.folders.add(f"{self.directory.rstrip('/')}/{step}/")
            raise
        return state["state"], meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


class _ReportedFailures(logging.Filter):
    """Drops asyncio's "Task exception was never retrieved" reports of array reads from a checkpoint whose
    restore already failed (the caller reports that failure in one line). TensorStore finishes such reads
    after Orbax gives up on the step, and asyncio logs each one when its task is collected, often at exit."""

    def __init__(self):
        super().__init__()
        self.folders: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.folders or "never retrieved" not in record.getMessage():
            return True
        text = f"{record.getMessage()} {record.exc_info[1] if record.exc_info else ''}"
        return not any(folder in text for folder in self.folders)


_REPORTED_FAILURES = _ReportedFailures()
logging.getLogger("asyncio").addFilter(_REPORTED_FAILURES)


# TensorStore's reader threads print this traceback for each array read that completes after a failed one
# made Orbax close its event loop; several threads print at once, so their lines interleave.
_CLOSED_LOOP_NOISE = re.compile(
    r"Traceback \(most recent call last\):\n?"
    r"|  File \"[^\"]*asyncio[/\\]base_events\.py\", line \d+, in \w+\n?"
    r"|    self\._check_closed\(\)\n?"
    r"|    raise RuntimeError\('Event loop is closed'\)\n?"
    r"|RuntimeError: Event loop is closed\n?")


@contextlib.contextmanager
def _without_closed_loop_noise():
    """Runs a restore with the process's stderr (fd 2) captured, then writes it back without the
    tracebacks TensorStore's reader threads print when one array read fails: the others complete after
    Orbax has closed its event loop, and each prints "Event loop is closed" (about 70 for a small model)
    below the one error that matters."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        except BaseException:
            _wait_until_quiet(capture.fileno())  # reads still in flight print now, not after fd 2 is back
            raise
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            sys.stderr.write(_drop_closed_loop_noise(capture.read().decode(errors="replace")))
            sys.stderr.flush()


def _wait_until_quiet(fd: int, *, interval: float = 0.2, limit: float = 5.0) -> None:
    """Waits until nothing more is written to `fd` for one `interval` (at most `limit` seconds)."""
    deadline, size = time.monotonic() + limit, -1
    while time.monotonic() < deadline and os.fstat(fd).st_size != size:
        size = os.fstat(fd).st_size
        time.sleep(interval)


def _drop_closed_loop_noise(text: str) -> str:
    if "Event loop is closed" not in text:
        return text
    lines = _CLOSED_LOOP_NOISE.sub("", text).splitlines(keepends=True)
    return "".join(line for line in lines if line.strip() and set(line.strip()) != {"^"})


def abstract_like(state: Any) -> Any:
    """ShapeDtypeStructs (with each array's sharding) for restoring into the layout of `state`."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
