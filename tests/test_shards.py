"""Prepared shards: records read back equal the online preparation within the storage's stated error, a
pipeline reads the same samples from shards as from the raw files, interrupted preparation resumes, bad
records are named or listed, and an fsspec URL (in-memory) works through the local cache."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
from conftest import word_tokenizer
from ml_collections import ConfigDict

from m3d_jax.data import shards
from m3d_jax.data.lamed_samples import LamedSampleSpec
from m3d_jax.data.phantoms import write_phantoms
from m3d_jax.data.pipeline import build_mixture, build_source, iterate
from m3d_jax.data.prepared import prepare_record
from m3d_jax.data.shard_writer import prepare_shards
from m3d_jax.errors import RecordError, VolumeError
from m3d_jax.tokenizer import add_lamed_tokens

SIZE = (8, 16, 16)
ENTRIES = [dict(kind="cap", path="cap.json", split="train"), dict(kind="vqa_closed", path="vqa_train.csv", split=""),
           dict(kind="seg", path="seg.json", split="training"), dict(kind="rec", path="seg.json", split="training"),
           dict(kind="refseg", path="refseg.csv", split=""), dict(kind="label_map", path="labels.json", split=""),
           dict(kind="class_label", path="classes.json", split="")]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    return write_phantoms(tmp_path_factory.mktemp("phantoms"), num_cases=6, seed=5, shape=(16, 32, 32))


@pytest.fixture(scope="module")
def prepared(phantoms, tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    settings = shards.Settings(SIZE, storage="uint8")
    return out, prepare_shards(ENTRIES, str(phantoms), str(out), settings, records_per_shard=4)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    tok = word_tokenizer(tmp_path_factory.mktemp("tok"), 256)
    add_lamed_tokens(tok)
    return tok


def _read_all(out, entry, settings):
    source = shards.open_source(str(out), entry, _default_split(entry), settings)
    return [source[i] for i in range(len(source))]


def _default_split(entry):
    from m3d_jax.data.pipeline import SOURCES

    return SOURCES[entry["kind"]][1]


@pytest.mark.parametrize("storage, bound", [("uint8", 1 / 510), ("bfloat16", 2.0 ** -9)])
def test_records_read_back_equal_the_online_preparation_within_the_stated_error(phantoms, tmp_path, storage, bound):
    settings = shards.Settings(SIZE, storage=storage)
    manifest = prepare_shards(ENTRIES, str(phantoms), str(tmp_path), settings, records_per_shard=4)
    assert manifest["image_error_bound"] == pytest.approx(bound)
    worst = 0.0
    for entry in ENTRIES:
        raw = build_source(entry, str(phantoms)).records
        stored = _read_all(tmp_path, entry, settings)
        assert len(stored) == len(raw) > 0
        for record, back in zip(raw, stored):
            image, mask = prepare_record(record, SIZE)
            worst = max(worst, float(np.abs(back["prepared"]["image"] - image).max()))
            if mask is None:
                assert "mask" not in back["prepared"]
            else:  # binary masks and label maps are stored exactly
                np.testing.assert_array_equal(back["prepared"]["mask"], mask)
            assert {k: v for k, v in back.items() if k != "prepared"} == {
                k: (str(v) if k in shards.PATH_FIELDS else v) for k, v in record.items()}
    assert 0 < worst <= bound * (1 + 1e-6)


def test_manifest_counts_and_checksums(phantoms, prepared):
    out, manifest = prepared
    assert manifest["settings"] == {"image_size": list(SIZE), "window": None, "in_channels": 1, "storage": "uint8"}
    assert json.loads((out / "manifest.json").read_text()) == manifest
    for source in manifest["sources"]:
        assert source["written"] == source["records"] == sum(s["records"] for s in source["shards"])
        assert len(source["shards"]) == -(-source["records"] // 4)
        for shard in source["shards"]:
            assert shards.sha256(str(out / shard["file"])) == shard["sha256"]
    assert [s["key"] for s in manifest["sources"]][:3] == ["cap:cap.json:train", "vqa_closed:vqa_train.csv:",
                                                           "seg:seg.json:training"]
    # Each distinct volume is stored once, however many records (VQA rows, Seg classes, tasks) use it.
    distinct = {str(r["image"]) for e in ENTRIES for r in build_source(e, str(phantoms)).records}
    images = manifest["images"]
    assert images["written"] == images["distinct"] == len(distinct) < sum(s["records"] for s in manifest["sources"])
    assert sum(s["records"] for s in images["shards"]) == len(distinct)


def test_a_pipeline_reads_the_same_samples_from_shards_as_from_raw_files(phantoms, prepared, tokenizer):
    out, _ = prepared
    spec = LamedSampleSpec(image_size=SIZE, proj_out_num=4, image_token_id=tokenizer.convert_tokens_to_ids(
        "<im_patch>"), max_length=48)
    sources = [ConfigDict(dict(e, weight=w)) for e, w in zip(ENTRIES[:5], (1.0, 2.0, 1.0, 0.5, 0.5))]
    raw = ConfigDict(dict(root=str(phantoms), batch_size=4, sources=sources))
    from_shards = ConfigDict(dict(raw.to_dict(), root="/nonexistent", shards=str(out)))
    a, b = iterate(build_mixture(raw, tokenizer, spec, seed=7)), iterate(build_mixture(from_shards, tokenizer, spec,
                                                                                       seed=7))
    for _ in range(4):
        x, y = next(a), next(b)
        for key in ("sample_index", "input_ids", "labels", "attention_mask", "image_starts"):
            np.testing.assert_array_equal(x[key], y[key])
        # The same augmentation: the storage error, scaled at most by the intensity scale.
        assert np.abs(x["images"] - y["images"]).max() <= (1 + spec.augment.scale) / 510 + 1e-6
        np.testing.assert_array_equal(x["seg_masks"], y["seg_masks"])
    resumed = iterate(build_mixture(from_shards, tokenizer, spec, seed=7), state=b.get_state())
    expected, got = next(b), next(resumed)
    for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])

    other = dataclasses.replace(spec, image_size=(8, 32, 32))
    with pytest.raises(shards.ShardError, match=r"image_size \(8, 16, 16\) \(pipeline: \(8, 32, 32\)\)"):
        build_mixture(from_shards, tokenizer, other, seed=7)
    missing = ConfigDict(dict(from_shards.to_dict(), sources=[dict(kind="vqa_open", path="vqa_train.csv")]))
    with pytest.raises(shards.ShardError, match="no source vqa_open:vqa_train.csv:"):
        build_mixture(missing, tokenizer, spec, seed=7)


def test_an_interrupted_preparation_keeps_finished_shards_and_redoes_the_rest(phantoms, tmp_path):
    settings = shards.Settings(SIZE)
    entries = ENTRIES[:2]
    first = prepare_shards(entries, str(phantoms), str(tmp_path), settings, records_per_shard=3, workers=2)
    files = sorted(tmp_path.glob("*/*.array_record"))
    stamps = {f: f.stat().st_mtime_ns for f in files}
    # An interruption: one shard never got its sidecar, another was left half-written, the manifest is missing.
    files[0].with_suffix(".json").unlink()
    files[1].with_suffix(".json").unlink()
    files[1].write_bytes(files[1].read_bytes()[:100])
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(shards.ShardError, match="no manifest"):
        shards.read_manifest(str(tmp_path))
    second = prepare_shards(entries, str(phantoms), str(tmp_path), settings, records_per_shard=3)
    assert [f.stat().st_mtime_ns == stamps[f] for f in files[:3]] == [False, False, True]
    assert all(f.stat().st_mtime_ns == stamps[f] for f in files[2:])
    strip = lambda m: [{k: v for k, v in s.items()} for s in m["sources"]]  # noqa: E731
    assert strip(second) == strip(first)


def test_a_bad_record_is_named_or_listed_in_the_manifest(phantoms, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(phantoms, root)
    cases = sorted((root / "cases").iterdir())
    (cases[1] / "image.nii.gz").write_bytes(b"not a volume")
    entry = dict(kind="cap", path="cap.json", split="train")
    with pytest.raises(VolumeError, match=rf"{cases[1].name}/image.nii.gz"):
        prepare_shards([entry], str(root), str(tmp_path / "stop"), shards.Settings(SIZE))
    manifest = prepare_shards([entry], str(root), str(tmp_path / "skip"), shards.Settings(SIZE),
                              skip_bad_records=True)
    (source,) = manifest["sources"]
    assert source["written"] == source["records"] - 1
    (skipped,) = source["skipped"]
    assert skipped["image"].endswith(f"{cases[1].name}/image.nii.gz")
    assert skipped["error"].startswith("its image was skipped: ") and "image.nii.gz" in skipped["error"]
    assert [s["image"] for s in manifest["images"]["skipped"]] == [skipped["image"]]
    # A mask that does not fit its image: the record is named (without skipping) or listed.
    seg = dict(kind="seg", path="seg.json", split="training")
    shutil.copy(phantoms / "cases" / cases[1].name / "image.nii.gz", cases[1] / "image.nii.gz")
    (cases[2] / "lesion_mask.nii.gz").write_bytes((cases[3] / "image.nii.gz").read_bytes()[:50])
    with pytest.raises(RecordError, match=rf"record \d+ of seg:seg.json:training: .*{cases[2].name}/lesion_mask"):
        prepare_shards([seg], str(root), str(tmp_path / "seg_stop"), shards.Settings(SIZE))
    assert len(shards.open_source(str(tmp_path / "skip"), entry, "train", shards.Settings(SIZE))) == source["written"]


def test_shards_on_an_fsspec_url_are_read_through_a_checked_local_cache(phantoms, tmp_path):
    import fsspec

    url = "memory://bucket/m3d-shards"
    entry = ENTRIES[1]
    settings = shards.Settings(SIZE)
    prepare_shards([entry], str(phantoms), url, settings, records_per_shard=5)
    source = shards.open_source(url, entry, "", settings, cache=str(tmp_path / "cache"))
    local = sorted(tmp_path.glob("cache/*/*/*.array_record"))
    manifest = shards.read_manifest(url)
    assert len(local) == len(manifest["sources"][0]["shards"]) + len(manifest["images"]["shards"]) > 2
    raw = build_source(entry, str(phantoms)).records
    assert [source[i]["question"] for i in range(len(source))] == [r["question"] for r in raw]
    # A damaged remote shard is refused by checksum, not read.
    fs = fsspec.filesystem("memory")
    name = "/" + url.removeprefix("memory://") + "/" + shards.read_manifest(url)["sources"][0]["shards"][0]["file"]
    fs.pipe(name, fs.cat(name)[:-1] + b"x")
    with pytest.raises(shards.ShardError, match="checksum differs"):
        shards.open_source(url, entry, "", settings, cache=str(tmp_path / "cache2"))
    fs.rm("/bucket", recursive=True)


def test_the_tool_prepares_a_training_config_with_its_eval_sources(phantoms, tmp_path):
    import subprocess
    import sys

    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "tools/prepare_data.py", "--config=configs/demo.py",
                             f"--config.data.root={phantoms}", "--image_size=8,16,16", f"--out={out}",
                             "--workers=1", "--records_per_shard=100"],
                            cwd=os.path.dirname(os.path.dirname(__file__)), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    keys = [s["key"] for s in shards.read_manifest(str(out))["sources"]]
    assert keys == ["vqa_closed:vqa_train.csv:", "vqa_closed:vqa_validation.csv:"]
    assert f"--config.data.shards={out}" in result.stdout
