"""M3D-Data records → M3D-LaMed samples (`LamedSampleSpec`, `LamedTransform`), and what every model that
learns from those records shares: a record's question and answer (`record_texts`, also Med-2E3's and the
bench's)."""

from __future__ import annotations

import dataclasses

import numpy as np

from m3d_jax.data.augment import AugmentConfig, augment
from m3d_jax.data.pipeline import RecordTransform
from m3d_jax.data.prompts import (
    CAPTION_PROMPTS, IMAGE_START, REC_PROMPTS, REG_PROMPTS, SEGMENT_ANSWERS, SEGMENT_PROMPTS, box_from_mask,
    box_text, choose, tokenize_sample,
)
from m3d_jax.errors import RecordError


@dataclasses.dataclass(frozen=True)
class LamedSampleSpec:
    """What a LaMed sample is made of: the model's image size and image tokens, the text length, augmentation."""

    image_size: tuple[int, int, int]
    proj_out_num: int
    image_token_id: int
    max_length: int
    in_channels: int = 1
    augment: AugmentConfig | None = AugmentConfig()
    window: tuple[float, float] | None = None  # CT (level, width) before min-max; None = M3D's plain min-max
    skip_bad_records: bool = False

    def transform(self, tokenizer, seed: int, epoch_length: int) -> LamedTransform:
        return LamedTransform(tokenizer, self, seed, epoch_length)



class LamedTransform(RecordTransform):
    """→ dict(images [C,D,H,W], seg_masks [1,D,H,W], input_ids, attention_mask, labels [L], image_starts [])."""

    def _sample(self, index: int, record: dict) -> dict[str, np.ndarray]:
        spec = self.spec
        image, mask, rng = self._prepared(index, record)
        if spec.augment is not None:
            image, mask = augment(image, mask, rng, spec.augment)
        question, answer = record_texts(record, mask, rng)
        try:
            sample = tokenize_sample(self.tokenizer, question, answer, proj_out_num=spec.proj_out_num,
                                     max_length=spec.max_length, image_token_id=spec.image_token_id)
        except ValueError as err:
            raise RecordError(f"{record['image']}: {err}") from None
        seg = mask if mask is not None and record["task"] in ("seg", "refseg") else np.zeros((1, *image.shape[1:]))
        return {"images": image.astype(np.float32), "seg_masks": seg.astype(np.float32),
                "input_ids": sample.input_ids, "attention_mask": sample.attention_mask, "labels": sample.labels,
                "image_starts": np.asarray(IMAGE_START, np.int32)}


def record_texts(record: dict, mask: np.ndarray | None, rng: np.random.Generator) -> tuple[str, str]:
    """(question, answer) of a record: its own, or drawn from the task's templates (box text from the mask)."""
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
