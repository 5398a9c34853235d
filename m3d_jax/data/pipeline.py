"""The Grain pipeline for LaMed training: source → per-process shard → seeded shuffle (a new order each
epoch) → map (read, preprocess, augment, tokenize) → fixed-shape batches. A sample is a pure function of
(seed, epoch, index), and the iterator's state (grain `get_state`/`set_state`) resumes at the exact next
batch."""

from __future__ import annotations

import collections
import dataclasses
import os

import grain.python as grain
import numpy as np
from absl import logging

from m3d_jax.data.augment import AugmentConfig, augment, record_rng
from m3d_jax.data.prompts import (
    CAPTION_PROMPTS, REC_PROMPTS, REG_PROMPTS, SEGMENT_ANSWERS, SEGMENT_PROMPTS, box_from_mask, box_text, choose,
    tokenize_sample,
)
from m3d_jax.data.volume import VolumeError, load_volume, prepare, prepare_mask


@dataclasses.dataclass(frozen=True)
class SampleSpec:
    image_size: tuple[int, int, int]
    proj_out_num: int
    image_token_id: int
    max_length: int
    in_channels: int = 1
    augment: AugmentConfig | None = AugmentConfig()
    window: tuple[float, float] | None = None  # CT (level, width) before min-max; None = M3D's plain min-max
    skip_bad_records: bool = False


class RecordError(ValueError):
    """A record cannot be turned into a sample; the message names the file and the problem."""


_SKIPPED: collections.Counter = collections.Counter()  # (epoch, reason) → count, in this process


def skipped_records(epoch: int | None = None) -> dict[str, int]:
    """Records skipped in this process so far (with skip_bad_records), by reason; one epoch's if given."""
    counts: collections.Counter = collections.Counter()
    for (seen_epoch, reason), count in _SKIPPED.items():
        if epoch is None or seen_epoch == epoch:
            counts[reason] += count
    return dict(counts)


def _load_mask(record: dict, image_shape: tuple[int, ...]) -> np.ndarray:
    mask = load_volume(record["mask"]).array
    if mask.shape[1:] == (1, 1, 1) and not mask.any():  # M3D-Seg stores an absent class as [1,1,1,1] zeros
        return np.zeros((1, *image_shape[1:]), np.float32)
    if mask.shape[1:] != image_shape[1:]:
        raise RecordError(f"{record['mask']}: mask shape {mask.shape} does not match image {record['image']} "
                          f"shape {image_shape}")
    value = record.get("mask_value")
    return ((mask == value) if value is not None else (mask > 0)).astype(np.float32)[:1]


class LamedTransform:
    """(index, record) → dict(images [C,D,H,W], seg_masks [1,D,H,W], input_ids, attention_mask, labels [L]);
    picklable. With `spec.skip_bad_records`, a bad record becomes None (dropped and counted) instead of
    raising a RecordError / VolumeError that names its file."""

    def __init__(self, tokenizer, spec: SampleSpec, seed: int, epoch_length: int):
        self.tokenizer = tokenizer
        self.spec = spec
        self.seed = seed
        self.epoch_length = epoch_length
        self._last_epoch = 0

    def __call__(self, index: int, record: dict) -> dict[str, np.ndarray] | None:
        epoch = index // self.epoch_length
        if epoch > self._last_epoch:  # the first record of a new epoch: report the finished one
            skipped = skipped_records(self._last_epoch)
            if skipped:
                logging.warning("epoch %d: skipped %d bad records %s", self._last_epoch, sum(skipped.values()), skipped)
            self._last_epoch = epoch
        try:
            return self._sample(index, record)
        except (VolumeError, RecordError) as err:
            if not self.spec.skip_bad_records:
                raise
            _SKIPPED[(epoch, type(err).__name__)] += 1
            logging.warning("skipping record %d (%s): %s", index, record.get("image"), err)
            return None

    def _sample(self, index: int, record: dict) -> dict[str, np.ndarray]:
        spec = self.spec
        epoch, position = divmod(index, self.epoch_length)
        rng = record_rng(self.seed, epoch, position)
        volume = load_volume(record["image"]).array
        if volume.shape[0] != spec.in_channels:
            raise RecordError(f"{record['image']}: {volume.shape[0]} channels, the model takes {spec.in_channels}")
        image, geometry = prepare(volume, spec.image_size, spec.window)
        mask = prepare_mask(_load_mask(record, volume.shape), geometry) if "mask" in record else None
        if spec.augment is not None:
            image, mask = augment(image, mask, rng, spec.augment)
        question, answer = self._texts(record, mask, rng)
        try:
            sample = tokenize_sample(self.tokenizer, question, answer, proj_out_num=spec.proj_out_num,
                                     max_length=spec.max_length, image_token_id=spec.image_token_id)
        except ValueError as err:
            raise RecordError(f"{record['image']}: {err}") from None
        seg = mask if mask is not None and record["task"] in ("seg", "refseg") else np.zeros((1, *image.shape[1:]))
        return {"images": image.astype(np.float32), "seg_masks": seg.astype(np.float32),
                "input_ids": sample.input_ids, "attention_mask": sample.attention_mask, "labels": sample.labels}

    @staticmethod
    def _texts(record: dict, mask: np.ndarray | None, rng: np.random.Generator) -> tuple[str, str]:
        task = record["task"]
        if task in ("caption", "vqa_closed", "vqa_open", "refseg"):
            return record.get("question") or choose(CAPTION_PROMPTS, rng), record["answer"]
        target = record["target"]
        if task == "seg":
            return choose(SEGMENT_PROMPTS, rng, target=target), choose(SEGMENT_ANSWERS, rng, target=target)
        if not mask.any():
            raise RecordError(f"{record['mask']}: empty mask for {target!r}; no box to ask or answer about")
        box = box_text(box_from_mask(mask[0]))
        if task == "rec":
            return choose(REC_PROMPTS, rng, target=target), f"It is at {box}."
        return choose(REG_PROMPTS, rng, box=box), f"It is the {target}."


