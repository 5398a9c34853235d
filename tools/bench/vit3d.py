"""Full-size ViT3D forward: JAX (this project) vs MONAI's ViT in PyTorch, same weights, same process.

Prints median times, the speed ratio, achieved GFLOP/s (analytic count: matmuls and attention) and that
as a fraction of a measured fp32 matmul peak of this machine (the larger of JAX's and torch's 4096³ matmul
rate). On CPU, torch gets as many intra-op threads as XLA uses (all cores). On a GPU both run on the GPU.

  python tools/bench/vit3d.py                      # fp32, batch 1 and 2, 32×256×256
  python tools/bench/vit3d.py --dtype=bfloat16     # bf16 compute (torch under autocast)
  python tools/bench/vit3d.py --parts              # one layer's time by part: matmuls, attention, norms
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

from absl import app, flags
from timing import interleaved_medians, machine_line, median_seconds  # tools/bench/timing.py (on sys.path)

_BATCH_SIZES = flags.DEFINE_list("batch_sizes", ["1", "2"], "Batch sizes to time.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per measurement (median reported).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_IMAGE_SIZE = flags.DEFINE_list("image_size", ["32", "256", "256"], "Volume size D,H,W.")
_PARTS = flags.DEFINE_bool("parts", False, "Also time one layer's parts (JAX vs torch, interleaved): the "
                            "matmuls, attention (ours vs torch's SDPA) and LayerNorm + GELU, at the bench's size.")
_PRECISION = flags.DEFINE_enum(
    "matmul_precision", "highest", ["default", "highest"],
    "JAX fp32 matmul precision; 'highest' matches torch's fp32 (no TF32) on GPU.",
)


def _matmul_peak(jax, jnp, torch, device: str) -> tuple[float, float]:
    n = 4096
    a = jnp.ones((n, n), jnp.float32)
    matmul = jax.jit(lambda x: x @ x)
    jax_rate = 2 * n**3 / median_seconds(lambda: matmul(a).block_until_ready(), 5) / 1e9
    t = torch.ones(n, n, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch_rate = 2 * n**3 / median_seconds(lambda: (t @ t, sync()), 5) / 1e9
    return jax_rate, torch_rate


def _analytic_flops(config, batch: int) -> float:
    tokens, width, mlp = config.num_tokens, config.hidden_size, config.mlp_dim
    patch_dim = config.in_channels * config.patch_size[0] * config.patch_size[1] * config.patch_size[2]
    per_layer = 2 * tokens * width * (3 * width + width + 2 * mlp) + 4 * tokens * tokens * width
    return batch * (2 * config.num_patches * patch_dim * width + config.num_layers * per_layer)


def _layer_parts(config, jax, jnp, np, torch, repeats: int) -> None:
    """One layer's time by part at the config's size and dtype, batch 1, interleaved JAX / torch runs
    (medians): the linear layers (qkv, out, MLP: this project's `Dense`, its fp32 kernels cast to the compute
    dtype at each call as in the model; torch's weights are cast once), attention (this project's `attend`
    against torch's SDPA, a fused CPU kernel; MONAI's ViT computes attention with explicit einsums instead),
    and LayerNorm + GELU."""
    from flax import nnx

    from m3d_jax.layers import Dense
    from m3d_jax.layers.attention import attend

    tokens, width, mlp, heads = config.num_tokens, config.hidden_size, config.mlp_dim, config.num_heads
    dtype, torch_dtype = jnp.dtype(config.dtype), getattr(torch, jnp.dtype(config.dtype).name)
    rng = np.random.default_rng(0)
    arrays = dict(x=(1, tokens, width), q=(1, tokens, heads, width // heads), h=(1, tokens, mlp))
    host = {name: rng.standard_normal(shape, dtype=np.float32) for name, shape in arrays.items()}
    j = {name: jnp.asarray(value, dtype) for name, value in host.items()}
    t = {name: torch.from_numpy(value).to(torch_dtype) for name, value in host.items()}
    shapes = dict(qkv=(width, 3 * width), out=(width, width), up=(width, mlp), down=(mlp, width))
    dense = nnx.List([Dense(*shape, axes=(None, None), use_bias=False, dtype=dtype, rngs=nnx.Rngs(0))
                      for shape in shapes.values()])
    graphdef, state = nnx.split(dense)
    weights = {name: torch.from_numpy(np.array(layer.kernel[...])).to(torch_dtype)
               for name, layer in zip(shapes, dense)}

    def linear(state, x):
        qkv, out, up, down = nnx.merge(graphdef, state)
        return out(qkv(x)[..., :width]) + down(up(x))

    linear = jax.jit(linear)
    scale = (width // heads) ** -0.5
    attention = jax.jit(lambda q: attend(q, q, q, scale=scale))

    def norm_gelu(x, h):
        x, h = x.astype(jnp.float32), h.astype(jnp.float32)
        normed = (x - x.mean(-1, keepdims=True)) / jnp.sqrt(x.var(-1, keepdims=True) + 1e-5)
        return normed.astype(dtype), jax.nn.gelu(h, approximate=False).astype(dtype)

    norm_gelu = jax.jit(norm_gelu)
    tq, functional, w = t["q"].transpose(1, 2), torch.nn.functional, weights
    parts = {
        "linear (qkv, out, MLP)": (
            lambda: linear(state, j["x"]),
            lambda: (t["x"] @ w["qkv"])[..., :width] @ w["out"] + (t["x"] @ w["up"]) @ w["down"]),
        "attention (torch: SDPA)": (
            lambda: attention(j["q"]), lambda: functional.scaled_dot_product_attention(tq, tq, tq, scale=scale)),
        "LayerNorm + GELU": (
            lambda: norm_gelu(j["x"], j["h"]),
            lambda: (functional.layer_norm(t["x"], (width,)), functional.gelu(t["h"]))),
    }
    calls = {}
    for name, (ours, theirs) in parts.items():
        calls[(name, "jax")] = lambda ours=ours: jax.block_until_ready(ours())
        calls[(name, "torch")] = theirs
    with torch.inference_mode():
        timed = interleaved_medians(calls, repeats)
    print(f"one layer by part ({tokens} tokens, width {width}, {heads} heads, batch 1, {dtype.name}):")
    for name in parts:
        ours, theirs = timed[(name, "jax")], timed[(name, "torch")]
        print(f"  {name:24s} jax {ours * 1e3:7.1f} ms  torch {theirs * 1e3:7.1f} ms  torch/jax {theirs / ours:5.2f}")


def main(argv):
    del argv
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    from flax import nnx
    from monai.networks.nets import ViT
    from safetensors.torch import save_file

    from m3d_jax.convert.vit3d import load_vit3d
    from m3d_jax.models.vit3d import ViT3DConfig
    from m3d_jax.parity.torch_reference import vit_features

    jax.config.update("jax_default_matmul_precision", _PRECISION.value)
    on_gpu = jax.default_backend() == "gpu"
    device = "cuda" if on_gpu and torch.cuda.is_available() else "cpu"
    if device == "cpu":
        torch.set_num_threads(os.cpu_count())
    config = ViT3DConfig(image_size=tuple(int(s) for s in _IMAGE_SIZE.value), dtype=_DTYPE.value)
    print(f"{machine_line()}; jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}); "
          f"torch {torch.__version__} on {device}, {torch.get_num_threads()} threads")

    torch.manual_seed(0)
    reference = ViT(in_channels=1, img_size=config.image_size, patch_size=config.patch_size,
                    proj_type="perceptron", classification=True).eval()
    with tempfile.TemporaryDirectory() as tmp:
        save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, f"{tmp}/vit.safetensors")
        model, _ = load_vit3d(f"{tmp}/vit.safetensors", config)
    reference = reference.to(device)
    graphdef, state = nnx.split(model)
    encode = jax.jit(lambda state, images: nnx.merge(graphdef, state)(images).features)

    @torch.inference_mode()
    def torch_features(images):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=_DTYPE.value == "bfloat16"):
            out = vit_features(reference, images)[:, 1:]
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    probe = jnp.zeros((1, 1, *config.image_size), jnp.float32)
    compiled_text = encode.lower(state, probe).compile().as_text()
    print("attention kernel:", "cuDNN fused attention" if "__cudnn$fmha" in compiled_text else "XLA")
    jax_peak, torch_peak = _matmul_peak(jax, jnp, torch, device)
    peak = max(jax_peak, torch_peak)
    print(f"fp32 matmul 4096³: jax {jax_peak:.0f} GFLOP/s, torch {torch_peak:.0f} GFLOP/s -> peak {peak:.0f}")
    print(f"{'batch':>5} {'jax s':>8} {'torch s':>8} {'speed-up':>8} {'GFLOP':>8} {'jax GFLOP/s':>11} "
          f"{'of peak':>7} {'torch GFLOP/s':>13} {'max|Δ|/max|ref|':>15}")
    for batch in (int(b) for b in _BATCH_SIZES.value):
        images = np.random.default_rng(batch).random((batch, 1, *config.image_size), dtype=np.float32)
        jax_images = jnp.asarray(images)
        torch_images = torch.from_numpy(images).to(device)
        timed = interleaved_medians({"jax": lambda: encode(state, jax_images).block_until_ready(),
                                     "torch": lambda: torch_features(torch_images)}, _REPEATS.value)
        jax_time, torch_time = timed["jax"], timed["torch"]
        ours = np.asarray(encode(state, jax_images), np.float32)
        ref = torch_features(torch_images).float().cpu().numpy()
        flops = _analytic_flops(config, batch)  # XLA's cost analysis does not count loop trip counts
        error = np.max(np.abs(ours - ref)) / np.max(np.abs(ref))
        print(f"{batch:>5} {jax_time:>8.3f} {torch_time:>8.3f} {torch_time / jax_time:>7.2f}x {flops / 1e9:>8.1f} "
              f"{flops / jax_time / 1e9:>11.1f} {flops / jax_time / 1e9 / peak:>6.0%} "
              f"{flops / torch_time / 1e9:>13.1f} {error:>15.2e}")
    print(f"config {dataclasses.asdict(config)}")
    if _PARTS.value and device == "cpu":
        _layer_parts(config, jax, jnp, np, torch, _REPEATS.value)


if __name__ == "__main__":
    app.run(main)
