"""Loading, saving and converting checkpoints of every registered kind (m3d_jax.convert.kind), streaming
one tensor (or one layer slice) at a time in both directions.

  detect        the kind and config of a folder or file (from m3d_jax.convert.kind)
  load          an m3d-jax parameter folder or a released checkpoint (converted in memory) → model
  read_released a released checkpoint → (model, ConversionReport)
  save_jax      model → m3d-jax parameter folder
  export        model → the released PyTorch layout
  torch_to_jax  released checkpoint → m3d-jax parameter folder, streamed
  jax_to_torch  m3d-jax parameter folder → released layout, streamed

An m3d-jax parameter folder holds `config.json` (the model's transformers-style config plus
`"m3d_jax_kind"`) and safetensors shards keyed by the JAX parameter paths (e.g.
`language_model.layers.self_attn.q_proj.kernel`, stacked over layers), in the parameters' own layout.
A released layout is one weight folder per part of its kind (Med-2E3: llm/, vision2d_model/, ...), each
converted with its own key map; a kind with its own `read` / `write` (Med3DInsight's single `.pth`) goes
through the whole model in host memory.

Writers produce their output complete or not at all: a destination that holds something is refused unless
`overwrite`, which replaces it whole, and one that is the source, lies inside it or holds it is refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from m3d_jax.convert.keymap import (
    ConversionReport, Entry, FusedLinear, _flat_values, _progress, _to_torch, check_checkpoint, jax_pieces,
    piece_shapes, read_state, write_state,
)
from m3d_jax.convert.kind import KIND_KEY, Kind, Part, detect, is_jax_folder, kind_of
from m3d_jax.convert.torch_io import (
    CheckpointReader, CheckpointReadError, TensorSpec, atomic_output, check_output, write_checkpoint,
)
from m3d_jax.sharding import on_host

Expected = str | Sequence[str] | None


def load(path: str | os.PathLike, *, expect: Expected = None, config: Any = None, **overrides) -> nnx.Module:
    """The model of an m3d-jax parameter folder, or of a released checkpoint converted in memory.

    `expect` names the kind (or kinds) the caller can use; another is an error naming both. `config`
    replaces the detected config (for layouts whose files do not record everything); `overrides`
    replace fields of it (e.g. `dtype`)."""
    kind, config = _detected(path, expect, config, overrides)
    if is_jax_folder(path):
        return _load_jax(Path(path), kind, config)
    return _read_released(Path(path), kind, config)[0]


def read_released(path: str | os.PathLike, *, expect: Expected = None, config: Any = None, **overrides
                  ) -> tuple[nnx.Module, ConversionReport]:
    """A released (PyTorch) checkpoint → the model and the conversion report (`load`'s arguments)."""
    kind, config = _detected(path, expect, config, overrides)
    if is_jax_folder(path):
        raise CheckpointReadError(f"{path}: an m3d-jax parameter folder, not a released checkpoint; load it with "
                                  "m3d_jax.convert.load")
    return _read_released(Path(path), kind, config)


def _detected(path, expect: Expected, config: Any, overrides: dict) -> tuple[Kind, Any]:
    kind, detected = detect(path)
    wanted = (expect,) if isinstance(expect, str) else tuple(expect or ())
    if wanted and kind.name not in wanted:
        raise CheckpointReadError(f"{path}: a {kind.title} checkpoint (kind {kind.name}), but this needs "
                                  f"{' or '.join(wanted)}")
    config = detected if config is None else config
    return kind, dataclasses.replace(config, **overrides) if overrides else config


def _load_jax(folder: Path, kind: Kind, config: Any) -> nnx.Module:
    params = CheckpointReader(folder)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: kind.build(config)))
    flat = []
    for path, variable in nnx.to_flat_state(abstract):
        name = ".".join(map(str, path))
        if name not in params.keys():
            raise CheckpointReadError(f"{folder}: parameter {name} is missing")
        value = params.read(name)
        if value.shape != variable.shape:
            raise CheckpointReadError(f"{folder}: parameter {name} has shape {value.shape}, expected {variable.shape}")
        flat.append((path, variable.replace(jax.device_put(np.asarray(value, variable.dtype)))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))


def _read_released(path: Path, kind: Kind, config: Any) -> tuple[nnx.Module, ConversionReport]:
    if kind.read is not None:
        return kind.read(path, config)
    model = nnx.eval_shape(lambda: kind.build(config))
    report = read_parts(path, kind, config, model)
    return model, report


