"""tools/slice_embeddings.py: cached 2D CLIP slice embeddings, checked against a tiny fake encoder."""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = pathlib.Path(__file__).parent.parent
SIZE, DIM = 8, 16

_spec = importlib.util.spec_from_file_location("tools_slice_embeddings", ROOT / "tools" / "slice_embeddings.py")
slice_embeddings = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = slice_embeddings  # dataclasses look their module up
_spec.loader.exec_module(slice_embeddings)


class FakeClip:
    """Fixed random linear maps: pixels → E and a bag of characters → E; records the batch sizes."""

    def __init__(self, dim: int = DIM, text_dim: int | None = None):
        generator = torch.Generator().manual_seed(0)
        self.image_map = torch.randn(SIZE * SIZE, dim, generator=generator, dtype=torch.float64)
        self.text_map = torch.randn(128, text_dim or dim, generator=generator, dtype=torch.float64)
        self.batches = []

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        assert not torch.is_grad_enabled()
        self.batches.append(len(images))
        return images.reshape(len(images), -1).double() @ self.image_map

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        assert not torch.is_grad_enabled()
        counts = torch.zeros(len(texts), 128, dtype=torch.float64)
        for row, text in enumerate(texts):
            for char in text:
                counts[row, ord(char) % 128] += 1
        return counts @ self.text_map


def load_image(path: str) -> torch.Tensor:
    with Image.open(path) as image:
        return torch.from_numpy(np.asarray(image, np.float32) / 255)


def _png(path: pathlib.Path, seed: int) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return str(path)


@pytest.fixture
def dataset(tmp_path):
    """data/slices.json with a 3-slice train volume and a 2-slice validation volume (paths relative)."""
    data = tmp_path / "data"
    (data / "volumes").mkdir(parents=True)
    spec = {"train": [("volumes/ct_a.nii.gz", [("Axial", 100), ("Coronal", 0), ("Sagittal", 255)])],
            "validation": [("volumes/ct_b.npy", [("Sagittal", 7), ("Axial", 3)])]}
    entries, seed = {}, 0
    for split, volumes in spec.items():
        entries[split] = []
        for volume, slices in volumes:
            with open(data / volume, "wb") as f:  # a file object: np.save keeps the name as given
                np.save(f, np.full((4, 4, 4), seed, np.float32))
            items = []
            for plane, index in slices:
                seed += 1
                image2d = f"png/{split}_{seed}.png"
                _png(data / image2d, seed)
                items.append({"plane": plane, "slice": index, "image2d": image2d,
                              "text": f"{plane} slice {index}: caption {seed} " + "x" * seed})
            entries[split].append({"image": volume, "slices": items})
    (data / "slices.json").write_text(json.dumps(entries))
    return data, entries


def _embed(data, entries, out, clip=None, batch_size=3):
    clip = clip or FakeClip()
    summary = slice_embeddings.embed_volumes(entries, str(data), clip.encode_image, clip.encode_text, load_image,
                                             str(out), batch_size=batch_size, source=str(data / "slices.json"))
    return clip, summary


def test_embeddings_match_per_slice_encoding(dataset, tmp_path):
    data, entries = dataset
    out = tmp_path / "out" / "emb"
    clip, summary = _embed(data, entries, out)
    assert clip.batches == [3, 2]  # the first batch spans both volumes
    assert summary.volumes == {"train": 1, "validation": 1} and summary.slices == {"train": 3, "validation": 2}
    assert summary.dim == DIM and summary.list_path == str(out / "insight.json")

    listing = json.loads((out / "insight.json").read_text())
    assert list(listing) == ["train", "validation"]
    for split, volumes in entries.items():
        assert len(listing[split]) == len(volumes)
        for entry, volume in zip(listing[split], volumes):
            assert os.path.samefile(out / entry["image"], data / volume["image"])
            assert not os.path.isabs(entry["image"]) and not os.path.isabs(entry["slices"])
            with np.load(out / entry["slices"]) as npz:
                arrays = dict(npz)
            n = len(volume["slices"])
            assert set(arrays) == {"plane", "slice", "image_embedding", "text_embedding", "text"}
            assert arrays["plane"].dtype == np.int64 and arrays["plane"].shape == (n,)
            assert arrays["slice"].dtype == np.int64 and arrays["slice"].shape == (n,)
            assert arrays["image_embedding"].dtype == np.float32 and arrays["image_embedding"].shape == (n, DIM)
            assert arrays["text_embedding"].dtype == np.float32 and arrays["text_embedding"].shape == (n, DIM)
            assert arrays["text"].dtype.kind == "U"
            expected_plane = [{"Axial": 0, "Coronal": 1, "Sagittal": 2}[s["plane"]] for s in volume["slices"]]
            np.testing.assert_array_equal(arrays["plane"], expected_plane)
            np.testing.assert_array_equal(arrays["slice"], [s["slice"] for s in volume["slices"]])
            assert arrays["text"].tolist() == [s["text"] for s in volume["slices"]]
            with torch.no_grad():
                for row, item in enumerate(volume["slices"]):
                    image = clip.encode_image(load_image(str(data / item["image2d"]))[None])[0].numpy()
                    text = clip.encode_text([item["text"]])[0].numpy()
                    np.testing.assert_allclose(arrays["image_embedding"][row], image, rtol=0, atol=1e-6)
                    np.testing.assert_allclose(arrays["text_embedding"][row], text, rtol=0, atol=1e-6)


def test_batch_size_does_not_change_results(dataset, tmp_path):
    data, entries = dataset
    _embed(data, entries, tmp_path / "a", batch_size=1)
    clip, _ = _embed(data, entries, tmp_path / "b", batch_size=64)
    assert clip.batches == [5]
    for name in os.listdir(tmp_path / "a"):
        if name.endswith(".npz"):
            with np.load(tmp_path / "a" / name) as a, np.load(tmp_path / "b" / name) as b:
                for key in a.files:
                    np.testing.assert_array_equal(a[key], b[key])


