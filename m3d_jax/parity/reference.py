"""The reference `.npz` format for parity checks, and the comparisons.

Keys: `image` float32 [B,1,D,H,W], `input_ids` int [B,L], `logits` float32 [B,L,V] (required);
`attention_mask` int [B,L], `seg_logits` float32 [B,1,D,H,W] (prompted by the `[SEG]` ids in
`input_ids`), `generated_ids` int [B,T] (greedy continuation of `input_ids`) (optional). A Med-2E3
reference also requires `question_ids`, `question_mask` int [B,Lq] and may hold `slice_scores` [B,S]
instead of `seg_logits`.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np

from m3d_jax.errors import InputError

REQUIRED = {"image": 5, "input_ids": 2, "logits": 3}
OPTIONAL = {"attention_mask": 2, "seg_logits": 5, "generated_ids": 2}
# Per model kind: (required, optional) fields with their ranks.
FIELDS = {
    "lamed": (REQUIRED, OPTIONAL),
    "med2e3": ({**REQUIRED, "question_ids": 2, "question_mask": 2},
               {"attention_mask": 2, "slice_scores": 2, "generated_ids": 2}),
}


class ReferenceFileError(InputError):
    """A reference file is missing, unreadable, or lacks / mis-shapes a field."""


def load_reference(path: str | os.PathLike, kind: str = "lamed") -> dict[str, np.ndarray]:
    """The fields of a reference file for a `kind` ("lamed" or "med2e3") model, checked for presence,
    rank and batch size."""
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
    missing = sorted(set(required) - set(arrays))
    if missing or unknown:
        raise ReferenceFileError(f"{path}: a {kind} reference lacks fields {missing}, has unknown fields {unknown}")
    for key, ndim in {**required, **optional}.items():
        if key in arrays and arrays[key].ndim != ndim:
            raise ReferenceFileError(f"{path}: field {key} has shape {arrays[key].shape}, expected {ndim} dimensions")
    batch, length = arrays["input_ids"].shape
    if arrays["logits"].shape[:2] != (batch, length) or {value.shape[0] for value in arrays.values()} != {batch}:
        raise ReferenceFileError(f"{path}: fields disagree on the batch / length of input_ids {(batch, length)}: "
                                 + ", ".join(f"{k} {v.shape}" for k, v in arrays.items()))
    return arrays


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
