"""Cache the frozen 2D CLIP slice embeddings that Med3DInsight pretrains against.

  python tools/slice_embeddings.py --slices=slices.json --model=BiomedCLIP/ --out=embeddings/ \
      [--batch_size=64] [--device=cpu] [--context_length=256]

The reference embeds every (volume, plane, slice) online with a frozen BiomedCLIP
(hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224 in open_clip), in eval() under no_grad:
model.encode_image(preprocess_val(PIL.Image.open(image2d))) and model.encode_text(tokenizer(text,
context_length=256)), both un-normalised. The encoder is frozen and the val transform deterministic, so
this tool computes them once.

Input (--slices; paths relative to its folder):
  {"train": [{"image": "vol.nii.gz", "slices": [{"plane": "Axial", "slice": 100, "image2d": "a.png",
                                                   "text": "caption"}, ...]}, ...], "validation": [...]}
Output (--out): one .npz per volume (plane int64 [N] with Axial 0, Coronal 1, Sagittal 2; slice int64 [N];
image_embedding and text_embedding float32 [N, E]; text unicode [N]) and insight.json, the list
{"train": [{"image": ..., "slices": ...}], ...} with both paths relative to --out.

--model is a local folder in the HF-hub layout (open_clip_config.json + open_clip_pytorch_model.bin),
loaded with open_clip's 'local-dir:' schema (open_clip_torch >= 3.0.0; it needs torchvision). That schema
builds the tokenizer from the folder itself, so for BiomedCLIP the folder also needs the tokenizer files of
the config's hf_tokenizer_name (microsoft/BiomedNLP-PubMedBERT-base-uncased-abstract: vocab.txt,
tokenizer_config.json, ...). The text tower's architecture comes from transformers' config of
hf_model_name: from the folder's config.json when there is one (copy PubMedBERT's there to run offline),
otherwise from the HF cache or hub.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from absl import flags

from m3d_jax.cli import run
from m3d_jax.errors import InputError
from m3d_jax.models.psat import PLANES

SPLITS = ("train", "validation", "test")
LIST_NAME = "insight.json"
MIN_OPEN_CLIP = (3, 0, 0)

_SLICES = flags.DEFINE_string("slices", None, "Input JSON of volumes and their 2D slices (see the module doc).")
_MODEL = flags.DEFINE_string("model", None, "Local open_clip folder: open_clip_config.json + weights.")
_OUT = flags.DEFINE_string("out", None, "Output folder for the .npz files and insight.json.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 64, "Slices per encoder call (batches span volumes).")
_DEVICE = flags.DEFINE_string("device", "cpu", "torch device for the encoder, e.g. cpu or cuda.")
_CONTEXT_LENGTH = flags.DEFINE_integer("context_length", 256, "Tokenizer context length (the reference: 256).")

ImageEncoder = Callable[[torch.Tensor], Any]
TextEncoder = Callable[[list[str]], Any]
ImageLoader = Callable[[str], Any]


@dataclasses.dataclass(frozen=True)
class Volume:
    """One checked input entry: the 3D volume's path and its slices (2D image paths resolved)."""

    split: str
    index: int
    image: str
    planes: np.ndarray
    slices: np.ndarray
    paths: tuple[str, ...]
    texts: tuple[str, ...]

    @property
    def name(self) -> str:
        """Output .npz file name, unique per (split, index)."""
        stem = os.path.basename(self.image)
        stem = os.path.splitext(stem[:-3] if stem.endswith(".gz") else stem)[0]
        return f"{self.split}_{self.index:05d}_{re.sub(r'[^A-Za-z0-9._-]+', '_', stem)}.npz"


@dataclasses.dataclass(frozen=True)
class Summary:
    """What embed_volumes wrote."""

    volumes: dict[str, int]
    slices: dict[str, int]
    dim: int
    seconds: float
    list_path: str


def read_slices(path: str) -> dict:
    """Loads the input JSON; its top level must map split names to lists."""
    with open(path, encoding="utf-8") as f:
        try:
            entries = json.load(f)
        except ValueError as err:  # bad JSON, or not UTF-8 text
            raise InputError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(entries, dict):
        raise InputError(f"{path}: expected an object of splits ({', '.join(SPLITS)}), got {type(entries).__name__}")
    return entries


