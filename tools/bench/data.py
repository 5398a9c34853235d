"""Input-pipeline throughput: NIfTI volumes → preprocessed (min-max, crop foreground, trilinear resize to
32×256×256), augmented batches. This project's Grain pipeline vs MONAI Dataset + torch DataLoader with
the equivalent transforms, the same files and the same number of workers, in steady state (after the
first batch, so worker start-up is excluded); plus the raw read rate of the files' bytes as the ceiling.

  python tools/bench/data.py [--cases=48 --workers=2 --shape=48,160,160]
"""

from __future__ import annotations

import os
import tempfile
import time

from absl import app, flags

_CASES = flags.DEFINE_integer("cases", 48, "Phantom volumes to write and read.")
_WORKERS = flags.DEFINE_integer("workers", 2, "Reader processes for both pipelines.")
_SHAPE = flags.DEFINE_list("shape", ["48", "160", "160"], "Phantom volume size D,H,W on disk.")
_BATCH = flags.DEFINE_integer("batch", 4, "Batch size.")
TARGET = (32, 256, 256)


class ImageTransform:
    """The image half of the LaMed sample transform (no tokenization, as the MONAI side has none)."""

    def __init__(self, seed: int):
        self.seed = seed

    def __call__(self, index: int, path: str):
        from m3d_jax.data.augment import augment, record_rng
        from m3d_jax.data.volume import load_volume, prepare

        image, _ = prepare(load_volume(path).array, TARGET)
        return augment(image, None, record_rng(self.seed, 0, index))[0]


class PathSource:
    def __init__(self, paths):
        self.paths = list(paths)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return self.paths[index]

    def __repr__(self):
        return f"PathSource({len(self.paths)})"


def _ours(paths) -> float:
    import grain.python as grain

    from m3d_jax.data.pipeline import iterate

    dataset = grain.MapDataset.source(PathSource(paths)).map_with_index(ImageTransform(0))
    dataset = dataset.batch(_BATCH.value, drop_remainder=True)
    iterator = iterate(dataset, workers=_WORKERS.value)
    return _steady_rate(iterator)


def _monai(paths) -> float:
    import torch
    from monai import transforms as mt
    from monai.data import DataLoader, Dataset

    pipeline = mt.Compose([
        mt.LoadImage(image_only=True, ensure_channel_first=True), mt.Orientation(axcodes="RAS"),
        mt.ScaleIntensity(), mt.CropForeground(), mt.Resize(TARGET[::-1], mode="trilinear"),
        mt.RandRotate90(prob=0.5, spatial_axes=(0, 1)), mt.RandFlip(prob=0.1, spatial_axis=0),
        mt.RandFlip(prob=0.1, spatial_axis=1), mt.RandFlip(prob=0.1, spatial_axis=2),
        mt.RandScaleIntensity(factors=0.1, prob=0.5), mt.RandShiftIntensity(offsets=0.1, prob=0.5),
    ])
    loader = DataLoader(Dataset(paths, transform=pipeline), batch_size=_BATCH.value, num_workers=_WORKERS.value,
                        drop_last=True)
    torch.set_num_threads(1)
    return _steady_rate(iter(loader))


def _steady_rate(iterator) -> float:
    """Volumes per second after the first batch (worker start-up excluded for both pipelines)."""
    next(iterator)
    start, count = time.perf_counter(), 0
    for batch in iterator:
        count += batch.shape[0]
    return count / (time.perf_counter() - start)


def main(argv):
    del argv
    from m3d_jax.data.phantoms import write_phantoms

    with tempfile.TemporaryDirectory() as tmp:
        shape = tuple(int(s) for s in _SHAPE.value)
        root = write_phantoms(tmp, num_cases=_CASES.value, seed=0, shape=shape)
        paths = sorted(str(p) for p in root.glob("cases/*/image.nii.gz"))
        total = sum(os.path.getsize(p) for p in paths)
        start = time.perf_counter()
        for path in paths:
            with open(path, "rb") as handle:
                handle.read()
        raw = total / (time.perf_counter() - start)
        ours, theirs = _ours(paths), _monai(paths)
    print(f"{len(paths)} NIfTI volumes {shape} → {TARGET}, batch {_BATCH.value}, {_WORKERS.value} workers, "
          f"{os.cpu_count()} cores; raw file reads {raw / 2**20:.0f} MB/s ({len(paths) * 2**20 / total * raw / 2**20:.0f} "
          f"volumes/s if reading were all)")
    print(f"m3d-jax (Grain) {ours:.2f} volumes/s, MONAI + DataLoader {theirs:.2f} volumes/s: {ours / theirs:.2f}x")


if __name__ == "__main__":
    app.run(main)
