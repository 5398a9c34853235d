"""LoRA adapters on the LLM: exact merge, zero start, per-layer init, keyed dropout, adapter-only training,
logical shardings."""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.ad_checkpoint import print_saved_residuals
from jax.sharding import AbstractMesh, NamedSharding, PartitionSpec

from m3d_jax.layers.params import Buffer
from m3d_jax.models.decoder import Decoder
from m3d_jax.models.decoder_presets import tiny_phi3
from m3d_jax.models.lamed import Lamed, LamedConfig, lamed_loss
from m3d_jax.models.vit3d import ViT3DConfig
from m3d_jax.sharding import (
    MESH_AXES, MeshConfig, create_sharded, logical_axes, make_mesh, spec_for, state_shardings,
)
from m3d_jax.train.lora import LoraAdapter, LoraConfig, LoraParam, apply_lora, lora_dropout, merge_lora

CONFIG = LamedConfig(vision=ViT3DConfig(image_size=(16, 64, 64), hidden_size=64, mlp_dim=128, num_layers=2,
                                        num_heads=4),
                     decoder=tiny_phi3(vocab_size=516), image_token_id=512, seg_token_id=515, seg_decoder_heads=4,
                     seg_decoder_mlp_dim=96, seg_iou_head_hidden=32)
ADAPTED_PER_LAYER = 7  # q, k, v, o, gate, up, down


def _batch(rng):
    ids = np.concatenate([np.ones((2, 1)), np.full((2, 8), 512), rng.integers(3, 500, (2, 7))], 1).astype(np.int32)
    return {k: jnp.asarray(v) for k, v in dict(
        images=rng.random((2, 1, 16, 64, 64), dtype=np.float32), input_ids=ids, attention_mask=np.ones_like(ids),
        labels=np.where(np.arange(16) < 10, -100, ids), image_starts=np.ones(2, np.int32)).items()}


def _adapters(model: nnx.Module) -> list[LoraAdapter]:
    return [node for _, node in nnx.iter_graph(model) if isinstance(node, LoraAdapter)]


def _randomise_b(model: nnx.Module, seed: int = 0) -> None:
    """Non-zero B everywhere, so the adapters change the outputs."""
    for index, adapter in enumerate(_adapters(model)):
        key = jax.random.fold_in(jax.random.key(seed), index)
        adapter.b[...] = 0.05 * jax.random.normal(key, adapter.b.shape, adapter.b.dtype)


def _set_scan(decoder: Decoder, scan: bool) -> None:
    decoder.config = dataclasses.replace(decoder.config, scan_layers=scan)


def _flat(model: nnx.Module) -> dict:
    return {path: np.asarray(variable[...]) for path, variable in nnx.to_flat_state(nnx.state(model))}


def _logits(model: Lamed, batch) -> np.ndarray:
    return np.asarray(model(batch["images"], batch["input_ids"], image_starts=batch["image_starts"]).logits)


def test_merged_kernels_match_unmerged_adapters_loop_and_scan(rng):
    model = Lamed(CONFIG, rngs=nnx.Rngs(0))
    batch = _batch(rng)
    base = _logits(model, batch)
    count = apply_lora(model, LoraConfig(), rngs=nnx.Rngs(1))
    assert count == ADAPTED_PER_LAYER * CONFIG.decoder.num_layers
    _randomise_b(model)
    unmerged = {}
    for scan in (False, True):
        _set_scan(model.language_model, scan)
        unmerged[scan] = _logits(model, batch)
    assert np.abs(unmerged[False] - base).max() > 1e-2  # the adapters do act
    np.testing.assert_allclose(unmerged[True], unmerged[False], atol=1e-5, rtol=0)
    merge_lora(model)
    assert not _adapters(model)
    assert set(_flat(model)) == set(_flat(Lamed(CONFIG, rngs=nnx.Rngs(0))))  # plain layers for the exporters
    for scan in (False, True):
        _set_scan(model.language_model, scan)
        np.testing.assert_allclose(_logits(model, batch), unmerged[scan], atol=1e-5, rtol=0)


def test_fresh_adapters_leave_logits_bit_identical(rng):
    model = Lamed(CONFIG, rngs=nnx.Rngs(0))
    batch = _batch(rng)
    base = _logits(model, batch)
    apply_lora(model, LoraConfig(), rngs=nnx.Rngs(1))
    np.testing.assert_array_equal(_logits(model, batch), base)


def test_stacked_layers_get_independent_adapters_and_dropout_ids():
    config = tiny_phi3(vocab_size=64)
    decoder = Decoder(config, rngs=nnx.Rngs(0))
    count = apply_lora(decoder, LoraConfig(rank=4, under=""), rngs=nnx.Rngs(1))
    adapters = _adapters(decoder)
    assert len(adapters) == ADAPTED_PER_LAYER and count == ADAPTED_PER_LAYER * config.num_layers
    assert decoder.lm_head.lora is None
    for adapter in adapters:
        a = np.asarray(adapter.a[...])
        assert a.shape[0] == config.num_layers and a.shape[-1] == 4
        assert not np.array_equal(a[0], a[1])
        assert np.abs(a).max() <= 1 / np.sqrt(np.prod(a.shape[1:-1]))  # PEFT's U(±1/√fan_in)
    ids = np.concatenate([np.asarray(adapter.dropout_id[...]) for adapter in adapters])
    assert sorted(ids) == list(range(count))
    with pytest.raises(ValueError, match="already has an adapter"):
        apply_lora(decoder, LoraConfig(under=""), rngs=nnx.Rngs(1))
    with pytest.raises(ValueError, match="no Dense named"):
        apply_lora(decoder, LoraConfig(under="vision_tower"), rngs=nnx.Rngs(1))