def read_parts(path: str | os.PathLike, kind: Kind, config: Any, model: nnx.Module,
               parts: Sequence[Part] | None = None) -> ConversionReport:
    """Fills `model` (built abstractly with `nnx.eval_shape`) in place from the released weight folders
    of `parts` (the kind's by default, which must cover every parameter). Ignored keys are reported as
    `<part folder>/<key>`."""
    path = Path(path)
    parts = kind.parts if parts is None else parts
    _check_part_folders(path, kind, parts)
    converted, ignored = 0, []
    for part in parts:
        module = _submodule(model, part.module)
        state, report = read_state(CheckpointReader(path / part.folder), part.keymap(config), nnx.state(module))
        nnx.update(module, state)
        converted += report.converted
        ignored += _in_folder(part, report.ignored)
    return ConversionReport(converted=converted, ignored=ignored)


def _in_folder(part: Part, ignored: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Ignored (key, reason) pairs of a part, keys as `<part folder>/<key>` where the part has a folder."""
    return [(f"{part.folder}/{key}" if part.folder else key, why) for key, why in ignored]


def _check_part_folders(path: Path, kind: Kind, parts: Sequence[Part]) -> None:
    for part in parts:
        if part.folder and not (path / part.folder).is_dir():
            raise CheckpointReadError(f"{path / part.folder}: missing; a {kind.title} folder holds "
                                      f"{', '.join(p.folder for p in kind.parts)}")


def _submodule(model: nnx.Module, dotted: str) -> nnx.Module:
    for name in filter(None, dotted.split(".")):
        model = getattr(model, name)
    return model


def _prefix(part: Part) -> str:
    return f"{part.module}." if part.module else ""


def _write_parts(dst: str | os.PathLike, kind: Kind, config: Any, overwrite: bool,
                 write_part: Callable[[Part, Path, dict | None, bool], Any]) -> None:
    """Writes the released layout: a root-only kind as one folder with the kind's config.json, else one
    folder per part (with the part's own config.json, if any) under a root config.json."""
    if [part.folder for part in kind.parts] == [""]:
        write_part(kind.parts[0], Path(dst), kind.config_to_hf(config), overwrite)
        return
    with atomic_output(dst, overwrite=overwrite) as tmp:
        for part in kind.parts:
            write_part(part, tmp / part.folder, part.config_json(config), False)
        (tmp / "config.json").write_text(json.dumps(kind.config_to_hf(config), indent=2))


def export(model: nnx.Module, dst: str | os.PathLike, *, dtype=None, max_shard_bytes: int = 5 * 2**30,
           overwrite: bool = False) -> None:
    """Writes `model` in its kind's released PyTorch layout, in the parameters' dtype unless `dtype`."""
    kind = kind_of(model)
    if kind.write is not None:
        kind.write(model, dst, dtype, overwrite=overwrite)
        return
    _write_parts(dst, kind, model.config, overwrite, lambda part, folder, config_json, replace: write_state(
        folder, part.keymap(model.config), nnx.state(_submodule(model, part.module)), dtype=dtype,
        config=config_json, max_shard_bytes=max_shard_bytes, overwrite=replace))


def _abstract_shapes(kind: Kind, config: Any) -> dict[str, nnx.Variable]:
    return _flat_values(nnx.state(nnx.eval_shape(lambda: kind.build(config))))


def _part_entries(kind: Kind, config: Any, shapes: dict[str, tuple]) -> list[tuple[Part, dict, list[Entry]]]:
    """(part, its parameters' shapes relative to its sub-module, its key-map entries) per part; every
    parameter must belong to one part."""
    result, covered = [], set()
    for part in kind.parts:
        prefix = _prefix(part)
        local = {p[len(prefix):]: shape for p, shape in shapes.items() if p.startswith(prefix)}
        result.append((part, local, part.keymap(config).expand(local)))
        covered |= {prefix + p for p in local}
    uncovered = sorted(set(shapes) - covered)
    if uncovered:
        raise KeyError(f"the {kind.name} parts do not cover parameters {uncovered[:10]}")
    return result


def torch_to_jax(src: str | os.PathLike, dst: str | os.PathLike, *, dtype=None, progress: bool = False,
                 max_shard_bytes: int = 5 * 2**30, overwrite: bool = False) -> ConversionReport:
    """Released checkpoint → m3d-jax parameter folder, one torch tensor at a time; parameters are stored
    in `dtype` if given, else in the model's parameter dtype (`load` casts on load)."""
    check_output(dst, overwrite=overwrite, inputs=[src])
    kind, config = detect(src)
    if kind.read is not None:
        with on_host():
            model, report = kind.read(Path(src), config)
            save_jax(model, dst, dtype=dtype, max_shard_bytes=max_shard_bytes, overwrite=overwrite)
        return report
    _check_part_folders(Path(src), kind, kind.parts)
    flat = _abstract_shapes(kind, config)
    shapes = {p: tuple(v.shape) for p, v in flat.items()}
    sources: dict[str, list] = {}  # JAX path -> [(entry, its index in entry.jax_paths, reader, part-local shapes)]
    ignored, count = [], 0
    for part, local, entries in _part_entries(kind, config, shapes):
        reader = CheckpointReader(Path(src) / part.folder)
        ignored += _in_folder(part, check_checkpoint(reader, part.keymap(config), entries))
        count += len(entries)
        for entry in entries:
            for which, path in enumerate(entry.jax_paths):
                sources.setdefault(_prefix(part) + path, []).append((entry, which, reader, local))
    stored = {p: np.dtype(dtype) if dtype is not None else np.dtype(flat[p].dtype) for p in sources}
    specs = [TensorSpec(path, shapes[path], stored[path]) for path in sorted(sources)]
    bar = _progress(range(count), progress, "torch -> jax")
    counter = iter(bar) if progress else None

    def produce(path: str):
        for entry, which, reader, local in sorted(sources[path], key=lambda s: s[0].layer or 0):
            if isinstance(entry.transform, FusedLinear):  # read only this kernel's rows of the fused weight
                shapes_of_pieces = piece_shapes(entry, local)
                rows = reader.read(entry.torch_key, entry.transform.rows(shapes_of_pieces, which))
                piece = entry.transform.part_to_jax(rows, shapes_of_pieces[which]).astype(stored[path], copy=False)
            else:
                piece = jax_pieces(entry, reader.read(entry.torch_key), local)[which].astype(stored[path], copy=False)
            if counter is not None and which == 0:
                next(counter, None)
            yield piece if entry.layer is None else piece[None]

    hf = kind.config_to_hf(config) | {KIND_KEY: kind.name}
    write_checkpoint(dst, specs, produce, max_shard_bytes=max_shard_bytes, config=hf, overwrite=overwrite)
    if progress:
        bar.close()
    return ConversionReport(converted=count, ignored=ignored)


def jax_to_torch(src: str | os.PathLike, dst: str | os.PathLike, *, dtype=None, progress: bool = False,
                 max_shard_bytes: int = 5 * 2**30, overwrite: bool = False) -> int:
    """m3d-jax parameter folder → the released layout, one tensor at a time; returns the tensor count.
    Tensors keep the folder's stored dtype unless `dtype` is given."""
    check_output(dst, overwrite=overwrite, inputs=[src])
    kind, config = detect(src)
    if not is_jax_folder(src):
        raise CheckpointReadError(f"{src}: a released {kind.title} checkpoint, not an m3d-jax parameter folder; "
                                  "jax2torch reads what torch2jax wrote")
    if kind.write is not None:
        with on_host():
            return kind.write(_load_jax(Path(src), kind, config), dst, dtype, overwrite=overwrite)
    params = CheckpointReader(src)
    flat = _abstract_shapes(kind, config)
    missing = sorted(set(flat) - set(params.keys()))
    if missing:
        raise CheckpointReadError(f"{src}: m3d-jax parameter folder lacks {len(missing)} parameters: {missing[:10]}")
    entries_of = {part.folder: entries
                  for part, _, entries in _part_entries(kind, config, {p: tuple(v.shape) for p, v in flat.items()})}
    total = sum(map(len, entries_of.values()))
    bar = _progress(range(total), progress, "jax -> torch")
    counter = iter(bar) if progress else None

    def write_part(part: Part, folder: Path, config_json: dict | None, replace: bool) -> None:
        entries = entries_of[part.folder]
        by_key = {e.torch_key: e for e in entries}
        specs = [TensorSpec(e.torch_key, e.torch_shape, np.dtype(dtype) if dtype is not None
                            else params.info(_prefix(part) + e.jax_paths[0]).dtype) for e in entries]
        out_dtype = {spec.key: spec.dtype for spec in specs}
        get = lambda path, layer: params.read(_prefix(part) + path, layer)  # noqa: E731  (a layer's slice)

        def produce(key):
            if counter is not None:
                next(counter, None)
            return _to_torch(by_key[key], get, out_dtype[key])

        write_checkpoint(folder, specs, produce, max_shard_bytes=max_shard_bytes, config=config_json, overwrite=replace)

    _write_parts(dst, kind, config, overwrite, write_part)
    if progress:
        bar.close()
    return total


def save_jax(model: nnx.Module, folder: str | os.PathLike, *, dtype=None, max_shard_bytes: int = 5 * 2**30,
             overwrite: bool = False) -> list[Path]:
    """Writes an m3d-jax parameter folder (config.json + safetensors keyed by parameter path), in the
    parameters' dtype unless `dtype` is given."""
    kind = kind_of(model)
    values = _flat_values(nnx.state(model))
    stored = {path: np.dtype(dtype if dtype is not None else v.dtype) for path, v in values.items()}
    specs = [TensorSpec(path, tuple(v.shape), stored[path]) for path, v in sorted(values.items())]
    produce = lambda path: np.asarray(jax.device_get(values[path][...])).astype(stored[path], copy=False)  # noqa: E731
    hf = kind.config_to_hf(model.config) | {KIND_KEY: kind.name}
    return write_checkpoint(folder, specs, produce, max_shard_bytes=max_shard_bytes, config=hf, overwrite=overwrite)
