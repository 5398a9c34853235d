"""Med3DInsight's entropic partial-OT loss against POT: plans (numpy backend) and gradients (torch autograd)."""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import ot
import pytest
import torch

from m3d_jax.losses.partial_ot import entropic_partial_wasserstein, mahalanobis_cost, partial_ot_alignment_loss

_plan = jax.jit(entropic_partial_wasserstein, static_argnames="num_iter_max")
_loss_and_grads = jax.jit(jax.value_and_grad(partial_ot_alignment_loss, argnums=(0, 2)),
                          static_argnames=("num_iter_max", "full"))


def _problem(rng: np.random.Generator, n: int, k: int, uniform: bool):
    """A random cost in [0, 1) with marginals that are uniform, or random with unequal total masses."""
    cost = rng.random((n, k))
    if uniform:
        return np.full(n, 1 / n), np.full(k, 1 / k), cost
    a, b = rng.random(n) + 0.2, rng.random(k) + 0.2
    return 0.9 * a / a.sum(), b / b.sum(), cost


def _pot_plan(a, b, cost, reg, m, num_iter_max=1000, stop_threshold=1e-100, log=False):
    with warnings.catch_warnings():  # POT's own divide/NaN warnings in the numerical-error case
        warnings.simplefilter("ignore", RuntimeWarning)
        return ot.partial.entropic_partial_wasserstein(a, b, cost, reg, m, numItermax=num_iter_max,
                                                       stopThr=stop_threshold, log=log)


# (n, k, uniform marginals, reg, fraction of the transportable mass, num_iter_max, stop_threshold)
PLAN_CASES = [
    (6, 6, True, 0.03, 0.95, 1000, 1e-100),
    (5, 8, False, 0.1, 0.7, 1000, 1e-100),
    (7, 4, False, 1.0, 0.5, 1000, 1e-100),
    (6, 6, False, 0.03, 0.8, 3, 1e-100),  # few iterations pin the iteration itself
    (6, 6, True, 0.1, 0.8, 10, 1e-100),
    (6, 6, False, 0.1, 0.8, 11, 1e-100),
    (6, 6, False, 0.1, 0.8, 1000, 1e-6),  # early stops pin the every-10-iterations check
    (5, 8, False, 1.0, 0.8, 1000, 1e-9),
    (6, 6, True, 0.03, 0.95, 1000, 1e-4),
]


@pytest.mark.parametrize("n, k, uniform, reg, mass, num_iter_max, stop_threshold", PLAN_CASES)
def test_plan_matches_pot_float64_and_float32(n, k, uniform, reg, mass, num_iter_max, stop_threshold):
    a, b, cost = _problem(np.random.default_rng(n * 100 + k), n, k, uniform)
    m = mass * min(a.sum(), b.sum())
    expected, log = _pot_plan(a, b, cost, reg, m, num_iter_max, stop_threshold, log=True)
    if stop_threshold > 1e-100:  # the case must really stop early, at one of the checks
        assert len(log["err"]) < 100 and log["err"][-1] <= stop_threshold
    with jax.enable_x64(True):
        plan64 = np.asarray(_plan(jnp.asarray(a), jnp.asarray(b), jnp.asarray(cost), reg, m,
                                  num_iter_max=num_iter_max, stop_threshold=stop_threshold))
    assert plan64.dtype == np.float64
    np.testing.assert_allclose(plan64, expected, rtol=0, atol=1e-12)
    assert abs(plan64.sum() - m) < 1e-12
    plan32 = np.asarray(_plan(*(jnp.asarray(x, jnp.float32) for x in (a, b, cost)), reg, m,
                              num_iter_max=num_iter_max, stop_threshold=stop_threshold))
    assert plan32.dtype == np.float32
    # float32 drifts ~1e-8..1e-7 over 1000 iterations on entries of size ~0.01..0.2. An early-stopping case is
    # only compared when float32 stops at the same check as float64 (it did in every case here).
    np.testing.assert_allclose(plan32, expected, rtol=0, atol=1e-6)


