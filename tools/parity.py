"""Check an M3D-LaMed or Med-2E3 checkpoint in JAX against a PyTorch reference .npz (tools/dump_reference.py).

  python tools/parity.py --ckpt=lamed_jax/ --ref=ref.npz [--atol=1e-3 --max_kl=1e-5 --seg_atol=1e-3]
  python tools/parity.py --ckpt=Med-2E3-M3D/ --ref=med2e3_ref.npz [--atol=1e-3 --max_kl=1e-5 --score_atol=1e-4]

--ckpt is an m3d-jax parameter folder (tools/convert_checkpoint.py torch2jax) or a released PyTorch
folder (converted in memory). Prints, per output, max |Δ|, max relative Δ (to max |reference|) and, for
logits, the mean KL divergence of the softmaxed distributions; generated_ids compare token by token.
Exits 1 when any output is beyond its threshold.

A Med-2E3 reference holds image [B,1,D,H,W], input_ids [B,L] (the prompt with its block of
image_token_id placeholders, as m3d_jax.data.med2e3_samples.prompt_ids builds it), question_ids and
question_mask [B,Lq] (BERT tokens of the question), logits [B,L,V], optionally attention_mask [B,L],
slice_scores [B,slices] (the TG-IS softmax, checked with --score_atol) and generated_ids [B,T]
(greedy continuation).
"""

from __future__ import annotations

import sys

from absl import app, flags

_CKPT = flags.DEFINE_string("ckpt", None, "m3d-jax folder or released PyTorch folder.", required=True)
_REF = flags.DEFINE_string("ref", None, "Reference .npz.", required=True)
_ATOL = flags.DEFINE_float("atol", 1e-3, "Largest allowed max |Δ| of the logits.")
_MAX_KL = flags.DEFINE_float("max_kl", 1e-5, "Largest allowed mean KL(reference ‖ ours) of the logits.")
_SEG_ATOL = flags.DEFINE_float("seg_atol", 1e-3, "Largest allowed max |Δ| of the seg logits.")
_SCORE_ATOL = flags.DEFINE_float("score_atol", 1e-4, "Med-2E3: largest allowed max |Δ| of the slice scores.")

def _logit_row(reference, logits, mask):
    import numpy as np

    from m3d_jax.parity.reference import differences, mean_kl

    max_abs, max_rel = differences(reference, logits)
    kl = mean_kl(reference, logits, np.asarray(mask))
    return ("logits", f"{max_abs:.3e}", f"{max_rel:.3e}", f"{kl:.3e}", max_abs <= _ATOL.value and kl <= _MAX_KL.value)


def _generated_row(expected, generated):
    agree = float((generated == expected).mean())
    return ("generated_ids", "", f"{agree:.1%} equal", "", agree == 1.0)


def lamed_rows(folder: str, ref_path: str) -> list[tuple]:
    import jax.numpy as jnp
    import numpy as np

    from m3d_jax.convert.lamed import load_lamed_folder
    from m3d_jax.generate import SamplingConfig
    from m3d_jax.models.lamed import generate_lamed, shift_left
    from m3d_jax.parity.reference import differences, load_reference

    ref = load_reference(ref_path)
    model = load_lamed_folder(folder)
    images, ids = jnp.asarray(ref["image"]), jnp.asarray(ref["input_ids"].astype(np.int32))
    mask = jnp.asarray(ref.get("attention_mask", np.ones(ids.shape, np.int32)).astype(np.int32))
    out = model(images, ids, attention_mask=mask)
    rows = [_logit_row(ref["logits"], np.asarray(out.logits), mask)]
    if "seg_logits" in ref:
        prompts, _ = model.seg_prompts(out.last_hidden_state, shift_left(ids, -1))
        seg = np.asarray(model.segment(images, prompts))
        max_abs, max_rel = differences(ref["seg_logits"], seg)
        rows.append(("seg_logits", f"{max_abs:.3e}", f"{max_rel:.3e}", "", max_abs <= _SEG_ATOL.value))
    if "generated_ids" in ref:
        expected = ref["generated_ids"]
        generated = generate_lamed(model, np.asarray(images), np.asarray(ids), attention_mask=np.asarray(mask),
                                   config=SamplingConfig(max_new_tokens=expected.shape[1], eos_token_ids=())).tokens
        rows.append(_generated_row(expected, np.asarray(generated)))
    return rows


def med2e3_rows(folder: str, ref_path: str) -> list[tuple]:
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from m3d_jax.convert.checkpoint import load_med2e3_folder
    from m3d_jax.generate import SamplingConfig
    from m3d_jax.models.med2e3 import generate_med2e3, image_placeholder_starts
    from m3d_jax.parity.reference import differences, load_reference

    ref = load_reference(ref_path, "med2e3")
    model = load_med2e3_folder(folder)
    ids = ref["input_ids"].astype(np.int32)
    mask = ref.get("attention_mask", np.ones(ids.shape, np.int32)).astype(np.int32)
    questions = ref["question_ids"].astype(np.int32), ref["question_mask"].astype(np.int32)
    starts = image_placeholder_starts(ids, model.config)
    forward = nnx.jit(lambda m, images, ids, qids, qmask, mask, starts: m(
        images, ids, qids, qmask, attention_mask=mask, image_starts=starts))
    out = forward(model, *map(jnp.asarray, (ref["image"], ids, *questions, mask, starts)))
    rows = [_logit_row(ref["logits"], np.asarray(out.logits), mask)]
    if "slice_scores" in ref:
        max_abs, max_rel = differences(ref["slice_scores"], np.asarray(out.slice_scores))
        rows.append(("slice_scores", f"{max_abs:.3e}", f"{max_rel:.3e}", "", max_abs <= _SCORE_ATOL.value))
    if "generated_ids" in ref:
        expected = ref["generated_ids"]
        generated = generate_med2e3(model, ref["image"], ids, *questions, attention_mask=mask,
                                    config=SamplingConfig(max_new_tokens=expected.shape[1], eos_token_ids=())).tokens
        rows.append(_generated_row(expected, np.asarray(generated)))
    return rows


def main(argv):
    del argv
    from m3d_jax.convert.checkpoint import is_med2e3

    rows = (med2e3_rows if is_med2e3(_CKPT.value) else lamed_rows)(_CKPT.value, _REF.value)
    failed = False
    print(f"{'output':<14} {'max |Δ|':>10} {'max rel Δ':>12} {'mean KL':>10}  result")
    for name, max_abs, max_rel, kl, ok in rows:
        print(f"{name:<14} {max_abs:>10} {max_rel:>12} {kl:>10}  {'ok' if ok else 'FAIL'}")
        failed |= not ok
    print("parity FAILED" if failed else "parity ok")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    app.run(main)
