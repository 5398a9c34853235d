"""Input-pipeline throughput: volumes → preprocessed (min-max, crop foreground, trilinear resize to
32×256×256), augmented batches.

1. Phantom NIfTI volumes: this project's Grain pipeline with reader threads (its default) and with worker
   processes, and from prepared shards (tools/prepare_data.py), against MONAI Dataset + torch DataLoader
   with the equivalent transforms and the same files; whole runs, start-up included; plus the raw read
   rate of the files' bytes as the ceiling.
2. CT-like volumes (int16 NIfTI, 160×512×512 by default, a body of fat, soft tissue and bone in air):
   the time to prepare them into shards, volumes/s per core from NIfTI and from shards (one reader thread),
   and the rate one accelerator chip needs for the full LaMed-Phi-3 stage 2 at 50% MFU, from the planner's
   report (tools/plans/, written by tools/plan_run.py).

  python tools/bench/data.py [--cases=96 --workers=2 --threads=16 --shape=48,160,160 --ct_cases=8]
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from absl import app, flags
from timing import machine_line  # tools/bench/timing.py (the script's folder is on sys.path)

_CASES = flags.DEFINE_integer("cases", 96, "Phantom volumes to write and read.")
_WORKERS = flags.DEFINE_integer("workers", 2, "Reader processes for both pipelines.")
_SHAPE = flags.DEFINE_list("shape", ["48", "160", "160"], "Phantom volume size D,H,W on disk.")
_BATCH = flags.DEFINE_integer("batch", 4, "Batch size.")
_THREADS = flags.DEFINE_integer("threads", None, "Reader threads of this project's pipeline (default: one per core).")
_CT_CASES = flags.DEFINE_integer("ct_cases", 8, "CT-like volumes to write (0: skip part 2).")
_CT_SHAPE = flags.DEFINE_list("ct_shape", ["160", "512", "512"], "CT-like volume size D,H,W on disk.")
_PLAN = flags.DEFINE_string("plan", "tools/plans/lamed_phi3_stage2__v5p_2x2x1.json",
                            "Planner report giving the step time at 50% MFU (tools/plan_run.py).")
TARGET = (32, 256, 256)


class ImageTransform:
    """The image half of the LaMed sample transform (no tokenization, as the MONAI side has none): a
    record's prepared image (from its file, or from a shard record) augmented."""

    def __init__(self, seed: int):
        self.seed = seed

    def __call__(self, index: int, record):
        from m3d_jax.data.augment import augment, record_rng
        from m3d_jax.data.prepared import prepare_record

        if isinstance(record, str):
            record = {"task": "caption", "image": record}
        image, _ = prepare_record(record, TARGET)
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


def _ours(source, mode: str, threads: int | None = None, batch: int | None = None) -> float:
    import grain.python as grain

    from m3d_jax.data.pipeline import iterate

    if not hasattr(source, "__getitem__") or isinstance(source, list):
        source = PathSource(source)
    dataset = grain.MapDataset.source(source).map_with_index(ImageTransform(0))
    dataset = dataset.batch(min(batch or _BATCH.value, len(source)), drop_remainder=True)
    if mode == "threads":
        return _rate(lambda: iterate(dataset, threads=threads or _THREADS.value))
    return _rate(lambda: iterate(dataset, threads=1, workers=_WORKERS.value))


def _shards(root: Path, out: Path) -> tuple[object, float]:
    """The caption records of `root` prepared into shards at `out`: (the shard source, seconds taken)."""
    from m3d_jax.data import shards
    from m3d_jax.data.shard_writer import prepare_shards

    entry = dict(kind="cap", path="cap.json", split="train")
    settings = shards.Settings(TARGET)
    start = time.perf_counter()
    prepare_shards([entry], str(root), str(out), settings, records_per_shard=64, workers=os.cpu_count() or 1)
    seconds = time.perf_counter() - start
    return shards.open_source(str(out), entry, "train", settings), seconds


