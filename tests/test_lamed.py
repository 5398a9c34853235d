"""M3D-LaMed against an independent torch composition (m3d_jax.parity.torch_reference: MONAI ViT + torch
pooling/MLP projector and splice + transformers Phi3ForCausalLM / LlamaForCausalLM + SAM-based SegVol), its
seg path, loss, released-layout conversion and tokenizer."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx
from safetensors.torch import save_file
from transformers import LlamaConfig, Phi3Config, Phi3ForCausalLM

from conftest import word_tokenizer
from m3d_jax.convert.keymap import torch_shapes
from m3d_jax.convert import export, read_released
from m3d_jax.convert.lamed import export_language_model, lamed_keymap
from m3d_jax.convert.torch_io import CheckpointReader
from m3d_jax.generate import SamplingConfig
from m3d_jax.models.decoder_presets import llama2_7b, phi3_mini_4k
from m3d_jax.models.lamed import Lamed, LamedConfig, generate_lamed, image_token_starts, lamed_loss
from m3d_jax.models.vit3d import ViT3DConfig
from m3d_jax.tokenizer import add_lamed_tokens, lamed_prompt_ids, resize_token_embeddings
from m3d_jax.parity.torch_reference import TorchLamed
from test_segvol import randomised

VOCAB = 260  # words w3..w255, then <im_patch>=256, <bx_start>=257, <bx_end>=258, [SEG]=259
IMAGE_ID, SEG_ID = 256, 259
VISION = ViT3DConfig(image_size=(16, 64, 64), hidden_size=64, mlp_dim=128, num_layers=2, num_heads=4)
NUM_IMAGE_TOKENS = 8  # grid 4×4×4 pooled by 2


def released_config(architecture: str, segmentation: bool) -> dict:
    """config.json as the released folders have it: the LLM's fields plus LaMed's."""
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=4, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    hf = (Phi3Config if architecture == "phi3" else LlamaConfig)(**common).to_dict()
    hf.update(model_type=f"lamed_{architecture}", image_channel=1, image_size=[16, 64, 64], patch_size=[4, 16, 16],
              vision_tower="vit3d", vision_select_layer=-1, vision_select_feature="patch", mm_projector_type="spp",
              proj_layer_type="mlp", proj_layer_num=2, proj_pooling_type="spatial", proj_pooling_size=2,
              mm_hidden_size=64, seg_token_id=SEG_ID, segmentation_module="segvol" if segmentation else None,
              # not in the released files (ViT-B and SegVol's decoder sizes are fixed there); tiny sizes here
              vision_mlp_dim=128, vision_num_layers=2, vision_num_heads=4, seg_decoder_heads=4,
              seg_decoder_mlp_dim=96, seg_iou_head_hidden=32)
    return hf


def tiny_torch_lamed(architecture: str, segmentation: bool) -> TorchLamed:
    """The torch oracle at test size with every weight random (large enough for varied greedy tokens)."""
    model = randomised(TorchLamed(released_config(architecture, segmentation)), seed=5)
    with torch.no_grad():
        for name, parameter in model.llm.named_parameters():
            if "norm" not in name:
                parameter.normal_(0.0, 0.2 if "embed" in name or "lm_head" in name else 0.08)
    return model


def _save_released(reference: TorchLamed, folder) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    save_file(reference.released_state_dict(), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(reference.hf_config))


@pytest.fixture(scope="module")
def phi3_lamed(tmp_path_factory):
    reference = tiny_torch_lamed("phi3", segmentation=True)
    folder = tmp_path_factory.mktemp("lamed_phi3")
    _save_released(reference, folder)
    model, report = read_released(folder)
    return reference, model, folder


def _prompt(rng, text_len: int) -> list[int]:
    return [1, *[IMAGE_ID] * NUM_IMAGE_TOKENS, *rng.integers(3, 256, text_len)]


def test_lamed_logits_match_torch_composition(phi3_lamed, rng):
    reference, model, _ = phi3_lamed
    images = rng.random((2, 1, 16, 64, 64), dtype=np.float32)
    ids = np.array([_prompt(rng, 7), _prompt(rng, 7)])
    ref_logits, ref_hidden = reference(torch.from_numpy(images), torch.from_numpy(ids))
    out = model(jnp.asarray(images), jnp.asarray(ids))
    assert float(np.max(np.abs(np.asarray(out.logits) - ref_logits.numpy()))) <= 1e-4
    assert float(np.max(np.abs(np.asarray(out.last_hidden_state) - ref_hidden.numpy()))) <= 1e-4


def test_image_placeholders_are_validated(phi3_lamed, rng):
    _, model, _ = phi3_lamed
    images = jnp.asarray(rng.random((1, 1, 16, 64, 64), dtype=np.float32))
    bad = np.array([[1, *[IMAGE_ID] * (NUM_IMAGE_TOKENS - 1), 5, 6]])
    with pytest.raises(ValueError, match=r"row 0: expected 8 consecutive image placeholder ids \(256\).*found 7.*<im_patch> × 8"):
        model(images, jnp.asarray(bad))


def test_left_padded_batch_equals_single_rows(phi3_lamed, rng):
    _, model, _ = phi3_lamed
    images = rng.random((2, 1, 16, 64, 64), dtype=np.float32)
    long, short = _prompt(rng, 6), _prompt(rng, 2)
    ids = np.array([long, [0] * 4 + short])
    mask = np.array([[1] * len(long), [0] * 4 + [1] * len(short)])
    assert list(image_token_starts(ids, model.config)) == [1, 5]
    batched = np.asarray(model(jnp.asarray(images), jnp.asarray(ids), attention_mask=jnp.asarray(mask)).logits)
    single = np.asarray(model(jnp.asarray(images[1:]), jnp.asarray([short])).logits)
    np.testing.assert_allclose(batched[1, 4:], single[0], atol=1e-5)


def test_loss_matches_torch_definitions(phi3_lamed, rng):
    _, model, _ = phi3_lamed
    images = rng.random((2, 1, 16, 64, 64), dtype=np.float32)
    ids = np.array([_prompt(rng, 6) + [SEG_ID, 2], _prompt(rng, 6) + [7, 2]])
    labels = np.where(np.arange(ids.shape[1]) < NUM_IMAGE_TOKENS + 4, -100, ids)
    masks = np.zeros((2, 1, 16, 64, 64), np.float32)
    masks[0, :, 4:9, 10:30, 20:40] = 1  # only sample 0 carries a mask
    batch = dict(images=jnp.asarray(images), input_ids=jnp.asarray(ids), attention_mask=jnp.ones(ids.shape, jnp.int32),
                 labels=jnp.asarray(labels), seg_masks=jnp.asarray(masks))
    loss, metrics = lamed_loss(model, batch)

    out = model(batch["images"], batch["input_ids"])
    ce = F.cross_entropy(torch.from_numpy(np.array(out.logits[:, :-1])).reshape(-1, VOCAB),
                         torch.from_numpy(labels[:, 1:]).reshape(-1).long(), ignore_index=-100)
    prompts, has_seg = model.seg_prompts(out.last_hidden_state, jnp.concatenate([batch["input_ids"][:, 1:],
                                                                                 -jnp.ones((2, 1), jnp.int32)], 1))
    assert list(np.asarray(has_seg)) == [True, False]
    seg = torch.from_numpy(np.array(model.segment(batch["images"], prompts))[:1])
    target = torch.from_numpy(masks[:1])
    bce = F.binary_cross_entropy_with_logits(seg, target)
    p = torch.sigmoid(seg).flatten(1)
    dice = (1 - 2 * (p * target.flatten(1)).sum(1) / (p.sum(1) + target.flatten(1).sum(1) + 1)).mean()
    np.testing.assert_allclose(float(metrics["lm_loss"]), float(ce), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["bce"]), float(bce), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["dice_loss"]), float(dice), rtol=1e-5)
    np.testing.assert_allclose(float(loss), float(ce + bce + dice), rtol=1e-5)
    grads = nnx.grad(lambda m: lamed_loss(m, batch)[0])(model)
    assert np.isfinite(np.asarray(grads.seg_module.mask_decoder.txt_align_upscaled_embedding.kernel[...])).all()


def test_generation_segments_at_seg_and_matches_forward(phi3_lamed, rng):
    _, model, _ = phi3_lamed
    images = rng.random((2, 1, 16, 64, 64), dtype=np.float32)
    ids = np.array([_prompt(rng, 5), _prompt(rng, 5)])
    sampling = SamplingConfig(max_new_tokens=6, eos_token_ids=())
    plain = np.asarray(generate_lamed(model, images, ids, config=sampling).tokens)
    # A copy whose [SEG] output column outscores the token row 0 emits second: [SEG] is generated there.
    graphdef, state = nnx.split(model)
    forced = nnx.merge(graphdef, jax.tree.map(lambda x: x, state))
    head = forced.language_model.lm_head.kernel
    head[...] = jnp.asarray(head[...]).at[:, SEG_ID].set(1.05 * jnp.asarray(head[...])[:, plain[0, 1]])
    out = generate_lamed(forced, images, ids, config=sampling)
    tokens = np.asarray(out.tokens)
    seg_logits = np.asarray(out.seg_logits)
    assert seg_logits.shape == (2, 1, 16, 64, 64)
    for row in range(2):
        uses_seg = (tokens[row, 1:] == SEG_ID).any()  # a [SEG] as the first new token is not used
        if not uses_seg:
            assert np.isneginf(seg_logits[row]).all()
            continue
        assert np.isfinite(seg_logits[row]).all()
        # The same mask from a plain forward pass over prompt + generated tokens.
        full = np.concatenate([ids[row], tokens[row]])[None]
        hidden = forced(jnp.asarray(images[row:row + 1]), jnp.asarray(full)).last_hidden_state
        next_tokens = np.concatenate([full[:, 1:], [[-1]]], axis=1)
        next_tokens[:, : ids.shape[1]] = -1  # only generated positions count, as in the reference
        prompts, _ = forced.seg_prompts(hidden, jnp.asarray(next_tokens))
        expected = np.asarray(forced.segment(jnp.asarray(images[row:row + 1]), prompts))
        np.testing.assert_allclose(seg_logits[row:row + 1], expected, atol=1e-4)
    assert tokens[0, 1] == SEG_ID, tokens


@pytest.mark.parametrize("architecture,segmentation", [("phi3", True), ("llama", False)])
def test_released_layout_round_trip_is_bit_identical(architecture, segmentation, tmp_path):
    reference = tiny_torch_lamed(architecture, segmentation)
    _save_released(reference, tmp_path / "src")
    model, report = read_released(tmp_path / "src")
    assert report.ignored == []
    export(model, tmp_path / "out", max_shard_bytes=1_000_000)
    original = reference.released_state_dict()
    reader = CheckpointReader(tmp_path / "out")
    assert sorted(reader.keys()) == sorted(original)
    for key, tensor in original.items():
        np.testing.assert_array_equal(reader.read(key), tensor.numpy(), err_msg=key)
    exported_config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert LamedConfig.from_hf(exported_config) == model.config


def test_full_size_released_layout_has_617_tensors():
    decoder = dataclasses.replace(phi3_mini_4k(), vocab_size=32015)  # 32011 tokens + 4 added
    config = LamedConfig(decoder=decoder, image_token_id=32011, seg_token_id=32014)
    abstract = nnx.eval_shape(lambda: Lamed(config, rngs=nnx.Rngs(0)))
    shapes = torch_shapes(lamed_keymap(config), nnx.state(abstract))
    ours = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract)))
    assert len(shapes) == 617
    assert ours == sum(int(np.prod(s)) for s in shapes.values())
    assert 4.04e9 < ours < 4.06e9  # "≈4.05 B params"
    assert config.proj_out_num == 256
    llama = LamedConfig(decoder=dataclasses.replace(llama2_7b(), vocab_size=32004), image_token_id=32000,
                        seg_token_id=32003)
    abstract = nnx.eval_shape(lambda: Lamed(llama, rngs=nnx.Rngs(0)))
    assert 27.5e9 < 4 * sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(abstract))) < 28.3e9  # 27.9 GB


def test_language_model_export_loads_in_transformers(phi3_lamed, tmp_path, rng):
    reference, model, _ = phi3_lamed
    tokenizer = word_tokenizer(tmp_path / "tok", 256)
    add_lamed_tokens(tokenizer)
    export_language_model(model, tmp_path / "llm", tokenizer=tokenizer)
    llm, info = Phi3ForCausalLM.from_pretrained(tmp_path / "llm", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    ids = rng.integers(3, VOCAB, (1, 12))
    with torch.no_grad():
        theirs = llm(torch.from_numpy(ids)).logits.numpy()
    np.testing.assert_allclose(np.asarray(model.language_model(jnp.asarray(ids)).logits), theirs, atol=1e-4)


def test_tokenizer_added_tokens_and_prompt(tmp_path):
    tokenizer = word_tokenizer(tmp_path, 256)
    ids = add_lamed_tokens(tokenizer)
    assert (ids.image, ids.box_start, ids.box_end, ids.seg, ids.pad) == (256, 257, 258, 259, 0)
    assert len(tokenizer) == VOCAB
    assert tokenizer.convert_ids_to_tokens(259) == "[SEG]" and "[SEG]" not in tokenizer.all_special_tokens
    prompt = lamed_prompt_ids(tokenizer, " w5 w9", NUM_IMAGE_TOKENS)
    assert prompt[1:1 + NUM_IMAGE_TOKENS] == [256] * NUM_IMAGE_TOKENS and prompt[-2:] == [5, 9]


def test_embedding_resize_initialises_new_rows_with_the_mean(phi3_lamed):
    _, model, _ = phi3_lamed
    llm = model.language_model
    resized = resize_token_embeddings(llm, VOCAB + 3, num_new_tokens=3)
    table = np.asarray(resized.embed_tokens.embedding[...])
    np.testing.assert_array_equal(table[:VOCAB], np.asarray(llm.embed_tokens.embedding[...]))
    np.testing.assert_allclose(table[VOCAB:], np.broadcast_to(table[:VOCAB].mean(0), (3, table.shape[1])), rtol=1e-5,
                               atol=1e-7)
    head = np.asarray(resized.lm_head.kernel[...])
    np.testing.assert_allclose(head[:, VOCAB:], np.broadcast_to(head[:, :VOCAB].mean(1, keepdims=True), (64, 3)),
                               rtol=1e-5, atol=1e-7)
    cut = resize_token_embeddings(llm, VOCAB - 6, num_new_tokens=4)  # Phi-3: 32064 rows cut to 32015
    assert cut.embed_tokens.embedding[...].shape == (VOCAB - 6, 64)


@pytest.mark.parametrize("pooling_type,layer_type,layer_num", [("spatial", "linear", 1), ("sequence", "mlp", 3)])
def test_projector_variants_match_torch(pooling_type, layer_type, layer_num, rng):
    from m3d_jax.models.projector import ProjectorConfig, SpatialPoolingProjector

    config = ProjectorConfig(grid=(4, 4, 8), in_dim=16, out_dim=24, layer_type=layer_type, layer_num=layer_num,
                             pooling_type=pooling_type)
    model = SpatialPoolingProjector(config, rngs=nnx.Rngs(0))
    features = rng.normal(size=(2, 128, 16)).astype(np.float32)
    x = torch.from_numpy(features)
    if pooling_type == "spatial":
        pooled = F.avg_pool3d(x.transpose(1, 2).reshape(2, 16, 4, 4, 8), 2, 2).flatten(2).transpose(1, 2)
    else:
        pooled = F.avg_pool1d(x.transpose(1, 2), 8, 8).transpose(1, 2)
    for index, layer in enumerate(model.layers):
        if index and layer_type == "mlp":
            pooled = F.gelu(pooled)
        pooled = pooled @ torch.from_numpy(np.array(layer.kernel[...])) + torch.from_numpy(np.array(layer.bias[...]))
    assert config.proj_out_num == 16
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(features))), pooled.numpy(), atol=1e-5)


def test_released_layout_errors_name_the_key(phi3_lamed, tmp_path):
    from safetensors.torch import load_file

    from m3d_jax.convert import CheckpointMismatchError

    _, _, folder = phi3_lamed
    state = load_file(str(folder / "model.safetensors"))
    del state["model.seg_module.mask_decoder.txt_align_upscaled_embedding.weight"]
    state["model.mm_projector.projector.2.weight"] = state["model.mm_projector.projector.2.weight"][:, :5].contiguous()
    (tmp_path / "bad").mkdir()
    save_file(state, str(tmp_path / "bad" / "model.safetensors"))
    (tmp_path / "bad" / "config.json").write_text((folder / "config.json").read_text())
    with pytest.raises(CheckpointMismatchError) as error:
        read_released(tmp_path / "bad")
    message = str(error.value)
    assert "missing keys: model.seg_module.mask_decoder.txt_align_upscaled_embedding.weight" in message
    assert "model.mm_projector.projector.2.weight (file model.safetensors: [64, 5], expected [64, 64])" in message


def test_config_round_trips_and_names_unknown_keys(tmp_path):
    from m3d_jax.tokenizer import load_lamed_tokenizer

    med2e3_style = LamedConfig(vision=dataclasses.replace(VISION, select_final_norm=False), image_token_id=256,
                               seg_token_id=259)
    assert LamedConfig.from_hf(med2e3_style.to_hf()) == med2e3_style
    with pytest.raises(ValueError, match=r"unknown LamedConfig keys \['proj_layers'\]"):
        LamedConfig.from_dict({"proj_layers": 3})
    word_tokenizer(tmp_path, 256)
    tokenizer, ids = load_lamed_tokenizer(tmp_path)
    assert (ids.image, ids.seg, len(tokenizer)) == (256, 259, VOCAB)


def test_under_jit_the_image_starts_are_passed_not_guessed(phi3_lamed, rng):
    """One rule for LaMed and Med-2E3: abstract ids cannot be searched, so a jitted call without
    image_starts is an error; with them it matches the eager call, which finds the starts itself."""
    _, model, _ = phi3_lamed
    images = jnp.asarray(rng.random((2, 1, 16, 64, 64), dtype=np.float32))
    ids = jnp.asarray(np.array([_prompt(rng, 6), _prompt(rng, 6)]))
    with pytest.raises(ValueError, match="under jit, pass image_starts"):
        nnx.jit(lambda m, x, t: m(x, t).logits)(model, images, ids)
    jitted = nnx.jit(lambda m, x, t, s: m(x, t, image_starts=s).logits)(model, images, ids, jnp.ones(2, jnp.int32))
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(model(images, ids).logits), atol=1e-5)
