"""Training-step benchmark for any LaMed training config on the devices present: step time, tokens/s, MFU
and HFU (model and hardware FLOPs of the step, m3d_jax/train/flops.py, against the chip's bf16 peak). On CPU
it also times the same model's training step in PyTorch (MONAI ViT + transformers LLM, same weights, same
batch, AdamW), the two steps interleaved, and prints the ratio.

  python tools/bench/train_step.py --config=configs/demo.py --config.mesh.data=1 --config.mesh.fsdp=1 \\
      --config.mesh.tensor=1 --config.cpu_devices=0
  python tools/bench/train_step.py --config=configs/lamed.py:stage2_phi3 --config.tokenizer=/models/Phi-3 \\
      --config.init.lamed= --config.data.batch_size=8      # random weights, the full-size model
"""

from __future__ import annotations

import tempfile

from absl import app, flags
from ml_collections import config_flags
from timing import interleaved_medians, machine_line  # tools/bench/timing.py (on sys.path)

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py", "training config", lock_config=False)
_REPEATS = flags.DEFINE_integer("repeats", 5, "timed steps (median)")
_TORCH = flags.DEFINE_enum("torch", "auto", ["auto", "yes", "no"], "also time PyTorch (auto: on CPU)")


def _batch(config, run, rng):
    import numpy as np

    model = run.model_config
    size, length = config.data.batch_size, config.data.max_length
    ids = rng.integers(3, len(run.tokenizer) - 4, (size, length)).astype(np.int32)
    ids[:, 0] = run.tokenizer.bos_token_id or 0
    ids[:, 1:1 + model.proj_out_num] = model.image_token_id
    labels = np.where(np.arange(length) >= length - length // 4, ids, -100).astype(np.int32)
    images = rng.random((size, model.vision.in_channels, *model.vision.image_size), dtype=np.float32)
    masks = np.zeros((size, 1, *model.vision.image_size), np.float32)
    return dict(images=images, input_ids=ids, attention_mask=np.ones_like(ids), labels=labels, seg_masks=masks,
                image_starts=np.ones(size, np.int32))


def _jax_step(run, batch):
    """(one blocking training step, its FLOPs)."""
    import jax

    from m3d_jax.data.pipeline import to_global_arrays
    from m3d_jax.train.flops import step_flops
    from m3d_jax.train.trainer import compiled_step, task_step

    graphdef, state, step = compiled_step(run)
    arrays = to_global_arrays(batch, run.mesh)
    key = jax.random.key(0)
    shardings = jax.tree.map(lambda x: x.sharding, state)
    flops = step_flops(run.task.loss, graphdef, state, arrays, key,
                       lambda: task_step(run.task, graphdef, run.wrt, shardings, run.mesh))
    holder = {"state": state}

    def one_step():
        holder["state"], metrics = step(holder["state"], arrays, key)
        jax.block_until_ready(metrics["loss"])

    return one_step, flops


# LaMed's top-level parts → the TorchLamed modules they are
_TORCH_PARTS = {"vision_tower": "vit", "mm_projector": "projector", "language_model": "llm",
                "seg_projector": "seg_projector", "seg_module": "seg_module"}


def _torch_model(run):
    """The same weights in the PyTorch composition (read before the JAX step donates them). A part gets
    gradients when the JAX step trains any of its parameters (LoRA and stage 1's embeddings-only LLM train
    the whole LLM here, an overestimate of PyTorch's work)."""
    from flax import nnx

    from m3d_jax.convert import export
    from m3d_jax.parity.torch_reference import TorchLamed

    with tempfile.TemporaryDirectory() as folder:
        export(run.model, folder)
        model = TorchLamed.from_folder(folder).train()
    trained = {str(path[0]) for path, _ in nnx.to_flat_state(nnx.state(run.model, run.wrt))}
    model.requires_grad_(False)
    for part, attribute in _TORCH_PARTS.items():
        if part in trained and getattr(model, attribute) is not None:
            getattr(model, attribute).requires_grad_(True)
    return model


def _torch_step(model, batch):
    """One blocking PyTorch training step (AdamW) of the same model on the same batch."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    from m3d_jax.parity.torch_reference import TorchLamed

    torch.manual_seed(0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.0)
    tensors = {k: torch.from_numpy(np.asarray(v)) for k, v in batch.items()}
    embed = TorchLamed.embed.__wrapped__  # the reference splice, with gradients

    def one_step():
        embeds = embed(model, tensors["images"], tensors["input_ids"].long())
        logits = model.llm(inputs_embeds=embeds, attention_mask=tensors["attention_mask"]).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tensors["labels"][:, 1:].flatten().long(),
                               ignore_index=-100)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return one_step


def main(argv):
    del argv
    from m3d_jax.train.platform import select_platform

    config = _CONFIG.value
    select_platform(config)
    import jax
    import numpy as np

    from m3d_jax.train.flops import peak_flops, utilisation
    from m3d_jax.train.trainer import setup

    run = setup(config)
    batch = _batch(config, run, np.random.default_rng(0))
    tokens = int(batch["attention_mask"].sum())
    device = jax.devices()[0]
    use_torch = _TORCH.value == "yes" or (_TORCH.value == "auto" and device.platform == "cpu")
    torch_model = _torch_model(run) if use_torch else None
    jax_step, flops = _jax_step(run, batch)
    steps = {"jax": jax_step}
    if torch_model is not None:
        steps["torch"] = _torch_step(torch_model, batch)
    timed = interleaved_medians(steps, _REPEATS.value)
    seconds = timed["jax"]
    peak = peak_flops(override=config.get("peak_flops_per_device", 0.0))
    utilisations = [utilisation(count, seconds, jax.device_count(), peak) for count in (flops.model, flops.hardware)]
    print(f"{machine_line()}; jax {jax.__version__}")
    print(f"{device.platform} {device.device_kind} × {jax.device_count()}, mesh {dict(run.mesh.shape)}, "
          f"batch {config.data.batch_size} × {config.data.max_length} tokens, training {', '.join(config.trainable)}")
    line = f"JAX step {seconds * 1e3:.1f} ms, {tokens / seconds:.0f} tokens/s"
    line += f", model {flops.model / 1e9:.2f} GFLOP/step = {flops.model / seconds / 1e9:.1f} GFLOP/s"
    if flops.hardware:
        line += f", hardware {flops.hardware / 1e9:.2f} GFLOP/step"
    for name, value in zip(("MFU", "HFU"), utilisations):
        if value is not None:
            line += f", {name} {100 * value:.1f}%"
    print(line)
    if torch_model is not None:
        if jax.device_count() > 1:
            print("note: JAX ran on", jax.device_count(), "devices; compare on mesh 1×1×1 for a like-for-like ratio")
        torch_seconds = timed["torch"]
        print(f"PyTorch step {torch_seconds * 1e3:.1f} ms, {tokens / torch_seconds:.0f} tokens/s; "
              f"JAX is {torch_seconds / seconds:.2f}× PyTorch (interleaved steps, medians)")


if __name__ == "__main__":
    app.run(main)
