"""Phantoms, M3D-Data sources, augmentation, tokenization and the Grain pipeline's determinism/resume."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import word_tokenizer

from m3d_jax.data.augment import AugmentConfig, augment, record_rng
from m3d_jax.data.phantoms import write_phantoms
from m3d_jax.data.lamed_samples import LamedSampleSpec, LamedTransform
from m3d_jax.data.pipeline import batched, source_dataset, source_samples
from m3d_jax.data.prompts import box_from_mask, box_text, tokenize_sample
from m3d_jax.data.sources import CaptionSource, VQASource
from m3d_jax.data.volume import VolumeError, load_volume
from m3d_jax.tokenizer import add_lamed_tokens


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return write_phantoms(tmp_path_factory.mktemp("phantoms"), num_cases=10, seed=3, shape=(16, 32, 32))


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    tok = word_tokenizer(tmp_path_factory.mktemp("tok"), 256)
    add_lamed_tokens(tok)
    return tok


def test_phantoms_are_deterministic_and_answerable(tmp_path, phantoms):
    again = write_phantoms(tmp_path, num_cases=10, seed=3, shape=(16, 32, 32))
    assert (again / "cap.json").read_text() == (phantoms / "cap.json").read_text()
    np.testing.assert_array_equal(load_volume(again / "cases/case_0004/image.nii.gz").array,
                                  load_volume(phantoms / "cases/case_0004/image.nii.gz").array)
    from scipy import ndimage

    words = {"one": 1, "two": 2, "three": 3}
    for record in VQASource(phantoms / "vqa_train.csv", closed=False).records:
        mask = load_volume(record["image"].replace("image.nii.gz", "lesion_mask.nii.gz")).array[0] > 0
        if record["question"].startswith("How many"):
            components = ndimage.label(mask)[1]
            assert 1 <= components <= words[record["answer"]]  # touching lesions may merge
        else:  # "On which side is the largest / brightest lesion?": lesion voxels lie on that side
            width = mask.shape[2]
            half = mask[:, :, : width // 2] if record["answer"] == "left" else mask[:, :, width // 2:]
            assert half.any(), record


def test_sources_parse_layouts_and_name_bad_rows(phantoms, tmp_path):
    captions = CaptionSource(phantoms / "cap.json", "train")
    assert len(captions) == 7 and captions[0]["answer"].startswith("There ")
    closed = VQASource(phantoms / "vqa_train.csv")
    assert closed[0]["question"].endswith(tuple(f"D. {w}" for w in ("one", "two", "three", "four", "left", "right",
                                                                   "middle", "none")))
    assert closed[0]["answer"][:3] in ("A. ", "B. ", "C. ", "D. ")
    assert VQASource(phantoms / "vqa_train.csv", closed=False)[0]["answer"] in ("one", "two", "three", "left", "right")
    bad = (phantoms / "vqa_train.csv").read_text().splitlines()
    bad[2] = bad[2].replace("cases/", "missing/", 1)
    (tmp_path / "bad.csv").write_text("\n".join(bad))
    (tmp_path / "cases").symlink_to(phantoms / "cases")
    with pytest.raises(VolumeError, match=r"bad\.csv line 3: file 'missing/.*' not found"):
        VQASource(tmp_path / "bad.csv")


def test_augmentation_is_seeded_and_co_transforms_masks():
    image = np.random.default_rng(0).random((1, 8, 16, 16)).astype(np.float32)
    mask = (image > 0.7).astype(np.uint8)
    outs = [augment(image, mask, record_rng(7, 1, index)) for index in range(40)]
    again = augment(image, mask, record_rng(7, 1, 5))
    np.testing.assert_array_equal(again[0], outs[5][0])
    assert any(not np.array_equal(out[0].shape, image.shape) or not np.allclose(out[0], image) for out in outs)
    for out_image, out_mask in outs:
        # Intensity changes are affine (a·x + b), so the mask still marks the same voxels' ranking.
        bright = out_image > np.quantile(out_image, 1 - mask.mean())
        assert (bright == (out_mask > 0)).mean() > 0.99


def test_flip_axes_keep_left_and_right():
    image = np.random.default_rng(0).random((1, 4, 6, 8)).astype(np.float32)
    config = AugmentConfig(rotate90_prob=0.0, flip_prob=1.0, flip_axes=(1, 2), scale_prob=0.0, shift_prob=0.0)
    flipped, _ = augment(image, None, record_rng(0, 0, 0), config)
    np.testing.assert_array_equal(flipped, image[:, ::-1, ::-1, :])  # D and H flipped, W (left/right) kept
    everything, _ = augment(image, None, record_rng(0, 0, 0), dataclasses.replace(config, flip_axes=(1, 2, 3)))
    np.testing.assert_array_equal(everything, image[:, ::-1, ::-1, ::-1])
    with pytest.raises(ValueError, match=r"flip_axes \(0, 1\)"):
        AugmentConfig(flip_axes=(0, 1))


def test_tokenized_sample_masks_prompt_and_padding(tokenizer):
    sample = tokenize_sample(tokenizer, "w5 w6", "w7 w8", proj_out_num=4, max_length=14, image_token_id=256)
    ids, labels = sample.input_ids.tolist(), sample.labels.tolist()
    assert ids[:5] == [1, 256, 256, 256, 256] and ids[5:7] == [5, 6]
    assert ids[7:10] == [7, 8, 2] and labels[7:10] == [7, 8, 2]  # answer + EOS supervised
    assert labels[:7] == [-100] * 7 and labels[10:] == [-100] * 4 and sample.attention_mask.sum() == 10
    assert box_text([0.1234, 0, 0.5, 0.25, 1, 0.75]) == "<bx_start>[0.123, 0.0, 0.5, 0.25, 1.0, 0.75]<bx_end>"
    mask = np.zeros((10, 20, 20))
    mask[2:5, 4:9, 10:20] = 1
    assert box_from_mask(mask) == [0.2, 0.2, 0.5, 0.4, 0.4, 0.95]


def _batches(dataset, count, state=None):
    iterator = iter(dataset.to_iter_dataset())
    if state is not None:
        iterator.set_state(state)
    return [next(iterator) for _ in range(count)], iterator.get_state()


def test_pipeline_is_deterministic_and_resumes_exactly(phantoms, tokenizer):
    spec = LamedSampleSpec(image_size=(16, 32, 32), proj_out_num=4, image_token_id=256, max_length=48)
    source = VQASource(phantoms / "vqa_train.csv")
    make = lambda seed: source_dataset(source, tokenizer, spec, seed=seed, batch_size=2)  # noqa: E731
    first, _ = _batches(make(0), 6)
    second, _ = _batches(make(0), 6)
    for a, b in zip(first, second):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    other, _ = _batches(make(1), 6)
    assert any(not np.array_equal(a["input_ids"], b["input_ids"]) for a, b in zip(first, other))
    head, state = _batches(make(0), 4)
    resumed, _ = _batches(make(0), 2, state)
    for a, b in zip(resumed, first[4:]):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    assert first[0]["images"].shape == (2, 1, 16, 32, 32) and first[0]["input_ids"].shape == (2, 48)
    assert np.isfinite(np.stack([b["images"] for b in first])).all()


def test_processes_load_disjoint_rows_of_the_same_global_batches(phantoms, tokenizer):
    spec = LamedSampleSpec(image_size=(16, 32, 32), proj_out_num=4, image_token_id=256, max_length=48, augment=None)
    source = VQASource(phantoms / "vqa_train.csv")
    whole = _batches(source_dataset(source, tokenizer, spec, seed=0, batch_size=4), 3)[0]
    parts = [_batches(source_dataset(source, tokenizer, spec, seed=0, batch_size=4, process_index=p,
                                    process_count=2), 3)[0] for p in range(2)]
    for step, batch in enumerate(whole):
        np.testing.assert_array_equal(batch["sample_index"], np.arange(4 * step, 4 * step + 4))
        for key in batch:
            np.testing.assert_array_equal(np.concatenate([parts[0][step][key], parts[1][step][key]]), batch[key])
    with pytest.raises(ValueError, match="global batch size 3 is not divisible by 2 processes"):
        source_dataset(source, tokenizer, spec, seed=0, batch_size=3, process_count=2)


SPEC = LamedSampleSpec(image_size=(16, 32, 32), proj_out_num=4, image_token_id=256, max_length=48)


def test_seg_refseg_and_positioning_samples(phantoms, tokenizer):
    from m3d_jax.data.sources import RefSegSource, SegSource

    seg = SegSource(phantoms / "seg.json", "training")
    assert len(seg) == 9 and seg[0]["target"] == "lesion" and seg[0]["mask_value"] == 1  # 9 non-test cases
    transform = LamedTransform(tokenizer, dataclasses.replace(SPEC, augment=None), seed=0, epoch_length=len(seg))
    sample = transform(0, seg[0])
    text = tokenizer.decode(sample["input_ids"][sample["attention_mask"] > 0])
    assert "[SEG]" in text and sample["seg_masks"].sum() > 0
    assert set(np.unique(sample["seg_masks"])) <= {0.0, 1.0}
    rec = transform(0, {**SegSource(phantoms / "seg.json", "training", task="rec")[0]})
    rec_text = tokenizer.decode(rec["input_ids"][rec["labels"] != -100])
    assert "<bx_start>" in rec_text and rec["seg_masks"].sum() == 0
    reg = transform(0, SegSource(phantoms / "seg.json", "training", task="reg")[0])
    prompt_part = reg["input_ids"][(reg["labels"] == -100) & (reg["attention_mask"] > 0)]
    assert 257 in prompt_part and 258 in prompt_part  # <bx_start> ... <bx_end> in the question
    refseg = RefSegSource(phantoms / "refseg.csv")
    assert transform(0, refseg[0])["seg_masks"].sum() > 0


def test_mixture_and_multiprocess_prefetch_give_the_same_batches(phantoms, tokenizer):
    from absl import flags

    from m3d_jax.data.pipeline import iterate, mix
    from m3d_jax.data.sources import SegSource

    flags.FLAGS(["test"])  # grain reads absl flags
    vqa = source_samples(VQASource(phantoms / "vqa_train.csv"), tokenizer, SPEC, seed=0)
    seg = source_samples(SegSource(phantoms / "seg.json", "training"), tokenizer, SPEC, seed=1)
    mixed = batched(mix([vqa, seg], [0.75, 0.25]), SPEC, batch_size=4)
    local = iterate(mixed)
    expected = [next(local) for _ in range(3)]
    assert expected[0]["seg_masks"].shape == (4, 1, 16, 32, 32)
    workers = iterate(mixed, workers=2)
    got = [next(workers) for _ in range(3)]
    for a, b in zip(expected, got):
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    del workers


def test_batches_become_global_arrays(phantoms, tokenizer):
    import jax

    from m3d_jax.data.pipeline import to_global_arrays
    from m3d_jax.sharding import MeshConfig, make_mesh

    batch = next(iter(source_dataset(VQASource(phantoms / "vqa_train.csv"), tokenizer, SPEC, seed=0,
                                    batch_size=2).to_iter_dataset()))
    arrays = to_global_arrays(batch, make_mesh(MeshConfig(data=len(jax.devices()))))
    np.testing.assert_array_equal(np.asarray(arrays["input_ids"]), batch["input_ids"])
    np.testing.assert_array_equal(np.asarray(arrays["images"]), batch["images"])


def _bad_inputs(root):
    """(file, record change, expected message) for each kind of bad input."""
    import gzip

    cases = []
    (root / "corrupt.nii.gz").write_bytes(gzip.compress(b"x" * 400)[:50])
    cases.append(("corrupt.nii.gz", {}, r"corrupt\.nii\.gz: cannot read NIfTI"))
    np.save(root / "trunc.npy", np.zeros((1, 16, 32, 32), np.float32))
    (root / "trunc.npy").write_bytes((root / "trunc.npy").read_bytes()[:300])
    cases.append(("trunc.npy", {}, r"trunc\.npy: cannot read \.npy"))
    np.save(root / "rank.npy", np.zeros((4, 4), np.float32))
    cases.append(("rank.npy", {}, r"rank\.npy: expected \[C, D, H, W\]"))
    np.save(root / "channels.npy", np.ones((3, 16, 32, 32), np.float32))
    cases.append(("channels.npy", {}, r"channels\.npy: 3 channels .*expected 1"))
    nan = np.ones((1, 16, 32, 32), np.float32)
    nan[0, 3, 3, 3] = np.nan
    np.save(root / "nan.npy", nan)
    cases.append(("nan.npy", {}, r"nan\.npy: volume contains NaN or Inf"))
    np.save(root / "complex.npy", np.ones((1, 16, 32, 32), np.complex64))
    cases.append(("complex.npy", {}, r"complex\.npy: unsupported voxel dtype complex64"))
    np.save(root / "ok.npy", np.random.default_rng(0).random((1, 16, 32, 32)).astype(np.float32))
    cases.append(("ok.npy", {"question": " ".join(["w9"] * 60)}, r"ok\.npy: prompt of \d+ tokens does not fit"))
    np.save(root / "small_mask.npy", np.ones((1, 8, 32, 32), np.float32))
    cases.append(("ok.npy", {"task": "refseg", "mask": str(root / "small_mask.npy"), "mask_value": 1},
                  r"small_mask\.npy: mask shape \(1, 8, 32, 32\) does not match image .*ok\.npy"))
    return cases


def test_each_bad_input_names_the_file_or_is_counted_when_skipping(tmp_path, tokenizer):
    from m3d_jax.data.pipeline import BadRecordLog, RecordError
    from m3d_jax.data.sources import _ListSource

    cases = _bad_inputs(tmp_path)
    strict = LamedTransform(tokenizer, SPEC, seed=0, epoch_length=1)
    for name, change, message in cases:
        record = {"task": "vqa_open", "image": str(tmp_path / name), "question": "w5", "answer": "w6", **change}
        with pytest.raises((VolumeError, RecordError), match=message):
            strict(0, record)
    good = {"task": "vqa_open", "image": str(tmp_path / "ok.npy"), "question": "w5", "answer": "w6"}
    records = [good] + [{**good, "image": str(tmp_path / n), **c} for n, c, _ in cases] + [good]
    lenient = dataclasses.replace(SPEC, skip_bad_records=True)
    log = BadRecordLog("test")
    samples = source_samples(_ListSource(records, "bad"), tokenizer, lenient, seed=0, num_epochs=1, bad_records=log)
    batches = list(batched(samples, lenient, batch_size=2))
    assert sum(log.skipped().values()) == len(cases)
    assert len(batches) == 1 and np.isfinite(batches[0]["images"]).all()


def test_iterator_state_round_trips_through_a_training_checkpoint(phantoms, tokenizer, tmp_path):
    import jax.numpy as jnp

    from m3d_jax.data.pipeline import iterate
    from m3d_jax.train.checkpoints import Checkpoints, abstract_like

    dataset = source_dataset(VQASource(phantoms / "vqa_train.csv"), tokenizer, SPEC, seed=0, batch_size=2)
    iterator = iterate(dataset)
    uninterrupted = [next(iterator) for _ in range(5)]
    iterator = iterate(dataset)
    for _ in range(3):
        next(iterator)
    state = {"w": jnp.arange(4.0)}
    with_async = Checkpoints(str(tmp_path / "ckpt"), every=1, keep=2)
    assert with_async.save(3, state, iterator, {"note": "x"})
    with_async.close()
    reader = Checkpoints(str(tmp_path / "ckpt"), every=1, keep=2)
    resumed = iterate(dataset)
    restored, meta = reader.restore(reader.latest_step(), abstract_like(state), resumed)
    assert meta == {"note": "x", "step": 3} and np.array_equal(restored["w"], np.arange(4.0))
    for expected in uninterrupted[3:]:
        got = next(resumed)
        for key in expected:
            np.testing.assert_array_equal(got[key], expected[key])
    reader.close()


def test_data_config_builds_a_mixture_over_the_phantoms(phantoms, tokenizer):
    import pathlib

    from absl import flags
    from ml_collections import config_flags

    from m3d_jax.data.pipeline import build_mixture, iterate

    path = pathlib.Path(__file__).parent.parent / "configs" / "data_m3d.py"
    argv = ["prog", f"--config={path}:phantoms", "--config.batch_size=2"]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_file("config", str(path), flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    config = flag_values.config
    config.root = str(phantoms)
    batch = next(iterate(build_mixture(config, tokenizer, SPEC, seed=0)))
    assert batch["input_ids"].shape == (2, 48) and batch["seg_masks"].shape == (2, 1, 16, 32, 32)
