"""Declarative torch ↔ JAX key maps, applied in both directions from the same table.

A `Rule` ties one PyTorch key pattern to one or more JAX parameter paths and a `Transform`. Patterns may
hold `{layer}`: the JAX parameter then has a leading "layers" axis (stacked layers) and the rule expands
to one torch key per layer. Reading is strict: missing, unexpected, mis-shaped and wrongly typed tensors
are all collected and reported in one `CheckpointMismatchError`; keys that exist in some checkpoints but
do not matter are listed in the map as ignored, with the reason, and returned in the report.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from m3d_jax.convert.torch_io import CheckpointReader, TensorSpec, write_checkpoint
from m3d_jax.errors import InputError

Shape = tuple[int, ...]


class CheckpointMismatchError(InputError):
    """The checkpoint's keys, shapes or dtypes do not match the model the key map describes."""


# --- transforms: per-tensor maps between the torch layout and the JAX layout -----------------------


def transposed(matrix: np.ndarray, block: int = 256) -> np.ndarray:
    """A contiguous transpose of a 2D array, copied in cache-sized tiles (≈2× numpy's plain strided copy
    for the large weight matrices a conversion moves)."""
    rows, cols = matrix.shape
    out = np.empty((cols, rows), matrix.dtype)
    for i in range(0, rows, block):
        for j in range(0, cols, block):
            out[j : j + block, i : i + block] = matrix[i : i + block, j : j + block].T
    return out


