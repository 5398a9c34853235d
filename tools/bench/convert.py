"""Conversion throughput and peak memory on the FULL released M3D-LaMed-Phi-3-4B layout (617 tensors,
4.05 B parameters, synthetic values, bf16 by default: 8.1 GB on disk), against a plain read + write of
the same bytes. Each step runs in its own process so its peak RSS is its own.

  python tools/bench/convert.py [--dir=/tmp/m3d_convert_bench] [--dtype=bfloat16] [--tiny]

Targets: peak RSS ≤ largest tensor + 1 GiB; throughput ≥ 70% of the plain read + write.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags

_DIR = flags.DEFINE_string("dir", "/tmp/m3d_convert_bench", "Scratch folder (needs ~4× the checkpoint size).")
_DTYPE = flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "Tensor dtype of the synthetic checkpoint.")
_TINY = flags.DEFINE_bool("tiny", False, "Use a tiny LaMed instead of the full size (smoke test).")
_STEP = flags.DEFINE_string("step", None, "Internal: run one step in this process.")

_PLAIN_CHUNK = 64 * 2**20


def _config():
    import dataclasses

    from m3d_jax.models.decoder_presets import phi3_mini_4k, tiny_phi3
    from m3d_jax.models.lamed import LamedConfig
    from m3d_jax.models.vit3d import ViT3DConfig

    if _TINY.value:
        return LamedConfig(vision=ViT3DConfig(image_size=(16, 64, 64), hidden_size=64, mlp_dim=128, num_layers=2,
                                              num_heads=4),
                           decoder=tiny_phi3(vocab_size=516), image_token_id=512, seg_token_id=515,
                           seg_decoder_heads=4, seg_decoder_mlp_dim=96, seg_iou_head_hidden=32)
    return LamedConfig(decoder=dataclasses.replace(phi3_mini_4k(), vocab_size=32015))


def _make_checkpoint(folder: Path) -> tuple[int, int, int]:
    """Writes the synthetic released folder; returns (tensors, bytes, largest tensor bytes)."""
    import numpy as np
    from flax import nnx

    from m3d_jax.convert.keymap import torch_shapes
    from m3d_jax.convert.lamed import lamed_keymap
    from m3d_jax.convert.torch_io import TensorSpec, write_checkpoint
    from m3d_jax.models.lamed import Lamed

    config = _config()
    abstract = nnx.state(nnx.eval_shape(lambda: Lamed(config, rngs=nnx.Rngs(0))))
    dtype = np.dtype(jnp_dtype(_DTYPE.value))
    specs = [TensorSpec(k, s, dtype) for k, s in torch_shapes(lamed_keymap(config), abstract).items()]
    pattern = (np.random.default_rng(0).standard_normal(1 << 20) * 0.02).astype(dtype)

    def produce(key):
        spec = next(s for s in specs if s.key == key)
        count = int(np.prod(spec.shape))
        return np.resize(pattern, count).reshape(spec.shape)

    write_checkpoint(folder, specs, produce, config=config.to_hf())
    return len(specs), sum(s.nbytes for s in specs), max(s.nbytes for s in specs)


def jnp_dtype(name):
    import ml_dtypes
    import numpy as np

    return ml_dtypes.bfloat16 if name == "bfloat16" else np.float32


def _plain_copy(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    buffer = bytearray(_PLAIN_CHUNK)
    for file in sorted(src.glob("*.safetensors")):
        with open(file, "rb") as reader, open(dst / file.name, "wb") as writer:
            view = memoryview(buffer)
            while count := reader.readinto(view):
                writer.write(view[:count])


def _run_step(step: str) -> tuple[float, float]:
    """Runs a step in a child process; returns (seconds, that child's peak RSS in GiB)."""
    start = time.perf_counter()
    command = [sys.executable, __file__, f"--step={step}", f"--dir={_DIR.value}", f"--dtype={_DTYPE.value}",
               f"--tiny={_TINY.value}"]
    child = subprocess.Popen(command)
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise RuntimeError(f"step {step} failed with exit code {child.returncode}")
    return time.perf_counter() - start, usage.ru_maxrss / 2**20


def main(argv):
    del argv
    root = Path(_DIR.value)
    if _STEP.value == "plain":
        _plain_copy(root / "released", root / "plain")
        return
    if _STEP.value == "torch2jax":
        from m3d_jax.convert.checkpoint import torch_to_jax

        torch_to_jax(root / "released", root / "jax", dtype=jnp_dtype(_DTYPE.value))
        return
    if _STEP.value == "jax2torch":
        from m3d_jax.convert.checkpoint import jax_to_torch

        jax_to_torch(root / "jax", root / "back")
        return

    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    count, total, largest = _make_checkpoint(root / "released")
    print(f"synthetic released LaMed-Phi-3 layout: {count} tensors, {total / 2**30:.2f} GiB ({_DTYPE.value}), "
          f"largest tensor {largest / 2**20:.0f} MiB")
    rows = []
    for step in ("plain", "torch2jax", "jax2torch"):
        rows.append((step, *_run_step(step)))
    plain_rate = total / rows[0][1] / 2**20
    limit = (largest + 2**30) / 2**30
    print(f"{'step':<10} {'seconds':>8} {'MB/s':>8} {'vs plain':>8} {'peak RSS GiB':>12}  (target ≤ {limit:.2f} GiB)")
    for step, seconds, rss in rows:
        rate = total / seconds / 2**20
        print(f"{step:<10} {seconds:>8.1f} {rate:>8.0f} {rate / plain_rate:>7.0%} {rss:>12.2f}")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    app.run(main)
