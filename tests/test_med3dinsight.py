"""Med3DInsight pretraining on synthetic data: the backbone + PSAT + partial-OT + reconstruction loss falls
and the OT plan's diagonal mass (pairs matched to their own slice embeddings) rises."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from m3d_jax.losses.partial_ot import entropic_partial_wasserstein, mahalanobis_cost
from m3d_jax.models.med3dinsight import Med3DInsight, Med3DInsightConfig, med3dinsight_loss
from m3d_jax.models.nnformer import NnFormerConfig
from m3d_jax.models.psat import PsatConfig

CONFIG = Med3DInsightConfig(
    backbone=NnFormerConfig(crop_size=(32, 32, 32), embed_dim=16, depths=(2, 2, 1, 1), num_heads=(1, 2, 2, 4),
                            window_sizes=(4, 2, 4, 1), num_classes=3),
    psat=PsatConfig(hidden_size=128, num_heads=4, num_layers=2, num_queries=4, out_dim=32, slice_bins=16),
    ot_iterations=150)


def synthetic_batch(batch: int = 8, seed: int = 0) -> dict[str, np.ndarray]:
    """Volumes with one bright blob each; the "2D model" embeddings are fixed random maps of the chosen
    slice's intensity profile (plus noise), so each volume–slice pair has a learnable match."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.arange(32)] * 3, indexing="ij"), -1)
    volumes = np.zeros((batch, 1, 32, 32, 32), np.float32)
    for b in range(batch):
        centre = rng.uniform(8, 24, 3)
        volumes[b, 0] = np.exp(-((grid - centre) ** 2).sum(-1) / (2 * rng.uniform(3, 6) ** 2))
    plane = rng.integers(0, 3, batch)
    slice_index = rng.integers(0, 32, batch)
    slices = np.stack([np.take(volumes[b, 0], slice_index[b], axis=int(plane[b])).reshape(-1)
                       for b in range(batch)])  # [B, 1024]
    project = rng.normal(size=(2, slices.shape[1], 32)).astype(np.float32)
    noise = rng.normal(size=(2, batch, 32)).astype(np.float32) * 0.1
    return dict(images=volumes, plane=plane, slice_index=slice_index,
                image_embedding=slices @ project[0] + noise[0], text_embedding=slices @ project[1] + noise[1])


@nnx.jit
def _plan_trace(model: Med3DInsight, batch) -> jax.Array:
    out = model(batch["images"], batch["plane"], batch["slice_index"])
    unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
    cost = mahalanobis_cost(unit(out.embedding), unit(batch["image_embedding"]), model.L[...])
    uniform = jnp.full((len(cost),), 1 / len(cost))
    plan = entropic_partial_wasserstein(uniform, uniform, cost, CONFIG.ot_reg, CONFIG.ot_mass,
                                        num_iter_max=CONFIG.ot_iterations)
    return jnp.trace(plan)


def diagonal_mass(model: Med3DInsight, batch) -> float:
    return float(_plan_trace(model, {k: jnp.asarray(v) for k, v in batch.items()}))


@pytest.mark.slow
def test_pretraining_loss_falls_and_the_plan_concentrates_on_the_pairs():
    model = Med3DInsight(CONFIG, rngs=nnx.Rngs(0))
    batch = synthetic_batch()
    optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, batch):
        (loss, metrics), grads = nnx.value_and_grad(med3dinsight_loss, has_aux=True)(model, batch)
        optimizer.update(model, grads)
        return metrics

    before = diagonal_mass(model, batch)
    arrays = {k: jnp.asarray(v) for k, v in batch.items()}
    history = [step(model, optimizer, arrays) for _ in range(30)]
    losses = [float(m["loss"]) for m in history]
    after = diagonal_mass(model, batch)
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
    assert float(history[-1]["ot_image"]) < float(history[0]["ot_image"])
    assert after > before + 0.1, (before, after)  # of the 0.95 transported mass


def test_metric_starts_symmetric_with_diagonal_in_one_to_two():
    model = Med3DInsight(CONFIG, rngs=nnx.Rngs(0))
    metric = np.asarray(model.L[...])
    assert metric.shape == (32, 32) and np.array_equal(metric, metric.T)
    assert (np.diag(metric) >= 1).all() and (np.diag(metric) < 2).all()
    _, grads = nnx.jit(nnx.value_and_grad(med3dinsight_loss, has_aux=True))(
        model, {k: jnp.asarray(v) for k, v in synthetic_batch(4, seed=1).items()})
    metric_grad = np.asarray(grads.L[...])
    assert np.abs(np.diag(metric_grad)).max() > 0
    assert np.array_equal(metric_grad - np.diag(np.diag(metric_grad)), np.zeros_like(metric_grad))  # diag only
