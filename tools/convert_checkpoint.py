"""Convert checkpoints between PyTorch (released layouts) and m3d-jax parameter folders.

  python tools/convert_checkpoint.py torch2jax M3D-LaMed-Phi-3-4B/ lamed_phi3_jax/
  python tools/convert_checkpoint.py jax2torch lamed_phi3_jax/ lamed_phi3_torch/ [--dtype=bfloat16]

The kind is detected from SRC/config.json: lamed_phi3, lamed_llama (M3D-LaMed), m3d_clip (M3D-CLIP: ViT +
BERT + projections + logit_scale), phi3, llama (plain transformers LLMs), bert (a BertModel), a Med-2E3
(a MedMLLMConfig with a nested llm_config in config.json or args/config.json, beside the part folders
llm/, vision2d_model/, vision2d_connector/, vision3d_model/, vision3d_connector/), or, without a
config.json, a bare M3D-CLIP vision checkpoint (pretrained_ViT.bin) or a Med3DInsight pretraining state
dict (a .pth file, e.g. latest_model_biomedclip_huatuo.pth; its sizes are read from the tensor shapes,
the crop size is taken as 128³ and the PSAT head count as 8, which the shapes do not record — edit the
written config.json for others). jax2torch writes a Med3DInsight back as DST itself when DST ends in
.pth/.safetensors, else as DST/model.pth, with the recomputed relative_position_index buffers.
Tensors stream one at a time (peak memory ≈ the largest tensor), so a 16 GB checkpoint converts on a
24 GB machine. torch2jax writes safetensors keyed by JAX parameter paths plus config.json; jax2torch
writes the released layout (config.json + sharded safetensors + index) that the PyTorch code loads
with strict=True.

DST must not exist or be empty: the output is written beside it and renamed into place when complete, so
an interrupted conversion leaves no DST that looks complete. --overwrite replaces an existing DST whole
(never merging into it); DST may never be SRC, lie inside it or hold it.

Med-2E3 streams part by part like the others: torch2jax reads every part, including the trained
vision3d_connector text_mlp that the reference's own loader drops, and jax2torch writes the released
folders back (each part as safetensors with its own config.json where the reference has one, sharded at
--max_shard_gb). The tokenizer files at the released root are not copied. Med3DInsight goes through the
whole model in host memory (its .pth holds recomputed index buffers as well as the parameters).
"""

from __future__ import annotations

import time

from absl import app, flags

from m3d_jax.cli import run
from m3d_jax.storage import local_copy

_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                           "jax2torch: tensor dtype to write (default: the parameters' dtype).")
_SHARD_GB = flags.DEFINE_float("max_shard_gb", 5.0, "Largest output shard in GiB.")
_OVERWRITE = flags.DEFINE_bool("overwrite", False, "Replace an existing, non-empty DST whole (never merged).")


def main(argv):
    if len(argv) != 4 or argv[1] not in ("torch2jax", "jax2torch"):
        raise app.UsageError("usage: convert_checkpoint.py {torch2jax,jax2torch} SRC DST")
    from m3d_jax.convert import detect, jax_to_torch, torch_to_jax
    from m3d_jax.convert.torch_io import check_output

    direction, src, dst = argv[1:]
    src = local_copy(src)  # a URL (gs://, s3://, ...) is read from its local copy
    check_output(dst, overwrite=_OVERWRITE.value, inputs=[src])  # before the (slow) detection and reads
    kind, _ = detect(src)
    shard_bytes = int(_SHARD_GB.value * 2**30)
    start = time.perf_counter()
    if direction == "torch2jax":
        report = torch_to_jax(src, dst, progress=True, max_shard_bytes=shard_bytes, overwrite=_OVERWRITE.value)
        print(f"{kind.name}: converted {report.converted} tensors from {src} to {dst}")
        for key, reason in report.ignored:
            print(f"  ignored {key}: {reason}")
    else:
        count = jax_to_torch(src, dst, dtype=_DTYPE.value, progress=True, max_shard_bytes=shard_bytes,
                             overwrite=_OVERWRITE.value)
        print(f"{kind.name}: wrote {count} tensors in the PyTorch layout to {dst}")
    print(f"({time.perf_counter() - start:.1f} s)")


if __name__ == "__main__":
    run(main)
