"""The Grain pipeline: source → seeded shuffle (a new order each epoch) → map (read, preprocess, augment,
tokenize: the spec's transform, from the family's `*_samples` module) → one global stream of samples
numbered 0, 1, 2, ... → this process's rows of each GLOBAL batch → fixed-shape local batches. A sample is
a pure function of (seed, epoch, index), so the global batches are the same whatever the number of
processes, and the iterator's state (grain `get_state`/`set_state`) resumes at the exact next batch."""

from __future__ import annotations

import collections
import contextlib
import os
import threading
from collections.abc import Callable

import grain.python as grain
import numpy as np
from absl import logging

from m3d_jax.data import shards, sources
from m3d_jax.data.augment import record_rng
from m3d_jax.data.prepared import prepare_record
from m3d_jax.data.volume import VolumeError
from m3d_jax.errors import InputError, RecordError


class BadDataError(InputError):
    """Too many records in a row could not be read, or a source yielded nothing for a whole epoch."""


class BadRecordLog:
    """The skipped records of one pipeline (with `skip_bad_records`): counted by source and reason, the first
    `show` logged one by one, then one summary per source and epoch. It raises a `BadDataError` after
    `max_consecutive` skips in a row, or when every record a source gave in an epoch was bad, naming the
    sources and the first errors, so a pipeline whose data is all bad stops instead of spinning."""

    def __init__(self, name: str = "data", *, max_consecutive: int = 1000, show: int = 10):
        self.name, self.max_consecutive, self.show = name, max_consecutive, show
        self.counts: collections.Counter = collections.Counter()  # (source, reason) → skipped
        self.first_errors: list[str] = []
        self._streak = 0
        self._epochs: dict[tuple[str, int], list[int]] = {}  # (source, epoch) → [good, bad]
        self._stopped: BadDataError | None = None  # once raised, every reader thread raises the same error
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:  # picklable for worker processes (each counts its own records)
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def good(self, source: str, epoch: int, epoch_length: int) -> None:
        with self._lock, self._stopping():
            self._streak = 0
            self._tally(source, epoch, epoch_length, good=True)

    def bad(self, source: str, epoch: int, epoch_length: int, index: int, error: Exception) -> None:
        with self._lock, self._stopping():
            self.counts[(source, type(error).__name__)] += 1
            self._streak += 1
            if len(self.first_errors) < 3:
                self.first_errors.append(str(error))
            if sum(self.counts.values()) <= self.show:
                logging.warning("%s: skipping record %d of %s: %s", self.name, index, source, error)
            if self._streak >= self.max_consecutive:
                raise BadDataError(f"{self.name}: {self._streak} records in a row were bad ({self._sources()}; "
                                   f"data.max_consecutive_skips={self.max_consecutive}); first errors: "
                                   + " | ".join(self.first_errors))
            self._tally(source, epoch, epoch_length, good=False)

    @contextlib.contextmanager
    def _stopping(self):
        """Raises the pipeline's first BadDataError again in every later call: reader threads run records out
        of order, so without this whichever thread's error the loop meets first would be reported."""
        if self._stopped is not None:
            raise self._stopped
        try:
            yield
        except BadDataError as error:
            self._stopped = error
            raise

    def skipped(self) -> dict[str, int]:
        """Skipped records so far by reason (error class)."""
        totals: collections.Counter = collections.Counter()
        for (_, reason), count in self.counts.items():
            totals[reason] += count
        return dict(totals)

    def _sources(self) -> str:
        per_source: collections.Counter = collections.Counter()
        for (source, _), count in self.counts.items():
            per_source[source] += count
        return ", ".join(f"{count} skipped from {source}" for source, count in per_source.items())

    def _tally(self, source: str, epoch: int, epoch_length: int, *, good: bool) -> None:
        tally = self._epochs.setdefault((source, epoch), [0, 0])
        tally[0 if good else 1] += 1
        if tally[1] == epoch_length:
            self._close(source, epoch)
        # Reader threads run ahead by a few records, so an epoch is closed once its source is two epochs on.
        for key in [k for k in self._epochs if k[0] == source and k[1] <= epoch - 2]:
            self._close(*key)

    def _close(self, source: str, epoch: int) -> None:
        good, bad = self._epochs.pop((source, epoch), (0, 0))
        if bad and not good:
            raise BadDataError(f"{self.name}: every record of {source} was bad in epoch {epoch} ({bad} skipped); "
                               "first errors: " + " | ".join(self.first_errors))
        if bad:
            logging.warning("%s: epoch %d of %s: skipped %d of %d records", self.name, epoch, source, bad, good + bad)


