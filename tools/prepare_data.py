"""Prepare a data mixture into ArrayRecord shards of preprocessed samples (`m3d_jax/data/shards.py`):
each record holds its volume after M3D's deterministic preparation (min-max, foreground crop, resize),
its mask, text fields and source; augmentation and tokenization stay online. Train from them with
`--config.data.shards=OUT`.

  python tools/prepare_data.py --config=configs/data_m3d.py --config.root=/data/M3D-Data --out=/data/m3d-shards
  python tools/prepare_data.py --config=configs/demo.py --image_size=32,64,64 --out=data/phantom_shards

  python tools/prepare_data.py --config=configs/bench.py:phantoms --image_size=32,64,64 --out=data/bench_shards

--config takes a data config, a training config (its data sources and its eval sources) or a bench config
(the sources of its tasks, for `tools/evaluate.py --shards`). --out may be a
folder or an fsspec URL (gs://, s3://). Rerunning after an interruption keeps the finished shards.
"""

from __future__ import annotations

import os
import sys
import time

from absl import flags
from ml_collections import config_flags

from m3d_jax.cli import run, volume_size
from m3d_jax.data.phantoms import ensure_phantoms
from m3d_jax.data.shard_writer import prepare_shards
from m3d_jax.data.pipeline import SOURCES
from m3d_jax.data.shards import STORAGE, Settings, source_key

_CONFIG = config_flags.DEFINE_config_file("config", "configs/data_m3d.py", "Data or training config.",
                                          lock_config=False)
_OUT = flags.DEFINE_string("out", None, "Output folder or URL of the shard set.", required=True)
_SIZE = flags.DEFINE_list("image_size", ["32", "256", "256"], "Prepared volume size D,H,W (the model's).")
_STORAGE = flags.DEFINE_enum("storage", "uint8", list(STORAGE), "Image storage (uint8: error ≤ 1/510).")
_PER_SHARD = flags.DEFINE_integer("records_per_shard", 256, "Records per shard file.", lower_bound=1)
_WORKERS = flags.DEFINE_integer("workers", os.cpu_count() or 1, "Parallel processes.", lower_bound=1)
_SKIP = flags.DEFINE_bool("skip_bad_records", None, "Skip and list unreadable records in the manifest "
                          "(default: the config's data.skip_bad_records); otherwise the first one stops the run.")


def _progress(done: int, total: int) -> None:
    """A line per shard on a terminal (rewritten in place), else one line per tenth of the shards."""
    if sys.stdout.isatty():
        print(f"\r{done}/{total} shards", end="\n" if done == total else "", flush=True)
    elif done == total or done % max(1, total // 10) == 0:
        print(f"{done}/{total} shards", flush=True)


def main(argv):
    del argv
    config = _CONFIG.value
    data = config.data if "data" in config else config
    if "tasks" in config:  # a bench config (configs/bench.py[:layout]): the sources its tasks read, once each
        entries = list({source_key(dict(e), SOURCES[e["kind"]][1]): dict(e) for e in config.tasks.values()}.values())
    else:
        entries = list(data.sources) + (list(config.eval.get("sources", [])) if "eval" in config else [])
    ensure_phantoms(data)
    window = data.get("window")
    settings = Settings(volume_size(_SIZE.value, "image_size"), tuple(window) if window else None,
                        int(data.get("in_channels", 1)), _STORAGE.value)
    skip = data.get("skip_bad_records", False) if _SKIP.value is None else _SKIP.value
    started = time.time()
    manifest = prepare_shards(entries, data.get("root"), _OUT.value, settings, records_per_shard=_PER_SHARD.value,
                              workers=_WORKERS.value, skip_bad_records=skip,
                              progress=_progress)
    images = manifest["images"]
    skipped = f", {len(images['skipped'])} skipped (listed in the manifest)" if images["skipped"] else ""
    print(f"images: {images['written']} distinct volumes in {len(images['shards'])} shards{skipped}")
    for source in manifest["sources"]:
        skipped = f", {len(source['skipped'])} skipped (listed in the manifest)" if source["skipped"] else ""
        print(f"{source['key']}: {source['written']} of {source['records']} records in {len(source['shards'])} "
              f"shards{skipped}")
    print(f"wrote {_OUT.value} in {time.time() - started:.0f} s; train with --config.data.shards={_OUT.value}")


if __name__ == "__main__":
    run(main)
