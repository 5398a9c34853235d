"""Optimiser, stage masks and the train step on a tiny LaMed."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from m3d_jax.models.decoder_presets import tiny_phi3
from m3d_jax.models.lamed import Lamed, LamedConfig, lamed_loss
from m3d_jax.models.vit3d import ViT3DConfig
from m3d_jax.train.optim import OptimConfig, decay_mask, make_optimizer, schedule
from m3d_jax.train.step import make_train_step, trainable

CONFIG = LamedConfig(vision=ViT3DConfig(image_size=(16, 64, 64), hidden_size=64, mlp_dim=128, num_layers=2,
                                        num_heads=4),
                     decoder=tiny_phi3(vocab_size=516), image_token_id=512, seg_token_id=515, seg_decoder_heads=4,
                     seg_decoder_mlp_dim=96, seg_iou_head_hidden=32)


def _batch(rng):
    ids = np.concatenate([np.ones((2, 1)), np.full((2, 8), 512), rng.integers(3, 500, (2, 7))], 1).astype(np.int32)
    return {k: jnp.asarray(v) for k, v in dict(
        images=rng.random((2, 1, 16, 64, 64), dtype=np.float32), input_ids=ids, attention_mask=np.ones_like(ids),
        labels=np.where(np.arange(16) < 10, -100, ids), image_starts=np.ones(2, np.int32)).items()}


def test_schedule_warms_up_then_decays():
    lr = schedule(OptimConfig(learning_rate=1e-3, warmup_fraction=0.1, total_steps=100))
    assert float(lr(0)) == 0.0 and abs(float(lr(10)) - 1e-3) < 1e-9
    assert float(lr(55)) < 1e-3 and float(lr(100)) < 1e-6


def test_lr_multipliers_scale_updates_by_longest_path_prefix():
    from m3d_jax.train.optim import scale_by_path

    transform = scale_by_path({"vision_tower": 0.1, "vision_tower/blocks": 0.5})
    updates = {"vision_tower": {"blocks": jnp.ones(2), "norm": jnp.ones(2)}, "mm_projector": jnp.ones(2)}
    scaled, _ = transform.update(updates, transform.init(updates))
    assert [float(scaled["vision_tower"]["blocks"][0]), float(scaled["vision_tower"]["norm"][0]),
            float(scaled["mm_projector"][0])] == [0.5, pytest.approx(0.1), 1.0]


def test_decay_mask_skips_vectors_and_embeddings():
    params = {"embed_tokens": {"embedding": jnp.zeros((4, 3))}, "dense": {"kernel": jnp.zeros((3, 3)),
                                                                          "bias": jnp.zeros(3)}}
    assert decay_mask(params) == {"embed_tokens": {"embedding": False}, "dense": {"kernel": True, "bias": False}}


def test_stage1_trains_only_projector_and_embeddings_and_loss_falls(rng):
    model = Lamed(CONFIG, rngs=nnx.Rngs(0))
    wrt = trainable("lamed_stage1")
    optimizer = nnx.Optimizer(model, make_optimizer(OptimConfig(learning_rate=1e-2, warmup_fraction=0.0,
                                                                total_steps=20)), wrt=wrt)
    before = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model))}
    opt_leaves = jax.tree.leaves(nnx.state(optimizer))
    trained_count = sum(1 for p, v in nnx.to_flat_state(nnx.state(model)) if wrt(p, v))
    assert trained_count == 2 * CONFIG.proj_layer_num + 1
    assert sum(x.size for x in opt_leaves) < 4 * sum(x.size for x in jax.tree.leaves(nnx.state(model))) / 10
    graphdef, state = nnx.split((model, optimizer))
    step = make_train_step(graphdef, lamed_loss, wrt)
    batch = _batch(rng)
    losses = []
    for index in range(8):
        state, metrics = step(state, batch, jax.random.key(index))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] * 0.9, losses
    model, _ = nnx.merge(graphdef, state)
    for path, variable in nnx.to_flat_state(nnx.state(model)):
        changed = not np.array_equal(np.asarray(variable[...]), before[path])
        assert changed == wrt(path, variable), (path, changed)


def test_nonfinite_gradients_skip_the_update(rng):
    model = Lamed(CONFIG, rngs=nnx.Rngs(0))
    wrt = trainable("lamed_stage1")
    optimizer = nnx.Optimizer(model, make_optimizer(OptimConfig(warmup_fraction=0.0, total_steps=10)), wrt=wrt)
    graphdef, state = nnx.split((model, optimizer))
    step = make_train_step(graphdef, lamed_loss, wrt)
    batch = _batch(rng)
    batch["images"] = batch["images"].at[0, 0, 0, 0, 0].set(jnp.nan)
    before = [np.asarray(x) for x in jax.tree.leaves(state)]
    state, metrics = step(state, batch, jax.random.key(0))
    assert not bool(metrics["finite"])
    model, optimizer = nnx.merge(graphdef, state)
    after = [np.asarray(x) for x in jax.tree.leaves(nnx.state((model, optimizer)))]
    changed = [i for i, (a, b) in enumerate(zip(before, after)) if not np.array_equal(a, b)]
    # Only integer / boolean counters (apply_if_finite's, the step) move; no parameter and no Adam moment does.
    assert changed and all(after[i].ndim == 0 and not np.issubdtype(after[i].dtype, np.floating)
                           for i in changed), changed


def test_stage2_with_lora_trains_adapters_embeddings_and_lm_head_not_llm_weights():
    from m3d_jax.train.lora import LoraConfig, LoraParam, apply_lora

    model = Lamed(CONFIG, rngs=nnx.Rngs(0))
    apply_lora(model, LoraConfig(rank=4), rngs=nnx.Rngs(1))
    wrt = trainable("lamed_stage2", lora=True)
    selected = {"/".join(map(str, p)) for p, v in nnx.to_flat_state(nnx.state(model)) if wrt(p, v)}
    assert any(name.startswith("vision_tower") for name in selected)
    assert "language_model/embed_tokens/embedding" in selected and "language_model/lm_head/kernel" in selected
    llm = [name for name in selected if name.startswith("language_model/layers")]
    assert llm and all("lora" in name for name in llm), llm
    lora = [p for p, v in nnx.to_flat_state(nnx.state(model, LoraParam))]
    assert len(lora) == 2 * len(LoraConfig().targets)
    frozen = trainable("lamed_stage1", lora=True)
    assert not any(frozen(p, v) for p, v in nnx.to_flat_state(nnx.state(model, LoraParam)))


def test_frozen_vision_stage_trains_everything_but_the_vision_tower():
    model = Lamed(CONFIG, rngs=nnx.Rngs(0))
    wrt = trainable("frozen_vision")
    selected = {"/".join(map(str, p)).split("/")[0] for p, v in nnx.to_flat_state(nnx.state(model)) if wrt(p, v)}
    assert selected == {"mm_projector", "language_model", "seg_projector", "seg_module"}


def test_unknown_stage_is_named():
    with pytest.raises(ValueError, match="unknown training stage 'stage3'"):
        trainable("stage3")
