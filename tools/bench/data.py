"""Input-pipeline throughput: NIfTI volumes → preprocessed (min-max, crop foreground, trilinear resize to
32×256×256), augmented batches. This project's Grain pipeline vs MONAI Dataset + torch DataLoader with
the equivalent transforms and the same files: ours with reader threads (its default) and with worker
processes, MONAI with --workers processes; whole runs, start-up included; plus the raw read rate of the
files' bytes as the ceiling.

  python tools/bench/data.py [--cases=96 --workers=2 --threads=16 --shape=48,160,160]
"""

from __future__ import annotations

import os
import tempfile
import time

from absl import app, flags

_CASES = flags.DEFINE_integer("cases", 96, "Phantom volumes to write and read.")
_WORKERS = flags.DEFINE_integer("workers", 2, "Reader processes for both pipelines.")
_SHAPE = flags.DEFINE_list("shape", ["48", "160", "160"], "Phantom volume size D,H,W on disk.")
_BATCH = flags.DEFINE_integer("batch", 4, "Batch size.")
_THREADS = flags.DEFINE_integer("threads", None, "Reader threads of this project's pipeline (default: one per core).")
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


def _ours(paths, mode: str) -> float:
    import grain.python as grain

    from m3d_jax.data.pipeline import iterate

    dataset = grain.MapDataset.source(PathSource(paths)).map_with_index(ImageTransform(0))
    dataset = dataset.batch(_BATCH.value, drop_remainder=True)
    if mode == "threads":
        return _rate(lambda: iterate(dataset, threads=_THREADS.value))
    return _rate(lambda: iterate(dataset, threads=1, workers=_WORKERS.value))


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
    return _rate(lambda: iter(loader))


def _rate(make_iterator) -> float:
    """Volumes per second from creating the iterator to exhausting it (start-up included, as a training
    job pays it too; prefetch buffers cannot hide work when all batches are counted)."""
    start = time.perf_counter()
    count = sum(batch.shape[0] for batch in make_iterator())
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
        threads, processes, theirs = _ours(paths, "threads"), _ours(paths, "processes"), _monai(paths)
    print(f"{len(paths)} NIfTI volumes {shape} → {TARGET}, batch {_BATCH.value}, {_WORKERS.value} workers, "
          f"{os.cpu_count()} cores; raw file reads {raw / 2**20:.0f} MB/s ({len(paths) * 2**20 / total * raw / 2**20:.0f} "
          f"volumes/s if reading were all)")
    print(f"m3d-jax (Grain, {_THREADS.value or os.cpu_count()} reader threads) {threads:.2f} volumes/s = {threads / theirs:.2f}x; "
          f"(Grain, {_WORKERS.value} worker processes) {processes:.2f} volumes/s = {processes / theirs:.2f}x; "
          f"MONAI Dataset + DataLoader ({_WORKERS.value} worker processes) {theirs:.2f} volumes/s")


if __name__ == "__main__":
    app.run(main)
