"""Resuming safely: the checkpoint's saved config against the current one.

Keys that fix the data position (batch size, sources and their weights, seed, sequence lengths) or the
state's structure (task, model, trained parameters, LoRA, gradient accumulation) must not change between
runs, or a resume silently skips or repeats samples, or fails deep inside the restore. Such changes are
refused with the keys named, unless `resume.allow_changes` lists them. A global batch size change is
resumed exactly when the samples seen so far make a whole number of new batches: the data position is a
global sample index, so only the iterator's batch counter is rescaled.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from absl import logging

from m3d_jax.errors import ConfigError

BATCH_KEY = "data.batch_size"
DATA_POSITION = ("seed", BATCH_KEY, "data.sources", "data.max_length", "data.excerpt_tokens")
STATE_STRUCTURE = ("task", "model", "trainable", "lora", "optim.accumulation_steps")


@dataclasses.dataclass(frozen=True)
class BatchChange:
    """The global batch went from `old` to `new` samples per step."""

    old: int
    new: int


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else key))
    return flat


def _guarded(key: str) -> bool:
    return any(key == root or key.startswith(root + ".") for root in DATA_POSITION + STATE_STRUCTURE)


def guarded_changes(saved: dict, current: dict) -> dict[str, tuple[Any, Any]]:
    """{dotted key: (saved value, current value)} for the guarded keys that differ. A key the saved config
    lacks (written by an older version) cannot be compared: it is logged, not refused."""
    old, new = _flatten(saved), _flatten(current)
    unknown = sorted(key for key in set(new) - set(old) if _guarded(key))
    if unknown:
        logging.warning("the checkpoint's config predates %s; resuming without comparing them", ", ".join(unknown))
    return {key: (old.get(key), new.get(key)) for key in sorted(set(old) | set(new))
            if key not in unknown and _guarded(key) and old.get(key) != new.get(key)}


def _allowed(key: str, config) -> bool:
    """Whether `config.resume.allow_changes` (comma-separated keys or prefixes) lists `key`."""
    listed = str(config.get("resume", {}).get("allow_changes", "")).split(",")
    return any(key == root or key.startswith(root + ".") for root in (item.strip() for item in listed) if root)


def check_resume(saved_json: str, config, checkpoint: str) -> BatchChange | None:
    """Refuses (ConfigError naming the keys) a resume whose config changed a guarded key that
    `config.resume.allow_changes` (comma-separated keys or prefixes) does not list; returns the batch
    change to apply to the data position, if any."""
    current = json.loads(config.to_json())
    changes = guarded_changes(json.loads(saved_json), current)
    batch = None
    if BATCH_KEY in changes:
        old, new = changes.pop(BATCH_KEY)
        batch = BatchChange(int(old), int(new))
    refused = {key: change for key, change in changes.items() if not _allowed(key, config)}
    if refused:
        listed = "; ".join(f"{key}: {_short(old)} → {_short(new)}" for key, (old, new) in refused.items())
        raise ConfigError(f"{checkpoint}: the config changed since this checkpoint was saved ({listed}); "
                          f"resuming would skip or repeat data or not fit the saved state. Use the saved values, "
                          f"a new --workdir, or --config.resume.allow_changes={','.join(refused)}")
    for key, (old, new) in changes.items():
        logging.warning("resuming with a changed %s: %s → %s (allowed by resume.allow_changes)", key,
                        _short(old), _short(new))
    return batch


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 80 else text[:77] + "..."


def rescale_position(state: dict, change: BatchChange, *, per_row: bool, processes: int, config,
                     checkpoint: str) -> dict:
    """The iterator state at the same global sample for the new batch size. `next_index` counts batches, or,
    when `per_row` (skip_bad_records: rows are filtered before batching), this process's rows."""
    index = int(state["next_index"])
    old_local, new_local = change.old // processes, change.new // processes
    if per_row:
        batches, partial = divmod(index, old_local)
        samples = batches * change.old
    else:
        samples, partial = index * change.old, 0
    if not partial and samples % change.new == 0:
        moved = samples // change.new
        logging.warning("resuming at global sample %d with data.batch_size %d (was %d)", samples, change.new,
                        change.old)
        return dict(state, next_index=moved * new_local if per_row else moved)
    if not _allowed(BATCH_KEY, config):
        where = f"{samples} samples" if not partial else "a position between batches"
        raise ConfigError(f"{checkpoint}: data.batch_size changed {change.old} → {change.new}, and the data "
                          f"position ({where}) is not a whole number of new batches, so the resume cannot be "
                          f"exact. Use a batch size that divides {samples}, or "
                          f"--config.resume.allow_changes={BATCH_KEY} to resume at the nearest earlier batch")
    moved = samples // change.new
    logging.warning("resuming at global sample %d (not %d: data.batch_size %d → %d); %d samples repeat",
                    moved * change.new, samples, change.old, change.new, samples - moved * change.new)
    return dict(state, next_index=moved * new_local if per_row else moved)
