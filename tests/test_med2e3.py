"""Med-2E3 against an independent torch composition written here (MONAI's ViT, transformers' SigLIP,
BERT and Phi-3, and a few lines of torch for TG-IS), and the released folder layout round trip."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from flax import nnx
from safetensors.torch import load_file, save_file

from conftest import make_monai_vit, prefixed_state_dict
from m3d_jax.convert.keymap import CheckpointMismatchError
from m3d_jax.convert import CheckpointReader, export, read_released
from m3d_jax.convert.med2e3 import PARTS, read_without_text_mlp
from m3d_jax.models.med2e3 import image_placeholder_starts, slice_scores
from m3d_jax.models.vit3d import ViT3DConfig

VOLUME = (32, 32, 32)  # 32 slices (4 depth groups of 8), 32×32 slices
VIT = ViT3DConfig(image_size=VOLUME, patch_size=(4, 16, 16), hidden_size=48, mlp_dim=96, num_layers=2, num_heads=4)
BERT = dict(vocab_size=99, hidden_size=40, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=32)
SIGLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8, num_channels=3)
PHI3 = dict(vocab_size=120, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
EMBED = PHI3["hidden_size"]
NUM_3D, NUM_2D = 4, 16  # pooled (4, 1, 1) grid; (32 / 8)² SigLIP patches


def _randomise(module: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    with torch.no_grad():
        for name, parameter in module.named_parameters():
            if "norm" in name.lower():
                parameter.copy_(torch.randn_like(parameter) * 0.1 + (1.0 if name.endswith("weight") else 0.0))
            elif name.endswith("bias"):
                parameter.normal_(0, scale)
    return module.eval()


class TorchMed2E3(torch.nn.Module):
    """The Med-2E3 forward (exp 4) from the reference description, on independent building blocks."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.vit = make_monai_vit(VIT, seed=3)
        self.bert = _randomise(transformers.BertModel(transformers.BertConfig(**BERT)))
        self.siglip = _randomise(transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**SIGLIP)))
        self.llm = _randomise(transformers.Phi3ForCausalLM(transformers.Phi3Config(**PHI3)))
        self.connector2d = torch.nn.Sequential(torch.nn.Linear(SIGLIP["hidden_size"], EMBED), torch.nn.GELU(),
                                               torch.nn.Linear(EMBED, EMBED))
        self.connector3d = torch.nn.Sequential(torch.nn.Linear(VIT.hidden_size, EMBED), torch.nn.GELU(),
                                               torch.nn.Linear(EMBED, EMBED))
        self.text_mlp = torch.nn.Linear(BERT["hidden_size"], EMBED)
        # M3D-CLIP's projection heads and logit scale exist in the released folder but are unused here.
        self.mm_vision_proj = torch.nn.Linear(VIT.hidden_size, 24)
        self.mm_language_proj = torch.nn.Linear(BERT["hidden_size"], 24)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.5))

    @torch.no_grad()
    def visual(self, volume, question_ids, question_mask):
        batch = volume.shape[0]
        x = self.vit.patch_embedding(volume)
        x = torch.cat([self.vit.cls_token.expand(batch, -1, -1), x], dim=1)
        for block in self.vit.blocks:
            x = block(x)
        x = x[:, 1:]  # the last block's output, before the ViT's final norm, cls dropped
        grid = [s // p for s, p in zip(VIT.image_size, VIT.patch_size)]
        x = x.transpose(1, 2).reshape(batch, -1, *grid)
        x = F.avg_pool3d(x, kernel_size=2, stride=2).flatten(2).transpose(1, 2)
        x3d = self.connector3d(x)  # [B, 4, E]
        slices = volume.transpose(1, 2).reshape(batch * VOLUME[0], 1, *VOLUME[1:]).expand(-1, 3, -1, -1)
        hidden = self.siglip(pixel_values=slices, output_hidden_states=True).hidden_states[-1]
        v2d = self.connector2d(hidden).reshape(batch, VOLUME[0], NUM_2D, EMBED)
        text = self.text_mlp(self.bert(question_ids, attention_mask=question_mask).pooler_output)
        groups = x3d.reshape(batch, 4, NUM_3D // 4, EMBED).repeat_interleave(VOLUME[0] // 4, dim=1)
        summary = torch.cat([groups, v2d], dim=2).mean(dim=2)  # [B, 32, E]
        scores = torch.softmax(torch.bmm(summary, text[..., None]) / 5, dim=1)  # [B, 32, 1]
        fused = (v2d * scores[..., None]).sum(dim=1)
        return torch.cat([x3d, fused], dim=1), scores[..., 0]

    @torch.no_grad()
    def logits(self, visual, input_ids, start):
        embeds = self.llm.get_input_embeddings()(input_ids).clone()
        embeds[:, start:start + visual.shape[1]] = visual
        return self.llm(inputs_embeds=embeds).logits


def write_released(folder, reference: TorchMed2E3, *, text_mlp: bool = True) -> None:
    """The reference's save layout: one folder per part (connectors as pytorch_model.bin) + root config."""
    parts = {
        "llm": prefixed_state_dict(reference.llm),
        # Keys under "vision_model." as the reference (transformers 4.x) saved them; transformers 5 drops it.
        "vision2d_model": {"vision_model." + k.removeprefix("vision_model."): v
                           for k, v in prefixed_state_dict(reference.siglip).items()},
        "vision2d_connector": prefixed_state_dict(reference.connector2d, "_connector."),
        "vision3d_model": {**{k: v for k, v in prefixed_state_dict(reference.vit, "vision_encoder.").items()
                              if "cross_attn" not in k and "classification_head" not in k},
                           **prefixed_state_dict(reference.bert, "language_encoder."),
                           **prefixed_state_dict(reference.mm_vision_proj, "mm_vision_proj."),
                           **prefixed_state_dict(reference.mm_language_proj, "mm_language_proj."),
                           "logit_scale": reference.logit_scale.detach().clone()},
        "vision3d_connector": {**prefixed_state_dict(reference.connector3d, "_connector."),
                               **(prefixed_state_dict(reference.text_mlp, "text_mlp.") if text_mlp else {})},
    }
    for part, state in parts.items():
        os.makedirs(folder / part, exist_ok=True)
        if part.endswith("connector"):
            torch.save(state, folder / part / "pytorch_model.bin")
        else:
            save_file(state, str(folder / part / "model.safetensors"))
    config = dict(
        exp_id=4, llm_max_length=768, vision2d_select_layer=-1, vision2d_select_feature="cls_patch",
        vision3d_select_layer=-1, vision3d_select_feature="patch",
        vision3d_connector_config=dict(connector_type="spatial_pooling_score15_mlp2x_gelu"),
        llm_config=transformers.Phi3Config(**PHI3).to_dict(),
        vision2d_model_config=transformers.SiglipVisionConfig(**SIGLIP).to_dict(),
        vision3d_model_config=dict(model_type="m3d_clip", img_size=list(VOLUME), patch_size=[4, 16, 16],
                                   hidden_size=VIT.hidden_size, mlp_dim=VIT.mlp_dim, num_layers=VIT.num_layers,
                                   num_heads=VIT.num_heads, embed_dim=24, vocab_size=BERT["vocab_size"],
                                   text_config=dict(BERT, model_type="bert")),
        m3d_jax=dict(image_token_id=3),
    )
    (folder / "config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    folder = tmp_path_factory.mktemp("med2e3") / "released"
    reference = TorchMed2E3()
    write_released(folder, reference)
    return folder, reference


def _inputs():
    rng = np.random.default_rng(0)
    volume = rng.random((2, 1, *VOLUME), dtype=np.float32)
    question_ids = rng.integers(1, BERT["vocab_size"], (2, 10))
    question_mask = np.ones_like(question_ids)
    question_mask[1, 6:] = 0
    start = 5
    input_ids = rng.integers(4, PHI3["vocab_size"], (2, start + NUM_3D + NUM_2D + 7))
    input_ids[:, start:start + NUM_3D + NUM_2D] = 3  # the placeholder block
    return volume, question_ids, question_mask, input_ids, start


def test_med2e3_visual_path_scores_and_logits_match_the_torch_composition(released):
    folder, reference = released
    model, report = read_released(folder)
    volume, question_ids, question_mask, input_ids, start = _inputs()
    visual, scores = reference.visual(torch.from_numpy(volume), torch.from_numpy(question_ids),
                                      torch.from_numpy(question_mask))
    expected_logits = reference.logits(visual, torch.from_numpy(input_ids), start)
    run = nnx.jit(lambda m, *args: m.visual_tokens(*args))
    ours = run(model, jnp.asarray(volume), jnp.asarray(question_ids), jnp.asarray(question_mask))
    assert ours.tokens.shape == (2, NUM_3D + NUM_2D, EMBED)
    assert np.abs(np.asarray(ours.tokens[:, :NUM_3D]) - visual[:, :NUM_3D].numpy()).max() <= 1e-4  # 3D tokens
    assert np.abs(np.asarray(ours.tokens[:, NUM_3D:]) - visual[:, NUM_3D:].numpy()).max() <= 1e-4  # fused 2D
    assert np.abs(np.asarray(ours.slice_scores) - scores.numpy()).max() <= 1e-5
    assert np.allclose(np.asarray(ours.slice_scores).sum(axis=1), 1.0, atol=1e-6)
    starts = image_placeholder_starts(input_ids, model.config)
    assert starts.tolist() == [start, start]
    out = nnx.jit(lambda m, *args: m(*args[:4], image_starts=args[4]))(
        model, jnp.asarray(volume), jnp.asarray(input_ids), jnp.asarray(question_ids), jnp.asarray(question_mask),
        jnp.asarray(starts))
    assert np.abs(np.asarray(out.logits) - expected_logits.numpy()).max() <= 1e-4
    # every tensor of the five parts, text_mlp's included, converted
    assert report.converted == sum(len(CheckpointReader(folder / part).keys()) for part in PARTS) and not report.ignored


def test_slice_scores_follow_the_question_direction():
    """Slices whose 2D tokens align with the text get the weight; the 3D part is shared per depth group."""
    rng = np.random.default_rng(0)
    text = rng.normal(size=(1, 8))
    v2d = rng.normal(size=(1, 32, 5, 8)) * 0.1
    v2d[0, 13] += 2 * text[0]
    scores = np.asarray(slice_scores(jnp.zeros((1, 4, 8)), jnp.asarray(v2d), jnp.asarray(text), 4, 5.0))
    assert scores.argmax() == 13 and scores.sum() == pytest.approx(1.0, abs=1e-6)


def test_released_layout_round_trip_is_bit_identical_including_text_mlp(released, tmp_path):
    folder, _ = released
    model, _ = read_released(folder)
    export(model, tmp_path / "export")
    for part in PARTS:
        source = folder / part
        original = (torch.load(source / "pytorch_model.bin") if (source / "pytorch_model.bin").exists()
                    else load_file(str(source / "model.safetensors")))
        exported = load_file(str(tmp_path / "export" / part / "model.safetensors"))
        assert sorted(exported) == sorted(original), part
        assert all(torch.equal(exported[k], original[k]) for k in original), part
    assert "text_mlp.weight" in load_file(str(tmp_path / "export" / "vision3d_connector" / "model.safetensors"))
    again, _ = read_released(tmp_path / "export")  # our own root config.json reads back
    assert again.config == model.config


def test_missing_text_mlp_is_an_error_unless_initialisation_is_asked_for(tmp_path, caplog):
    write_released(tmp_path / "no_text_mlp", TorchMed2E3(), text_mlp=False)
    with pytest.raises(CheckpointMismatchError, match=r"(?s)vision3d_connector.*missing keys: text_mlp.bias, text_mlp"):
        read_released(tmp_path / "no_text_mlp")
    model, _ = read_without_text_mlp(tmp_path / "no_text_mlp")
    assert np.isfinite(np.asarray(model.vision3d_connector.text_mlp.kernel[...])).all()
    assert any("has no text_mlp" in record.getMessage() for record in caplog.records)
