"""Reference files and folders in the reference's own formats: Med-2E3 parity files with one −201 sentinel
per row (logits over the spliced sequence) and intermediate outputs, M3D-CLIP / Med-2E3 vision3d_model
folders whose BERT sizes only the tensor shapes record, and the BERT name kept through an export."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import make_monai_vit, prefixed_state_dict
from flax import nnx
from safetensors.torch import save_file
from test_med2e3 import EMBED, NUM_2D, NUM_3D, TorchMed2E3, _inputs, _randomise, write_released

from m3d_jax.convert import detect, export, read_released
from m3d_jax.models.clip import ClipConfig
from m3d_jax.models.med2e3 import Med2E3Config
from m3d_jax.models.vit3d import ViT3DConfig
from m3d_jax.parity import compare as parity
from m3d_jax.parity.reference import IMAGE3D_SENTINEL, ReferenceFileError, expand_image_sentinels, load_reference

PLACEHOLDER = 3  # write_released's m3d_jax.image_token_id
NUM_VISUAL = NUM_3D + NUM_2D
# A BERT no default describes: one layer, width 32 (one head at the assumed head width), MLP 48.
SMALL_BERT = dict(vocab_size=77, hidden_size=32, num_hidden_layers=1, num_attention_heads=1, intermediate_size=48,
                  max_position_embeddings=24, type_vocab_size=3)


def _spliced_logits(reference: TorchMed2E3, visual: torch.Tensor, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The reference's packing: each row's unmasked ids, the sentinel replaced by that row's visual rows,
    right-padded with zero embeddings and a rebuilt mask."""
    embed = reference.llm.get_input_embeddings()
    rows = []
    with torch.no_grad():
        for row in range(len(ids)):
            kept = torch.from_numpy(ids[row][mask[row] == 1])
            at = int((kept == IMAGE3D_SENTINEL).nonzero()[0, 0])
            rows.append(torch.cat([embed(kept[:at]), visual[row], embed(kept[at + 1:])]))
        embeds = torch.zeros(len(rows), max(map(len, rows)), EMBED)
        attention = torch.zeros(embeds.shape[:2], dtype=torch.long)
        for row, values in enumerate(rows):
            embeds[row, :len(values)], attention[row, :len(values)] = values, 1
        return reference.llm(inputs_embeds=embeds, attention_mask=attention).logits.numpy()


@pytest.fixture(scope="module")
def reference_form(tmp_path_factory):
    """(released folder, reference-form fields): row 0 of 12 ids with the sentinel at 5, row 1 with two
    masked (left-padding) ids and the sentinel at 7, so the spliced rows are 31 and 29 long."""
    folder = tmp_path_factory.mktemp("reference_form")
    reference = TorchMed2E3()
    write_released(folder / "released", reference)
    volume, question_ids, question_mask, _, _ = _inputs()
    ids = np.random.default_rng(1).integers(4, 120, (2, 12))
    mask = np.ones_like(ids)
    mask[1, :2], ids[1, :2] = 0, 0
    ids[0, 5] = ids[1, 7] = IMAGE3D_SENTINEL
    visual, scores = reference.visual(*map(torch.from_numpy, (volume, question_ids, question_mask)))
    fields = dict(image=volume, input_ids=ids, attention_mask=mask, question_ids=question_ids,
                  question_mask=question_mask, logits=_spliced_logits(reference, visual, ids, mask),
                  slice_scores=scores.numpy(), visual_tokens=visual.numpy())
    assert fields["logits"].shape[:2] == (2, 11 + NUM_VISUAL)
    return folder / "released", fields


def _rows(folder, path, fields) -> dict[str, bool]:
    np.savez(path, **fields)
    return {name: ok for name, *_, ok in parity.med2e3_rows(str(folder), str(path))}


def test_med2e3_parity_expands_one_sentinel_per_row_and_compares_the_spliced_logits_and_visual_tokens(
        reference_form, tmp_path, capsys):
    folder, fields = reference_form
    assert _rows(folder, tmp_path / "ref.npz", fields) == {"logits": True, "visual_tokens": True,
                                                           "slice_scores": True}
    assert "warning" not in capsys.readouterr().err


def test_med2e3_parity_fails_on_wrong_visual_tokens(reference_form, tmp_path):
    folder, fields = reference_form
    wrong = fields["visual_tokens"].copy()
    wrong[1, NUM_3D + 2, 5] += 0.01  # one fused 2D entry
    rows = _rows(folder, tmp_path / "wrong.npz", {**fields, "visual_tokens": wrong})
    assert rows == {"logits": True, "visual_tokens": False, "slice_scores": True}
    assert not parity.print_rows([("visual_tokens", "", "", "", False)])


