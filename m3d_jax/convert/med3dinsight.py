"""Med3DInsight's pretraining checkpoint (the plain `nnFormer.state_dict()` the reference saves as
`latest_model_biomedclip_huatuo.pth`: 363 entries, no prefix) ↔ JAX, both ways.

  model_down.* decoder.* res.up.* final.0.up.*  → `NnFormer` (`nnformer_keymap`)
  psat.* queries.weight proj.*                  → `Psat` (`psat_keymap`; torch MultiheadAttention's packed
                                                  `in_proj_weight` [3d, d] split into q, k, v)
  L                                             → the learnable metric

The 14 int64 `relative_position_index` buffers are not parameters: reading recomputes each one from its
block's window and the config's `relative_index` mode and checks it equals the stored buffer (a checkpoint
saved with the other mode is refused with the fix named); writing stores the recomputed buffers, so torch
uses exactly the index the JAX model used.

Fine-tuning reads only the backbone (`load_backbone`): the pretraining heads are reported as ignored, and
the segmentation head `final` is re-initialised when its class count differs from the checkpoint's.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from flax import nnx

from m3d_jax.convert.keymap import (
    IDENTITY, LINEAR, Conv3dKernel, ConversionReport, ConvTranspose3dKernel, FusedBias, FusedLinear, KeyMap, Linear,
    Reshape, Rule, _flat_values, _state_getter, _to_torch, norm_rules, read_state,
)
from m3d_jax.convert.kind import Kind, Part, Source
from m3d_jax.convert.torch_io import CheckpointReader, atomic_output
from m3d_jax.convert.unetr import unetr_keymap
from m3d_jax.models.med3dinsight import Med3DInsight, Med3DInsightConfig
from m3d_jax.models.nnformer import NnFormer, NnFormerConfig, WindowAttention, relative_position_index
from m3d_jax.models.psat import PsatConfig

INDEX_BUFFER = "relative_position_index"
PRETRAINING_HEADS = (("psat.*", "PSAT, used only in pretraining"), ("queries.weight", "PSAT queries, pretraining"),
                     ("proj.*", "PSAT output projection, pretraining"), ("L", "OT metric, pretraining"),
                     ("res.up.*", "reconstruction head, pretraining"))


_TORCH_NAMES = ((".mlp.linear1.", ".mlp.fc1."), (".mlp.linear2.", ".mlp.fc2."), (".upsample.", ".Upsample."))


def _torch_module_name(jax_name: str) -> str:
    name = f".{jax_name}."
    for jax_part, torch_part in _TORCH_NAMES:
        name = name.replace(jax_part, torch_part)
    return name[1:-1]


def _nnformer_rule(path: str, ndim: int) -> Rule:
    """The rule of one NnFormer parameter: its torch key (the renames in nnformer.py's docstring) and the
    layout change its kind needs."""
    stem, leaf = path.rsplit(".", 1)
    torch = _torch_module_name(stem)
    torch = {"res": "res.up", "final": "final.0.up"}.get(torch, torch)
    torch += "." + {"kernel": "weight", "scale": "weight"}.get(leaf, leaf)
    transform = IDENTITY
    if leaf == "kernel" and ndim == 5:
        transposed = path.startswith(("res.", "final.")) or ".upsample.up." in path
        transform = ConvTranspose3dKernel() if transposed else Conv3dKernel()
    elif leaf == "kernel":
        transform = Linear(n_in=2) if stem.endswith("attn.proj") else LINEAR
    elif leaf == "bias" and stem.endswith(("attn.qkv", "attn.kv")):
        transform = Reshape(flatten=True)
    return Rule(torch, path, transform)


def _nnformer_rules(config: NnFormerConfig, heads: tuple[str, ...]) -> tuple[Rule, ...]:
    """The rules of an `NnFormer`'s parameters, of its heads (`res`, `final`) only those in `heads`."""
    model = nnx.eval_shape(lambda: NnFormer(config, rngs=nnx.Rngs(0)))
    return tuple(_nnformer_rule(path, len(variable.shape)) for path, variable in _flat_values(nnx.state(model)).items()
                 if not path.startswith(("res.", "final.")) or path.split(".")[0] in heads)


_INDEX_IGNORED = (f"*.attn.{INDEX_BUFFER}", "index buffer; recomputed from the window and checked")


def nnformer_keymap(config: NnFormerConfig) -> KeyMap:
    """torch keys of an nnFormer state dict ↔ an `NnFormer`'s parameters. The index buffers are ignored
    here and checked by `check_index_buffers`."""
    return KeyMap("med3dinsight/nnformer", _nnformer_rules(config, ("res", "final")), ignored=(_INDEX_IGNORED,))


def backbone_keymap(config: NnFormerConfig, *, load_final: bool) -> KeyMap:
    """What fine-tuning reads from a pretraining state dict: the nnFormer, with the segmentation head
    `final` only when `load_final`; PSAT, `L`, the reconstruction head (and otherwise `final`) are
    reported as ignored."""
    final = [] if load_final else [("final.0.up.*", "segmentation head with another class count; re-initialised")]
    ignored = (_INDEX_IGNORED, *PRETRAINING_HEADS, *final)
    return KeyMap("med3dinsight/backbone", _nnformer_rules(config, ("final",) if load_final else ()), ignored=ignored)


def psat_keymap(config: PsatConfig) -> KeyMap:
    """torch keys of the PSAT, its queries and output projection ↔ a `Psat` module's parameters."""
    layer = "psat.decoder.layers.{layer}."
    rules = [Rule("psat.ps_pos", "ps_pos"), Rule("queries.weight", "queries"),
             Rule("proj.weight", "proj.kernel", LINEAR), Rule("proj.bias", "proj.bias"),
             *norm_rules("psat.decoder.norm", "norm")]
    for name in ("self_attn", "cross_attn"):
        qkv = tuple(f"layers.{name}.{p}" for p in ("query", "key", "value"))
        rules += [Rule(f"{layer}{name}.in_proj_weight", tuple(f"{p}.kernel" for p in qkv), FusedLinear()),
                  Rule(f"{layer}{name}.in_proj_bias", tuple(f"{p}.bias" for p in qkv), FusedBias()),
                  Rule(f"{layer}{name}.out_proj.weight", f"layers.{name}.out.kernel", Linear(n_in=2)),
                  Rule(f"{layer}{name}.out_proj.bias", f"layers.{name}.out.bias")]
    for index in (1, 2, 3):
        rules += norm_rules(f"{layer}norm{index}", f"layers.norm{index}")
    for index in (1, 2):
        rules += [Rule(f"{layer}linear{index}.weight", f"layers.linear{index}.kernel", LINEAR),
                  Rule(f"{layer}linear{index}.bias", f"layers.linear{index}.bias")]
    return KeyMap("med3dinsight/psat", tuple(rules))


def med3dinsight_keymap(config: Med3DInsightConfig) -> KeyMap:
    """The whole pretraining state dict ↔ a `Med3DInsight`. With a UNETR backbone (no released
    checkpoint) the layout is ours: MONAI UNETR keys under `backbone.` and the reconstruction head `res`."""
    shared = (psat_keymap(config.psat).nested("", "psat."), KeyMap("metric", (Rule("L", "L"),)))
    if config.backbone_kind == "unetr":
        head = KeyMap("res", (Rule("res.weight", "res.kernel", LINEAR), Rule("res.bias", "res.bias")))
        return KeyMap.combine("med3dinsight/unetr", unetr_keymap(config.backbone).nested("backbone.", "backbone."),
                              head, *shared)
    return KeyMap.combine("med3dinsight", nnformer_keymap(config.backbone).nested("", "backbone."), *shared)


def _window_attentions(backbone: nnx.Module) -> Iterator[tuple[str, WindowAttention]]:
    """(torch key of the index buffer, module) of every window attention (none in a UNETR)."""
    for path, module in nnx.iter_graph(backbone):
        if isinstance(module, WindowAttention):
            yield f"{_torch_module_name('.'.join(map(str, path)))}.{INDEX_BUFFER}", module


def index_buffers(backbone: nnx.Module) -> dict[str, np.ndarray]:
    """torch key → the int64 relative-position index each window attention uses."""
    return {key: relative_position_index(module.window, module.relative_index).astype(np.int64)
            for key, module in _window_attentions(backbone)}


def check_index_buffers(reader: CheckpointReader, backbone: nnx.Module) -> None:
    """Raises if a stored `relative_position_index` is missing or differs from the recomputed one."""
    other = {"reference": "corrected", "corrected": "reference"}
    for key, module in _window_attentions(backbone):
        if key not in reader.keys():
            raise ValueError(f"{reader.path}: missing index buffer {key}")
        stored = reader.read(key)
        expected = relative_position_index(module.window, module.relative_index)
        if stored.shape == expected.shape and np.array_equal(stored, expected):
            continue
        alternative = relative_position_index(module.window, other[module.relative_index])
        hint = (f"; it is the {other[module.relative_index]!r} index: set the backbone's relative_index to "
                f"{other[module.relative_index]!r}" if np.array_equal(stored, alternative) else "")
        raise ValueError(f"{reader.path}: {key} (shape {list(stored.shape)}) is not the "
                         f"{module.relative_index!r} relative-position index for window {module.window}{hint}")


def load_med3dinsight(path: str | os.PathLike, config: Med3DInsightConfig) -> tuple[Med3DInsight, ConversionReport]:
    """A Med3DInsight from a pretraining state dict (`.pth`/`.bin` or safetensors, or a folder with one)."""
    reader = CheckpointReader(path)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Med3DInsight(config, rngs=nnx.Rngs(0))))
    state, report = read_state(reader, med3dinsight_keymap(config), abstract)
    model = nnx.merge(graphdef, state)
    check_index_buffers(reader, model.backbone)
    return model, report


