"""Med3DInsight on the trainer: pretraining on the phantom set's synthetic slice embeddings (sharded over
8 simulated devices; the segmentation head stays out of the optimiser; the export is the reference's
state dict), fine-tuning that export for segmentation and classification, the losses and metrics
against MONAI and torch, and the data's error messages."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
from flax import nnx

from conftest import recipe_config

from m3d_jax.data.pipeline import RecordError
from m3d_jax.data.volume import VolumeError

ROOT = pathlib.Path(__file__).parent.parent


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    from m3d_jax.data.phantoms import write_phantoms

    return write_phantoms(tmp_path_factory.mktemp("insight") / "phantoms", num_cases=64, seed=0)


def _train(tmp_path, config: str, *flags: str) -> list[dict]:
    command = [sys.executable, "-m", "m3d_jax.train", f"--config={ROOT / 'configs' / config}",
               f"--workdir={tmp_path}", "--config.progress=False", "--config.checkpoint.every=1000", *flags]
    result = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT,
                            env={**os.environ, "XLA_FLAGS": ""})
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]


@pytest.fixture(scope="module")
def pretrained(phantoms, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("pretrain")
    rows = _train(workdir, "med3dinsight.py:phantoms", f"--config.data.root={phantoms}", "--config.total_steps=16",
                  "--config.log_every=8", "--config.eval.loss_batches=1", "--config.eval.plan_batches=2")
    return workdir, rows


def test_pretraining_runs_sharded_keeps_the_segmentation_head_frozen_and_exports(pretrained):
    from m3d_jax.convert.med3dinsight import load_med3dinsight
    from m3d_jax.models.med3dinsight import Med3DInsight, Med3DInsightConfig

    workdir, rows = pretrained
    train = [row for row in rows if row["split"] == "train"]
    assert [row["step"] for row in train] == [8, 16]
    assert all(np.isfinite(row["loss"]) and row["samples_per_s"] > 0 for row in train)
    assert all(row["ot_image"] > 0 and row["reconstruction_mse"] > 0 for row in train)
    final = rows[-1]
    assert final["split"] == "eval" and 0 < final["plan_diagonal_image"] <= 0.95 + 1e-6
    config = recipe_config("med3dinsight", "phantoms")
    model_config = Med3DInsightConfig.from_dict(config.model.to_dict())
    exported, report = load_med3dinsight(workdir / "pytorch" / "model.pth", model_config)
    depths = model_config.backbone.depths
    assert len(report.ignored) == sum(depths) + sum(depths[:-1])  # one checked index buffer per window attention
    initial = Med3DInsight(model_config, rngs=nnx.Rngs(config.seed))
    # torch Adam skips `final` (no gradient); here it is outside the optimiser, so not even weight decay moves it
    assert np.array_equal(np.asarray(exported.backbone.final.kernel[...]), np.asarray(initial.backbone.final.kernel[...]))
    assert not np.array_equal(np.asarray(exported.backbone.res.kernel[...]), np.asarray(initial.backbone.res.kernel[...]))
    assert not np.array_equal(np.asarray(exported.L[...]), np.asarray(initial.L[...]))


def test_fine_tuning_starts_from_the_pretrained_backbone(pretrained, phantoms, tmp_path):
    from m3d_jax.convert.med3dinsight import load_med3dinsight
    from m3d_jax.models.med3dinsight import Med3DInsightConfig
    from m3d_jax.train import trainer

    workdir, _ = pretrained
    checkpoint = workdir / "pytorch" / "model.pth"
    pretraining = Med3DInsightConfig.from_dict(recipe_config("med3dinsight", "phantoms").model.to_dict())
    source, _ = load_med3dinsight(checkpoint, pretraining)
    for variant in ("segment_phantoms", "classify_phantoms"):
        config = recipe_config("med3dinsight_finetune", variant)
        config.data.root, config.init.backbone = str(phantoms), str(checkpoint)
        config.mesh.data, config.cpu_devices = 1, 0
        run = trainer.setup(config)
        ours = dict(nnx.to_flat_state(nnx.state(run.model.backbone.model_down, nnx.Param)))
        for path, variable in nnx.to_flat_state(nnx.state(source.backbone.model_down, nnx.Param)):
            assert np.array_equal(np.asarray(ours[path][...]), np.asarray(variable[...])), (variant, path)
    head = run.model.head.kernel[...]
    assert head.shape == (128, 2)  # left / right


@pytest.mark.parametrize("variant", ["segment_phantoms", "classify_phantoms"])
def test_fine_tuning_trains_and_reports_its_metric(pretrained, phantoms, tmp_path, variant):
    workdir, _ = pretrained
    rows = _train(tmp_path, f"med3dinsight_finetune.py:{variant}", f"--config.data.root={phantoms}",
                  f"--config.init.backbone={workdir / 'pytorch' / 'model.pth'}", "--config.total_steps=6",
                  "--config.log_every=3")
    train = [row for row in rows if row["split"] == "train"]
    assert all(np.isfinite(row["loss"]) for row in train)
    final = rows[-1]
    if variant.startswith("segment"):
        assert {"dice_background", "dice_body", "dice_lesion", "dice_mean_foreground"} <= final.keys()
        assert all(0.0 <= final[key] <= 1.0 for key in ("dice_background", "dice_body", "dice_lesion"))
        assert final["dice_background"] > 0.5  # the body/background split is learned within a few steps
    else:
        assert 0.0 <= final["accuracy"] <= 1.0
    state = torch.load(tmp_path / "pytorch" / "model.pth", weights_only=True)
    assert ("final.0.up.weight" in state) == variant.startswith("segment")
    assert ("head.weight" in state) == variant.startswith("classify")
    assert "psat.ps_pos" not in state and "model_down.layers.0.blocks.0.attn.relative_position_index" in state


def test_dice_ce_loss_matches_monai():
    from monai.losses import DiceCELoss

    from m3d_jax.losses.segmentation import dice_ce_loss

    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 3, 6, 5, 4)).astype(np.float32) * 2
    labels = rng.integers(0, 3, (2, 6, 5, 4))
    reference = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False, smooth_nr=1e-5,
                           smooth_dr=1e-5)(torch.from_numpy(logits), torch.from_numpy(labels[:, None]))
    ours, parts = dice_ce_loss(jnp.asarray(logits), jnp.asarray(labels))
    assert abs(float(ours) - float(reference)) <= 1e-6
    ce = torch.nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels))
    assert abs(float(parts["ce"]) - float(ce)) <= 1e-6


def test_per_class_dice_matches_monai_dice_metric():
    from monai.metrics import DiceMetric

    from m3d_jax.eval.metrics import per_class_dice

    rng = np.random.default_rng(1)
    predicted, labels = rng.integers(0, 3, (4, 7, 6, 5)), rng.integers(0, 3, (4, 7, 6, 5))
    labels[2][labels[2] == 2] = 0  # case 2 has no class 2: skipped for that class
    onehot = lambda x: torch.nn.functional.one_hot(torch.from_numpy(x), 3).permute(0, 4, 1, 2, 3)  # noqa: E731
    metric = DiceMetric(include_background=True, reduction="none", ignore_empty=True)
    reference = metric(onehot(predicted), onehot(labels)).numpy()
    ours = per_class_dice(predicted, labels, 3)
    assert np.isnan(ours[2, 2]) and np.isnan(reference[2, 2])
    np.testing.assert_allclose(ours, reference, atol=1e-6)


def test_coupled_weight_decay_matches_torch_adam():
    from m3d_jax.train.optim import OptimConfig, make_optimizer

    rng = np.random.default_rng(2)
    start, target = rng.normal(size=(4, 3)).astype(np.float32), rng.normal(size=(4, 3)).astype(np.float32)
    config = OptimConfig(learning_rate=1e-2, schedule="constant", weight_decay=0.1, weight_decay_mode="coupled",
                         decay_all=True, clip_norm=0.0)
    tx = make_optimizer(config)
    params = {"w": jnp.asarray(start)}
    state = tx.init(params)
    weight = torch.nn.Parameter(torch.from_numpy(start.copy()))
    adam = torch.optim.Adam([weight], lr=1e-2, weight_decay=0.1)
    for _ in range(5):
        grads = {"w": params["w"] - jnp.asarray(target)}
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        adam.zero_grad()
        weight.grad = weight.detach() - torch.from_numpy(target)
        adam.step()
    np.testing.assert_allclose(np.asarray(params["w"]), weight.detach().numpy(), atol=1e-6)


def test_bad_slice_records_and_labels_name_the_file(phantoms, tmp_path):
    from m3d_jax.data.insight_samples import FinetuneSampleSpec, InsightSampleSpec
    from m3d_jax.data.sources import ClassLabelSource, LabelMapSource, SliceEmbeddingSource

    with np.load(phantoms / "cases" / "case_0000" / "slices.npz") as arrays:
        kept = {k: arrays[k] for k in ("plane", "slice", "image_embedding")}
    np.savez(tmp_path / "broken.npz", **kept)
    (tmp_path / "list.json").write_text(json.dumps({"train": [
        {"image": str(phantoms / "cases" / "case_0000" / "image.nii.gz"), "slices": "broken.npz"}]}))
    with pytest.raises(VolumeError, match=r"broken.npz lacks the arrays \['text_embedding'\]"):
        SliceEmbeddingSource(tmp_path / "list.json")
    source = SliceEmbeddingSource(phantoms / "slices.json")
    record = dict(source[0], slice=300)
    with pytest.raises(RecordError, match=r"slices.npz row 0: slice position 300 outside \[0, 256\)"):
        InsightSampleSpec(image_size=(32, 32, 32), embedding_dim=64).transform(None, 0, 1)(0, record)
    with pytest.raises(RecordError, match="embeddings of size 64, the model's PSAT outputs 32"):
        InsightSampleSpec(image_size=(32, 32, 32), embedding_dim=32).transform(None, 0, 1)(0, source[0])
    labels = LabelMapSource(phantoms / "labels.json")
    with pytest.raises(RecordError, match=r"labels.nii.gz: label values 0, 1, 2 are not class ids in 0..1"):
        FinetuneSampleSpec((32, 32, 32), "segment", 2).transform(None, 0, 1)(0, labels[0])
    (tmp_path / "classes.json").write_text(json.dumps({"labels": {"0": "a", "1": "b"}, "training": [
        {"image": str(phantoms / "cases" / "case_0000" / "image.nii.gz"), "label": 5}]}))
    with pytest.raises(VolumeError, match=r"classes.json \[training\]\[0\]: label 5 is not a class id in 0..1"):
        ClassLabelSource(tmp_path / "classes.json")
