"""Writing prepared shards (`shards.py`) from a data config's sources, in parallel processes, resumable:
each distinct volume is prepared once into the image shards, then each source's records (fields, image
index, mask prepared against the stored geometry) into its own. A shard is written under a temporary name
and moved into place when complete, then its sidecar JSON marks it done, so a rerun keeps finished shards
and redoes the rest. The manifest is written last."""

from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime
import importlib.metadata
import json
import multiprocessing
import os
import tempfile

from absl import logging

from m3d_jax.data import shards
from m3d_jax.data.pipeline import SOURCES, build_source
from m3d_jax.data.prepared import LABEL_MAP_TASKS, prepare_image, prepare_record_mask
from m3d_jax.data.volume import Geometry
from m3d_jax.errors import ConfigError, RecordError, VolumeError
from m3d_jax.storage import filesystem, is_remote

IMAGES = "images"  # the image shards' folder
UNSHARDABLE = {"slices": "Med3DInsight's slice records read the whole volume per slice row"}


@dataclasses.dataclass(frozen=True)
class Job:
    """One shard: records [start, stop) of source `position`."""

    position: int
    key: str
    folder: str
    shard: int
    shards: int
    start: int
    stop: int

    @property
    def file(self) -> str:
        return f"{self.folder}/shard-{self.shard:05d}-of-{self.shards:05d}.array_record"