def _is_sample(sample) -> bool:
    return sample is not None


def lamed_samples(source, tokenizer, spec: SampleSpec, *, seed: int, num_epochs: int | None = None,
                  shard_index: int = 0, shard_count: int = 1) -> grain.MapDataset:
    """Unbatched samples of this process's shard (records shard_index, shard_index + shard_count, ...),
    reshuffled every epoch; `num_epochs=None` repeats forever."""
    dataset = grain.MapDataset.source(source)[shard_index::shard_count]
    epoch_length = len(dataset)
    dataset = dataset.shuffle(seed=seed).repeat(num_epochs)
    dataset = dataset.map_with_index(LamedTransform(tokenizer, spec, seed, epoch_length))
    return dataset.filter(_is_sample) if spec.skip_bad_records else dataset


def lamed_dataset(source, tokenizer, spec: SampleSpec, *, seed: int, batch_size: int, num_epochs: int | None = None,
                  shard_index: int = 0, shard_count: int = 1) -> grain.MapDataset | grain.IterDataset:
    """Fixed-shape batches of `lamed_samples` (the last partial batch is dropped). With skip_bad_records
    the batching happens on an IterDataset, since dropped records make positions unknowable up front."""
    samples = lamed_samples(source, tokenizer, spec, seed=seed, num_epochs=num_epochs, shard_index=shard_index,
                            shard_count=shard_count)
    if spec.skip_bad_records:
        samples = samples.to_iter_dataset(read_options())
    return samples.batch(batch_size, drop_remainder=True)


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


def to_global_arrays(batch: dict[str, np.ndarray], sharding) -> dict:
    """This process's part of a batch → global jax Arrays laid out by `sharding` (e.g. a NamedSharding over
    the data axes); each process passes only its own rows."""
    import jax

    return {key: jax.make_array_from_process_local_data(sharding, value) for key, value in batch.items()}


def save_iterator_state(directory, iterator) -> None:
    """Saves the iterator's position with Orbax (JSON) — put it next to the train state of the same step."""
    import orbax.checkpoint as ocp

    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as checkpointer:
        checkpointer.save(os.path.abspath(directory), args=ocp.args.JsonSave(iterator.get_state()), force=True)


def load_iterator_state(directory) -> dict:
    """The state saved by `save_iterator_state`, for `iterate(..., state=...)`."""
    import orbax.checkpoint as ocp

    with ocp.Checkpointer(ocp.JsonCheckpointHandler()) as checkpointer:
        return checkpointer.restore(os.path.abspath(directory), args=ocp.args.JsonRestore())


SOURCES = {"cap": "CaptionSource", "vqa_closed": "VQASource", "vqa_open": "VQASource", "seg": "SegSource",
           "rec": "SegSource", "reg": "SegSource", "refseg": "RefSegSource"}


def build_source(entry) -> object:
    """A source from a config entry: kind (cap, vqa_closed, vqa_open, seg, rec, reg, refseg), path, split."""
    from m3d_jax.data import sources

    kind, path, split = entry["kind"], entry["path"], entry.get("split", "")
    if kind not in SOURCES:
        raise ValueError(f"unknown data source kind {kind!r}; choose one of {sorted(SOURCES)}")
    if kind == "cap":
        return sources.CaptionSource(path, split or "train")
    if kind.startswith("vqa"):
        return sources.VQASource(path, closed=kind == "vqa_closed")
    if kind in ("seg", "rec", "reg"):
        return sources.SegSource(path, split or "training", task=kind)
    return sources.RefSegSource(path)


def build_mixture(data_config, tokenizer, spec: SampleSpec, *, seed: int, shard_index: int = 0,
                  shard_count: int = 1):
    """The weighted mixture of a config's `data.sources` (each with kind, path, split, weight), batched."""
    parts, weights = [], []
    for offset, entry in enumerate(data_config["sources"]):
        parts.append(lamed_samples(build_source(entry), tokenizer, spec, seed=seed + offset, shard_index=shard_index,
                                   shard_count=shard_count))
        weights.append(float(entry.get("weight", 1.0)))
    mixed = parts[0] if len(parts) == 1 else mix(parts, weights)
    if spec.skip_bad_records:
        mixed = mixed.to_iter_dataset(read_options())
    return mixed.batch(int(data_config["batch_size"]), drop_remainder=True)
