"""The checkpoint kinds: what each family's checkpoints look like, and how a folder is recognised.

Each family module (m3d_jax.convert.lamed, .clip, .med2e3, ...) declares its `KIND` next to its key maps;
`m3d_jax.convert` registers them in one explicit list, in recognition order. This module knows none of them.

  Kind      name, model class, config ↔ config.json, how to recognise the released layout, and its
            parts: one (folder, sub-module, KeyMap) per weight folder ("" = the root; Med-2E3 has five)
  register  adds kinds to the table that `detect` walks, in that order
  detect    the kind and config of a folder: an m3d-jax one names its kind under KIND_KEY, a released
            one is recognised by its config.json or, without one, by its tensor names and shapes
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

from flax import nnx

from m3d_jax.convert.keymap import ConversionReport, KeyMap
from m3d_jax.convert.torch_io import CheckpointReader, CheckpointReadError

KIND_KEY = "m3d_jax_kind"


@dataclasses.dataclass(frozen=True)
class Part:
    """One weight folder of a released layout: `folder` ("" = the checkpoint itself) holds the weights
    of the sub-module `module` ("" = the whole model) in `keymap(config)`'s layout (JAX paths relative to
    that sub-module), with `config_json(config)` (None: no config.json) beside them."""

    folder: str
    module: str
    keymap: Callable[[Any], KeyMap]
    config_json: Callable[[Any], dict | None] = lambda config: None


@dataclasses.dataclass(frozen=True)
class Source:
    """What recognition looks at: the path, its parsed config.json (None without one) and, read only
    when asked for, its tensors."""

    path: Path
    hf: dict | None

    @functools.cached_property
    def reader(self) -> CheckpointReader:
        return CheckpointReader(self.path)


@dataclasses.dataclass(frozen=True)
class Kind:
    """One checkpoint family.

    `recognise(source)` returns the config of a released checkpoint of this kind, or None when `source`
    is not one (it may raise CheckpointReadError when it is one but is broken). `read` and `write`
    replace the part-by-part conversion for layouts that parts cannot describe (Med3DInsight's single
    `.pth` with recomputed index buffers): `read(path, config) -> (model, report)`,
    `write(model, dst, dtype, overwrite) -> tensor count`."""

    name: str
    title: str
    model: type[nnx.Module]
    config_from_hf: Callable[[dict], Any]
    config_to_hf: Callable[[Any], dict]
    recognise: Callable[[Source], Any]
    released: str  # how its released layout is recognised, for the error when nothing matches
    parts: tuple[Part, ...]
    read: Callable[..., tuple[nnx.Module, ConversionReport]] | None = None
    write: Callable[..., int] | None = None

    def build(self, config: Any, seed: int = 0) -> nnx.Module:
        return self.model(config, rngs=nnx.Rngs(seed))

    def parse(self, hf: dict, path: str | os.PathLike) -> Any:
        """`config_from_hf(hf)` with every problem (a missing key, a value of the wrong type) reported as a
        CheckpointReadError naming `path`."""
        try:
            config = self.config_from_hf(hf)
        except KeyError as err:
            raise CheckpointReadError(f"{path}: missing key {err.args[0]!r}, which a {self.name} config "
                                      "needs") from None
        except (TypeError, ValueError, AttributeError) as err:
            raise CheckpointReadError(f"{path}: not a valid {self.name} config ({err})") from None
        check_config_types(config, path, hf)
        return config


_KINDS: dict[str, Kind] = {}


def register(*table: Kind) -> None:
    """Adds the kinds to the table that `detect` walks, in this order."""
    for kind in table:
        if kind.name in _KINDS:
            raise ValueError(f"checkpoint kind {kind.name!r} registered twice")
        _KINDS[kind.name] = kind


def kinds() -> dict[str, Kind]:
    """Every registered kind by name, in registration order."""
    return dict(_KINDS)


def kind_of(model: nnx.Module) -> Kind:
    """The kind whose model class `model` is."""
    for kind in _KINDS.values():
        if type(model) is kind.model:
            return kind
    raise TypeError(f"no checkpoint kind for {type(model).__name__}")


def detect(path: str | os.PathLike) -> tuple[Kind, Any]:
    """The kind and config of an m3d-jax parameter folder (its config.json names the kind) or of a
    released checkpoint (folder or file), recognised by each registered kind in turn."""
    path = Path(path)
    config_path = path / "config.json"
    hf = read_config_json(config_path) if path.is_dir() and config_path.is_file() else None
    if hf is not None and KIND_KEY in hf:
        kind = _KINDS.get(hf[KIND_KEY])
        if kind is None:
            raise CheckpointReadError(f"{config_path}: unknown {KIND_KEY} {hf[KIND_KEY]!r}; known: {', '.join(_KINDS)}")
        return kind, kind.parse(hf, config_path)
    source = Source(path, hf)
    for kind in _KINDS.values():
        config = kind.recognise(source)
        if config is not None:
            return kind, config
    where = config_path if hf is not None else path
    found = f"model_type {hf.get('model_type')!r}" if hf is not None else "no config.json"
    raise CheckpointReadError(f"{where}: cannot tell the model kind ({found}); expected " +
                              "; ".join(f"{kind.released} ({kind.title})" for kind in _KINDS.values()))


def is_jax_folder(folder: str | os.PathLike) -> bool:
    """Whether `folder` is an m3d-jax parameter folder (its config.json names the kind)."""
    path = Path(folder) / "config.json"
    return path.is_file() and KIND_KEY in read_config_json(path)


def read_config_json(path: str | os.PathLike) -> dict:
    """A config.json as a dict; a missing file, bad JSON or a non-object is a CheckpointReadError naming it."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointReadError(f"{path}: missing; a model folder needs its config.json")
    try:
        hf = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointReadError(f"{path}: not valid JSON ({err}); fix or replace the file") from None
    if not isinstance(hf, dict):
        raise CheckpointReadError(f"{path}: expected a JSON object of config keys, got {type(hf).__name__}")
    return hf