def load_backbone(path: str | os.PathLike, config: NnFormerConfig, *, seed: int = 0) -> tuple[NnFormer, ConversionReport]:
    """The nnFormer of a pretraining (or nnFormer) state dict, for fine-tuning with `config`: PSAT, `L` and
    the reconstruction head are ignored (and reported); the segmentation head `final` is loaded when the
    checkpoint has one with `config.num_classes` classes, else initialised from `seed`."""
    reader = CheckpointReader(path)
    model = NnFormer(config, rngs=nnx.Rngs(seed))
    graphdef, fresh = nnx.split(model)
    key = "final.0.up.weight"
    load_final = (model.final is not None and key in reader.keys()
                  and reader.info(key).shape[1] == config.num_classes)
    keymap = backbone_keymap(config, load_final=load_final)
    covered = {path for rule in keymap.rules for path in rule.jax_paths}
    loaded_part = nnx.from_flat_state([(path, variable) for path, variable in nnx.to_flat_state(fresh)
                                       if ".".join(map(str, path)) in covered])
    state, report = read_state(reader, keymap, loaded_part)
    nnx.update(model, state)
    check_index_buffers(reader, model)
    return model, report


def torch_state_dict(model: Med3DInsight | NnFormer) -> dict[str, np.ndarray]:
    """The reference's state dict (numpy arrays in the torch layout, with the index buffers) of a
    Med3DInsight or a bare nnFormer."""
    if isinstance(model, Med3DInsight):
        keymap, backbone = med3dinsight_keymap(model.config), model.backbone
    else:
        keymap, backbone = nnformer_keymap(model.config), model
    values = _flat_values(nnx.state(model, nnx.Param))
    get = _state_getter(values)
    entries = keymap.expand({p: tuple(v.shape) for p, v in values.items()})
    tensors = {entry.torch_key: _to_torch(entry, get, None) for entry in entries}
    tensors.update(index_buffers(backbone))
    return tensors


