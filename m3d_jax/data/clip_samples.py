"""Image–report pairs for M3D-CLIP: the volume prepared and augmented as for LaMed, the report shortened
the reference way (its first sentence, then further sentences drawn at random while the token budget
allows) and tokenized with BERT's tokenizer to `max_text_len` ([CLS] ... [SEP], padded)."""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from m3d_jax.data.augment import AugmentConfig, augment
from m3d_jax.data.pipeline import RecordError, RecordTransform


@dataclasses.dataclass(frozen=True)
class ClipSampleSpec:
    image_size: tuple[int, int, int]
    max_text_len: int  # tokens given to BERT (M3D-CLIP: 128)
    excerpt_tokens: int = 512  # the report is first cut to this many tokens, sentence-wise (reference: 512)
    in_channels: int = 1
    augment: AugmentConfig | None = AugmentConfig()
    window: tuple[float, float] | None = None
    skip_bad_records: bool = False

    def transform(self, tokenizer, seed: int, epoch_length: int) -> ClipTransform:
        return ClipTransform(tokenizer, self, seed, epoch_length)


_SENTENCE_END = re.compile(r"(?<=\.)\s+")


def report_excerpt(text: str, count_tokens, max_tokens: int, rng: np.random.Generator) -> str:
    """The whole report when it fits `max_tokens`; else its first sentence followed by further sentences in
    a random order, each added only while the running token count stays within the budget."""
    if count_tokens(text) <= max_tokens:
        return text
    first, *rest = [s for s in _SENTENCE_END.split(text.strip()) if s]
    chosen, used = [first], count_tokens(first)
    for index in rng.permutation(len(rest)):
        cost = count_tokens(rest[index])
        if used + cost <= max_tokens:
            chosen.append(rest[index])
            used += cost
    return " ".join(chosen)


def count_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def text_ids(tokenizer, text: str, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """([CLS] tokens [SEP] truncated to `max_len` and right-padded, attention mask), both int32 [max_len].

    Truncation and padding are done here rather than by the tokenizer's options: a fast tokenizer
    keeps those options as shared state, which Grain's reader threads would race on."""
    tokens = tokenizer(text, add_special_tokens=False)["input_ids"][: max_len - 2]
    ids = [tokenizer.cls_token_id, *tokens, tokenizer.sep_token_id]
    mask = np.zeros(max_len, np.int32)
    mask[: len(ids)] = 1
    padded = np.full(max_len, tokenizer.pad_token_id, np.int32)
    padded[: len(ids)] = ids
    return padded, mask


class ClipTransform(RecordTransform):
    """→ dict(images [C,D,H,W], input_ids [L], attention_mask [L]) from a caption record."""

    def _count(self, text: str) -> int:
        return count_tokens(self.tokenizer, text)

    def _sample(self, index: int, record: dict) -> dict[str, np.ndarray]:
        spec = self.spec
        image, _, rng = self._prepared(index, record)
        if spec.augment is not None:
            image, _ = augment(image, None, rng, spec.augment)
        text = record.get("answer", "").strip()
        if not text:
            raise RecordError(f"{record['image']}: empty report text")
        text = report_excerpt(text, self._count, spec.excerpt_tokens, rng)
        input_ids, attention_mask = text_ids(self.tokenizer, text, spec.max_text_len)
        return {"images": image.astype(np.float32), "input_ids": input_ids, "attention_mask": attention_mask}