def _ct_like(folder: Path, cases: int, shape: tuple[int, int, int]) -> Path:
    """`cases` int16 CT-like NIfTI volumes (HU: air −1000, fat −100, soft tissue 40, bone 700, noise σ 20)
    with a caption list (cap.json) over them."""
    import json

    import nibabel as nib
    import numpy as np

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    depth, height, width = shape
    y, x = np.ogrid[:height, :width]
    entries = []
    for case in range(cases):
        a, b = width * rng.uniform(0.35, 0.45), height * rng.uniform(0.25, 0.35)
        body = ((x - width / 2) / a) ** 2 + ((y - height / 2) / b) ** 2
        plane = np.where(body <= 1, np.where(body > 0.8, -100, 40), -1000).astype(np.int16)
        spine = (x - width / 2) ** 2 + (y - height / 2 - 0.6 * b) ** 2 <= (0.12 * b) ** 2
        plane[spine] = 700
        volume = np.repeat(plane[None], depth, axis=0) + rng.normal(0, 20, (depth, height, width)).astype(np.int16)
        name = f"ct_{case:03d}"
        nib.save(nib.Nifti1Image(volume.transpose(2, 1, 0), np.diag([0.8, 0.8, 2.0, 1.0])),
                 str(folder / f"{name}.nii.gz"))
        (folder / f"{name}.txt").write_text("A CT-like volume.")
        entries.append({"image": f"{name}.nii.gz", "text": f"{name}.txt"})
    (folder / "cap.json").write_text(json.dumps({"train": entries}))
    return folder


def _chip_need(plan_path: str) -> tuple[float, str]:
    """Samples/s one chip needs at 50% MFU, from a planner report: global batch / (step time × chips)."""
    import json

    report = json.loads(Path(plan_path).read_text())
    seconds = report["seconds_per_step_at_mfu"]["0.5"]
    return report["global_batch"] / (seconds * report["chips"]), f"{report['command'].split('--config=')[1]}"


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


def _platform() -> str:
    import jax

    return f"{machine_line()}; jax {jax.__version__}"


def main(argv):
    del argv
    from m3d_jax.data.phantoms import write_phantoms

    print(_platform())
    with tempfile.TemporaryDirectory() as tmp:
        shape = tuple(int(s) for s in _SHAPE.value)
        root = write_phantoms(Path(tmp) / "phantoms", num_cases=_CASES.value, seed=0, shape=shape)
        paths = sorted(str(p) for p in root.glob("cases/*/image.nii.gz"))
        total = sum(os.path.getsize(p) for p in paths)
        start = time.perf_counter()
        for path in paths:
            with open(path, "rb") as handle:
                handle.read()
        raw = total / (time.perf_counter() - start)
        threads, processes, theirs = _ours(paths, "threads"), _ours(paths, "processes"), _monai(paths)
        shard_source, _ = _shards(root, Path(tmp) / "phantom_shards")
        from_shards = _ours(shard_source, "threads")
        print(f"{len(paths)} NIfTI volumes {shape} → {TARGET}, batch {_BATCH.value}, {_WORKERS.value} workers, "
              f"{os.cpu_count()} cores; raw file reads {raw / 2**20:.0f} MB/s "
              f"({len(paths) * 2**20 / total * raw / 2**20:.0f} volumes/s if reading were all)")
        print(f"m3d-jax (Grain, {_THREADS.value or os.cpu_count()} reader threads) {threads:.2f} volumes/s = "
              f"{threads / theirs:.2f}x; (Grain, {_WORKERS.value} worker processes) {processes:.2f} volumes/s = "
              f"{processes / theirs:.2f}x; from shards ({_THREADS.value or os.cpu_count()} reader threads) "
              f"{from_shards:.2f} volumes/s = {from_shards / theirs:.2f}x; MONAI Dataset + DataLoader "
              f"({_WORKERS.value} worker processes) {theirs:.2f} volumes/s")
        if _CT_CASES.value:
            ct_shape = tuple(int(s) for s in _CT_SHAPE.value)
            ct = _ct_like(Path(tmp) / "ct", _CT_CASES.value, ct_shape)
            ct_paths = sorted(str(p) for p in ct.glob("*.nii.gz"))
            nifti_core = _ours(ct_paths, "threads", threads=1, batch=1)
            ct_shards, seconds = _shards(ct, Path(tmp) / "ct_shards")
            shard_core = _ours(ct_shards, "threads", threads=1, batch=1)
            need, plan = _chip_need(_PLAN.value)
            print(f"{len(ct_paths)} CT-like int16 NIfTI volumes {ct_shape} → {TARGET}, augmented: prepared into "
                  f"shards at {len(ct_paths) / seconds:.2f} volumes/s ({os.cpu_count()} processes); one reader "
                  f"thread (one core): from NIfTI {nifti_core:.2f} volumes/s, from shards {shard_core:.2f} "
                  f"volumes/s ({shard_core / nifti_core:.0f}x)")
            print(f"one chip of {plan} at 50% MFU needs {need:.1f} samples/s: one core from shards feeds "
                  f"{shard_core / need:.1f} chips; a 4-chip host needs {4 * need / shard_core:.1f} cores "
                  f"(from NIfTI: {4 * need / nifti_core:.0f} cores)")


if __name__ == "__main__":
    app.run(main)
