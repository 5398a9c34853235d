"""Folder-level conversion between PyTorch checkpoints and m3d-jax parameter folders, streaming one
tensor (or one layer slice) at a time in both directions.

An m3d-jax parameter folder holds `config.json` (the model's transformers-style config plus
`"m3d_jax_kind"`) and safetensors shards keyed by the JAX parameter paths (e.g.
`language_model.layers.self_attn.q_proj.kernel`, stacked over layers), in the parameters' own layout.
They are read one parameter (or one layer slice) at a time.

Med-2E3 is the exception: its released layout spans one folder per part (llm/, vision2d_model/, ...; see
m3d_jax.convert.med2e3), so its torch ↔ JAX conversion goes through the whole model in host memory.
"""

from __future__ import annotations

import dataclasses
import json
import os
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
from flax import nnx

from m3d_jax.convert.keymap import (
    ConversionReport, FusedLinear, KeyMap, _flat_values, _progress, _to_torch, check_checkpoint, jax_pieces,
    piece_shapes,
)
from m3d_jax.convert.torch_io import (
    CheckpointReader, CheckpointReadError, TensorSpec, atomic_output, check_output, write_checkpoint,
)

KIND_KEY = "m3d_jax_kind"
_KIND_OF_CLASS = {"Lamed": "lamed", "Decoder": "decoder", "ViT3D": "vit3d", "M3DClip": "clip", "Bert": "bert",
                  "Med2E3": "med2e3", "Med3DInsight": "med3dinsight"}


@dataclasses.dataclass(frozen=True)
class ModelKind:
    """How to build, map and describe one kind of checkpoint."""

    name: str
    config_from_hf: Callable[[dict], Any]
    config_to_hf: Callable[[Any], dict]
    build: Callable[[Any], nnx.Module]
    keymap: Callable[[Any], KeyMap] | None  # None: a multi-folder layout, converted in memory by the two below
    load_torch: Callable[[str | os.PathLike], tuple[nnx.Module, ConversionReport]] | None = None
    export_torch: Callable[..., int] | None = None  # (model, dst, dtype, *, overwrite) -> tensor count


def _kinds() -> dict[str, ModelKind]:
    from m3d_jax.convert.clip import clip_keymap
    from m3d_jax.convert.decoder import decoder_keymap
    from m3d_jax.convert.lamed import lamed_keymap
    from m3d_jax.convert.text_encoder import bert_keymap
    from m3d_jax.convert.vit3d import vit3d_keymap
    from m3d_jax.models.clip import ClipConfig, M3DClip
    from m3d_jax.models.decoder import Decoder, DecoderConfig
    from m3d_jax.models.lamed import Lamed, LamedConfig
    from m3d_jax.models.med2e3 import Med2E3, Med2E3Config
    from m3d_jax.models.med3dinsight import Med3DInsight, Med3DInsightConfig
    from m3d_jax.models.text_encoder import Bert, BertConfig
    from m3d_jax.models.vit3d import ViT3D, ViT3DConfig

    return {
        "lamed": ModelKind("lamed", LamedConfig.from_hf, LamedConfig.to_hf,
                           lambda c: Lamed(c, rngs=nnx.Rngs(0)), lamed_keymap),
        "decoder": ModelKind("decoder", DecoderConfig.from_hf, DecoderConfig.to_hf,
                             lambda c: Decoder(c, rngs=nnx.Rngs(0)), decoder_keymap),
        "vit3d": ModelKind("vit3d", lambda hf: ViT3DConfig.from_dict(hf["vit3d"]),
                           lambda c: {"vit3d": dataclasses.asdict(c)}, lambda c: ViT3D(c, rngs=nnx.Rngs(0)),
                           lambda c: vit3d_keymap(c, "m3d_clip_vision")),
        "clip": ModelKind("clip", ClipConfig.from_hf, ClipConfig.to_hf, lambda c: M3DClip(c, rngs=nnx.Rngs(0)),
                          clip_keymap),
        "bert": ModelKind("bert", BertConfig.from_hf, BertConfig.to_hf, lambda c: Bert(c, rngs=nnx.Rngs(0)),
                          bert_keymap),
        "med2e3": ModelKind("med2e3", Med2E3Config.from_hf, Med2E3Config.to_hf,
                            lambda c: Med2E3(c, rngs=nnx.Rngs(0)), None, _load_released_med2e3,
                            _export_released_med2e3),
        "med3dinsight": ModelKind("med3dinsight", lambda hf: Med3DInsightConfig.from_dict(hf["med3dinsight"]),
                                  lambda c: {"med3dinsight": dataclasses.asdict(c)},
                                  lambda c: Med3DInsight(c, rngs=nnx.Rngs(0)), None, _load_released_med3dinsight,
                                  _export_released_med3dinsight),
    }


