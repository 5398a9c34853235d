"""Orbax training checkpoints: model + optimiser state, the data position (one JSON for the whole run,
`<step>/data/position.json`, that any process count resumes from: see `position.py`) and a small JSON of
metadata, saved together under `workdir/checkpoints/<step>`.

Saves are asynchronous (training continues while the arrays are written) and atomic: a step's folder is
written under a temporary name and renamed when complete, so a process killed mid-write leaves the
previous checkpoint as the latest. Restoring takes the target shardings, so a checkpoint saved on one mesh
resumes on any other.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import sys
import tempfile
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from m3d_jax.convert.torch_io import CheckpointReadError
from m3d_jax.train.position import FILENAME, VERSION, DataLayout, resume_state, saved_position

_PROCESS_FILE = re.compile(r"process_(\d+)-of-(\d+)\.json")  # a process's grain state, before version 2


class Checkpoints:
    """The checkpoints in `directory`; `layout` says how this run's data iterators count (default: batches, one
    stream per process), for saving their position globally and resuming it on any process count."""

    def __init__(self, directory: str, *, every: int, keep: int, async_save: bool = True,
                 layout: DataLayout | None = None):
        directory = directory if "://" in directory else os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(save_interval_steps=max(1, every), max_to_keep=keep or None,
                                               enable_async_checkpointing=async_save, create=True)
        self.directory = directory
        self.layout = layout or DataLayout()
        self._last_saved: int | None = None
        registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
        registry.add("state", ocp.args.StandardSave)
        registry.add("state", ocp.args.StandardRestore)
        registry.add("data", ocp.args.JsonSave, ocp.handlers.JsonCheckpointHandler(filename=FILENAME))
        registry.add("meta", ocp.args.JsonSave)
        registry.add("meta", ocp.args.JsonRestore)
        self.manager = ocp.CheckpointManager(directory, options=options, handler_registry=registry)

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
        returns whether a save started. The data position (`data_iterator.get_state()`, made global:
        `saved_position`, which may gather across processes, so every process saves at the same step) is
        captured before this returns. A step saved already (e.g. by the interval, then forced at the end) is
        not saved again."""
        if step == self._last_saved or step in self.manager.all_steps():
            return False
        items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta or {}, step=step)))
        if data_iterator is not None:
            items["data"] = ocp.args.JsonSave(saved_position(data_iterator.get_state(), self.layout))
        started = self.manager.save(step, args=ocp.args.Composite(**items), force=force)
        if started:
            self._last_saved = step
        return started

    def position(self, step: int) -> dict | None:
        """The data position saved at `step` (None: none saved): the version 2 JSON, or, from an older
        checkpoint, {"processes": n, "states": [each process's grain iterator state]}. A corrupt, unknown or
        incomplete one is a CheckpointReadError naming the file."""
        folder = epath.Path(self.directory) / str(step) / "data"
        if not (folder / FILENAME).exists():
            return _process_states(folder)
        position = _read_json(folder / FILENAME)
        if not (isinstance(position, dict) and position.get("version") == VERSION
                and isinstance(position.get("batches"), int) and isinstance(position.get("processes"), int)
                and len(position.get("rows", [0] * position["processes"])) == position["processes"]):
            raise CheckpointReadError(f"{folder / FILENAME}: not a version {VERSION} data position: {position}")
        return position

    def restore(self, step: int, abstract_state: Any, data_iterator=None) -> tuple[Any, dict]:
        """The state at `step` laid out as `abstract_state` says (jax.ShapeDtypeStruct leaves with
        shardings), the iterator moved to its saved position (`resume_state` for this layout), and the
        metadata. The small items are read first, so a corrupt one fails before any array read is in flight."""
        meta = self.meta(step)
        position = self.position(step) if data_iterator is not None else None
        try:
            with _without_closed_loop_noise():
                state = self.manager.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state)))
        except BaseException:
            _REPORTED_FAILURES.folders.add(f"{self.directory.rstrip('/')}/{step}/")
            raise
        if position is not None:
            data_iterator.set_state(resume_state(position, self.layout, data_iterator.get_state(),
                                                 checkpoint=f"{self.directory}/{step}"))
        return state["state"], meta

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _process_states(folder: epath.Path) -> dict | None:
    """{"processes": n, "states": [...]} from the per-process grain states of a checkpoint saved before
    version 2 (None: the folder holds none)."""
    files = {}  # process index → (process count, file)
    for path in folder.iterdir() if folder.exists() else []:
        if found := _PROCESS_FILE.fullmatch(path.name):
            files[int(found[1])] = (int(found[2]), path)
    counts = {count for count, _ in files.values()}
    if not files:
        return None
    if len(counts) > 1 or sorted(files) != list(range(min(counts))):
        raise CheckpointReadError(f"{folder}: the per-process data positions are incomplete or mixed "
                                  f"({', '.join(sorted(path.name for _, path in files.values()))})")
    return {"processes": counts.pop(), "states": [_read_json(files[index][1]) for index in sorted(files)]}


def _read_json(path: epath.Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointReadError(f"{path}: cannot read this data position ({error})") from error


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
