"""Check an M3D-LaMed or Med-2E3 checkpoint in JAX against a PyTorch reference .npz (tools/dump_reference.py).

  python tools/parity.py --ckpt=lamed_jax/ --ref=ref.npz [--atol=1e-3 --max_kl=1e-5 --seg_atol=1e-3]
  python tools/parity.py --ckpt=Med-2E3-M3D/ --ref=med2e3_ref.npz [--atol=1e-3 --max_kl=1e-5 --score_atol=1e-4]

--ckpt is an m3d-jax parameter folder (tools/convert_checkpoint.py torch2jax) or a released PyTorch
folder (converted in memory). Prints, per output, max |Δ|, max relative Δ (to max |reference|) and, for
logits, the mean KL divergence of the softmaxed distributions (both over the unmasked positions);
generated_ids compare token by token. Exits 1 when any output is beyond its threshold.

A Med-2E3 reference holds image [B,1,D,H,W], input_ids [B,L], question_ids and question_mask [B,Lq]
(BERT tokens of the question), logits, optionally attention_mask [B,L], slice_scores [B,slices] (the
TG-IS softmax, checked with --score_atol), visual_tokens [B,N_vis,E] (the 3D and fused 2D connector
outputs as spliced, checked with --feature_atol) and generated_ids [B,T] (greedy continuation).
input_ids is either the reference's own form, one −201 sentinel per row where the N_vis visual rows are
spliced (N_vis from the model's config; logits then cover the spliced sequence, rows packed as the
reference packs them), or already expanded to the block of image_token_id placeholders that
m3d_jax.data.med2e3_samples.prompt_ids builds (logits [B,L,V]). A LaMed reference may hold
image_features [B,N,H] (the projected image tokens, --feature_atol). Other fields are ignored with a
warning (m3d_jax.parity.reference).
"""

from __future__ import annotations

import sys

from absl import flags

from m3d_jax.cli import run
from m3d_jax.convert import detect
from m3d_jax.parity.compare import Tolerances, lamed_rows, med2e3_rows, print_rows

_CKPT = flags.DEFINE_string("ckpt", None, "m3d-jax folder or released PyTorch folder.", required=True)
_REF = flags.DEFINE_string("ref", None, "Reference .npz.", required=True)
_ATOL = flags.DEFINE_float("atol", 1e-3, "Largest allowed max |Δ| of the logits.")
_MAX_KL = flags.DEFINE_float("max_kl", 1e-5, "Largest allowed mean KL(reference ‖ ours) of the logits.")
_SEG_ATOL = flags.DEFINE_float("seg_atol", 1e-3, "Largest allowed max |Δ| of the seg logits.")
_SCORE_ATOL = flags.DEFINE_float("score_atol", 1e-4, "Med-2E3: largest allowed max |Δ| of the slice scores.")
_FEATURE_ATOL = flags.DEFINE_float("feature_atol", 1e-3, "Largest allowed max |Δ| of the intermediate outputs "
                                   "(LaMed image_features, Med-2E3 visual_tokens).")


def main(argv: list[str]) -> None:
    del argv
    tol = Tolerances(atol=_ATOL.value, max_kl=_MAX_KL.value, seg_atol=_SEG_ATOL.value, score_atol=_SCORE_ATOL.value,
                     feature_atol=_FEATURE_ATOL.value)
    rows = (med2e3_rows if detect(_CKPT.value)[0].name == "med2e3" else lamed_rows)(_CKPT.value, _REF.value, tol)
    sys.exit(0 if print_rows(rows) else 1)


if __name__ == "__main__":
    run(main)