def _load_released_med2e3(folder: str | os.PathLike) -> tuple[nnx.Module, ConversionReport]:
    from m3d_jax.convert.med2e3 import load_med2e3

    model, reports = load_med2e3(folder)
    ignored = [(f"{part}/{key}", reason) for part, report in reports.items() for key, reason in report.ignored]
    return model, ConversionReport(converted=sum(r.converted for r in reports.values()), ignored=ignored)


def _export_released_med2e3(model: nnx.Module, folder: str | os.PathLike, dtype, *, overwrite: bool = False
                            ) -> int:
    from m3d_jax.convert.med2e3 import PARTS, export_med2e3

    export_med2e3(model, folder, dtype=dtype, overwrite=overwrite)
    return sum(len(CheckpointReader(Path(folder) / part).keys()) for part in PARTS)


def _load_released_med3dinsight(path: str | os.PathLike) -> tuple[nnx.Module, ConversionReport]:
    from m3d_jax.convert.med3dinsight import config_from_checkpoint, load_med3dinsight

    return load_med3dinsight(path, config_from_checkpoint(CheckpointReader(path)))


def _export_released_med3dinsight(model: nnx.Module, dst: str | os.PathLike, dtype, *, overwrite: bool = False
                                  ) -> int:
    """`dst` ending in .pth / .bin / .safetensors is the file; otherwise a folder that gets `model.pth`."""
    from m3d_jax.convert.med3dinsight import export_med3dinsight

    if dtype is not None:
        raise ValueError("Med3DInsight checkpoints are exported in float32, as the reference saves them")
    dst = Path(dst)
    if dst.suffix in (".pth", ".bin", ".safetensors"):
        return export_med3dinsight(model, dst, overwrite=overwrite)
    with atomic_output(dst, overwrite=overwrite) as tmp:
        return export_med3dinsight(model, tmp / "model.pth")


def _released_med2e3_config(folder: Path) -> tuple[Path, dict] | None:
    """The file and MedMLLMConfig of a released Med-2E3 folder (root or args/ config.json with a nested
    `llm_config`), or None when `folder` is not one."""
    for candidate in (folder / "config.json", folder / "args" / "config.json"):
        if candidate.is_file():
            try:
                hf = json.loads(candidate.read_text())
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue  # reported by the reader of that file, if it is the one that matters
            if isinstance(hf, dict) and "llm_config" in hf:
                return candidate, hf
    return None


def read_config_json(path: Path) -> dict:
    """A checkpoint's config.json as a dict; bad JSON or a non-object is a CheckpointReadError naming it."""
    try:
        hf = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointReadError(f"{path}: not valid JSON ({err}); fix or replace the file") from None
    if not isinstance(hf, dict):
        raise CheckpointReadError(f"{path}: expected a JSON object of config keys, got {type(hf).__name__}")
    return hf


def _config_from_hf(kind: ModelKind, hf: dict, path: Path):
    """`kind.config_from_hf(hf)` with every problem (a missing key, a value of the wrong type) reported
    as a CheckpointReadError naming `path`."""
    try:
        config = kind.config_from_hf(hf)
    except KeyError as err:
        raise CheckpointReadError(f"{path}: missing key {err.args[0]!r}, which a {kind.name} config needs") from None
    except (TypeError, ValueError, AttributeError) as err:
        raise CheckpointReadError(f"{path}: not a valid {kind.name} config ({err})") from None
    check_config_types(config, path, hf)
    return config


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


