"""Prompt templates (written for m3d-jax; several phrasings per task) and LaMed's tokenization:
BOS + `proj_out_num` × <im_patch> + text, labels −100 on the prompt and padding, EOS after the answer."""

from __future__ import annotations

import dataclasses

import numpy as np

CAPTION_PROMPTS = (
    "Write a radiology report for this scan.",
    "Describe the findings in this 3D image.",
    "What does this volume show? Give a short report.",
    "Summarise the imaging findings.",
    "Please caption this medical image.",
)
SEGMENT_PROMPTS = (
    "Segment the {target}.",
    "Where is the {target}? Please outline it.",
    "Can you delineate the {target} in this scan?",
    "Show me a mask of the {target}.",
)
SEGMENT_ANSWERS = ("Here it is: [SEG].", "It is [SEG].", "Sure, [SEG].", "The {target} is at [SEG].")
REC_PROMPTS = (
    "Give the bounding box of the {target}.",
    "Where is the {target}? Answer with a box.",
    "Locate the {target} with a box.",
)
REG_PROMPTS = ("What is in the region {box}?", "Describe the structure inside {box}.", "Name what lies in {box}.")


def choose(templates: tuple[str, ...], rng: np.random.Generator, **fields) -> str:
    return templates[int(rng.integers(len(templates)))].format(**fields)


def box_text(box) -> str:
    """`<bx_start>[d0, h0, w0, d1, h1, w1]<bx_end>` with 3 decimals (M3D's positioning format)."""
    return "<bx_start>" + str([round(float(v), 3) for v in box]) + "<bx_end>"


def box_from_mask(mask: np.ndarray) -> list[float]:
    """Normalised box of a [D, H, W] mask: first / size and INCLUSIVE last index / size per axis."""
    hits = np.argwhere(mask > 0)
    if hits.size == 0:
        raise ValueError("box_from_mask: the mask is empty")
    size = np.array(mask.shape, np.float64)
    return [round(v, 3) for v in (hits.min(0) / size).tolist() + (hits.max(0) / size).tolist()]


@dataclasses.dataclass(frozen=True)
class TokenizedSample:
    input_ids: np.ndarray  # [L] int32
    attention_mask: np.ndarray  # [L] int32
    labels: np.ndarray  # [L] int32, −100 where not supervised


def tokenize_sample(tokenizer, question: str, answer: str, *, proj_out_num: int, max_length: int,
                    image_token_id: int) -> TokenizedSample:
    """LaMed's convention: BOS, image placeholders, ' ' + question, ' ' + answer, EOS; padded or truncated
    to `max_length`. Only the answer tokens and the EOS are supervised. Raises ValueError when the prompt
    alone does not fit."""
    prompt = prompt_ids(tokenizer, question, proj_out_num=proj_out_num, image_token_id=image_token_id)
    answer_ids = _ids(tokenizer, " " + answer.strip()) + [tokenizer.eos_token_id]
    if len(prompt) >= max_length:
        raise ValueError(f"prompt of {len(prompt)} tokens does not fit max_length {max_length}")
    ids = (prompt + answer_ids)[:max_length]
    labels = [-100] * len(prompt) + ids[len(prompt):]
    pad = max_length - len(ids)
    return TokenizedSample(
        np.asarray(ids + [tokenizer.pad_token_id] * pad, np.int32),
        np.asarray([1] * len(ids) + [0] * pad, np.int32),
        np.asarray(labels + [-100] * pad, np.int32),
    )


IMAGE_START = 1  # a LaMed prompt's image placeholders follow its one BOS (or pad) token


def prompt_ids(tokenizer, question: str, *, proj_out_num: int, image_token_id: int) -> list[int]:
    """The prompt part of `tokenize_sample` (what a trained model is asked at inference)."""
    return [bos_id(tokenizer)] + [image_token_id] * proj_out_num + _ids(tokenizer, " " + question.strip())


def bos_id(tokenizer) -> int:
    """The id before the image tokens: BOS, or pad for tokenizers without one (the splice needs one token)."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.pad_token_id


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]