def test_plan_numerical_error_stops_like_pot():
    """A kernel that underflows to 0 off two entries: iteration 0 is finite, iteration 1 divides 0 by 0 and POT
    breaks and returns that NaN plan; one iteration stops before it."""
    cost = np.ones((5, 4))
    cost[0, 0], cost[1, 1] = 0.01, 0.0101
    a, b = np.full(5, 0.2), np.full(4, 0.25)
    with jax.enable_x64(True):
        for num_iter_max in (1, 50):
            expected = _pot_plan(a, b, cost, 1e-4, 0.3, num_iter_max=num_iter_max)
            plan = np.asarray(_plan(jnp.asarray(a), jnp.asarray(b), jnp.asarray(cost), 1e-4, 0.3,
                                    num_iter_max=num_iter_max))
            assert np.isnan(expected).all() == (num_iter_max > 1)
            np.testing.assert_allclose(plan, expected, rtol=0, atol=1e-12)  # NaNs compare equal


def test_plan_default_mass_and_mass_check():
    a, b, cost = (jnp.asarray(x, jnp.float32) for x in _problem(np.random.default_rng(2), 4, 5, uniform=False))
    plan = entropic_partial_wasserstein(a, b, cost, 0.1, num_iter_max=50)
    assert abs(float(plan.sum()) - float(min(a.sum(), b.sum()))) < 1e-6
    with pytest.raises(ValueError, match="must lie in"):
        entropic_partial_wasserstein(a, b, cost, 0.1, 1.5)


def test_jit_vmap_batch_matches_each_problem_and_pot():
    """Four problems with different regs and early-stop iterations, solved in one vmapped call."""
    rng = np.random.default_rng(3)
    problems = [_problem(rng, 5, 6, uniform=i % 2 == 0) for i in range(4)]
    regs = np.array([0.03, 0.1, 1.0, 0.3])
    masses = np.array([0.8 * min(a.sum(), b.sum()) for a, b, _ in problems])
    a, b, cost = (np.stack(parts) for parts in zip(*problems))
    with jax.enable_x64(True):
        solve = functools.partial(entropic_partial_wasserstein, num_iter_max=300, stop_threshold=1e-8)
        batched = np.asarray(jax.jit(jax.vmap(solve))(a, b, cost, regs, masses))
        for i in range(4):
            single = np.asarray(solve(a[i], b[i], cost[i], regs[i], masses[i]))
            expected = _pot_plan(a[i], b[i], cost[i], regs[i], masses[i], 300, 1e-8)
            np.testing.assert_allclose(batched[i], single, rtol=0, atol=1e-15)
            np.testing.assert_allclose(batched[i], expected, rtol=0, atol=1e-12)


def _embeddings(rng: np.random.Generator, batch: int = 6, dim: int = 16):
    x3d = rng.normal(size=(batch, dim))
    e2d = rng.normal(size=(batch, dim))
    noise = rng.random((dim, dim))
    metric = 0.5 * (noise + noise.T) + np.eye(dim)  # the reference's init of L
    return x3d, e2d, metric


def _torch_reference_loss(x3d, e2d, metric, reg=0.03, m=0.95):
    """The reference computation on POT's torch backend: returns (loss, grad x3d, grad L) in float64."""
    med = torch.tensor(x3d, requires_grad=True)
    big_l = torch.tensor(metric, requires_grad=True)
    med_n = torch.nn.functional.normalize(med, dim=1)
    img_n = torch.nn.functional.normalize(torch.tensor(e2d), dim=1)
    batch = med.shape[0]
    diff = med_n[None, :, :] - img_n[:, None, :]
    cost = torch.sqrt(torch.einsum("ijk,ikj,kk->ij", diff, diff.transpose(1, 2), big_l))
    cost = cost / cost.max()
    uniform = torch.full((batch,), 1.0 / batch, dtype=torch.float64)
    plan = ot.partial.entropic_partial_wasserstein(uniform, uniform, cost, reg=reg, m=m)
    loss = torch.sum(-torch.eye(batch, dtype=torch.float64) / batch * torch.log(plan))
    loss.backward()
    return loss.item(), med.grad.numpy(), big_l.grad.numpy()


