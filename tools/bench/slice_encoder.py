"""Med-2E3's 2D branch: SigLIP over every depth slice of one volume, JAX (jit) vs transformers'
SiglipVisionModel in PyTorch on the same weights, same process, on CPU.

Both compute the last encoder layer's output before post_layernorm (Med-2E3's feature) for the B·D slices as
one batch. Prints median times and the speed ratio, then the FLOPs of the slice branch per volume next to the
3D ViT-B's (M3D-CLIP's vision tower, `ViT3D`) on [B, 1, 32, 256, 256], each counted two ways: XLA's cost
analysis of the compiled, unrolled function (every op, incl. norms and softmax) and an analytic count
(matmuls + attention).

  python tools/bench/slice_encoder.py                  # SigLIP-L/16-256, one [1, 1, 32, 256, 256] volume
  python tools/bench/slice_encoder.py --width=64 --layers=2 --heads=4 --image_size=32 --patch=8 --depth=4
"""

from __future__ import annotations

import dataclasses
import os
import tempfile

from absl import app, flags
from timing import median_seconds  # tools/bench/timing.py (the script's folder is on sys.path)

_WIDTH = flags.DEFINE_integer("width", 1024, "SigLIP hidden size.")
_MLP = flags.DEFINE_integer("mlp", 0, "SigLIP intermediate size (0 = 4 × width).")
_LAYERS = flags.DEFINE_integer("layers", 24, "SigLIP encoder layers.")
_HEADS = flags.DEFINE_integer("heads", 16, "SigLIP attention heads.")
_IMAGE = flags.DEFINE_integer("image_size", 256, "Slice height = width (the volume's H, W).")
_PATCH = flags.DEFINE_integer("patch", 16, "SigLIP patch size.")
_DEPTH = flags.DEFINE_integer("depth", 32, "Slices per volume (the volume's D).")
_BATCH = flags.DEFINE_integer("batch", 1, "Volumes per call.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed runs per framework (median reported).")
_TIME = flags.DEFINE_bool("time", True, "Time both frameworks; --notime prints only the FLOP counts.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype (torch under autocast).")


def siglip_analytic_flops(config, images: int) -> float:
    tokens, width, mlp = config.num_patches, config.hidden_size, config.intermediate_size
    patch_dim = config.in_channels * config.patch_size**2
    per_layer = 2 * tokens * width * (4 * width + 2 * mlp) + 4 * tokens * tokens * width
    return images * (2 * tokens * patch_dim * width + config.num_layers * per_layer)


def vit3d_analytic_flops(config, volumes: int) -> float:
    tokens, width, mlp = config.num_tokens, config.hidden_size, config.mlp_dim
    patch_dim = config.in_channels * config.patch_size[0] * config.patch_size[1] * config.patch_size[2]
    per_layer = 2 * tokens * width * (4 * width + 2 * mlp) + 4 * tokens * tokens * width
    return volumes * (2 * config.num_patches * patch_dim * width + config.num_layers * per_layer)