def _check_slice(item: Any, root: str, where: str) -> tuple[int, int, str, str]:
    if not isinstance(item, Mapping):
        raise InputError(f"{where}: expected an object with plane, slice, image2d, text; got {item!r}")
    missing = [key for key in ("plane", "slice", "image2d", "text") if key not in item]
    if missing:
        raise InputError(f"{where}: missing {', '.join(missing)}")
    plane, index, image2d, text = item["plane"], item["slice"], item["image2d"], item["text"]
    if plane not in PLANES:
        raise InputError(f"{where}: unknown plane {plane!r} (expected one of {', '.join(PLANES)})")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise InputError(f"{where}: slice must be an integer >= 0, got {index!r}")
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"{where}: text must be a non-empty string, got {text!r}")
    if not isinstance(image2d, str) or not image2d:
        raise InputError(f"{where}: image2d must be a path, got {image2d!r}")
    path = os.path.join(root, image2d)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{where}: image2d not found: {path}")
    return PLANES.index(plane), index, path, text


def check_entries(entries: Mapping[str, Sequence[Mapping]], root: str, source: str = "slices.json") -> list[Volume]:
    """Validates every entry (errors name source, split, entry index and problem) → the volumes in order."""
    volumes = []
    for split, items in entries.items():
        if split not in SPLITS:
            raise InputError(f"{source}: unknown split {split!r} (expected some of {', '.join(SPLITS)})")
        if not isinstance(items, list):
            raise InputError(f"{source}: {split} must be a list of volumes, got {type(items).__name__}")
        for index, entry in enumerate(items):
            where = f"{source}: {split}[{index}]"
            if not isinstance(entry, Mapping):
                raise InputError(f"{where}: expected an object with image and slices, got {entry!r}")
            image, slices = entry.get("image"), entry.get("slices")
            if not isinstance(image, str) or not image:
                raise InputError(f"{where}: image must be the 3D volume's path, got {image!r}")
            image = os.path.join(root, image)
            if not os.path.exists(image):
                raise FileNotFoundError(f"{where}: volume not found: {image}")
            if not isinstance(slices, list) or not slices:
                raise InputError(f"{where}: slices must be a non-empty list, got {slices!r}")
            checked = [_check_slice(item, root, f"{where} slices[{j}]") for j, item in enumerate(slices)]
            planes, indices, paths, texts = zip(*checked)
            volumes.append(Volume(split, index, image, np.asarray(planes, np.int64), np.asarray(indices, np.int64),
                                  paths, texts))
    if not volumes:
        raise InputError(f"{source}: no volumes")
    return volumes


def _as_numpy(out: Any, rows: int, kind: str) -> np.ndarray:
    array = out.detach().float().cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out, np.float32)
    if array.ndim != 2 or array.shape[0] != rows:
        raise InputError(f"encode_{kind} returned shape {array.shape} for {rows} inputs (expected [{rows}, E])")
    return array.astype(np.float32, copy=False)


def _write(volume: Volume, out_dir: str, image_rows: list[np.ndarray], text_rows: list[np.ndarray]) -> None:
    np.savez(os.path.join(out_dir, volume.name), plane=volume.planes, slice=volume.slices,
             image_embedding=np.stack(image_rows), text_embedding=np.stack(text_rows),
             text=np.asarray(volume.texts, dtype=np.str_))


def embed_volumes(entries: Mapping[str, Sequence[Mapping]], root: str, encode_image: ImageEncoder,
                  encode_text: TextEncoder, load_image: ImageLoader, out_dir: str, batch_size: int = 64,
                  source: str = "slices.json") -> Summary:
    """Embeds every slice and writes one .npz per volume plus out_dir/insight.json.

    Slices are batched across volumes (in input order) under torch.no_grad: load_image(path) gives one
    image tensor, encode_image([n, ...]) and encode_text(list of n texts) give [n, E]. A volume's .npz is
    written as soon as its last slice is embedded, so memory stays at one batch plus the open volumes.
    """
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, got {batch_size}")
    volumes = check_entries(entries, root, source)
    os.makedirs(out_dir, exist_ok=True)
    start = time.perf_counter()
    items = [(v, j) for v, volume in enumerate(volumes) for j in range(len(volume.paths))]
    rows: dict[int, tuple[list[np.ndarray], list[np.ndarray]]] = {}
    dim = None
    for begin in range(0, len(items), batch_size):
        batch = items[begin:begin + batch_size]
        with torch.no_grad():
            images = torch.stack([torch.as_tensor(load_image(volumes[v].paths[j])) for v, j in batch])
            image_emb = _as_numpy(encode_image(images), len(batch), "image")
            text_emb = _as_numpy(encode_text([volumes[v].texts[j] for v, j in batch]), len(batch), "text")
        if image_emb.shape[1] != text_emb.shape[1] or dim not in (None, image_emb.shape[1]):
            raise InputError(f"embedding dims disagree: image {image_emb.shape[1]}, text {text_emb.shape[1]}"
                             + (f", earlier batches {dim}" if dim is not None else ""))
        dim = image_emb.shape[1]
        for row, (v, j) in enumerate(batch):
            image_rows, text_rows = rows.setdefault(v, ([], []))
            image_rows.append(image_emb[row])
            text_rows.append(text_emb[row])
            if j == len(volumes[v].paths) - 1:
                _write(volumes[v], out_dir, *rows.pop(v))

    listing: dict[str, list[dict[str, str]]] = {}
    for volume in volumes:
        listing.setdefault(volume.split, []).append(
            {"image": os.path.relpath(volume.image, out_dir), "slices": volume.name})
    list_path = os.path.join(out_dir, LIST_NAME)
    with open(list_path, "w", encoding="utf-8") as f:
        json.dump(listing, f, indent=1)
    counts = {split: [len(v.paths) for v in volumes if v.split == split] for split in listing}
    return Summary({s: len(c) for s, c in counts.items()}, {s: sum(c) for s, c in counts.items()}, dim,
                   time.perf_counter() - start, list_path)