def save_state_dict(tensors: dict[str, np.ndarray], path: str | os.PathLike) -> None:
    """`torch.save` of numpy tensors as a torch state dict (needs torch), or safetensors when `path`
    ends in `.safetensors`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        from safetensors.numpy import save_file

        save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path))
        return
    import torch

    torch.save({key: torch.from_numpy(np.array(value)) for key, value in tensors.items()}, path)


def export_med3dinsight(model: Med3DInsight | NnFormer, path: str | os.PathLike, *, overwrite: bool = False
                        ) -> int:
    """Writes the reference's checkpoint (a `.pth`, or safetensors when `path` ends in `.safetensors`);
    returns the number of state-dict entries. The file is written beside `path` and renamed into place;
    an existing `path` is refused unless `overwrite`."""
    tensors = torch_state_dict(model)
    with atomic_output(path, overwrite=overwrite, folder=False) as tmp:
        save_state_dict(tensors, tmp)
    return len(tensors)


def config_from_checkpoint(reader: CheckpointReader, *, crop_size: tuple[int, int, int] = (128, 128, 128),
                           psat_heads: int = 8) -> Med3DInsightConfig:
    """The Med3DInsight config a reference state dict was saved with, read from its tensor shapes. The
    crop size and the PSAT head count leave no trace in the shapes: they are arguments (the reference's
    128³ and 8 by default)."""
    keys = set(reader.keys())
    shape = lambda key: reader.info(key).shape  # noqa: E731
    for required in ("psat.ps_pos", "model_down.patch_embed.norm.weight", "queries.weight", "proj.weight"):
        if required not in keys:
            raise ValueError(f"{reader.path}: not a Med3DInsight pretraining state dict (no {required!r})")
    stages = sum(1 for key in keys if key.startswith("model_down.norm") and key.endswith(".weight"))
    depths = tuple(1 + max(int(k.split(".")[4]) for k in keys if k.startswith(f"model_down.layers.{i}.blocks."))
                   for i in range(stages))
    tables = [shape(f"model_down.layers.{i}.blocks.0.attn.relative_position_bias_table") for i in range(stages)]
    windows = tuple(round(rows ** (1 / 3) + 1) // 2 for rows, _ in tables)
    final = shape("final.0.up.weight") if "final.0.up.weight" in keys else None
    backbone = NnFormerConfig(
        crop_size=crop_size, in_channels=shape("model_down.patch_embed.proj1.conv1.weight")[1],
        embed_dim=shape("model_down.patch_embed.norm.weight")[0], depths=depths,
        num_heads=tuple(heads for _, heads in tables), window_sizes=windows,
        num_classes=final[1] if final else 1, segmentation_head=final is not None,
        reconstruction_head="res.up.weight" in keys, qkv_bias="model_down.layers.0.blocks.0.attn.qkv.bias" in keys)
    width, _, bins = shape("psat.ps_pos")
    psat = PsatConfig(hidden_size=width, num_heads=psat_heads,
                      num_layers=1 + max(int(k.split(".")[3]) for k in keys if k.startswith("psat.decoder.layers.")),
                      ffn_dim=shape("psat.decoder.layers.0.linear1.weight")[0], num_queries=shape("queries.weight")[0],
                      out_dim=shape("proj.weight")[0], slice_bins=bins)
    return Med3DInsightConfig(backbone=backbone, psat=psat)


def _write_released(model: Med3DInsight, dst: str | os.PathLike, dtype, *, overwrite: bool = False) -> int:
    """`dst` ending in .pth / .bin / .safetensors is the file; otherwise a folder that gets `model.pth`."""
    if dtype is not None:
        raise ValueError("Med3DInsight checkpoints are exported in float32, as the reference saves them")
    dst = Path(dst)
    if dst.suffix in (".pth", ".bin", ".safetensors"):
        return export_med3dinsight(model, dst, overwrite=overwrite)
    with atomic_output(dst, overwrite=overwrite) as tmp:
        return export_med3dinsight(model, tmp / "model.pth")


def _recognise(source: Source) -> Med3DInsightConfig | None:
    if source.hf is not None or "psat.ps_pos" not in source.reader.keys():
        return None
    return config_from_checkpoint(source.reader)


KIND = Kind(
    "med3dinsight", "Med3DInsight", Med3DInsight, lambda hf: Med3DInsightConfig.from_dict(hf["med3dinsight"]),
    lambda config: {"med3dinsight": dataclasses.asdict(config)}, _recognise,
    released="a pretraining state dict with psat.* keys (latest_model_*.pth)",
    parts=(Part("", "", med3dinsight_keymap),), read=load_med3dinsight, write=_write_released,
)