class RecordTransform:
    """(index, record) → a sample dict (`_sample`, per subclass); picklable. A bad record raises a
    RecordError / VolumeError that names its file (skipped and counted by `source_samples` with
    `spec.skip_bad_records`)."""

    def __init__(self, tokenizer, spec, seed: int, epoch_length: int):
        self.tokenizer = tokenizer
        self.spec = spec
        self.seed = seed
        self.epoch_length = epoch_length

    def __call__(self, index: int, record: dict) -> dict[str, np.ndarray]:
        return self._sample(index, record)

    def _sample(self, index: int, record: dict) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def _prepared(self, index: int, record: dict) -> tuple[np.ndarray, np.ndarray | None, np.random.Generator]:
        """(prepared image [C, D, H, W], its mask or label map on the same grid or None, the record's RNG)."""
        spec = self.spec
        epoch, position = divmod(index, self.epoch_length)
        image, mask = prepare_record(record, spec.image_size, spec.window, spec.in_channels)
        return image, mask, record_rng(self.seed, epoch, position)


def _is_sample(sample) -> bool:
    return sample is not None


class _Skipping:
    """A record transform whose bad records become None, counted in a `BadRecordLog`."""

    def __init__(self, transform: RecordTransform, log: BadRecordLog, source: str):
        self.transform, self.log, self.source = transform, log, source

    def __call__(self, index: int, record: dict) -> dict[str, np.ndarray] | None:
        epoch_length = self.transform.epoch_length
        epoch = index // epoch_length
        try:
            sample = self.transform(index, record)
        except (VolumeError, RecordError) as err:
            self.log.bad(self.source, epoch, epoch_length, index, err)
            return None
        self.log.good(self.source, epoch, epoch_length)
        return sample


def source_samples(source, tokenizer, spec, *, seed: int, num_epochs: int | None = None,
                   bad_records: BadRecordLog | None = None) -> grain.MapDataset:
    """Unbatched samples of all records (by `spec.transform`), reshuffled every epoch; `num_epochs=None`
    repeats forever. With `spec.skip_bad_records` a bad record is None here (dropped after the process
    split) and counted in `bad_records` (the pipeline's log; a new one if not given)."""
    dataset = grain.MapDataset.source(source)
    epoch_length = len(dataset)
    dataset = dataset.shuffle(seed=seed).repeat(num_epochs)
    transform = spec.transform(tokenizer, seed, epoch_length)
    if spec.skip_bad_records:
        transform = _Skipping(transform, bad_records or BadRecordLog(), _source_name(source))
    return dataset.map_with_index(transform)


def _source_name(source) -> str:
    return str(getattr(source, "description", None) or type(source).__name__)


class ProcessRows(grain.MapDataset):
    """This process's rows of each global batch: local item k is global item
    (k // local) · global + process_index · local + k % local, with local = global / process_count."""

    def __init__(self, parent: grain.MapDataset, global_batch: int, process_index: int, process_count: int):
        super().__init__(parent)
        if global_batch % process_count:
            raise ValueError(f"global batch size {global_batch} is not divisible by {process_count} processes")
        self._global, self._local = global_batch, global_batch // process_count
        self._offset = process_index * self._local
        self._length = len(parent) // global_batch * self._local

    def __len__(self) -> int:
        return self._length

    def _parent_index(self, index: int) -> int:
        return index // self._local * self._global + self._offset + index % self._local

    def __getitem__(self, index: int):
        return self._parent[self._parent_index(index)]

    def __str__(self) -> str:
        return f"ProcessRows(global={self._global}, local={self._local}, offset={self._offset})"


def _numbered(index: int, sample: dict | None) -> dict | None:
    if sample is None:
        return None
    return {**sample, "sample_index": np.asarray(index, np.int64)}


def batched(samples: grain.MapDataset, spec, *, batch_size: int, process_index: int = 0,
            process_count: int = 1) -> grain.MapDataset | grain.IterDataset:
    """Numbers the global stream (`sample_index`), keeps this process's rows of each global batch of
    `batch_size`, and batches them (batch_size / process_count rows; a last partial batch is dropped).
    With skip_bad_records the batching happens on an IterDataset, since dropped records make positions
    unknowable up front."""
    rows = ProcessRows(samples.map_with_index(_numbered), batch_size, process_index, process_count)
    if spec.skip_bad_records:
        rows = rows.filter(_is_sample).to_iter_dataset(read_options())
    return rows.batch(batch_size // process_count, drop_remainder=True)


def source_dataset(source, tokenizer, spec, *, seed: int, batch_size: int, num_epochs: int | None = None,
                   process_index: int = 0, process_count: int = 1) -> grain.MapDataset | grain.IterDataset:
    """`batched` `source_samples` of one source; `batch_size` is the global batch."""
    samples = source_samples(source, tokenizer, spec, seed=seed, num_epochs=num_epochs)
    return batched(samples, spec, batch_size=batch_size, process_index=process_index, process_count=process_count)


def mix(datasets, weights) -> grain.MapDataset:
    """Weighted mixture of unbatched sample datasets (e.g. Cap, VQA, Seg) in a fixed interleaving."""
    return grain.MapDataset.mix(list(datasets), list(weights))


def read_options(threads: int | None = None) -> grain.ReadOptions:
    """Reader threads (default: one per core — more only contend, as measured) and a prefetch buffer of
    two elements per thread."""
    threads = threads or os.cpu_count() or 1
    return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)