def test_med2e3_parity_still_accepts_the_expanded_form_and_warns_on_unknown_fields(reference_form, tmp_path, capsys):
    folder, fields = reference_form
    ids, mask = expand_image_sentinels(fields["input_ids"], fields["attention_mask"], NUM_VISUAL, PLACEHOLDER)
    expected_row1 = [*fields["input_ids"][1, 2:7], *[PLACEHOLDER] * NUM_VISUAL, *fields["input_ids"][1, 8:], 0, 0]
    assert ids[1].tolist() == expected_row1 and mask[1].tolist() == [1] * 29 + [0, 0]
    expanded = {**fields, "input_ids": ids, "attention_mask": mask, "layer_3_hidden": np.zeros((2, 4))}
    assert _rows(folder, tmp_path / "expanded.npz", expanded) == {"logits": True, "visual_tokens": True,
                                                                  "slice_scores": True}
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warnings) == 1 and "layer_3_hidden" in warnings[0] and "expanded.npz" in warnings[0], warnings


def test_reference_form_errors_name_the_file_and_the_problem(reference_form, tmp_path):
    folder, fields = reference_form
    two = fields["input_ids"].copy()
    two[0, 8] = IMAGE3D_SENTINEL
    with pytest.raises(ReferenceFileError, match=r"row 0 holds 2 image sentinels"):
        expand_image_sentinels(two, None, NUM_VISUAL, PLACEHOLDER)
    np.savez(tmp_path / "short.npz", **{**fields, "logits": fields["logits"][:, :-3]})
    with pytest.raises(ReferenceFileError, match=r"short.npz: logits cover 28 positions, but input_ids with each "
                                                 r"-201 sentinel expanded to 20 visual rows gives 31"):
        parity.med2e3_rows(str(folder), str(tmp_path / "short.npz"))
    np.savez(tmp_path / "lamed.npz", image=fields["image"], input_ids=fields["input_ids"], logits=fields["logits"])
    with pytest.raises(ReferenceFileError, match="disagree on the batch / length"):  # LaMed has no sentinel form
        load_reference(tmp_path / "lamed.npz")


def _small_bert(seed: int) -> transformers.BertModel:
    torch.manual_seed(seed)
    return _randomise(transformers.BertModel(transformers.BertConfig(**SMALL_BERT)))


def _check_bert(model, bert: transformers.BertModel) -> None:
    """Our BERT's sizes and outputs (last hidden state and pooler) against transformers' on padded text."""
    config = model.config
    assert (config.num_layers, config.hidden_size, config.intermediate_size, config.num_heads, config.vocab_size,
            config.max_position_embeddings, config.type_vocab_size) == (1, 32, 48, 1, 77, 24, 3)
    rng = np.random.default_rng(0)
    ids, types = rng.integers(1, 77, (2, 9)), rng.integers(0, 3, (2, 9))
    mask = np.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        expected = bert(*map(torch.from_numpy, (ids, mask, types)))
    ours = nnx.jit(lambda m, *args: m(*args))(model, *map(jnp.asarray, (ids, mask, types)))
    valid = mask.astype(bool)
    assert np.abs(np.asarray(ours.last_hidden_state) - expected.last_hidden_state.numpy())[valid].max() <= 1e-5
    assert np.abs(np.asarray(ours.pooled) - expected.pooler_output.numpy()).max() <= 1e-5


def _assumed_heads_warning(caplog, where) -> None:
    messages = [record.getMessage() for record in caplog.records]
    assert any(str(where) in m and "BERT head count is not recorded; assuming 1 heads" in m for m in messages), messages


