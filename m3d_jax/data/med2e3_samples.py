"""Med-2E3 samples: the volume, the chat prompt with its visual placeholder block, labels on the answers
only, and the question alone in BERT tokens (for text-guided slice scoring).

Prompt ("phi" template, fine-tuning and inference):
  [BOS if the tokenizer adds one] SYSTEM "USER: " <visual block> "\\n{question} ASSISTANT:" " {answer}" EOS
"pretrain" template (stage 1): <visual block> " {caption}" — no system text, no BOS, no EOS.
Everything but the answer (and its EOS) is −100 in the labels; rows are right-padded, as the reference.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import numpy as np

from m3d_jax.data.augment import AugmentConfig, augment
from m3d_jax.data.clip_samples import text_ids
from m3d_jax.data.lamed_samples import record_texts
from m3d_jax.data.pipeline import RecordError, RecordTransform

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions. ")
TEMPLATES = ("phi", "pretrain")


class Med2E3Tokenizers(NamedTuple):
    llm: object  # the decoder's tokenizer (Phi-3's, unchanged)
    text: object  # BERT's (bert-base-uncased), for the question


class Med2E3Prompt(NamedTuple):
    ids: list[int]
    image_start: int


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front by itself (the reference then keeps one BOS)."""
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("test string")["input_ids"][:1] == [bos]


def prompt_ids(tokenizer, question: str, *, num_visual: int, placeholder_id: int, template: str = "phi"
               ) -> Med2E3Prompt:
    """The prompt up to where the answer starts (what the model is asked at inference)."""
    if template not in TEMPLATES:
        raise ValueError(f"unknown Med-2E3 template {template!r}; choose one of {TEMPLATES}")
    if template == "pretrain":
        return Med2E3Prompt([placeholder_id] * num_visual, 0)
    head = ([tokenizer.bos_token_id] if _adds_bos(tokenizer) else []) + _ids(tokenizer, SYSTEM + "USER: ")
    tail = _ids(tokenizer, "\n" + question.strip() + " ASSISTANT:")
    return Med2E3Prompt(head + [placeholder_id] * num_visual + tail, len(head))


def tokenize_med2e3(tokenizer, question: str, answer: str, *, num_visual: int, placeholder_id: int,
                    max_length: int, template: str = "phi") -> dict[str, np.ndarray]:
    """input_ids, attention_mask, labels [max_length] and image_starts (scalar) of one sample. Raises
    ValueError when the prompt with its visual block does not fit."""
    prompt = prompt_ids(tokenizer, question, num_visual=num_visual, placeholder_id=placeholder_id,
                        template=template)
    answer_ids = _ids(tokenizer, " " + answer.strip()) + ([tokenizer.eos_token_id] if template == "phi" else [])
    if len(prompt.ids) >= max_length:
        raise ValueError(f"prompt of {len(prompt.ids)} tokens ({num_visual} visual) does not fit max_length "
                         f"{max_length}")
    ids = (prompt.ids + answer_ids)[:max_length]
    labels = [-100] * len(prompt.ids) + ids[len(prompt.ids):]
    pad = max_length - len(ids)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {"input_ids": np.asarray(ids + [pad_id] * pad, np.int32),
            "attention_mask": np.asarray([1] * len(ids) + [0] * pad, np.int32),
            "labels": np.asarray(labels + [-100] * pad, np.int32),
            "image_starts": np.asarray(prompt.image_start, np.int32)}


@dataclasses.dataclass(frozen=True)
class Med2E3SampleSpec:
    image_size: tuple[int, int, int]
    num_visual: int  # visual rows spliced into the prompt (512)
    placeholder_id: int
    max_length: int  # LLM tokens (768)
    question_length: int = 512  # BERT tokens of the question
    template: str = "phi"
    in_channels: int = 1
    augment: AugmentConfig | None = AugmentConfig()
    window: tuple[float, float] | None = None
    skip_bad_records: bool = False

    def transform(self, tokenizers: Med2E3Tokenizers, seed: int, epoch_length: int) -> Med2E3Transform:
        return Med2E3Transform(tokenizers, self, seed, epoch_length)


class Med2E3Transform(RecordTransform):
    """→ dict(images [C,D,H,W], input_ids, attention_mask, labels [L], image_starts [], question_ids,
    question_mask [Lq]) from any LaMed record (caption, VQA, ...)."""

    def _sample(self, index: int, record: dict) -> dict[str, np.ndarray]:
        spec, tokenizers = self.spec, self.tokenizer
        image, _, rng = self._prepared(index, record)
        if spec.augment is not None:
            image, _ = augment(image, None, rng, spec.augment)
        if record["task"] not in ("caption", "vqa_closed", "vqa_open"):
            raise RecordError(f"{record['image']}: Med-2E3 trains on caption and VQA records, not {record['task']!r}")
        question, answer = record_texts(record, None, rng)
        try:
            sample = tokenize_med2e3(tokenizers.llm, question, answer, num_visual=spec.num_visual,
                                     placeholder_id=spec.placeholder_id, max_length=spec.max_length,
                                     template=spec.template)
        except ValueError as err:
            raise RecordError(f"{record['image']}: {err}") from None
        question_ids, question_mask = text_ids(tokenizers.text, question, spec.question_length)
        return {"images": image.astype(np.float32), **sample, "question_ids": question_ids,
                "question_mask": question_mask}