def _bad(entries, split, index, **changes):
    bad = json.loads(json.dumps(entries))
    bad[split][0]["slices"][index].update(changes)
    return bad


@pytest.mark.parametrize("split,index,changes,error,message", [
    ("train", 1, {"plane": "Oblique"}, ValueError, r"train\[0\] slices\[1\]: unknown plane 'Oblique'"),
    ("validation", 0, {"slice": -1}, ValueError, r"validation\[0\] slices\[0\]: slice must be an integer >= 0"),
    ("train", 2, {"slice": 3.0}, ValueError, r"train\[0\] slices\[2\]: slice must be an integer"),
    ("train", 0, {"text": "  "}, ValueError, r"train\[0\] slices\[0\]: text must be a non-empty string"),
    ("validation", 1, {"image2d": "png/missing.png"}, FileNotFoundError,
     r"validation\[0\] slices\[1\]: image2d not found: .*png/missing\.png"),
])
def test_bad_entries_are_named(dataset, tmp_path, split, index, changes, error, message):
    data, entries = dataset
    clip = FakeClip()
    with pytest.raises(error, match=message) as info:
        _embed(data, _bad(entries, split, index, **changes), tmp_path / "out", clip)
    assert str(data / "slices.json") in str(info.value)
    assert clip.batches == []  # validation happens before any encoding
    assert not (tmp_path / "out").exists()


def test_bad_volumes_and_splits(dataset, tmp_path):
    data, entries = dataset
    with pytest.raises(ValueError, match=r"unknown split 'dev'"):
        _embed(data, {"dev": entries["train"]}, tmp_path / "out")
    with pytest.raises(FileNotFoundError, match=r"train\[0\]: volume not found: .*gone\.nii\.gz"):
        _embed(data, {"train": [dict(entries["train"][0], image="gone.nii.gz")]}, tmp_path / "out")
    with pytest.raises(ValueError, match=r"validation\[0\]: slices must be a non-empty list"):
        _embed(data, {"validation": [dict(entries["validation"][0], slices=[])]}, tmp_path / "out")


def test_dim_mismatch(dataset, tmp_path):
    data, entries = dataset
    with pytest.raises(ValueError, match="embedding dims disagree: image 16, text 8"):
        _embed(data, entries, tmp_path / "out", FakeClip(DIM, text_dim=8))


def test_load_open_clip_uses_local_dir(tmp_path, monkeypatch):
    """The open_clip calls (names, kwargs, eval, context length) through a stand-in module."""
    model_dir = tmp_path / "BiomedCLIP"
    model_dir.mkdir()
    text_cfg = {"hf_model_name": "microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract",
                "hf_tokenizer_name": "microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract", "context_length": 256}
    (model_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"embed_dim": DIM,
                                                                              "text_cfg": text_cfg}}))
    calls = {}

    class Model:
        def eval(self):
            calls["eval"] = True

        def encode_image(self, images):
            return images.reshape(len(images), -1)[:, :DIM]

        def encode_text(self, tokens):
            return tokens.float()

    def create_model_and_transforms(name, device, **kwargs):
        calls["model"] = (name, device, kwargs)
        return Model(), None, lambda image: torch.from_numpy(np.asarray(image.convert("RGB"), np.float32))

    def get_tokenizer(name, context_length):
        calls["tokenizer"] = (name, context_length)
        return lambda texts, context_length: torch.full((len(texts), context_length), 1)

    fake = types.SimpleNamespace(__version__="3.0.0", create_model_and_transforms=create_model_and_transforms,
                                 get_tokenizer=get_tokenizer)
    monkeypatch.setitem(sys.modules, "open_clip", fake)
    with pytest.raises(FileNotFoundError, match="no tokenizer files"):
        slice_embeddings.load_open_clip(str(model_dir))
    (model_dir / "vocab.txt").write_text("[PAD]\n")
    (model_dir / "config.json").write_text("{}")
    encode_image, encode_text, load = slice_embeddings.load_open_clip(str(model_dir), "cpu", context_length=12)
    name = f"local-dir:{model_dir}"
    assert calls["eval"] and calls["tokenizer"] == (name, 12)
    assert calls["model"] == (name, "cpu", {"text_cfg": dict(text_cfg, hf_model_name=str(model_dir),
                                                             hf_model_pretrained=False)})
    assert encode_text(["a", "b"]).shape == (2, 12)
    image = load(_png(tmp_path / "x.png", 0))
    assert image.shape == (SIZE, SIZE, 3) and encode_image(image[None]).shape == (1, DIM)

    monkeypatch.setitem(sys.modules, "open_clip", types.SimpleNamespace(__version__="2.32.0"))
    with pytest.raises(ImportError, match=r"no 'local-dir:' schema; pip install 'open_clip_torch>=3\.0\.0'"):
        slice_embeddings.load_open_clip(str(model_dir))


def test_cli_without_open_clip(dataset, tmp_path):
    """The CLI checks the input, then stops with a pip hint when open_clip cannot be imported."""
    data, _ = dataset
    shadow = tmp_path / "shadow" / "open_clip"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError(\"No module named 'torchvision'\")\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(shadow.parent), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "tools/slice_embeddings.py", f"--slices={data / 'slices.json'}",
                             f"--model={tmp_path / 'model'}", f"--out={tmp_path / 'out'}"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "pip install open_clip_torch" in result.stderr and "torchvision" in result.stderr
    assert not (tmp_path / "out").exists()