def test_m3d_clip_with_a_non_default_bert_loads_from_the_shapes_and_matches_transformers(tmp_path, caplog):
    vit = ViT3DConfig(image_size=(8, 32, 32), patch_size=(4, 16, 16), hidden_size=32, mlp_dim=64, num_layers=1,
                      num_heads=2)
    bert = _small_bert(seed=1)
    language_proj = torch.nn.Linear(32, 40)
    state = {**{k: v for k, v in prefixed_state_dict(make_monai_vit(vit), "vision_encoder.").items()
                if "cross_attn" not in k and "classification_head" not in k},
             **prefixed_state_dict(bert, "language_encoder."),
             **prefixed_state_dict(language_proj, "mm_language_proj."),
             **prefixed_state_dict(torch.nn.Linear(32, 40), "mm_vision_proj."), "logit_scale": torch.tensor(2.5)}
    (tmp_path / "clip").mkdir()
    save_file(state, str(tmp_path / "clip" / "model.safetensors"))
    # What M3DCLIPConfig records: the ViT, a BERT path, and a vocab_size its BERT does not use; no embed_dim.
    hf = dict(model_type="m3d_clip", language_model_name_or_path="org/bert-small", img_size=[8, 32, 32],
              patch_size=[4, 16, 16], hidden_size=32, mlp_dim=64, num_layers=1, num_heads=2, pos_embed="perceptron",
              max_text_len=16, vocab_size=30522)
    (tmp_path / "clip" / "config.json").write_text(json.dumps(hf))
    model, _ = read_released(tmp_path / "clip")
    _assumed_heads_warning(caplog, tmp_path / "clip")
    assert model.config.embed_dim == 40 and model.config.language_model_name_or_path == "org/bert-small"
    assert detect(tmp_path / "clip")[1] == model.config
    _check_bert(model.language_encoder, bert)
    ids, mask = np.array([[2, 9, 4, 7]]), np.array([[1, 1, 1, 0]])
    with torch.no_grad():
        cls = bert(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state[:, 0]
        expected = F.normalize(language_proj(cls), dim=-1).numpy()
    ours = nnx.jit(lambda m, *args: m.encode_text(*args))(model, jnp.asarray(ids), jnp.asarray(mask))
    assert np.abs(np.asarray(ours) - expected).max() <= 1e-5
    export(model, tmp_path / "export")  # the export records every size, and the BERT's name
    exported = json.loads((tmp_path / "export" / "config.json").read_text())
    assert exported["language_model_name_or_path"] == "org/bert-small"
    assert read_released(tmp_path / "export")[0].config == model.config


def test_med2e3_vision3d_model_with_a_non_default_bert_loads_from_the_shapes(tmp_path, caplog):
    reference = TorchMed2E3()
    reference.bert = _small_bert(seed=2)
    reference.mm_language_proj = torch.nn.Linear(32, 24)  # [embed_dim, BERT width]
    reference.text_mlp = torch.nn.Linear(32, EMBED)
    write_released(tmp_path / "released", reference)
    config_path = tmp_path / "released" / "config.json"
    hf = json.loads(config_path.read_text())
    for key in ("text_config", "embed_dim", "vocab_size"):  # what the released vision3d_model_config lacks
        hf["vision3d_model_config"].pop(key)
    config_path.write_text(json.dumps(hf))
    model, _ = read_released(tmp_path / "released")
    _assumed_heads_warning(caplog, tmp_path / "released" / "vision3d_model")
    assert model.config.vision3d.embed_dim == 24
    _check_bert(model.vision3d_model.language_encoder, reference.bert)
    ids, mask = np.array([[2, 9, 4, 7, 5]]), np.array([[1, 1, 1, 1, 0]])
    with torch.no_grad():
        expected = reference.text_mlp(reference.bert(torch.from_numpy(ids), torch.from_numpy(mask)).pooler_output)
    text = nnx.jit(lambda m, *args: m.vision3d_connector.text_mlp(m.vision3d_model.language_encoder(*args).pooled))
    assert np.abs(np.asarray(text(model, jnp.asarray(ids), jnp.asarray(mask))) - expected.numpy()).max() <= 1e-5


def test_bert_name_round_trips_through_the_clip_and_med2e3_configs():
    hf = dict(model_type="m3d_clip", language_model_name_or_path="./LaMed/pretrained_model/bert_base_uncased/",
              img_size=[32, 256, 256], patch_size=[4, 16, 16])
    config = ClipConfig.from_hf(hf)
    assert config.language_model_name_or_path == hf["language_model_name_or_path"]
    assert ClipConfig.from_hf(config.to_hf()) == config
    assert ClipConfig.from_hf({k: v for k, v in hf.items() if k != "language_model_name_or_path"}
                              ).language_model_name_or_path == "bert-base-uncased"
    med2e3 = Med2E3Config(vision3d=config)
    assert med2e3.to_hf()["vision3d_model_config"]["language_model_name_or_path"] == hf["language_model_name_or_path"]
    assert Med2E3Config.from_hf(med2e3.to_hf()) == med2e3
