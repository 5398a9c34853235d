"""Optimiser, what trains (config.trainable patterns, LoRA) and the train step on a tiny LaMed; every config
variant's trained parameters."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import abstract_model, recipe_config

from m3d_jax.errors import ConfigError
from m3d_jax.models.decoder_presets import tiny_phi3
from m3d_jax.models.lamed import Lamed, LamedConfig, lamed_loss
from m3d_jax.models.vit3d import ViT3DConfig
from m3d_jax.train.lora import LoraConfig, LoraParam, apply_lora
from m3d_jax.train.optim import OptimConfig, decay_mask, make_optimizer, schedule
from m3d_jax.train.step import make_train_step, optimizer_of, trainable, unmatched_patterns


CONFIG = LamedConfig(vision=ViT3DConfig(image_size=(16, 64, 64), hidden_size=64, mlp_dim=128, num_layers=2,
                                        num_heads=4),
                     decoder=tiny_phi3(vocab_size=516), image_token_id=512, seg_token_id=515, seg_decoder_heads=4,
                     seg_decoder_mlp_dim=96, seg_iou_head_hidden=32)
LAMED_STAGE1 = ("mm_projector", "language_model/embed_tokens")
LAMED_STAGE2 = ("vision_tower", "mm_projector", "language_model", "seg_projector", "seg_module")


def _names(model, wrt, filter=nnx.Param) -> set[str]:
    return {"/".join(map(str, path)) for path, variable in nnx.to_flat_state(nnx.state(model, filter))
            if wrt(path, variable)}


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
    wrt = trainable(LAMED_STAGE1)
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
    wrt = trainable(LAMED_STAGE1)
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
    model = Lamed(CONFIG, rngs=nnx.Rngs(0))
    lora = LoraConfig(rank=4)
    apply_lora(model, lora, rngs=nnx.Rngs(1))
    selected = _names(model, trainable(LAMED_STAGE2, lora))
    assert any(name.startswith("vision_tower") for name in selected)
    assert "language_model/embed_tokens/embedding" in selected and "language_model/lm_head/kernel" in selected
    llm = [name for name in selected if name.startswith("language_model/layers")]
    assert llm and all("lora" in name for name in llm), llm
    assert len(_names(model, lambda *_: True, LoraParam)) == 2 * len(LoraConfig().targets)
    # LoRA only narrows what the patterns select: stage 1's patterns reach no adapter.
    assert not _names(model, trainable(LAMED_STAGE1, lora), LoraParam)


def test_patterns_select_whole_module_paths():
    model = Lamed(CONFIG, rngs=nnx.Rngs(0))
    everything = _names(model, lambda *_: True)
    assert _names(model, trainable((".*",))) == everything
    assert not _names(model, trainable(("mm_proj", "language")))  # no partial names: whole path components
    assert _names(model, trainable(("language_model/(embed_tokens|lm_head)",))) == {
        "language_model/embed_tokens/embedding", "language_model/lm_head/kernel"}
    # A regex may name a parameter itself, at any depth.
    assert _names(model, trainable((r"mm_projector/.*/kernel",))) == {
        name for name in everything if name.startswith("mm_projector/") and name.endswith("/kernel")}
    assert unmatched_patterns(("mm_projector", "mm_proj", "seg_module"), model) == ["mm_proj"]


def test_bad_trainable_patterns_are_named():
    with pytest.raises(ConfigError, match=r"config.trainable: 'mm_projector\(' is not a regular expression"):
        trainable(("mm_projector(",))
    with pytest.raises(ConfigError, match="config.trainable is empty"):
        trainable(())


# Every config variant's trained parameters, on its abstract model: the modules listed train (a module path,
# every parameter under it), "LoRA" adds the LoRA adapters; nothing else trains.
LAMED_LORA = ("vision_tower", "mm_projector", "seg_projector", "seg_module", "language_model/embed_tokens",
              "language_model/lm_head", "LoRA")
EVERYTHING = ("",)
EXPECTED_TRAINED = {
    ("lamed", "stage1_phi3"): LAMED_STAGE1, ("lamed", "stage1_llama2"): LAMED_STAGE1,
    ("lamed", "stage2_phi3"): LAMED_LORA, ("lamed", "stage2_llama2"): LAMED_LORA,
    ("demo", None): ("mm_projector", "language_model"),
    ("med2e3", "stage1"): ("vision2d_connector", "vision3d_connector"),
    ("med2e3", "stage2"): ("llm", "vision2d_model", "vision2d_connector", "vision3d_connector"),
    ("med2e3", "phantoms"): EVERYTHING,
    ("clip", "m3d"): EVERYTHING, ("clip", "phantoms"): EVERYTHING,
    ("med3dinsight", "pretrain"): ("backbone/model_down", "backbone/decoder", "backbone/res", "psat", "L"),
    ("med3dinsight", "phantoms"): ("backbone/model_down", "backbone/decoder", "backbone/res", "psat", "L"),
    **{("med3dinsight_finetune", variant): EVERYTHING
       for variant in ("segment", "classify", "segment_phantoms", "classify_phantoms")},
}


@pytest.mark.parametrize("name, variant", list(EXPECTED_TRAINED), ids=lambda value: str(value))
def test_each_config_variant_trains_its_stage(name, variant):
    config = recipe_config(name, variant)
    model = abstract_model(config)
    expected = EXPECTED_TRAINED[name, variant]

    def listed(path, variable):
        joined = "/".join(map(str, path))
        return (any(joined == module or joined.startswith(module + "/") or not module for module in expected)
                or ("LoRA" in expected and isinstance(variable, LoraParam)))

    assert _names(model, optimizer_of(config)[1]) == _names(model, listed)


@pytest.mark.parametrize("name, variant, llm", [("demo", None, "language_model"), ("med2e3", "phantoms", "llm")])
def test_lora_trains_only_adapters_embeddings_and_lm_head_of_the_llm(name, variant, llm):
    """With LoRA the LLM's base weights never train, whatever its name (LaMed's language_model, Med-2E3's
    llm), even where the patterns select the whole LLM (demo) or the whole model (Med-2E3 phantoms)."""
    config = recipe_config(name, variant)
    config.lora.rank = 4
    model = abstract_model(config)
    # Without LoRA the patterns would train the LLM's base weights.
    assert any(path.startswith(f"{llm}/layers/") for path in _names(model, trainable(config.trainable)))
    trained = {path for path in _names(model, optimizer_of(config)[1]) if path.startswith(f"{llm}/")}
    adapters = _names(model, lambda *_: True, LoraParam)
    assert adapters and adapters <= trained
    assert trained - adapters == {f"{llm}/embed_tokens/embedding", f"{llm}/lm_head/kernel"}
