"""Comparing an m3d-jax checkpoint with a PyTorch reference .npz (`tools/dump_reference.py`): one row per output
(max |Δ|, max relative Δ, mean KL for logits, token equality for generated ids) against its threshold. The
file formats are described in `tools/parity.py` and `m3d_jax.parity.reference`."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
from flax import nnx

from m3d_jax.convert import load
from m3d_jax.generate import SamplingConfig, left_pad
from m3d_jax.models.lamed import generate_lamed, shift_left
from m3d_jax.models.med2e3 import generate_med2e3, image_placeholder_starts
from m3d_jax.parity.reference import (
    IMAGE3D_SENTINEL, ReferenceFileError, differences, expand_image_sentinels, has_image_sentinels, load_reference,
    mean_kl,
)

Row = tuple[str, str, str, str, bool]  # output, max |Δ|, max rel Δ, mean KL, within threshold


@dataclasses.dataclass(frozen=True)
class Tolerances:
    """The thresholds of each output (the flags' defaults)."""

    atol: float = 1e-3
    max_kl: float = 1e-5
    seg_atol: float = 1e-3
    score_atol: float = 1e-4
    feature_atol: float = 1e-3


def _logit_row(reference: np.ndarray, logits: np.ndarray, mask: np.ndarray, tol: Tolerances) -> Row:
    valid = np.asarray(mask).astype(bool)  # padded positions carry nothing the reference defines
    max_abs, max_rel = differences(reference[valid], logits[valid])
    kl = mean_kl(reference[valid], logits[valid])
    return ("logits", f"{max_abs:.3e}", f"{max_rel:.3e}", f"{kl:.3e}", max_abs <= tol.atol and kl <= tol.max_kl)


def _row(name: str, reference: np.ndarray, ours: np.ndarray, atol: float, ref_path: str) -> Row:
    if reference.shape != ours.shape:
        raise ReferenceFileError(f"{ref_path}: {name} has shape {reference.shape}, the model gives {ours.shape}")
    max_abs, max_rel = differences(reference, ours)
    return (name, f"{max_abs:.3e}", f"{max_rel:.3e}", "", max_abs <= atol)


def _generated_row(expected: np.ndarray, generated: np.ndarray) -> Row:
    agree = float((generated == expected).mean())
    return ("generated_ids", "", f"{agree:.1%} equal", "", agree == 1.0)


def _check_logits_shape(ref_path: str, reference: np.ndarray, ids: np.ndarray, how: str) -> None:
    if reference.shape[:2] != ids.shape:
        raise ReferenceFileError(f"{ref_path}: logits cover {reference.shape[1]} positions, but input_ids {how} "
                                 f"gives {ids.shape[1]} (batch {ids.shape[0]}, logits batch {reference.shape[0]})")


def lamed_rows(folder: str, ref_path: str, tol: Tolerances = Tolerances()) -> list[Row]:
    """The comparison rows of an M3D-LaMed checkpoint against a reference file."""
    ref = load_reference(ref_path)
    model = load(folder, expect="lamed")
    images, ids = jnp.asarray(ref["image"]), jnp.asarray(ref["input_ids"].astype(np.int32))
    mask = jnp.asarray(ref.get("attention_mask", np.ones(ids.shape, np.int32)).astype(np.int32))
    out = model(images, ids, attention_mask=mask)
    rows = [_logit_row(ref["logits"], np.asarray(out.logits), np.asarray(mask), tol)]
    if "image_features" in ref:
        rows.append(_row("image_features", ref["image_features"], np.asarray(model.encode_images(images)),
                         tol.feature_atol, ref_path))
    if "seg_logits" in ref:
        prompts, _ = model.seg_prompts(out.last_hidden_state, shift_left(ids, -1))
        rows.append(_row("seg_logits", ref["seg_logits"], np.asarray(model.segment(images, prompts)), tol.seg_atol,
                         ref_path))
    if "generated_ids" in ref:
        expected = ref["generated_ids"]
        generated = generate_lamed(model, np.asarray(images), np.asarray(ids), attention_mask=np.asarray(mask),
                                   config=SamplingConfig(max_new_tokens=expected.shape[1], eos_token_ids=())).tokens
        rows.append(_generated_row(expected, np.asarray(generated)))
    return rows


@nnx.jit
def _med2e3_forward(model, images, ids, question_ids, question_mask, mask, starts):
    """(logits, slice scores, visual tokens as spliced)."""
    visual = model.visual_tokens(images, question_ids, question_mask)
    out = model.llm(inputs_embeds=model.embed(ids, visual.tokens, starts), attention_mask=mask)
    return out.logits, visual.slice_scores, visual.tokens


def med2e3_rows(folder: str, ref_path: str, tol: Tolerances = Tolerances()) -> list[Row]:
    """The comparison rows of a Med-2E3 checkpoint against a reference file in either input_ids form."""
    ref = load_reference(ref_path, "med2e3")
    model = load(folder, expect="med2e3")
    config = model.config
    ids = ref["input_ids"].astype(np.int32)
    mask = ref.get("attention_mask", np.ones(ids.shape, np.int32)).astype(np.int32)
    how = "as given"
    if has_image_sentinels(ids):
        ids, mask = expand_image_sentinels(ids, mask, config.num_visual_tokens, config.image_token_id, ref_path)
        how = f"with each {IMAGE3D_SENTINEL} sentinel expanded to {config.num_visual_tokens} visual rows"
    _check_logits_shape(ref_path, ref["logits"], ids, how)
    try:
        starts = image_placeholder_starts(ids, config)
    except ValueError as err:
        raise ReferenceFileError(f"{ref_path}: {err}") from None
    questions = ref["question_ids"].astype(np.int32), ref["question_mask"].astype(np.int32)
    logits, scores, visual = _med2e3_forward(model, *map(jnp.asarray, (ref["image"], ids, *questions, mask, starts)))
    rows = [_logit_row(ref["logits"], np.asarray(logits), mask, tol)]
    if "visual_tokens" in ref:
        rows.append(_row("visual_tokens", ref["visual_tokens"], np.asarray(visual), tol.feature_atol, ref_path))
    if "slice_scores" in ref:
        rows.append(_row("slice_scores", ref["slice_scores"], np.asarray(scores), tol.score_atol, ref_path))
    if "generated_ids" in ref:
        expected = ref["generated_ids"]
        prompts, prompt_mask = left_pad([row[keep.astype(bool)] for row, keep in zip(ids, mask)],
                                        1 if config.image_token_id == 0 else 0)
        generated = generate_med2e3(model, ref["image"], prompts, *questions, attention_mask=prompt_mask,
                                    config=SamplingConfig(max_new_tokens=expected.shape[1], eos_token_ids=())).tokens
        rows.append(_generated_row(expected, np.asarray(generated)))
    return rows


def print_rows(rows: list[Row]) -> bool:
    """Prints the table and the verdict; True when every output is within its threshold."""
    print(f"{'output':<14} {'max |Δ|':>10} {'max rel Δ':>12} {'mean KL':>10}  result")
    for name, max_abs, max_rel, kl, ok in rows:
        print(f"{name:<14} {max_abs:>10} {max_rel:>12} {kl:>10}  {'ok' if ok else 'FAIL'}")
    passed = all(ok for *_, ok in rows)
    print("parity ok" if passed else "parity FAILED")
    return passed