def plan(sources: list[tuple[str, list]], records_per_shard: int, folder: str | None = None) -> list[Job]:
    """The shards of each (key, items) source, `records_per_shard` consecutive items each, in the source's
    folder (`folder` when given)."""
    jobs = []
    for position, (key, records) in enumerate(sources):
        count = max(1, -(-len(records) // records_per_shard))
        where = folder or shards.source_folder(position, key)
        jobs += [Job(position, key, where, shard, count, shard * records_per_shard,
                     min(len(records), (shard + 1) * records_per_shard)) for shard in range(count)]
    return jobs


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


def _done(out: str, job: Job) -> dict | None:
    """The sidecar of a finished shard (its shard file present at the recorded size), else None."""
    fs, path = filesystem(_join(out, job.file))
    sidecar = path.removesuffix(".array_record") + ".json"
    try:
        with fs.open(sidecar, "r") as handle:
            done = json.load(handle)
        return done if fs.size(path) == done["bytes"] else None
    except (FileNotFoundError, ValueError, KeyError):
        return None


class _ShardFile:
    """One shard being written: a local temporary file, moved (or uploaded) into place by `finish`, then the
    sidecar JSON that marks it done."""

    def __init__(self, out: str, job: Job):
        from array_record.python import array_record_module

        self.job = job
        self.fs, self.path = filesystem(_join(out, job.file))
        self.remote = is_remote(out)
        self.fs.makedirs(self.path.rsplit("/", 1)[0], exist_ok=True)
        folder = tempfile.mkdtemp(prefix="m3d-shard-") if self.remote else self.path.rsplit("/", 1)[0]
        self.partial = os.path.join(folder, os.path.basename(self.path) + ".partial")
        self.writer = array_record_module.ArrayRecordWriter(self.partial, shards.WRITER_OPTIONS)
        self.records = 0

    def write(self, data: bytes) -> None:
        self.writer.write(data)
        self.records += 1

    def finish(self, **extra) -> dict:
        self.writer.close()
        checksum, size = shards.sha256(self.partial), os.path.getsize(self.partial)
        if self.remote:
            self.fs.put_file(self.partial, self.path)
            os.remove(self.partial)
            os.rmdir(os.path.dirname(self.partial))
        else:
            os.replace(self.partial, self.path)
        done = {"file": self.job.file, "records": self.records, "bytes": size, "sha256": checksum, **extra}
        with self.fs.open(self.path.removesuffix(".array_record") + ".json", "w") as handle:
            json.dump(done, handle)
        return done

    def abandon(self) -> None:
        self.writer.close()
        os.remove(self.partial)


def write_images(job: Job, paths: list[str], settings: shards.Settings, out: str, skip_bad: bool) -> dict:
    """Prepares the volumes at `paths` (this job's slice of the distinct images) into one image shard."""
    shard, skipped, written = _ShardFile(out, job), [], []
    try:
        for path in paths:
            try:
                image, geometry, shape = prepare_image(path, settings.image_size, settings.window,
                                                       settings.in_channels)
            except VolumeError as error:
                if not skip_bad:
                    raise
                skipped.append({"image": path, "error": str(error)})
                logging.warning("skipping image %s: %s", path, error)
                continue
            shard.write(shards.encode_image(path, image, geometry, shape, settings.storage))
            written.append({"path": path, "box": [[b.start, b.stop] for b in geometry.box], "shape": list(shape)})
    except BaseException:
        shard.abandon()
        raise
    return shard.finish(skipped=skipped, images=written)


def write_records(job: Job, records: list[dict], images: dict[str, dict], settings: shards.Settings, out: str,
                  skip_bad: bool) -> dict:
    """Writes this job's slice of a source's records (fields, image index, prepared mask) into one shard;
    `images` maps each image path to its index, geometry and raw shape (or the error that skipped it)."""
    shard, skipped = _ShardFile(out, job), []
    try:
        for offset, record in enumerate(records):
            index, image = job.start + offset, images[str(record["image"])]
            try:
                if "error" in image:
                    raise RecordError(f"its image was skipped: {image['error']}")
                geometry = Geometry(tuple(image["shape"][1:]), tuple(slice(*b) for b in image["box"]),
                                    tuple(settings.image_size))
                mask = prepare_record_mask(record, geometry, tuple(image["shape"]))
            except (VolumeError, RecordError) as error:
                if not skip_bad:
                    raise RecordError(f"record {index} of {job.key}: {error}") from None
                skipped.append({"index": index, "image": str(record.get("image")), "error": str(error)})
                logging.warning("skipping record %d of %s: %s", index, job.key, error)
                continue
            shard.write(shards.encode_record(record, image["index"], mask, label_map=record["task"] in LABEL_MAP_TASKS))
    except BaseException:
        shard.abandon()
        raise
    return shard.finish(skipped=skipped)


def _run(jobs: list[Job], call, out: str, workers: int, progress, counts: list[int]) -> dict[Job, dict]:
    """Runs each job not done yet, `call(job)` = (function, *arguments) → its sidecar, in `workers`
    processes; returns every job's sidecar. `counts` = [shards done, shards in all] for `progress`."""
    results: dict[Job, dict] = {job: done for job in jobs if (done := _done(out, job)) is not None}
    todo = [job for job in jobs if job not in results]

    def report(job: Job, done: dict) -> None:
        results[job] = done
        counts[0] += 1
        if progress:
            progress(counts[0], counts[1])

    counts[0] += len(results)
    if workers <= 1 or len(todo) <= 1:
        for job in todo:
            function, *arguments = call(job)
            report(job, function(*arguments))
    else:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(min(workers, len(todo)), mp_context=context) as pool:
            futures = {pool.submit(*call(job)): job for job in todo}
            for future in concurrent.futures.as_completed(futures):
                report(futures[future], future.result())
    return results


def prepare_shards(entries: list, root: str, out: str, settings: shards.Settings, *, records_per_shard: int = 256,
                   workers: int = 1, skip_bad_records: bool = False, progress=None) -> dict:
    """Writes the shard set of the config source `entries` (kind, path, split; paths relative to `root`) to
    `out` and returns its manifest: first each distinct volume once (image shards), then each source's
    records. Finished shards of an interrupted run are kept."""
    sources, described = [], []
    for entry in entries:
        if entry["kind"] in UNSHARDABLE:
            raise ConfigError(f"data source {entry['kind']}:{entry['path']}: not prepared into shards "
                              f"({UNSHARDABLE[entry['kind']]}); train it from the raw layout")
        key = shards.source_key(entry, SOURCES[entry["kind"]][1] if entry["kind"] in SOURCES else "")
        if key in (k for k, _ in sources):
            continue
        sources.append((key, list(build_source(entry, root).records)))
        described.append(entry)
    paths = list(dict.fromkeys(str(record["image"]) for _, records in sources for record in records))
    image_jobs = plan([(IMAGES, paths)], records_per_shard, folder=IMAGES)
    record_jobs = plan(sources, records_per_shard)
    counts = [0, len(image_jobs) + len(record_jobs)]
    logging.info("%d distinct volumes, %d records of %d sources: %d shards", len(paths),
                 sum(len(records) for _, records in sources), len(sources), counts[1])

    def image_call(job: Job) -> tuple:
        return write_images, job, paths[job.start:job.stop], settings, out, skip_bad_records

    image_results = _run(image_jobs, image_call, out, workers, progress, counts)
    images = _image_table(image_jobs, image_results)
    records = dict(sources)

    def record_call(job: Job) -> tuple:
        rows = records[job.key][job.start:job.stop]
        needed = {path: images[path] for path in {str(record["image"]) for record in rows}}
        return write_records, job, rows, needed, settings, out, skip_bad_records

    results = _run(record_jobs, record_call, out, workers, progress, counts)
    manifest = _manifest(sources, described, record_jobs, results, image_jobs, image_results, settings)
    fs, path = filesystem(_join(out, shards.MANIFEST))
    with fs.open(path, "w") as handle:
        json.dump(manifest, handle, indent=1)
    return manifest


def _image_table(jobs: list[Job], results: dict[Job, dict]) -> dict[str, dict]:
    """Image path → {index (in the image shards, in order), box, shape}, or {error} for a skipped one."""
    table, index = {}, 0
    for job in jobs:
        for image in results[job]["images"]:
            table[image["path"]] = {"index": index, "box": image["box"], "shape": image["shape"]}
            index += 1
        for skipped in results[job]["skipped"]:
            table[skipped["image"]] = {"error": skipped["error"]}
    return table


def _manifest(sources, entries, jobs: list[Job], results: dict, image_jobs: list[Job], image_results: dict,
              settings: shards.Settings) -> dict:
    def listed_shards(done: list[dict]) -> list[dict]:
        return [{k: d[k] for k in ("file", "records", "bytes", "sha256")} for d in done]

    listed = []
    for position, ((key, records), entry) in enumerate(zip(sources, entries)):
        done = [results[job] for job in jobs if job.position == position]
        listed.append({"key": key, "kind": entry["kind"], "path": entry["path"], "split": key.rsplit(":", 1)[1],
                       "records": len(records), "written": sum(d["records"] for d in done),
                       "skipped": [s for d in done for s in d["skipped"]], "shards": listed_shards(done)})
    images = [image_results[job] for job in image_jobs]
    try:
        version = importlib.metadata.version("m3d-jax")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {"format": shards.FORMAT, "version": shards.VERSION, "m3d_jax_version": version,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "settings": settings.to_json(), "image_error_bound": _error_bound(settings.storage),
            "images": {"distinct": sum(d["records"] for d in images) + sum(len(d["skipped"]) for d in images),
                       "written": sum(d["records"] for d in images),
                       "skipped": [s for d in images for s in d["skipped"]], "shards": listed_shards(images)},
            "sources": listed}


def _error_bound(storage: str) -> float:
    """The largest |stored − float32| of an image voxel in [0, 1]."""
    return 1 / 510 if storage == "uint8" else 2.0 ** -9