def load_open_clip(model_dir: str, device: str = "cpu",
                   context_length: int = 256) -> tuple[ImageEncoder, TextEncoder, ImageLoader]:
    """open_clip model (eval), val preprocess and tokenizer from a local folder → the embed_volumes callables."""
    try:
        import open_clip
    except ImportError as error:
        raise ImportError(f"slice_embeddings needs open_clip_torch >= {'.'.join(map(str, MIN_OPEN_CLIP))}: "
                          f"pip install open_clip_torch (it needs torchvision); import failed: {error}") from error
    version = tuple(int(p) for p in re.findall(r"\d+", getattr(open_clip, "__version__", "0"))[:3])
    if version < MIN_OPEN_CLIP:
        raise ImportError(f"open_clip_torch {open_clip.__version__} has no 'local-dir:' schema; "
                          f"pip install 'open_clip_torch>={'.'.join(map(str, MIN_OPEN_CLIP))}'")
    config_path = os.path.join(model_dir, "open_clip_config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path} not found: --model must be a local open_clip folder")
    with open(config_path, encoding="utf-8") as f:
        text_cfg = json.load(f).get("model_cfg", {}).get("text_cfg", {})
    tokenizer_files = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")
    if text_cfg.get("hf_tokenizer_name") and not any(os.path.isfile(os.path.join(model_dir, name))
                                                     for name in tokenizer_files):
        raise FileNotFoundError(f"{model_dir} has no tokenizer files ({', '.join(tokenizer_files)}): open_clip's "
                                f"'local-dir:' loads the tokenizer from the folder; copy those of "
                                f"{text_cfg['hf_tokenizer_name']} there")
    model_kwargs = {}
    if text_cfg.get("hf_model_name") and os.path.isfile(os.path.join(model_dir, "config.json")):
        model_kwargs["text_cfg"] = dict(text_cfg, hf_model_name=model_dir, hf_model_pretrained=False)
    name = f"local-dir:{model_dir}"
    model, _, preprocess_val = open_clip.create_model_and_transforms(name, device=device, **model_kwargs)
    model.eval()
    tokenizer = open_clip.get_tokenizer(name, context_length=context_length)

    def encode_image(images: torch.Tensor) -> torch.Tensor:
        return model.encode_image(images.to(device))

    def encode_text(texts: list[str]) -> torch.Tensor:
        return model.encode_text(tokenizer(texts, context_length=context_length).to(device))

    def load_image(path: str) -> torch.Tensor:
        from PIL import Image

        with Image.open(path) as image:
            return preprocess_val(image)

    return encode_image, encode_text, load_image


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise InputError(f"unexpected arguments: {' '.join(argv[1:])}")
    if not (_SLICES.value and _MODEL.value and _OUT.value):
        raise InputError("--slices, --model and --out are required")
    entries = read_slices(_SLICES.value)
    root = os.path.dirname(os.path.abspath(_SLICES.value))
    check_entries(entries, root, _SLICES.value)  # fail before the slow model load
    try:
        encoders = load_open_clip(_MODEL.value, _DEVICE.value, _CONTEXT_LENGTH.value)
    except ImportError as error:  # a missing or too old package is the user's to install, not a bug
        raise InputError(str(error)) from error
    summary = embed_volumes(entries, root, *encoders, _OUT.value, _BATCH_SIZE.value, _SLICES.value)
    for split, count in summary.volumes.items():
        print(f"{split:<10} {count:6d} volumes {summary.slices[split]:8d} slices")
    total = sum(summary.slices.values())
    print(f"embedding dim {summary.dim}; {total} slices in {summary.seconds:.1f} s "
          f"({total / max(summary.seconds, 1e-9):.1f} slices/s) -> {summary.list_path}")


if __name__ == "__main__":
    run(main)
