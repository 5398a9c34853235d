"""Writing prepared shards (`shards.py`) from a data config's sources, in parallel processes, resumable:
a shard is written under a temporary name and moved into place when complete, then its sidecar JSON
marks it done, so a rerun keeps finished shards and redoes the rest. The manifest is written last."""

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
from m3d_jax.data.prepared import LABEL_MAP_TASKS, prepare_record
from m3d_jax.errors import ConfigError, RecordError, VolumeError

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


def plan(sources: list[tuple[str, list[dict]]], records_per_shard: int) -> list[Job]:
    """The shards of each (key, records) source, `records_per_shard` consecutive records each."""
    jobs = []
    for position, (key, records) in enumerate(sources):
        count = max(1, -(-len(records) // records_per_shard))
        folder = shards.source_folder(position, key)
        jobs += [Job(position, key, folder, shard, count, shard * records_per_shard,
                     min(len(records), (shard + 1) * records_per_shard)) for shard in range(count)]
    return jobs


def _join(root: str, name: str) -> str:
    return f"{root.rstrip('/')}/{name}"


def _done(out: str, job: Job) -> dict | None:
    """The sidecar of a finished shard (its shard file present at the recorded size), else None."""
    fs, path = shards._filesystem(_join(out, job.file))
    sidecar = path.removesuffix(".array_record") + ".json"
    try:
        with fs.open(sidecar, "r") as handle:
            done = json.load(handle)
        return done if fs.size(path) == done["bytes"] else None
    except (FileNotFoundError, ValueError, KeyError):
        return None


def write_shard(job: Job, records: list[dict], settings: shards.Settings, out: str, skip_bad: bool) -> dict:
    """Prepares `records` (this job's slice), writes the shard and its sidecar; returns the sidecar."""
    from array_record.python import array_record_module

    fs, path = shards._filesystem(_join(out, job.file))
    remote = shards._is_remote(out)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    local_dir = tempfile.mkdtemp(prefix="m3d-shard-") if remote else path.rsplit("/", 1)[0]
    partial = os.path.join(local_dir, os.path.basename(path) + ".partial")
    skipped, written = [], 0
    writer = array_record_module.ArrayRecordWriter(partial, shards.WRITER_OPTIONS)
    try:
        for offset, record in enumerate(records):
            index = job.start + offset
            try:
                image, mask = prepare_record(record, settings.image_size, settings.window, settings.in_channels)
            except (VolumeError, RecordError) as error:
                if not skip_bad:
                    raise RecordError(f"record {index} of {job.key}: {error}") from None
                skipped.append({"index": index, "image": str(record.get("image")), "error": str(error)})
                logging.warning("skipping record %d of %s: %s", index, job.key, error)
                continue
            writer.write(shards.encode(record, image, mask, storage=settings.storage,
                                       label_map=record["task"] in LABEL_MAP_TASKS))
            written += 1
    finally:
        writer.close()
    checksum, size = shards._sha256(partial), os.path.getsize(partial)
    if remote:
        fs.put_file(partial, path)
        os.remove(partial)
        os.rmdir(local_dir)
    else:
        os.replace(partial, path)
    done = {"file": job.file, "records": written, "bytes": size, "sha256": checksum, "skipped": skipped}
    with fs.open(path.removesuffix(".array_record") + ".json", "w") as handle:
        json.dump(done, handle)
    return done


def prepare_shards(entries: list, root: str, out: str, settings: shards.Settings, *, records_per_shard: int = 256,
                   workers: int = 1, skip_bad_records: bool = False, progress=None) -> dict:
    """Writes the shard set of the config source `entries` (kind, path, split; paths relative to `root`) to
    `out` and returns its manifest. Finished shards of an interrupted run are kept."""
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
    jobs = plan(sources, records_per_shard)
    results: dict[Job, dict] = {job: done for job in jobs if (done := _done(out, job)) is not None}
    todo = [job for job in jobs if job not in results]
    logging.info("%d shards: %d done before, %d to write", len(jobs), len(results), len(todo))
    records = dict(sources)

    def slice_of(job: Job) -> list[dict]:
        return records[job.key][job.start:job.stop]

    if workers <= 1 or len(todo) <= 1:
        for job in todo:
            results[job] = write_shard(job, slice_of(job), settings, out, skip_bad_records)
            if progress:
                progress(len(results), len(jobs))
    else:
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(workers, mp_context=context) as pool:
            futures = {pool.submit(write_shard, job, slice_of(job), settings, out, skip_bad_records): job
                       for job in todo}
            for future in concurrent.futures.as_completed(futures):
                results[futures[future]] = future.result()
                if progress:
                    progress(len(results), len(jobs))
    manifest = _manifest(sources, described, jobs, results, settings)
    fs, path = shards._filesystem(_join(out, shards.MANIFEST))
    with fs.open(path, "w") as handle:
        json.dump(manifest, handle, indent=1)
    return manifest


def _manifest(sources, entries, jobs: list[Job], results: dict, settings: shards.Settings) -> dict:
    listed = []
    for position, ((key, records), entry) in enumerate(zip(sources, entries)):
        done = [results[job] for job in jobs if job.position == position]
        listed.append({"key": key, "kind": entry["kind"], "path": entry["path"], "split": key.rsplit(":", 1)[1],
                       "records": len(records), "written": sum(d["records"] for d in done),
                       "skipped": [s for d in done for s in d["skipped"]],
                       "shards": [{k: d[k] for k in ("file", "records", "bytes", "sha256")} for d in done]})
    try:
        version = importlib.metadata.version("m3d-jax")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {"format": shards.FORMAT, "version": shards.VERSION, "m3d_jax_version": version,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "settings": settings.to_json(), "image_error_bound": _error_bound(settings.storage),
            "sources": listed}


def _error_bound(storage: str) -> float:
    """The largest |stored − float32| of an image voxel in [0, 1]."""
    return 1 / 510 if storage == "uint8" else 2.0 ** -9
