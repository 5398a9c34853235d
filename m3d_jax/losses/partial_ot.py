"""Entropic partial optimal transport and Med3DInsight's alignment loss.

The solver is the Bregman/Dykstra scheme of Benamou et al. (2015) for transporting exactly `m` units of mass
between two sub-probability marginals, with the same iteration, stopping rule and numerical-error exit as
`ot.partial.entropic_partial_wasserstein(method="sinkhorn")` in POT (0.9.1–0.9.7). It runs a static number of
steps under `lax.scan` and freezes the state once POT would have stopped, so values match POT's early exit and
reverse-mode gradients flow through the unrolled iterations, as they do through POT's torch backend.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

# POT's test fires on iterations 0, 10, 20, ... (0-based), before its counter is incremented.
_CHECK_EVERY = 10


def entropic_partial_wasserstein(
    a: jax.Array,
    b: jax.Array,
    cost: jax.Array,
    reg: float,
    m: float | jax.Array | None = None,
    *,
    num_iter_max: int = 1000,
    stop_threshold: float = 1e-100,
) -> jax.Array:
    """Entropic partial-OT plan [n, k] moving total mass `m` from `a` [n] to `b` [k] under `cost` [n, k].

    `m` defaults to min(Σa, Σb). Stops, like POT, when ‖K_prev − K‖_F ≤ `stop_threshold` at one of the checks
    made every 10 iterations, after `num_iter_max` iterations, or as soon as the plan holds a NaN or Inf (that
    plan is returned). The default threshold 1e-100 is 0 in float32, so there only an exact fixed point stops it;
    such a stop hinges on the last bit, where XLA's exp can round differently from numpy's. jit- and
    vmap-friendly; `num_iter_max` must be static.
    """
    if cost.ndim != 2 or a.shape != cost.shape[:1] or b.shape != cost.shape[1:]:
        raise ValueError(f"expected a [n], b [k] and cost [n, k]; got {a.shape}, {b.shape} and {cost.shape}")
    dtype = jnp.result_type(a, b, cost)
    a, b, cost = (jnp.asarray(x, dtype) for x in (a, b, cost))
    max_mass = jnp.minimum(a.sum(), b.sum())
    if m is None:
        m = max_mass
    else:
        _check_mass(m, max_mass)
    m = jnp.asarray(m, dtype)

    kernel = jnp.exp(-cost / reg)
    kernel = kernel * (m / kernel.sum())
    ones = jnp.ones_like(kernel)

    def iterate(state):
        plan, q1, q2, q3 = state
        # Three Bregman projections with Dykstra corrections: rows capped at a, columns at b, total mass = m.
        scaled = plan * q1
        rows = jnp.minimum(a / scaled.sum(axis=1), 1)[:, None] * scaled
        q1 = q1 * plan / rows
        scaled = rows * q2
        cols = scaled * jnp.minimum(b / scaled.sum(axis=0), 1)[None, :]
        q2 = q2 * rows / cols
        scaled = cols * q3
        new_plan = scaled * (m / scaled.sum())
        q3 = q3 * cols / new_plan
        return new_plan, q1, q2, q3

    def step(carry, iteration):
        state, done = carry
        new_state = iterate(state)
        plan, new_plan = state[0], new_state[0]
        numerical_error = ~jnp.all(jnp.isfinite(new_plan))
        # err only decides when to stop; keep it out of the gradient (sqrt has an infinite slope at 0).
        change = lax.stop_gradient(jnp.sqrt(jnp.sum((plan - new_plan) ** 2)))
        converged = (iteration % _CHECK_EVERY == 0) & ~(change > stop_threshold)
        state = jax.tree.map(lambda old, new: jnp.where(done, old, new), state, new_state)
        return (state, done | numerical_error | converged), None

    (state, _), _ = lax.scan(step, ((kernel, ones, ones, ones), jnp.asarray(False)), jnp.arange(num_iter_max))
    return state[0]


def _check_mass(m, max_mass) -> None:
    """POT's ValueError for a mass outside [0, min(Σa, Σb)], when the values are known (not under jit)."""
    try:
        mass, limit = float(m), float(max_mass)
    except (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError):
        return
    if not 0 <= mass <= limit:
        raise ValueError(f"m={mass} must lie in [0, min(sum(a), sum(b))] = [0, {limit}]")


def _l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """torch.nn.functional.normalize along the last axis: x / max(‖x‖, eps)."""
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)


def mahalanobis_cost(x3d: jax.Array, e2d: jax.Array, metric: jax.Array, *, full: bool = False) -> jax.Array:
    """Med3DInsight's cost [n2d, n3d] between 3D embeddings `x3d` [n3d, d] and 2D embeddings `e2d` [n2d, d].

    Rows index the 2D samples and columns the 3D samples. The default (reference parity) is a diagonally
    weighted Euclidean distance, sqrt(Σ_k (x3d_j − e2d_i)_k² · metric_kk): only diag(`metric`) [d, d] is used, so
    the off-diagonal gradient is exactly 0. `full=True` is the intended Mahalanobis distance with M = L·Lᵀ,
    L = `metric`. Either is divided by its global maximum. As in the reference there is no guard on the sqrt:
    a zero distance gives an infinite gradient and a negative diagonal entry can give NaN.
    """
    diff = x3d[None, :, :] - e2d[:, None, :]  # [n2d, n3d, d]
    if full:
        squared = jnp.sum((diff @ metric) ** 2, axis=-1)
    else:
        squared = jnp.einsum("ijk,k->ij", diff**2, jnp.diagonal(metric))
    distance = jnp.sqrt(squared)
    return distance / distance.max()


def alignment_plan(
    x3d: jax.Array,
    e2d: jax.Array,
    metric: jax.Array,
    *,
    reg: float = 0.03,
    m: float = 0.95,
    num_iter_max: int = 1000,
    full: bool = False,
) -> jax.Array:
    """The partial-OT plan [B (2D), B (3D)] between paired 3D [B, d] and 2D [B, d] embeddings: both sides
    L2-normalised, the cost `mahalanobis_cost`, uniform 1/B marginals, mass `m`."""
    if x3d.shape != e2d.shape or x3d.ndim != 2:
        raise ValueError(f"expected paired embeddings [B, d]; got x3d {x3d.shape} and e2d {e2d.shape}")
    cost = mahalanobis_cost(_l2_normalize(x3d), _l2_normalize(e2d), metric, full=full)
    batch = x3d.shape[0]
    marginal = jnp.full((batch,), 1.0 / batch, cost.dtype)
    return entropic_partial_wasserstein(marginal, marginal, cost, reg, m, num_iter_max=num_iter_max)


def partial_ot_alignment_loss(x3d: jax.Array, e2d: jax.Array, metric: jax.Array, **options) -> jax.Array:
    """Med3DInsight's partial-OT alignment loss: −mean(log diag π) of the `alignment_plan` (same options) —
    the reference's −Σ (I/B) ⊙ log π without its 0·log 0 = NaN when an off-diagonal entry of π underflows.
    The reference computes `e2d` from a frozen encoder; wrap it in `lax.stop_gradient` if it must stay
    constant here."""
    plan = alignment_plan(x3d, e2d, metric, **options)
    return -jnp.mean(jnp.log(jnp.diagonal(plan)))