def detect(folder: str | os.PathLike) -> tuple[ModelKind, Any]:
    """The model kind and config of a PyTorch or m3d-jax folder, from its config.json (model_type
    lamed_phi3 / lamed_llama / phi3 / llama / m3d_clip / bert, or a Med-2E3 MedMLLMConfig with nested
    `llm_config`, at the root or in args/) or, without one, from the keys of a bare ViT checkpoint."""
    folder = Path(folder)
    kinds = _kinds()
    config_path = folder / "config.json" if folder.is_dir() else None
    hf = read_config_json(config_path) if config_path is not None and config_path.is_file() else {}
    if folder.is_dir() and KIND_KEY not in hf:
        released = _released_med2e3_config(folder)
        if released is not None:  # vision3d_model/'s BERT and projection sizes are read from its shapes
            from m3d_jax.convert.med2e3 import with_vision3d_shapes

            return kinds["med2e3"], _config_from_hf(kinds["med2e3"], with_vision3d_shapes(folder, released[1]),
                                                    released[0])
    if config_path is not None and config_path.is_file():
        name = hf.get(KIND_KEY)
        if name is None and "vit3d" in hf:
            name = "vit3d"
        if name is None:
            model_type = hf.get("model_type", "")
            name = ("lamed" if model_type.startswith("lamed") else "decoder" if model_type in ("phi3", "llama")
                    else {"m3d_clip": "clip", "bert": "bert"}.get(model_type))
        if name == "clip" and KIND_KEY not in hf:  # released: the BERT and projection sizes are in the shapes
            from m3d_jax.convert.clip import released_clip_hf

            hf = released_clip_hf(folder, hf)
        if name not in kinds:
            raise CheckpointReadError(f"{config_path}: cannot tell the model kind (model_type "
                                      f"{hf.get('model_type')!r}; expected lamed_phi3, lamed_llama, phi3, llama, "
                                      "m3d_clip, bert, or a Med-2E3 config with a nested llm_config)")
        return kinds[name], _config_from_hf(kinds[name], hf, config_path)
    reader = CheckpointReader(folder)
    keys = set(reader.keys())
    if "psat.ps_pos" in keys:
        from m3d_jax.convert.med3dinsight import config_from_checkpoint

        return kinds["med3dinsight"], config_from_checkpoint(reader)
    if "patch_embedding.patch_embeddings.1.weight" in keys:
        from m3d_jax.models.vit3d import ViT3DConfig

        pos = reader.info("patch_embedding.position_embeddings").shape
        depth = 1 + max(int(k.split(".")[1]) for k in keys if k.startswith("blocks."))
        config = ViT3DConfig(hidden_size=pos[-1], num_layers=depth, cls_token="cls_token" in keys,
                             mlp_dim=reader.info("blocks.0.mlp.linear1.weight").shape[0],
                             num_heads=max(1, pos[-1] // 64))
        if config.num_patches != pos[1]:
            raise CheckpointReadError(f"{folder}: a bare ViT checkpoint with {pos[1]} patches does not match the "
                                      f"default image/patch size; write a config.json with the sizes")
        return kinds["vit3d"], config
    raise CheckpointReadError(f"{folder}: no config.json and not a bare 3D ViT or Med3DInsight checkpoint; cannot tell the kind")


def _abstract_state(kind: ModelKind, config) -> nnx.State:
    return nnx.state(nnx.eval_shape(lambda: kind.build(config)))


def torch_to_jax(src: str | os.PathLike, dst: str | os.PathLike, *, dtype=None, progress: bool = False,
                 max_shard_bytes: int = 5 * 2**30, overwrite: bool = False) -> ConversionReport:
    """PyTorch folder → m3d-jax parameter folder, one torch tensor at a time; parameters are stored in
    `dtype` if given, else in the model's parameter dtype (load_jax casts on load). A Med-2E3 folder
    is loaded whole into host memory and then written (its layout spans several folders).

    `dst` appears complete or not at all. One that holds something is refused unless `overwrite`, which
    replaces it whole; one that is `src`, lies inside it or holds it is always refused."""
    check_output(dst, overwrite=overwrite, inputs=[src])
    kind, config = detect(src)
    if kind.keymap is None:
        with _on_host():
            model, report = kind.load_torch(src)
            save_jax(model, dst, dtype=dtype, max_shard_bytes=max_shard_bytes, overwrite=overwrite)
        return report
    reader = CheckpointReader(src)
    keymap = kind.keymap(config)
    flat = _flat_values(_abstract_state(kind, config))
    shapes = {p: tuple(v.shape) for p, v in flat.items()}
    entries = keymap.expand(shapes)
    ignored = check_checkpoint(reader, keymap, entries)
    by_path: dict[str, list] = {}
    for entry in entries:
        for path in entry.jax_paths:
            by_path.setdefault(path, []).append(entry)
    stored = {p: np.dtype(dtype) if dtype is not None else np.dtype(flat[p].dtype) for p in by_path}
    specs = [TensorSpec(path, shapes[path], stored[path]) for path in sorted(by_path)]
    bar = _progress(range(len(entries)), progress, "torch -> jax")
    counter = iter(bar) if progress else None

    def produce(path: str):
        for entry in sorted(by_path[path], key=lambda e: -1 if e.layer is None else e.layer):
            which = entry.jax_paths.index(path)
            if isinstance(entry.transform, FusedLinear):  # read only this kernel's rows of the fused weight
                shapes_of_pieces = piece_shapes(entry, shapes)
                rows = reader.read(entry.torch_key, entry.transform.rows(shapes_of_pieces, which))
                piece = entry.transform.part_to_jax(rows, shapes_of_pieces[which]).astype(stored[path], copy=False)
            else:
                piece = jax_pieces(entry, reader.read(entry.torch_key), shapes)[which].astype(stored[path], copy=False)
            if counter is not None and path == entry.jax_paths[0]:
                next(counter, None)
            yield piece if entry.layer is None else piece[None]

    hf = kind.config_to_hf(config) | {KIND_KEY: kind.name}
    write_checkpoint(dst, specs, produce, max_shard_bytes=max_shard_bytes, config=hf, overwrite=overwrite)
    if progress:
        bar.close()
    return ConversionReport(converted=len(entries), ignored=ignored)


def jax_to_torch(src: str | os.PathLike, dst: str | os.PathLike, *, dtype=None, progress: bool = False,
                 max_shard_bytes: int = 5 * 2**30, overwrite: bool = False) -> int:
    """m3d-jax parameter folder → PyTorch folder in the released layout; returns the tensor count.
    Tensors keep the folder's stored dtype unless `dtype` is given. A Med-2E3 folder is loaded whole
    into host memory and exported part by part (llm/, vision2d_model/, ... as safetensors).
    `dst` is written as by `torch_to_jax` (complete or not at all; `overwrite` replaces it whole)."""
    check_output(dst, overwrite=overwrite, inputs=[src])
    kind, config = detect(src)
    if kind.keymap is None:
        with _on_host():
            return kind.export_torch(load_jax(src), dst, dtype, overwrite=overwrite)
    params = CheckpointReader(src)
    keymap = kind.keymap(config)
    flat = _flat_values(_abstract_state(kind, config))
    entries = keymap.expand({p: tuple(v.shape) for p, v in flat.items()})
    missing = sorted(set(flat) - set(params.keys()))
    if missing:
        raise CheckpointReadError(f"{src}: m3d-jax parameter folder lacks {len(missing)} parameters: {missing[:10]}")
    get = params.read  # (path, layer): reads just that layer's slice of a stacked parameter
    by_key = {e.torch_key: e for e in entries}
    specs = [TensorSpec(e.torch_key, e.torch_shape,
                        np.dtype(dtype) if dtype is not None else params.info(e.jax_paths[0]).dtype)
             for e in entries]
    out_dtype = {spec.key: spec.dtype for spec in specs}
    hf = kind.config_to_hf(config)
    bar = _progress(range(len(specs)), progress, "jax -> torch")
    counter = iter(bar) if progress else None

    def produce(key):
        if counter is not None:
            next(counter, None)
        return _to_torch(by_key[key], get, out_dtype[key])

    write_checkpoint(dst, specs, produce, max_shard_bytes=max_shard_bytes, config=hf, overwrite=overwrite)
    if progress:
        bar.close()
    return len(specs)


def load_jax(folder: str | os.PathLike, **config_overrides) -> nnx.Module:
    """Builds the model of an m3d-jax parameter folder and fills it, one parameter at a time."""
    kind, config = detect(folder)
    if not is_jax_folder(folder):
        raise CheckpointReadError(f"{folder}: a PyTorch {kind.name} folder, not an m3d-jax one (its config.json has "
                                  f"no {KIND_KEY!r}); convert it with tools/convert_checkpoint.py torch2jax")
    if config_overrides:
        config = dataclasses.replace(config, **config_overrides)
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


def save_jax(model: nnx.Module, folder: str | os.PathLike, *, dtype=None, max_shard_bytes: int = 5 * 2**30,
             overwrite: bool = False) -> list[Path]:
    """Writes an m3d-jax parameter folder (config.json + safetensors keyed by parameter path), in the
    parameters' dtype unless `dtype` is given; complete or not at all, and a folder that holds something
    is refused unless `overwrite`, which replaces it whole."""
    kind = _kinds().get(_KIND_OF_CLASS.get(type(model).__name__, ""))
    if kind is None:
        raise TypeError(f"no checkpoint kind for {type(model).__name__}")
    values = _flat_values(nnx.state(model))
    stored = {path: np.dtype(dtype if dtype is not None else v.dtype) for path, v in values.items()}
    specs = [TensorSpec(path, tuple(v.shape), stored[path]) for path, v in sorted(values.items())]
    produce = lambda path: np.asarray(jax.device_get(values[path][...])).astype(stored[path], copy=False)  # noqa: E731
    hf = kind.config_to_hf(model.config) | {KIND_KEY: kind.name}
    return write_checkpoint(folder, specs, produce, max_shard_bytes=max_shard_bytes, config=hf, overwrite=overwrite)


def is_jax_folder(folder: str | os.PathLike) -> bool:
    """Whether `folder` is an m3d-jax parameter folder (its config.json names the kind)."""
    path = Path(folder) / "config.json"
    return path.is_file() and KIND_KEY in read_config_json(path)


def is_med2e3(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds a Med-2E3: an m3d-jax folder of that kind or a released folder."""
    folder = Path(folder)
    if is_jax_folder(folder):
        return read_config_json(folder / "config.json")[KIND_KEY] == "med2e3"
    return folder.is_dir() and _released_med2e3_config(folder) is not None


def load_med2e3_folder(folder: str | os.PathLike) -> nnx.Module:
    """A Med-2E3 from an m3d-jax parameter folder or a released folder (converted in memory, with its
    trained text_mlp; see m3d_jax.convert.med2e3)."""
    if not is_med2e3(folder):
        raise CheckpointReadError(f"{folder}: not a Med-2E3 checkpoint (an m3d-jax folder of kind med2e3, or a "
                                  "released folder whose config.json or args/config.json has a nested llm_config)")
    if is_jax_folder(folder):
        return load_jax(folder)
    from m3d_jax.convert.med2e3 import load_med2e3

    return load_med2e3(folder)[0]


def _on_host():
    """Eagerly created arrays go to host memory (whole-model conversions)."""
    return jax.default_device(jax.local_devices(backend="cpu")[0])
