"""Check an M3D-LaMed checkpoint in JAX against a PyTorch reference .npz (tools/dump_reference.py).

  python tools/parity.py --ckpt=lamed_jax/ --ref=ref.npz [--atol=1e-3 --max_kl=1e-5 --seg_atol=1e-3]

--ckpt is an m3d-jax parameter folder (tools/convert_checkpoint.py torch2jax) or a released PyTorch
folder (converted in memory). Prints, per output, max |Δ|, max relative Δ (to max |reference|) and, for
logits, the mean KL divergence of the softmaxed distributions; generated_ids compare token by token.
Exits 1 when any output is beyond its threshold.
"""

from __future__ import annotations

import sys

from absl import app, flags

_CKPT = flags.DEFINE_string("ckpt", None, "m3d-jax folder or released PyTorch folder.", required=True)
_REF = flags.DEFINE_string("ref", None, "Reference .npz.", required=True)
_ATOL = flags.DEFINE_float("atol", 1e-3, "Largest allowed max |Δ| of the logits.")
_MAX_KL = flags.DEFINE_float("max_kl", 1e-5, "Largest allowed mean KL(reference ‖ ours) of the logits.")
_SEG_ATOL = flags.DEFINE_float("seg_atol", 1e-3, "Largest allowed max |Δ| of the seg logits.")


def main(argv):
    del argv
    import jax.numpy as jnp
    import numpy as np

    from m3d_jax.generate import SamplingConfig
    from m3d_jax.models.lamed import generate_lamed, shift_left
    from m3d_jax.parity.reference import differences, load_reference, mean_kl

    from m3d_jax.convert.lamed import load_lamed_folder

    ref = load_reference(_REF.value)
    model = load_lamed_folder(_CKPT.value)
    images, ids = jnp.asarray(ref["image"]), jnp.asarray(ref["input_ids"].astype(np.int32))
    mask = jnp.asarray(ref.get("attention_mask", np.ones(ids.shape, np.int32)).astype(np.int32))
    out = model(images, ids, attention_mask=mask)
    rows, failed = [], False
    logits = np.asarray(out.logits)
    max_abs, max_rel = differences(ref["logits"], logits)
    kl = mean_kl(ref["logits"], logits, np.asarray(mask))
    ok = max_abs <= _ATOL.value and kl <= _MAX_KL.value
    rows.append(("logits", f"{max_abs:.3e}", f"{max_rel:.3e}", f"{kl:.3e}", ok))
    if "seg_logits" in ref:
        prompts, _ = model.seg_prompts(out.last_hidden_state, shift_left(ids, -1))
        seg = np.asarray(model.segment(images, prompts))
        max_abs, max_rel = differences(ref["seg_logits"], seg)
        rows.append(("seg_logits", f"{max_abs:.3e}", f"{max_rel:.3e}", "", max_abs <= _SEG_ATOL.value))
    if "generated_ids" in ref:
        expected = ref["generated_ids"]
        steps = expected.shape[1]
        generated = np.asarray(generate_lamed(model, np.asarray(images), np.asarray(ids), attention_mask=np.asarray(mask),
                                              config=SamplingConfig(max_new_tokens=steps, eos_token_ids=())).tokens)
        agree = float((generated == expected).mean())
        rows.append(("generated_ids", "", f"{agree:.1%} equal", "", agree == 1.0))
    print(f"{'output':<14} {'max |Δ|':>10} {'max rel Δ':>12} {'mean KL':>10}  result")
    for name, max_abs, max_rel, kl, ok in rows:
        print(f"{name:<14} {max_abs:>10} {max_rel:>12} {kl:>10}  {'ok' if ok else 'FAIL'}")
        failed |= not ok
    print("parity FAILED" if failed else "parity ok")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    app.run(main)
