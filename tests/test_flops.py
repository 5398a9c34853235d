"""Step FLOPs: model FLOPs against a hand count, hardware FLOPs of scanned stacks against XLA's own count of
the same stack unrolled, and the utilisation arithmetic."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
import pytest
from conftest import TINY as TINY_VIT
from flax import nnx

from m3d_jax.models.decoder import Decoder
from m3d_jax.models.decoder_presets import tiny_phi3
from m3d_jax.models.vit3d import ViT3D
from m3d_jax.train.flops import hardware_flops, model_flops, peak_flops, utilisation
from m3d_jax.train.step import make_train_step

BATCH, LENGTH = 2, 64


def _decoder_loss(model, batch, rngs=None):
    logits = model(batch["input_ids"]).logits
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["input_ids"]).mean()
    return loss, {"loss": loss}


def _vit_loss(model, batch, rngs=None):
    loss = jnp.mean(model(batch["images"]).features ** 2)
    return loss, {"loss": loss}


def _abstract(make_model):
    """(model, optimizer) built abstractly."""
    def build():
        model = make_model()
        return model, nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.Param)

    return nnx.eval_shape(build)


def _step_flops(make_model, loss_fn, batch):
    """Hardware FLOPs of the full training step (forward, backward, AdamW) of an abstract model."""
    graphdef, state = nnx.split(_abstract(make_model))
    return hardware_flops(lambda: make_train_step(graphdef, loss_fn, nnx.Param), state, batch,
                          jax.ShapeDtypeStruct((), jax.random.key(0).dtype))


def _decoder(**overrides):
    config = dataclasses.replace(tiny_phi3(), num_layers=8, **overrides)
    return lambda: Decoder(config, rngs=nnx.Rngs(0))


def _ids():
    return {"input_ids": jax.ShapeDtypeStruct((BATCH, LENGTH), jnp.int32)}


def test_model_flops_of_tiny_decoder_equal_a_hand_count():
    config = dataclasses.replace(tiny_phi3(), num_layers=8, scan_layers=True)
    model = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(model)
    tokens = BATCH * LENGTH
    d, f, v = config.hidden_size, config.intermediate_size, config.vocab_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    per_layer = d * q + 2 * d * kv + q * d + 3 * d * f  # q, k, v, o; gate, up, down
    weights = 6 * tokens * (config.num_layers * per_layer + d * v)  # + lm_head; the embedding is a lookup
    # scores and values: 2 products × 2 FLOPs per MAC × B·T²·heads·head_dim, causal halved, ×3 for training
    attention = 3 * config.num_layers * 4 * BATCH * LENGTH**2 * q / 2
    assert model_flops(_decoder_loss, graphdef, state, _ids()) == weights + attention


def test_model_flops_do_not_depend_on_scan_or_remat():
    counts = []
    for overrides in ({}, {"scan_layers": True}, {"scan_layers": True, "remat": "full"}):
        graphdef, state = nnx.split(nnx.eval_shape(_decoder(**overrides)))
        counts.append(model_flops(_decoder_loss, graphdef, state, _ids()))
    assert counts[0] == counts[1] == counts[2]


def test_hardware_flops_of_scanned_decoder_match_the_unrolled_count():
    unrolled = _step_flops(_decoder(), _decoder_loss, _ids())
    scanned = _step_flops(_decoder(scan_layers=True), _decoder_loss, _ids())
    assert scanned == pytest.approx(unrolled, rel=0.05)
    # XLA's own count of the scanned program sees one layer of eight: the failure this guards against.
    graphdef, state = nnx.split(_abstract(_decoder(scan_layers=True))[0])
    lowered = jax.jit(lambda s, b: _decoder_loss(nnx.merge(graphdef, s), b)[0]).lower(state, _ids())
    assert lowered.cost_analysis()["flops"] < 0.5 * unrolled / 3


def test_hardware_flops_of_scanned_vit_match_the_unrolled_count():
    batch = {"images": jax.ShapeDtypeStruct((2, TINY_VIT.in_channels, *TINY_VIT.image_size), jnp.float32)}
    unrolled = _step_flops(lambda: ViT3D(TINY_VIT, rngs=nnx.Rngs(0)), _vit_loss, batch)
    scanned_config = dataclasses.replace(TINY_VIT, scan_layers=True, remat="dots_no_batch")
    remat_config = dataclasses.replace(TINY_VIT, remat="dots_no_batch")
    scanned = _step_flops(lambda: ViT3D(scanned_config, rngs=nnx.Rngs(0)), _vit_loss, batch)
    looped = _step_flops(lambda: ViT3D(remat_config, rngs=nnx.Rngs(0)), _vit_loss, batch)
    assert scanned == pytest.approx(looped, rel=0.05)
    assert unrolled <= looped  # rematerialisation adds recomputation; it is hardware work


def test_hardware_flops_count_rematerialisation():
    plain = _step_flops(_decoder(scan_layers=True), _decoder_loss, _ids())
    full = _step_flops(_decoder(scan_layers=True, remat="full"), _decoder_loss, _ids())
    assert full > 1.15 * plain  # the forward of every layer runs twice


def test_utilisation_and_peaks():
    assert utilisation(4e12, 2.0, 4, 1e12) == 0.5
    assert utilisation(None, 2.0, 4, 1e12) is None and utilisation(1.0, 1.0, 1, None) is None
    cpu = jax.devices()[0]
    assert peak_flops(cpu) is None and peak_flops(cpu, override=5.0) == 5.0