@pytest.mark.parametrize("scan", [False, True])
def test_dropout_is_keyed_and_off_outside_the_context(scan):
    config = dataclasses.replace(tiny_phi3(vocab_size=64), scan_layers=scan, remat="full" if scan else "none")
    decoder = Decoder(config, rngs=nnx.Rngs(0))
    apply_lora(decoder, LoraConfig(dropout=0.5, under=""), rngs=nnx.Rngs(1))
    _randomise_b(decoder)
    ids = jnp.arange(16).reshape(2, 8)

    @nnx.jit
    def train_logits(decoder, key):
        with lora_dropout(key):
            return decoder(ids).logits

    eval_logits = np.asarray(nnx.jit(lambda decoder: decoder(ids).logits)(decoder))
    first, again, other = (np.asarray(train_logits(decoder, jax.random.key(k))) for k in (0, 0, 1))
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - eval_logits).max() > 1e-3 and np.abs(first - other).max() > 1e-3
    np.testing.assert_allclose(np.asarray(decoder(ids).logits), eval_logits, atol=1e-5, rtol=0)


def test_lora_training_changes_only_adapters_and_loss_falls(rng):
    model = Lamed(CONFIG, rngs=nnx.Rngs(0))
    apply_lora(model, LoraConfig(), rngs=nnx.Rngs(1))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=LoraParam)
    lora_size = sum(a.a.size + a.b.size for a in _adapters(model))
    optimizer_size = sum(x.size for x in jax.tree.leaves(nnx.state(optimizer, nnx.optimizer.OptState)))
    assert 2 * lora_size <= optimizer_size < 2 * lora_size + 8  # Adam moments of A and B (+ step counts) only
    batch = _batch(rng)
    before = _flat(model)

    @nnx.jit
    def step(model, optimizer, batch, key):
        def loss(model):
            with lora_dropout(key):
                return lamed_loss(model, batch)

        (value, _), grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, LoraParam), has_aux=True)(model)
        optimizer.update(model, grads)
        return value

    losses = [float(step(model, optimizer, batch, jax.random.key(i))) for i in range(8)]
    assert losses[-1] < losses[0] * 0.9, losses
    for path, variable in nnx.to_flat_state(nnx.state(model)):
        changed = not np.array_equal(np.asarray(variable[...]), before[path])
        assert changed == isinstance(variable, LoraParam), (path, changed)


def test_lora_params_carry_logical_axes_for_sharding():
    config = tiny_phi3(vocab_size=64)

    def make() -> Decoder:
        decoder = Decoder(config, rngs=nnx.Rngs(0))
        apply_lora(decoder, LoraConfig(under=""), rngs=nnx.Rngs(1))
        return decoder

    abstract = nnx.state(nnx.eval_shape(make))
    q_proj = abstract["layers"]["self_attn"]["q_proj"]
    assert logical_axes(q_proj["lora"]["a"]) == ("layers", "embed", None)
    assert logical_axes(q_proj["lora"]["b"]) == ("layers", None, "q_heads", "head_dim")
    assert logical_axes(q_proj["lora"]["dropout_id"]) == ("layers",)
    assert isinstance(q_proj["lora"]["dropout_id"], Buffer)
    mesh = AbstractMesh((1, 2, 2), MESH_AXES)
    assert spec_for(logical_axes(q_proj["lora"]["a"]), (2, 64, 16), mesh) == PartitionSpec(None, "fsdp", None)
    assert spec_for(logical_axes(q_proj["lora"]["b"]), (2, 16, 4, 16), mesh) == PartitionSpec(None, None, "tensor",
                                                                                               None)
    real_mesh = make_mesh(MeshConfig(), jax.devices()[:1])
    shardings = nnx.to_flat_state(state_shardings(abstract, real_mesh))
    assert all(isinstance(sharding.get_value(), NamedSharding) for _, sharding in shardings)
    sharded = create_sharded(make, real_mesh)
    assert isinstance(sharded.layers.mlp.down_proj.lora.a[...].sharding, NamedSharding)


def test_adapters_add_no_saved_activations_under_the_dots_policy(capsys):
    """The rank-r path is rematerialised: with dots_no_batch remat, a LoRA decoder keeps (almost) what the
    plain decoder keeps for the backward pass, not a second copy of every projection's output."""
    config = dataclasses.replace(tiny_phi3(), num_layers=4, scan_layers=True, remat="dots_no_batch",
                                 dtype="bfloat16", hidden_size=128, intermediate_size=256, head_dim=32)
    ids = jnp.ones((2, 32), jnp.int32)

    def saved_bytes(lora: bool) -> int:
        model = Decoder(config, rngs=nnx.Rngs(0))
        if lora:
            apply_lora(model, LoraConfig(rank=4, dropout=0.1, under=""), rngs=nnx.Rngs(1))
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(params):
            with lora_dropout(jax.random.key(0)):
                return nnx.merge(graphdef, params, rest)(ids).logits.mean()

        capsys.readouterr()
        print_saved_residuals(loss, params)  # one line per residual: "bf16[2,32,64] from ..."
        total = 0
        for line in capsys.readouterr().out.splitlines():
            found = re.match(r"(\w+)\[([\d,]*)\]", line)
            if found and "from the argument" not in line:
                dims = [int(d) for d in found.group(2).split(",") if d]
                total += int(np.prod(dims)) * jnp.dtype(found.group(1).replace("bf16", "bfloat16").replace(
                    "f32", "float32").replace("i32", "int32").replace("u32", "uint32")).itemsize
        return total

    plain, adapted = saved_bytes(False), saved_bytes(True)
    assert adapted < 1.1 * plain, (plain, adapted)
