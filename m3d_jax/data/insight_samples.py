"""Samples for Med3DInsight pretraining and for fine-tuning its backbone.

Pretraining: one (volume, 2D slice) pair per sample — the whole volume min-max scaled and resized to the
backbone's crop (no foreground crop, so slice positions keep their meaning), the slice's plane and
position, and the frozen 2D encoder's cached image and text embeddings of that slice.
Fine-tuning: the volume prepared as for M3D (min-max, foreground crop, trilinear resize) with its label map
resized by nearest neighbour on the same grid (segmentation), or its class id (classification).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from m3d_jax.data.augment import AugmentConfig, augment
from m3d_jax.data.pipeline import RecordError, RecordTransform
from m3d_jax.data.volume import load_volume, min_max, resize_trilinear, window

SLICE_GRID = 256  # positions per plane axis in the slice records (the reference's 128 bins × stride 2)


@dataclasses.dataclass(frozen=True)
class InsightSampleSpec:
    image_size: tuple[int, int, int]  # the backbone's crop
    embedding_dim: int  # the PSAT's out_dim; the cached embeddings must have it
    slice_limit: int = SLICE_GRID  # PSAT slice_bins × slice_stride: slice positions must be below it
    in_channels: int = 1
    window: tuple[float, float] | None = None
    skip_bad_records: bool = False

    def transform(self, tokenizer, seed: int, epoch_length: int) -> InsightTransform:
        return InsightTransform(tokenizer, self, seed, epoch_length)


class InsightTransform(RecordTransform):
    """→ dict(images [C, *crop], plane, slice_index (int32 scalars), image_embedding, text_embedding [E])."""

    def _sample(self, index: int, record: dict) -> dict[str, np.ndarray]:
        spec = self.spec
        volume = load_volume(record["image"], channels=spec.in_channels).array
        if spec.window is not None:
            volume = window(volume, *spec.window)
        where = f"{record['slices']} row {record['row']}"
        if not 0 <= record["plane"] < 3:
            raise RecordError(f"{where}: plane {record['plane']} is not 0 (Axial), 1 (Coronal) or 2 (Sagittal)")
        if not 0 <= record["slice"] < spec.slice_limit:
            raise RecordError(f"{where}: slice position {record['slice']} outside [0, {spec.slice_limit})")
        with np.load(record["slices"]) as arrays:
            image_embedding = np.asarray(arrays["image_embedding"][record["row"]], np.float32)
            text_embedding = np.asarray(arrays["text_embedding"][record["row"]], np.float32)
        if image_embedding.shape != (spec.embedding_dim,):
            raise RecordError(f"{where}: embeddings of size {image_embedding.shape[0]}, the model's PSAT "
                              f"outputs {spec.embedding_dim}")
        return {"images": resize_trilinear(min_max(volume), spec.image_size),
                "plane": np.asarray(record["plane"], np.int32), "slice_index": np.asarray(record["slice"], np.int32),
                "image_embedding": image_embedding, "text_embedding": text_embedding}


@dataclasses.dataclass(frozen=True)
class FinetuneSampleSpec:
    """Segmentation (`num_classes` label map classes) or classification samples at `image_size`."""

    image_size: tuple[int, int, int]
    task: str  # "segment" or "classify"
    num_classes: int
    in_channels: int = 1
    augment: AugmentConfig | None = None
    window: tuple[float, float] | None = None
    skip_bad_records: bool = False

    def __post_init__(self):
        if self.task not in ("segment", "classify"):
            raise ValueError(f"fine-tuning task must be 'segment' or 'classify', got {self.task!r}")

    def transform(self, tokenizer, seed: int, epoch_length: int) -> FinetuneTransform:
        return FinetuneTransform(tokenizer, self, seed, epoch_length)


class FinetuneTransform(RecordTransform):
    """→ dict(images [C, *crop], labels): a label map int32 [*crop] (segment) or a class id int32 (classify)."""

    def _sample(self, index: int, record: dict) -> dict[str, np.ndarray]:
        spec = self.spec
        image, labels, rng = self._prepared(index, record)
        if spec.task == "classify":
            if spec.augment is not None:
                image, _ = augment(image, None, rng, spec.augment)
            return {"images": image.astype(np.float32), "labels": np.asarray(record["label"], np.int32)}
        values = np.unique(labels)
        if values.min() < 0 or values.max() >= spec.num_classes or not np.all(values == np.round(values)):
            shown = ", ".join(f"{value:g}" for value in values[:10])
            raise RecordError(f"{record['mask']}: label values {shown} are not class ids in 0..{spec.num_classes - 1}")
        if spec.augment is not None:
            image, labels = augment(image, labels, rng, spec.augment)
        return {"images": image.astype(np.float32), "labels": np.rint(labels[0]).astype(np.int32)}