class Transform:
    """Identity: the torch tensor and the JAX parameter have the same shape."""

    def torch_shape(self, jax_shapes: Sequence[Shape]) -> Shape:
        (shape,) = jax_shapes
        return tuple(shape)

    def to_jax(self, tensor: np.ndarray, jax_shapes: Sequence[Shape]) -> list[np.ndarray]:
        return [tensor.reshape(jax_shapes[0])]

    def to_torch(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        return arrays[0].reshape(self.torch_shape([a.shape for a in arrays]))


IDENTITY = Transform()


class Reshape(Transform):
    """Same elements, another shape: e.g. torch [1, N, D] position table ↔ JAX [N, D], or a flat torch
    bias ↔ a grouped JAX bias [3, heads, head_dim]. `leading_ones` ones are prepended to the flat torch
    shape (torch shape = (1,)*leading_ones + jax shape) unless `flatten` asks for a 1D torch tensor."""

    def __init__(self, *, leading_ones: int = 0, flatten: bool = False):
        self.leading_ones = leading_ones
        self.flatten = flatten

    def torch_shape(self, jax_shapes: Sequence[Shape]) -> Shape:
        (shape,) = jax_shapes
        return (math.prod(shape),) if self.flatten else (1,) * self.leading_ones + tuple(shape)


class Linear(Transform):
    """torch Linear weight [out, in] ↔ JAX kernel [*in_axes, *out_axes]; the first `n_in` kernel axes
    are the input."""

    def __init__(self, n_in: int = 1):
        self.n_in = n_in

    def torch_shape(self, jax_shapes: Sequence[Shape]) -> Shape:
        (shape,) = jax_shapes
        return (math.prod(shape[self.n_in:]), math.prod(shape[: self.n_in]))

    def to_jax(self, tensor: np.ndarray, jax_shapes: Sequence[Shape]) -> list[np.ndarray]:
        return [transposed(tensor).reshape(jax_shapes[0])]

    def to_torch(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        (kernel,) = arrays
        return transposed(kernel.reshape(self.torch_shape([kernel.shape])[::-1]))


LINEAR = Linear()


class FusedLinear(Transform):
    """One torch Linear weight whose output rows stack several JAX kernels [in, *out_i] in order, e.g.
    Phi-3's qkv_proj (rows q, k, v) or gate_up_proj (rows gate, up)."""

    def torch_shape(self, jax_shapes: Sequence[Shape]) -> Shape:
        fan_in = jax_shapes[0][0]
        return (sum(math.prod(shape[1:]) for shape in jax_shapes), fan_in)

    def to_jax(self, tensor: np.ndarray, jax_shapes: Sequence[Shape]) -> list[np.ndarray]:
        bounds = np.cumsum([math.prod(shape[1:]) for shape in jax_shapes])[:-1]
        return [transposed(rows).reshape(shape) for rows, shape in zip(np.split(tensor, bounds, axis=0), jax_shapes)]

    def to_torch(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        return np.concatenate([transposed(kernel.reshape(kernel.shape[0], -1)) for kernel in arrays], axis=0)

    def rows(self, jax_shapes: Sequence[Shape], index: int) -> slice:
        """The torch rows that hold kernel `index` (so it can be read alone)."""
        sizes = [math.prod(shape[1:]) for shape in jax_shapes]
        start = sum(sizes[:index])
        return slice(start, start + sizes[index])

    def part_to_jax(self, rows: np.ndarray, jax_shape: Shape) -> np.ndarray:
        return transposed(rows).reshape(jax_shape)


class FusedBias(Transform):
    """One flat torch bias whose entries stack several JAX biases in order, e.g. torch MultiheadAttention's
    `in_proj_bias` (q, k, v) ↔ three [heads, head_dim] biases."""

    def torch_shape(self, jax_shapes: Sequence[Shape]) -> Shape:
        return (sum(math.prod(shape) for shape in jax_shapes),)

    def to_jax(self, tensor: np.ndarray, jax_shapes: Sequence[Shape]) -> list[np.ndarray]:
        bounds = np.cumsum([math.prod(shape) for shape in jax_shapes])[:-1]
        return [part.reshape(shape) for part, shape in zip(np.split(tensor, bounds), jax_shapes, strict=True)]

    def to_torch(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        return np.concatenate([array.reshape(-1) for array in arrays])


class Conv3dKernel(Transform):
    """torch Conv3d weight (O, I, k, k, k) ↔ JAX kernel (k, k, k, I, O)."""

    def torch_shape(self, jax_shapes: Sequence[Shape]) -> Shape:
        ((*kernel, fan_in, fan_out),) = jax_shapes
        return (fan_out, fan_in, *kernel)

    def to_jax(self, tensor: np.ndarray, jax_shapes: Sequence[Shape]) -> list[np.ndarray]:
        return [np.ascontiguousarray(tensor.transpose(2, 3, 4, 1, 0))]

    def to_torch(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        return np.ascontiguousarray(arrays[0].transpose(4, 3, 0, 1, 2))


class ConvTranspose3dKernel(Transform):
    """torch ConvTranspose3d weight (I, O, k, k, k) ↔ JAX kernel (k, k, k, I, O) (stride = kernel: no overlap,
    so no kernel flip)."""

    def torch_shape(self, jax_shapes: Sequence[Shape]) -> Shape:
        ((*kernel, fan_in, fan_out),) = jax_shapes
        return (fan_in, fan_out, *kernel)

    def to_jax(self, tensor: np.ndarray, jax_shapes: Sequence[Shape]) -> list[np.ndarray]:
        return [np.ascontiguousarray(tensor.transpose(2, 3, 4, 0, 1))]

    def to_torch(self, arrays: Sequence[np.ndarray]) -> np.ndarray:
        return np.ascontiguousarray(arrays[0].transpose(3, 4, 0, 1, 2))


@dataclasses.dataclass(frozen=True)
class Rule:
    torch: str  # e.g. "blocks.{layer}.attn.qkv.weight"
    jax: str | tuple[str, ...]  # dotted parameter path(s), e.g. "blocks.attn.qkv.kernel"
    transform: Transform = IDENTITY

    @property
    def jax_paths(self) -> tuple[str, ...]:
        return (self.jax,) if isinstance(self.jax, str) else tuple(self.jax)

    @property
    def stacked(self) -> bool:
        return "{layer}" in self.torch


def norm_rules(torch_name: str, jax_name: str) -> list[Rule]:
    """A torch LayerNorm's weight / bias ↔ the JAX norm's scale / bias."""
    return [Rule(f"{torch_name}.weight", f"{jax_name}.scale"), Rule(f"{torch_name}.bias", f"{jax_name}.bias")]


@dataclasses.dataclass(frozen=True)
class Entry:
    """One concrete torch tensor of a key map expanded against a model."""

    torch_key: str
    torch_shape: Shape
    jax_paths: tuple[str, ...]
    layer: int | None
    transform: Transform


@dataclasses.dataclass(frozen=True)
class KeyMap:
    """The full mapping of one checkpoint layout: rules, a key prefix, and torch keys to ignore."""

    name: str
    rules: tuple[Rule, ...]
    prefix: str = ""
    ignored: tuple[tuple[str, str], ...] = ()  # (pattern with {layer}/*, reason), matched after the prefix

    def nested(self, torch_prefix: str, jax_prefix: str) -> KeyMap:
        """The same map for a sub-module: torch keys under `torch_prefix`, JAX paths under `jax_prefix`
        (e.g. the ViT3D map as SegVol's `image_encoder.`). The own prefix is folded into the rules."""
        rules = tuple(
            dataclasses.replace(rule, torch=torch_prefix + self.prefix + rule.torch,
                                jax=tuple(jax_prefix + path for path in rule.jax_paths))
            for rule in self.rules
        )
        ignored = tuple((torch_prefix + self.prefix + pattern, reason) for pattern, reason in self.ignored)
        return KeyMap(self.name, rules, "", ignored)

    @classmethod
    def combine(cls, name: str, *parts: KeyMap, prefix: str = "") -> KeyMap:
        """One map from several (already nested) parts."""
        return cls(name, tuple(r for p in parts for r in p.rules), prefix, tuple(i for p in parts for i in p.ignored))

    def expand(self, shapes: Mapping[str, Shape]) -> list[Entry]:
        """Concrete entries for a model whose parameters have these (dotted path → shape)."""
        entries, claimed = [], set()
        for rule in self.rules:
            missing = [p for p in rule.jax_paths if p not in shapes]
            if missing:
                raise KeyError(f"key map {self.name!r}: rule for {rule.torch!r} names unknown parameters {missing}")
            claimed.update(rule.jax_paths)
            full_shapes = [shapes[p] for p in rule.jax_paths]
            if not rule.stacked:
                torch_shape = rule.transform.torch_shape(full_shapes)
                entries.append(Entry(self.prefix + rule.torch, torch_shape, rule.jax_paths, None, rule.transform))
                continue
            num_layers = full_shapes[0][0]
            layer_shapes = [s[1:] for s in full_shapes]
            torch_shape = rule.transform.torch_shape(layer_shapes)
            for layer in range(num_layers):
                key = self.prefix + rule.torch.format(layer=layer)
                entries.append(Entry(key, torch_shape, rule.jax_paths, layer, rule.transform))
        unclaimed = sorted(set(shapes) - claimed)
        if unclaimed:
            raise KeyError(f"key map {self.name!r} does not cover parameters {unclaimed}")
        return entries

    def ignored_reason(self, key: str) -> str | None:
        if not key.startswith(self.prefix):
            return None
        local = key[len(self.prefix):]
        for pattern, reason in self.ignored:
            regex = re.escape(pattern).replace(r"\{layer\}", r"\d+").replace(r"\*", ".*")
            if re.fullmatch(regex, local):
                return reason
        return None


@dataclasses.dataclass
class ConversionReport:
    converted: int
    ignored: list[tuple[str, str]]  # (torch key, reason)


def _describe(keys: Sequence[str], limit: int = 25) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def check_checkpoint(reader: CheckpointReader, keymap: KeyMap, entries: Sequence[Entry]) -> list[tuple[str, str]]:
    """Raises `CheckpointMismatchError` listing every missing, unexpected, mis-shaped and non-float tensor;
    returns the (key, reason) pairs the key map ignores."""
    expected = {e.torch_key: e for e in entries}
    present = set(reader.keys())
    missing = sorted(set(expected) - present)
    ignored, unexpected = [], []
    for key in sorted(present - set(expected)):
        reason = keymap.ignored_reason(key)
        (ignored.append((key, reason)) if reason else unexpected.append(key))
    bad_shape, bad_dtype = [], []
    for key in sorted(present & set(expected)):
        info = reader.info(key)
        if info.shape != expected[key].torch_shape:
            bad_shape.append(f"{key} (file {info.file.name}: {list(info.shape)}, expected {list(expected[key].torch_shape)})")
        if not jnp.issubdtype(info.dtype, jnp.floating):  # jnp knows bfloat16 and float8
            bad_dtype.append(f"{key} (file {info.file.name}: {info.dtype}, expected a floating dtype)")
    problems = [
        f"{len(items)} {what}: {_describe(items)}"
        for what, items in (
            ("missing keys", missing), ("unexpected keys", unexpected),
            ("tensors with the wrong shape", bad_shape), ("tensors with the wrong dtype", bad_dtype),
        )
        if items
    ]
    if problems:
        raise CheckpointMismatchError(
            f"checkpoint {reader.path} does not match the {keymap.name!r} layout:\n  " + "\n  ".join(problems)
        )
    return ignored


def piece_shapes(entry: Entry, shapes: Mapping[str, Shape]) -> list[Shape]:
    """The shapes of `entry`'s JAX values: each parameter's, without the layer axis for stacked rules."""
    return [shapes[p][1:] if entry.layer is not None else shapes[p] for p in entry.jax_paths]


def jax_pieces(entry: Entry, tensor: np.ndarray, shapes: Mapping[str, Shape]) -> list[np.ndarray]:
    """The JAX values (one per path, per-layer slices for stacked rules) of one torch tensor."""
    return entry.transform.to_jax(tensor, piece_shapes(entry, shapes))


def read_state(
    reader: CheckpointReader, keymap: KeyMap, abstract_state: nnx.State, *, progress: bool = False
) -> tuple[nnx.State, ConversionReport]:
    """Converts a PyTorch checkpoint into an `nnx.State` shaped like `abstract_state` (from `nnx.eval_shape`).

    Tensors are read, transformed and cast one at a time into preallocated host arrays in each
    parameter's dtype. Raises `CheckpointMismatchError` listing every problem at once.
    """
    flat = _flat_values(abstract_state)
    shapes = {p: tuple(v.shape) for p, v in flat.items()}
    entries = keymap.expand(shapes)
    ignored = check_checkpoint(reader, keymap, entries)
    arrays = {path: np.empty(var.shape, var.dtype) for path, var in flat.items()}
    for entry in _progress(entries, progress, "torch -> jax"):
        for path, value in zip(entry.jax_paths, jax_pieces(entry, reader.read(entry.torch_key), shapes)):
            target = arrays[path] if entry.layer is None else arrays[path][entry.layer]
            target[...] = value
    state = _replace_values(abstract_state, arrays)
    return state, ConversionReport(converted=len(entries), ignored=ignored)


def _progress(items, enabled: bool, description: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=description, unit="tensor")


def _replace_values(abstract_state: nnx.State, arrays: dict[str, np.ndarray]) -> nnx.State:
    """Moves each host array to the default device as it goes (peak memory: model + one parameter)."""
    flat = []
    for path, var in nnx.to_flat_state(abstract_state):
        flat.append((path, var.replace(jax.device_put(arrays.pop(".".join(map(str, path)))))))
    return nnx.from_flat_state(flat)


def _flat_values(state: nnx.State) -> dict[str, nnx.Variable]:
    return {".".join(map(str, path)): var for path, var in nnx.to_flat_state(state)}


def torch_shapes(keymap: KeyMap, state: nnx.State) -> dict[str, Shape]:
    """torch key → shape of every tensor the key map writes for this (abstract or real) state."""
    values = _flat_values(state)
    return {e.torch_key: e.torch_shape for e in keymap.expand({p: tuple(v.shape) for p, v in values.items()})}


def _to_torch(entry: Entry, get: Callable[[str, int | None], np.ndarray], dtype: Any) -> np.ndarray:
    """The torch tensor of `entry`; `get(path, layer)` returns a JAX value (its layer slice if stacked)."""
    tensor = entry.transform.to_torch([np.asarray(get(path, entry.layer)) for path in entry.jax_paths])
    return tensor.astype(np.dtype(dtype), copy=False) if dtype is not None else tensor


def _state_getter(values: Mapping[str, nnx.Variable]) -> Callable[[str, int | None], np.ndarray]:
    def get(path: str, layer: int | None) -> np.ndarray:
        value = values[path][...] if layer is None else values[path][layer]
        return np.asarray(jax.device_get(value))

    return get


def write_state(
    out_dir: str | os.PathLike,
    keymap: KeyMap,
    state: nnx.State,
    *,
    dtype: Any = None,
    config: dict | None = None,
    max_shard_bytes: int = 5 * 2**30,
    overwrite: bool = False,
) -> list[Path]:
    """Exports `state` in the key map's PyTorch layout as sharded safetensors (+ index, + config.json).

    Tensors keep their parameter dtype unless `dtype` is given; one tensor is materialised at a time.
    The folder appears complete or not at all; one that holds something is refused unless `overwrite`,
    which replaces it whole (`torch_io.write_checkpoint`).
    """
    values = _flat_values(state)
    entries = keymap.expand({p: tuple(v.shape) for p, v in values.items()})
    by_key = {e.torch_key: e for e in entries}
    specs = [
        TensorSpec(e.torch_key, e.torch_shape, np.dtype(dtype if dtype is not None else values[e.jax_paths[0]].dtype))
        for e in entries
    ]
    get = _state_getter(values)
    produce = lambda key: _to_torch(by_key[key], get, dtype)  # noqa: E731
    return write_checkpoint(out_dir, specs, produce, max_shard_bytes=max_shard_bytes, config=config,
                            overwrite=overwrite)


def load_model(
    path: str | os.PathLike | CheckpointReader, keymap: KeyMap, make_model: Callable[[], nnx.Module]
) -> tuple[nnx.Module, ConversionReport]:
    """Builds the model abstractly (no random init) and fills it from a PyTorch checkpoint."""
    reader = path if isinstance(path, CheckpointReader) else CheckpointReader(path)
    graphdef, abstract_state = nnx.split(nnx.eval_shape(make_model))
    state, report = read_state(reader, keymap, abstract_state)
    return nnx.merge(graphdef, state), report