def iterate(dataset: grain.MapDataset | grain.IterDataset, *, threads: int | None = None, workers: int = 0,
            state: dict | None = None):
    """An iterator over `dataset`: `threads` reader threads (default: one per core; volume decompression
    and numpy release the GIL, so threads scale across cores without copying batches between processes) and optionally
    `workers` prefetching processes on top. It resumes from a state returned by the iterator's
    `get_state()` (a JSON-able dict: save it with the train state). Worker processes are spawned: call this
    under `if __name__ == "__main__":`."""
    if isinstance(dataset, grain.MapDataset):
        iter_dataset = dataset.to_iter_dataset(read_options(threads))
    else:  # already an IterDataset (e.g. with skip_bad_records), read with `read_options()`
        iter_dataset = dataset
    if workers > 0:
        iter_dataset = iter_dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    iterator = iter(iter_dataset)
    if state is not None:
        iterator.set_state(state)
    return iterator


def to_global_arrays(batch: dict[str, np.ndarray], mesh) -> dict:
    """This process's rows of a batch → global jax Arrays with the leading axis over the mesh's data axes
    (`m3d_jax.sharding.batch_sharding`); each process passes only its own rows."""
    import jax

    from m3d_jax.sharding import batch_sharding  # here: flax at import time costs each Grain worker ~1.3 s

    return {key: jax.make_array_from_process_local_data(batch_sharding(mesh, value.ndim), value)
            for key, value in batch.items()}


# kind → (the source built from (path, split), the split used when the entry names none)
SOURCES: dict[str, tuple[Callable[[str, str], object], str]] = {
    "cap": (sources.CaptionSource, "train"),
    "vqa_closed": (lambda path, _: sources.VQASource(path, closed=True), ""),
    "vqa_open": (lambda path, _: sources.VQASource(path, closed=False), ""),
    **{task: (lambda path, split, task=task: sources.SegSource(path, split, task=task), "training")
       for task in ("seg", "rec", "reg")},
    "refseg": (lambda path, _: sources.RefSegSource(path), ""),
    "slices": (sources.SliceEmbeddingSource, "train"),
    "label_map": (sources.LabelMapSource, "training"),
    "class_label": (sources.ClassLabelSource, "training"),
}


def head(source, count: int) -> list:
    """The first `count` records of a source (a list, a record source or a prepared shard source: shard
    sources index but do not slice)."""
    return [source[i] for i in range(min(count, len(source)))]


def build_source(entry, root: str | None = None) -> object:
    """A source from a config entry: kind (cap, vqa_closed, vqa_open, seg, rec, reg, refseg; slices for
    Med3DInsight; label_map and class_label for fine-tuning), path (relative paths are joined to `root`),
    split."""
    kind = entry["kind"]
    if kind not in SOURCES:
        raise ValueError(f"unknown data source kind {kind!r}; choose one of {sorted(SOURCES)}")
    make, default_split = SOURCES[kind]
    return make(os.path.join(root, entry["path"]) if root else entry["path"], entry.get("split", "") or default_split)


def build_mixture(data_config, tokenizer, spec, *, seed: int, process_index: int = 0,
                  process_count: int = 1, sources_key: str = "sources", name: str = "train data"):
    """The weighted mixture of a config's `data.sources` (each with kind, path, split, weight), batched
    (`batch_size` global), read from the raw files under `data.root`, or from the prepared shards at
    `data.shards` when it is set (`shards.py`; the same records in the same order). Skipped records
    (`skip_bad_records`) are counted per pipeline, under `name`, and stop it after
    `data.max_consecutive_skips` (default 1000) in a row."""
    parts, weights = [], []
    log = BadRecordLog(name, max_consecutive=int(data_config.get("max_consecutive_skips", 1000)))
    for offset, entry in enumerate(data_config[sources_key]):
        parts.append(source_samples(_mixture_source(entry, data_config, spec), tokenizer, spec, seed=seed + offset,
                                    bad_records=log))
        weights.append(float(entry.get("weight", 1.0)))
    mixed = parts[0] if len(parts) == 1 else mix(parts, weights)
    return batched(mixed, spec, batch_size=int(data_config["batch_size"]), process_index=process_index,
                   process_count=process_count)


def _mixture_source(entry, data_config, spec) -> object:
    """A mixture's source: the raw records, or their prepared shards when `data.shards` names a shard set."""
    if not data_config.get("shards"):
        return build_source(entry, data_config.get("root"))
    if entry["kind"] not in SOURCES:
        raise ValueError(f"unknown data source kind {entry['kind']!r}; choose one of {sorted(SOURCES)}")
    settings = shards.Settings(tuple(spec.image_size), spec.window, spec.in_channels)
    return shards.open_source(data_config.shards, entry, SOURCES[entry["kind"]][1], settings,
                              cache=data_config.get("shards_cache") or None)
