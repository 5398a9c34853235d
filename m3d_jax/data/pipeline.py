"""The Grain pipeline for LaMed training: source → per-process shard → seeded shuffle (a new order each
epoch) → map (read, preprocess, augment, tokenize) → fixed-shape batches. A sample is a pure function of
(seed, epoch, index), and the iterator's state (grain `get_state`/`set_state`) resumes at the exact next
batch."""

from __future__ import annotations

import dataclasses

import grain.python as grain
import numpy as np

from m3d_jax.data.augment import AugmentConfig, augment, record_rng
from m3d_jax.data.prompts import CAPTION_PROMPTS, choose, tokenize_sample
from m3d_jax.data.volume import load_volume, preprocess


@dataclasses.dataclass(frozen=True)
class SampleSpec:
    image_size: tuple[int, int, int]
    proj_out_num: int
    image_token_id: int
    max_length: int
    augment: AugmentConfig | None = AugmentConfig()


class LamedTransform:
    """(index, record) → dict(images [1,D,H,W], input_ids, attention_mask, labels [L]); picklable."""

    def __init__(self, tokenizer, spec: SampleSpec, seed: int, epoch_length: int):
        self.tokenizer = tokenizer
        self.spec = spec
        self.seed = seed
        self.epoch_length = epoch_length

    def __call__(self, index: int, record: dict) -> dict[str, np.ndarray]:
        epoch, position = divmod(index, self.epoch_length)
        rng = record_rng(self.seed, epoch, position)
        image = preprocess(load_volume(record["image"]).array, self.spec.image_size)
        if self.spec.augment is not None:
            image, _ = augment(image, None, rng, self.spec.augment)
        question = record.get("question") or choose(CAPTION_PROMPTS, rng)
        sample = tokenize_sample(self.tokenizer, question, record["answer"], proj_out_num=self.spec.proj_out_num,
                                 max_length=self.spec.max_length, image_token_id=self.spec.image_token_id)
        return {"images": image.astype(np.float32), "input_ids": sample.input_ids,
                "attention_mask": sample.attention_mask, "labels": sample.labels}


def lamed_dataset(source, tokenizer, spec: SampleSpec, *, seed: int, batch_size: int, num_epochs: int | None = None,
                  shard_index: int = 0, shard_count: int = 1) -> grain.MapDataset:
    """Batched dataset over this process's shard (records shard_index, shard_index + shard_count, ...)."""
    dataset = grain.MapDataset.source(source)[shard_index::shard_count]
    epoch_length = len(dataset)
    dataset = dataset.shuffle(seed=seed).repeat(num_epochs)
    dataset = dataset.map_with_index(LamedTransform(tokenizer, spec, seed, epoch_length))
    return dataset.batch(batch_size, drop_remainder=True)
