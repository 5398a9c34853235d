"""M3D's training augmentations, driven by a per-record RNG so a sample is a pure function of
(seed, epoch, index): RandRotate90 in the H-W plane (p 0.5, k ∈ {1, 2, 3}), a flip of each spatial axis
(p 0.1 each; `flip_axes` narrows the axes), intensity scale ×(1 + U(−0.1, 0.1)) (p 0.5) and shift
+ U(−0.1, 0.1) (p 0.5). Masks get the same rotations and flips (never the intensity changes). For
non-square H-W planes the rotation is always a half turn, so shapes stay fixed."""

from __future__ import annotations

import dataclasses

import numpy as np


def record_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The RNG of one record in one epoch, independent of worker count, order and resumption."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch, index])))


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    rotate90_prob: float = 0.5
    flip_prob: float = 0.1  # per spatial axis
    flip_axes: tuple[int, ...] = (1, 2, 3)  # of [C, D, H, W]; leave W (3) out where labels name a side
    scale_prob: float = 0.5
    scale: float = 0.1
    shift_prob: float = 0.5
    shift: float = 0.1

    def __post_init__(self):
        object.__setattr__(self, "flip_axes", tuple(int(a) for a in self.flip_axes))
        if not set(self.flip_axes) <= {1, 2, 3}:
            raise ValueError(f"flip_axes {self.flip_axes}: the spatial axes of [C, D, H, W] are 1, 2 and 3")


def augment(
    image: np.ndarray, mask: np.ndarray | None, rng: np.random.Generator, config: AugmentConfig = AugmentConfig()
) -> tuple[np.ndarray, np.ndarray | None]:
    """image [C, D, H, W] float32, mask [C', D, H, W] or None → augmented copies."""
    spatial = [image] + ([mask] if mask is not None else [])
    if rng.random() < config.rotate90_prob:
        k = int(rng.integers(1, 4))
        if image.shape[2] != image.shape[3]:
            k = 2  # a quarter turn would swap H and W of a non-square plane; keep the batch shape
        spatial = [np.rot90(a, k, axes=(2, 3)) for a in spatial]
    for axis in config.flip_axes:
        if rng.random() < config.flip_prob:
            spatial = [np.flip(a, axis=axis) for a in spatial]
    image = np.ascontiguousarray(spatial[0], dtype=np.float32)
    mask = np.ascontiguousarray(spatial[1]) if mask is not None else None
    if rng.random() < config.scale_prob:
        image = image * np.float32(1.0 + rng.uniform(-config.scale, config.scale))
    if rng.random() < config.shift_prob:
        image = image + np.float32(rng.uniform(-config.shift, config.shift))
    return image, mask