def xla_flops(make_model, call, input_shape) -> float:
    """FLOPs of `call(model, inputs)` from XLA's cost analysis of the compiled function (after dead-code
    elimination: outputs the call drops, e.g. SigLIP's pooling head, are not counted), built abstractly (no
    weights allocated). The model must run its layers as a Python loop: a scan's body counts once."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    graphdef, abstract = nnx.split(nnx.eval_shape(make_model))
    lowered = jax.jit(lambda state, x: call(nnx.merge(graphdef, state), x)).lower(
        abstract, jax.ShapeDtypeStruct(input_shape, jnp.float32))
    analysis = lowered.compile().cost_analysis()
    return float((analysis[0] if isinstance(analysis, list) else analysis)["flops"])


def time_both(config, volume_shape) -> None:
    """Times JAX and transformers on the same random weights and prints the times, ratio and difference."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import torch
    import transformers
    from flax import nnx
    from safetensors.torch import save_file

    from m3d_jax.convert.slice_encoder import load_siglip_vision
    from m3d_jax.models.slice_encoder import encode_slices

    torch.manual_seed(0)
    reference = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**config.to_hf())).eval()
    with tempfile.TemporaryDirectory() as tmp:
        state = {"vision_model." + k.removeprefix("vision_model."): v.contiguous()
                 for k, v in reference.state_dict().items()}
        save_file(state, f"{tmp}/siglip.safetensors")
        del state
        model, _ = load_siglip_vision(f"{tmp}/siglip.safetensors", config)
    graphdef, params = nnx.split(model)
    encode = jax.jit(lambda params, volume: encode_slices(nnx.merge(graphdef, params), volume))

    @torch.inference_mode()
    def torch_features(volume):  # Med-2E3: slices as one batch, channel repeated, pre-norm last layer
        batch, _, depth, height, width = volume.shape
        slices = volume.transpose(1, 2).reshape(batch * depth, 1, height, width).expand(-1, 3, -1, -1)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=_DTYPE.value == "bfloat16"):
            hidden = reference.encoder(inputs_embeds=reference.embeddings(slices)).last_hidden_state
        return hidden.reshape(batch, depth, *hidden.shape[1:])

    volume = np.random.default_rng(0).random(volume_shape, dtype=np.float32)
    jax_volume, torch_volume = jnp.asarray(volume), torch.from_numpy(volume)
    outputs = {}  # the last timed output of each, compared below
    jax_time = median_seconds(
        lambda: outputs.__setitem__("jax", encode(params, jax_volume).block_until_ready()), _REPEATS.value)
    torch_time = median_seconds(lambda: outputs.__setitem__("torch", torch_features(torch_volume)), _REPEATS.value)
    ours, ref = np.asarray(outputs["jax"], np.float32), outputs["torch"].float().numpy()
    error = np.max(np.abs(ours - ref)) / np.max(np.abs(ref))
    print(f"{'jax s':>8} {'torch s':>8} {'torch/jax':>9} {'max|Δ|/max|ref|':>15}")
    print(f"{jax_time:>8.4g} {torch_time:>8.4g} {torch_time / jax_time:>8.2f}x {error:>15.2e}")


def main(argv):
    del argv
    import jax
    import torch
    from flax import nnx

    from m3d_jax.models.slice_encoder import SiglipVision, SiglipVisionConfig, encode_slices
    from m3d_jax.models.vit3d import ViT3D, ViT3DConfig

    jax.config.update("jax_default_matmul_precision", "highest")
    torch.set_num_threads(os.cpu_count())
    config = SiglipVisionConfig(
        hidden_size=_WIDTH.value, intermediate_size=_MLP.value or 4 * _WIDTH.value, num_layers=_LAYERS.value,
        num_heads=_HEADS.value, image_size=_IMAGE.value, patch_size=_PATCH.value, dtype=_DTYPE.value,
    )
    volume_shape = (_BATCH.value, 1, _DEPTH.value, _IMAGE.value, _IMAGE.value)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()}); torch "
          f"{torch.__version__}, {torch.get_num_threads()} threads; {os.cpu_count()} CPU cores")
    print(f"volume {list(volume_shape)} -> {_BATCH.value * _DEPTH.value} slices of {config.image_size}², "
          f"{config.num_patches} tokens each")

    if _TIME.value:
        time_both(config, volume_shape)

    # FLOPs per call: the slice branch at this size vs the 3D ViT-B on the Med-2E3 volume size.
    vit = ViT3DConfig(image_size=(32, 256, 256), attention_query_chunk=0)  # no lax.map: every op counted
    vit_shape = (_BATCH.value, 1, *vit.image_size)
    flops = {
        "slices (SigLIP)": (xla_flops(lambda: SiglipVision(config, rngs=nnx.Rngs(0)), encode_slices, volume_shape),
                            siglip_analytic_flops(config, _BATCH.value * _DEPTH.value)),
        "3D ViT-B": (xla_flops(lambda: ViT3D(vit, rngs=nnx.Rngs(0)), lambda m, x: m(x).features, vit_shape),
                     vit3d_analytic_flops(vit, _BATCH.value)),
    }
    print(f"{'GFLOP per call':<16} {'input':<22} {'XLA cost':>10} {'analytic':>10}")
    for (name, (xla, analytic)), shape in zip(flops.items(), (volume_shape, vit_shape)):
        print(f"{name:<16} {str(list(shape)):<22} {xla / 1e9:>10.4g} {analytic / 1e9:>10.4g}")
    (slice_xla, slice_analytic), (vit_xla, vit_analytic) = flops.values()
    print(f"{'slices / ViT-B':<16} {'':<22} {slice_xla / vit_xla:>9.4g}x {slice_analytic / vit_analytic:>9.4g}x")
    print(f"config {dataclasses.asdict(config)}")


if __name__ == "__main__":
    app.run(main)
