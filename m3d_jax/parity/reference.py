"""The reference `.npz` format for parity checks, and the comparisons.

Keys: `image` float32 [B,1,D,H,W], `input_ids` int [B,L], `logits` float32 [B,L,V] (required);
`attention_mask` int [B,L], `seg_logits` float32 [B,1,D,H,W] (prompted by the `[SEG]` ids in
`input_ids`), `generated_ids` int [B,T] (greedy continuation of `input_ids`), `image_features` float32
[B,N,H] (the projected image tokens, as spliced) (optional). A Med-2E3 reference also requires
`question_ids`, `question_mask` int [B,Lq] and may hold `slice_scores` [B,S] and `visual_tokens` float32
[B,N_vis,E] (the 3D tokens, then the fused 2D tokens, as spliced) in place of `seg_logits` /
`image_features`.

A Med-2E3 `input_ids` comes in either form: the reference's own, one sentinel `IMAGE3D_SENTINEL` (−201)
per row where the N_vis visual rows are spliced (so `logits` cover up to L − 1 + N_vis positions; see
`expand_image_sentinels`), or already expanded to a block of the model's image placeholder ids (`logits`
[B,L,V]). Fields a reference does not define are dropped with a one-line warning on stderr.
"""

from __future__ import annotations

import os
import sys
import zipfile
from pathlib import Path

import numpy as np

from m3d_jax.errors import InputError

IMAGE3D_SENTINEL = -201  # Med-2E3's `<image3d>` id (src/utils/constants.py), replaced by the visual rows
REQUIRED = {"image": 5, "input_ids": 2, "logits": 3}
OPTIONAL = {"attention_mask": 2, "seg_logits": 5, "generated_ids": 2, "image_features": 3}
# Per model kind: (required, optional) fields with their ranks.
FIELDS = {
    "lamed": (REQUIRED, OPTIONAL),
    "med2e3": ({**REQUIRED, "question_ids": 2, "question_mask": 2},
               {"attention_mask": 2, "slice_scores": 2, "generated_ids": 2, "visual_tokens": 3}),
}


class ReferenceFileError(InputError):
    """A reference file is missing, unreadable, or lacks / mis-shapes a field."""


def has_image_sentinels(input_ids: np.ndarray) -> bool:
    """Whether `input_ids` is in Med-2E3's own form (sentinels, not an expanded placeholder block)."""
    return bool((np.asarray(input_ids) == IMAGE3D_SENTINEL).any())


def load_reference(path: str | os.PathLike, kind: str = "lamed") -> dict[str, np.ndarray]:
    """The fields of a reference file for a `kind` ("lamed" or "med2e3") model, checked for presence,
    rank and batch size; unknown fields are dropped with a warning on stderr."""
    required, optional = FIELDS[kind]
    path = Path(path)
    if not path.is_file():
        raise ReferenceFileError(f"{path}: reference file not found")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise ReferenceFileError(f"{path}: not a readable .npz ({err})") from None
    unknown = sorted(set(arrays) - set(required) - set(optional))
    if unknown:
        print(f"warning: {path}: ignoring fields {', '.join(unknown)}, which a {kind} reference does not define",
              file=sys.stderr)
        arrays = {key: value for key, value in arrays.items() if key not in unknown}
    missing = sorted(set(required) - set(arrays))
    if missing:
        raise ReferenceFileError(f"{path}: a {kind} reference lacks fields {missing}")
    for key, ndim in {**required, **optional}.items():
        if key in arrays and arrays[key].ndim != ndim:
            raise ReferenceFileError(f"{path}: field {key} has shape {arrays[key].shape}, expected {ndim} dimensions")
    batch, length = arrays["input_ids"].shape
    # With sentinels the logits cover the spliced sequence, whose length depends on the model (checked on expansion).
    spliced = kind == "med2e3" and has_image_sentinels(arrays["input_ids"])
    lengths_agree = spliced or arrays["logits"].shape[1] == length
    mask_agrees = arrays.get("attention_mask", arrays["input_ids"]).shape == (batch, length)
    if not (lengths_agree and mask_agrees) or {value.shape[0] for value in arrays.values()} != {batch}:
        raise ReferenceFileError(f"{path}: fields disagree on the batch / length of input_ids {(batch, length)}: "
                                 + ", ".join(f"{k} {v.shape}" for k, v in arrays.items()))
    return arrays


def expand_image_sentinels(input_ids: np.ndarray, attention_mask: np.ndarray | None, num_visual_tokens: int,
                           placeholder_id: int, where: str = "input_ids") -> tuple[np.ndarray, np.ndarray]:
    """Med-2E3's prompt packing on ids: each row keeps its unmasked ids, its one `IMAGE3D_SENTINEL` becomes
    `num_visual_tokens` copies of `placeholder_id` (the rows the reference splices there), and the rows are
    right-padded to the longest, as the reference pads its spliced embeddings. Padding holds an id other
    than the placeholder, masked out. Returns (input_ids, attention_mask) [B, T]; a row without exactly
    one sentinel, or already holding the placeholder id, is a ReferenceFileError naming `where`."""
    ids = np.asarray(input_ids)
    mask = np.ones_like(ids) if attention_mask is None else np.asarray(attention_mask)
    rows = []
    for row in range(ids.shape[0]):
        kept = ids[row][mask[row].astype(bool)]
        found = np.flatnonzero(kept == IMAGE3D_SENTINEL)
        if found.size != 1:
            raise ReferenceFileError(f"{where}: input_ids row {row} holds {found.size} image sentinels "
                                     f"({IMAGE3D_SENTINEL}) among its unmasked ids; the reference form has one per row")
        if (kept == placeholder_id).any():
            raise ReferenceFileError(f"{where}: input_ids row {row} already holds the model's image placeholder id "
                                     f"{placeholder_id}, so the expanded block would not be the only one")
        at = int(found[0])
        rows.append(np.concatenate([kept[:at], np.full(num_visual_tokens, placeholder_id, ids.dtype), kept[at + 1:]]))
    width = max(len(row) for row in rows)
    expanded = np.full((len(rows), width), 1 if placeholder_id == 0 else 0, ids.dtype)
    expanded_mask = np.zeros((len(rows), width), np.int32)
    for index, row in enumerate(rows):
        expanded[index, :len(row)] = row
        expanded_mask[index, :len(row)] = 1
    return expanded, expanded_mask


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def mean_kl(reference_logits: np.ndarray, logits: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean over positions of KL(softmax(reference) ‖ softmax(ours))."""
    ref, ours = log_softmax(reference_logits), log_softmax(logits)
    kl = (np.exp(ref) * (ref - ours)).sum(axis=-1)
    if mask is not None:
        return float((kl * mask).sum() / max(mask.sum(), 1))
    return float(kl.mean())


def differences(reference: np.ndarray, ours: np.ndarray) -> tuple[float, float]:
    """(max |Δ|, max |Δ| / max |reference|) over finite reference entries (−inf seg logits compare equal)."""
    reference, ours = np.asarray(reference, np.float64), np.asarray(ours, np.float64)
    if reference.shape != ours.shape:
        raise ValueError(f"shape {ours.shape} differs from the reference's {reference.shape}")
    finite = np.isfinite(reference)
    if not np.array_equal(finite, np.isfinite(ours)) or not np.array_equal(reference[~finite], ours[~finite]):
        return float("inf"), float("inf")
    if not finite.any():
        return 0.0, 0.0
    delta = float(np.max(np.abs(reference[finite] - ours[finite])))
    return delta, delta / max(float(np.max(np.abs(reference[finite]))), 1e-30)