def test_loss_gradients_match_pot_torch_autograd():
    x3d, e2d, metric = _embeddings(np.random.default_rng(4))
    expected_loss, expected_dx, expected_dl = _torch_reference_loss(x3d, e2d, metric)
    with jax.enable_x64(True):
        loss, (dx, dl) = _loss_and_grads(jnp.asarray(x3d), jnp.asarray(e2d), jnp.asarray(metric))
    dx, dl = np.asarray(dx), np.asarray(dl)
    assert abs(float(loss) - expected_loss) <= 1e-10 * abs(expected_loss)
    for got, want in ((dx, expected_dx), (np.diag(dl), np.diag(expected_dl))):
        assert np.abs(got - want).max() <= 1e-9 * np.abs(want).max()  # measured ~1e-13
    off_diagonal = ~np.eye(metric.shape[0], dtype=bool)
    assert np.all(dl[off_diagonal] == 0) and np.all(expected_dl[off_diagonal] == 0)
    assert np.abs(np.diag(dl)).max() > 0


def test_loss_float32_close_to_float64():
    x3d, e2d, metric = _embeddings(np.random.default_rng(5))
    with jax.enable_x64(True):
        loss64, (dx64, _) = _loss_and_grads(jnp.asarray(x3d), jnp.asarray(e2d), jnp.asarray(metric))
    loss32, (dx32, _) = _loss_and_grads(*(jnp.asarray(x, jnp.float32) for x in (x3d, e2d, metric)))
    assert loss32.dtype == jnp.float32
    assert abs(float(loss32) - float(loss64)) < 1e-4 * abs(float(loss64))
    assert np.abs(np.asarray(dx32) - np.asarray(dx64)).max() < 1e-3 * np.abs(np.asarray(dx64)).max()


def test_full_mahalanobis_cost_uses_l_l_transpose():
    rng = np.random.default_rng(6)
    x3d, e2d, metric = _embeddings(rng, batch=5, dim=8)
    diff = x3d[None, :, :] - e2d[:, None, :]
    full_metric = metric @ metric.T
    expected = np.sqrt(np.einsum("ijk,kl,ijl->ij", diff, full_metric, diff))
    with jax.enable_x64(True):
        got = np.asarray(mahalanobis_cost(jnp.asarray(x3d), jnp.asarray(e2d), jnp.asarray(metric), full=True))
        weights = rng.random(8) + 0.5
        diagonal = mahalanobis_cost(jnp.asarray(x3d), jnp.asarray(e2d), jnp.diag(jnp.asarray(weights)))
        full_of_sqrt = mahalanobis_cost(jnp.asarray(x3d), jnp.asarray(e2d), jnp.diag(jnp.sqrt(weights)), full=True)
    np.testing.assert_allclose(got, expected / expected.max(), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(diagonal), np.asarray(full_of_sqrt), rtol=1e-12)
    rows_are_2d = np.sqrt(((x3d[1] - e2d[0]) ** 2 * weights).sum())  # cost[0, 1]: 2D sample 0, 3D sample 1
    assert np.isclose(np.asarray(diagonal)[0, 1] * np.sqrt(np.einsum("ijk,k->ij", diff**2, weights)).max(),
                      rows_are_2d, rtol=1e-12)


def test_paired_embeddings_give_lower_loss_and_diagonal_plan():
    rng = np.random.default_rng(7)
    batch, dim = 8, 32
    x3d = rng.normal(size=(batch, dim)).astype(np.float32)
    e2d = x3d + 0.05 * rng.normal(size=(batch, dim)).astype(np.float32)
    shuffled = e2d[np.roll(np.arange(batch), 1)]
    metric = np.eye(dim, dtype=np.float32)

    @jax.jit
    def diagonal_mass(x, e):
        cost = mahalanobis_cost(x / jnp.linalg.norm(x, axis=1, keepdims=True),
                                e / jnp.linalg.norm(e, axis=1, keepdims=True), jnp.asarray(metric))
        uniform = jnp.full((batch,), 1 / batch)
        return jnp.trace(entropic_partial_wasserstein(uniform, uniform, cost, 0.03, 0.95))

    loss = jax.jit(partial_ot_alignment_loss)
    paired_loss = float(loss(jnp.asarray(x3d), jnp.asarray(e2d), jnp.asarray(metric)))
    shuffled_loss = float(loss(jnp.asarray(x3d), jnp.asarray(shuffled), jnp.asarray(metric)))
    assert paired_loss < shuffled_loss - 1.0
    assert paired_loss < -np.log(0.9 / batch)  # most of each 1/B row sits on the diagonal
    paired_mass, shuffled_mass = float(diagonal_mass(x3d, e2d)), float(diagonal_mass(x3d, shuffled))
    assert paired_mass > 0.9 and shuffled_mass < 0.1