def check_config_types(config: Any, path: str | os.PathLike, hf: dict | None = None) -> None:
    """Raises CheckpointReadError naming `path` when a field of the config dataclass `config` (nested ones
    included) annotated int, float, bool, str or tuple holds another type: ints for int fields (a bool is
    not one), ints or floats for float fields, tuples of the annotated element types for tuple fields.
    The config.json key holding the bad value is named when `hf` (the parsed file) has exactly one."""
    problem = _type_problem(config, type(config).__name__)
    if problem is None:
        return
    field, expected, value = problem
    keys = _keys_holding(hf, value) if hf is not None else []
    key = f" (key {keys[0]!r})" if len(keys) == 1 else ""
    raise CheckpointReadError(f"{path}: {field}{key} must be {expected}, got {value!r}; fix the value in the file")


def _type_problem(config: Any, where: str) -> tuple[str, str, Any] | None:
    try:
        hints = typing.get_type_hints(type(config))
    except (NameError, TypeError):  # an annotation that does not resolve: nothing to check against
        return None
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if dataclasses.is_dataclass(value):
            problem = _type_problem(value, f"{where}.{field.name}")
        else:
            expected = _mismatch(value, hints.get(field.name))
            problem = None if expected is None else (f"{where}.{field.name}", expected, value)
        if problem is not None:
            return problem
    return None


_SCALARS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}
_PLURALS = {int: "integers", float: "numbers", bool: "true/false values", str: "strings"}


def _mismatch(value: Any, hint: Any) -> str | None:
    """What `value` should be when it does not match `hint`, else None (hints other than scalars, tuples
    and unions of them are not checked)."""
    if hint in _SCALARS:
        ok = {int: lambda v: isinstance(v, int) and not isinstance(v, bool),
              float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              bool: lambda v: isinstance(v, bool), str: lambda v: isinstance(v, str)}[hint](value)
        return None if ok else _SCALARS[hint]
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is tuple or origin is tuple:
        if not isinstance(value, tuple):
            return "a list"
        if len(args) == 2 and args[1] is Ellipsis:
            args = (args[0],) * len(value)
        if args and len(args) != len(value):
            return f"a list of {len(args)} entries"
        return next((f"a list of {_PLURALS[arg]}" for item, arg in zip(value, args)
                     if arg in _SCALARS and _mismatch(item, arg) is not None), None)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        arms = [arg for arg in args if arg is not type(None)]
        if not all(arm in _SCALARS or arm is tuple or typing.get_origin(arm) is tuple for arm in arms):
            return None
        misses = [_mismatch(value, arm) for arm in arms]
        return None if None in misses else " or ".join(misses) + (" or null" if type(None) in args else "")
    return None


def _keys_holding(hf: Any, value: Any, prefix: str = "") -> list[str]:
    """The dotted config.json keys whose value equals `value` (a tuple matches a list)."""
    wanted = list(value) if isinstance(value, tuple) else value
    found = []
    if isinstance(hf, dict):
        for key, item in hf.items():
            name = f"{prefix}{key}"
            if type(item) is type(wanted) and item == wanted:
                found.append(name)
            elif isinstance(item, dict):
                found += _keys_holding(item, value, f"{name}.")
    return found
