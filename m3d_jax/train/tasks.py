"""What the training loop needs from a model family, one `Task` per family (`config.task`): LaMed
(`lamed_task`), M3D-CLIP (`clip_task`), Med-2E3 (`med2e3_task`), Med3DInsight pretraining
(`med3dinsight_task`) and fine-tuning its backbone for segmentation or classification (`finetune_task`:
tasks segment and classify)."""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from ml_collections import ConfigDict

from m3d_jax import convert
from m3d_jax.convert.vit3d import load_vit3d
from m3d_jax.data.augment import AugmentConfig
from m3d_jax.models.decoder import DecoderConfig
from m3d_jax.models.decoder_presets import PRESETS
from m3d_jax.sharding import on_host, state_shardings

TASK_MODULES = {"lamed": "m3d_jax.train.lamed_task", "clip": "m3d_jax.train.clip_task",
                "med2e3": "m3d_jax.train.med2e3_task", "med3dinsight": "m3d_jax.train.med3dinsight_task",
                "segment": "m3d_jax.train.finetune_task:SEGMENT", "classify": "m3d_jax.train.finetune_task:CLASSIFY"}


def count_text_tokens(batch: Mapping[str, Any]) -> int:
    """Tokens in a host batch (its attention mask's ones)."""
    return int(batch["attention_mask"].sum())


def count_samples(batch: Mapping[str, Any]) -> int:
    """Samples (rows) in a host batch, for models without tokens (volumes in, volumes out)."""
    return len(batch["images"])


@dataclasses.dataclass(frozen=True)
class Task:
    """name; inputs: batch key → rank of what the model takes; build(config, without_tokenizer=False) →
    (tokenizer, model config, model factory), with `without_tokenizer` sized as the released checkpoints
    and reading no file (for planning); batch_shapes(config, model config) → the global batch the step
    takes, as ShapeDtypeStructs (what the data pipeline yields); load_pretrained(model, config.init, mesh); loss(model, batch, rngs) → (loss, metrics);
    sample_spec(config, model_config, train) → a data spec whose `transform` makes samples; eval_metric:
    the loss metric reported on the eval sources; evaluate(model, run, config) → task metrics (e.g.
    closed-VQA accuracy, retrieval recall); export(model, tokenizer, folder): the released PyTorch
    layout (on the primary process, parameters gathered); unit and count: what throughput counts in a
    host batch ("tokens" by default)."""

    name: str
    inputs: Mapping[str, int]
    build: Callable[..., tuple[Any, Any, Callable[[], nnx.Module]]]
    batch_shapes: Callable[[ConfigDict, Any], dict[str, jax.ShapeDtypeStruct]]
    load_pretrained: Callable[[nnx.Module, ConfigDict, Any], None]
    loss: Callable
    sample_spec: Callable[..., Any]
    eval_metric: str
    evaluate: Callable[..., dict[str, float]]
    export: Callable[[nnx.Module, Any, str], None]
    unit: str = "tokens"
    count: Callable[[Mapping[str, Any]], int] = count_text_tokens


def volume_batch(config: ConfigDict, channels: int, image_size, **arrays: tuple) -> dict[str, jax.ShapeDtypeStruct]:
    """A global batch of `config.data.batch_size` float32 volumes [B, channels, *image_size] ("images") plus
    `arrays`: name → (per-sample shape, dtype)."""
    size = int(config.data.batch_size)
    shapes = {"images": jax.ShapeDtypeStruct((size, channels, *image_size), jnp.float32)}
    shapes.update({name: jax.ShapeDtypeStruct((size, *shape), dtype) for name, (shape, dtype) in arrays.items()})
    return shapes


def get_task(name: str) -> Task:
    """The task registered under `name` (config.task; default "lamed")."""
    if name not in TASK_MODULES:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASK_MODULES)}")
    module, _, attribute = TASK_MODULES[name].partition(":")
    return getattr(importlib.import_module(module), attribute or "TASK")


def decoder_config(section: dict, **fixed):
    """A model config's `decoder` section → DecoderConfig: `preset` names a decoder preset whose fields the
    other keys override; `fixed` (e.g. the tokenizer's vocab_size) overrides both."""
    section = dict(section)
    preset = section.pop("preset", "")
    base = dataclasses.asdict(PRESETS[preset]()) if preset else {}
    return DecoderConfig.from_dict({**base, **section, **fixed})


def augment_config(setting):
    """data.augment: True (the reference recipe), False, or a mapping of AugmentConfig fields."""
    if not setting:
        return None
    return AugmentConfig() if setting is True else AugmentConfig(**dict(setting))


def place(module: nnx.Module, loaded: nnx.Module, name: str, source: str, mesh) -> None:
    """Copies a loaded (host) module's parameters into a sharded module of the same structure."""
    target = nnx.state(module)
    state = nnx.state(loaded)
    if jax.tree.map(np.shape, target) != jax.tree.map(np.shape, state):
        raise ValueError(f"{source}: the {name} in this checkpoint does not match the configured model; "
                         "set the config's model section to the checkpoint's sizes")
    nnx.update(module, jax.device_put(state, state_shardings(target, mesh)))


def place_checkpoint(module: nnx.Module, path: str, name: str, mesh, **load_args) -> None:
    """Loads the checkpoint at `path` on the host (`m3d_jax.convert.load` with `load_args`: expect=,
    config=, field overrides) and places it in the sharded `module`."""
    with on_host():
        place(module, convert.load(path, **load_args), name, path, mesh)


def load_vision_tower(module: nnx.Module, vision_config, init: ConfigDict, mesh) -> None:
    """Fills a ViT3D from `init.vision_tower`, if set: a 3D ViT checkpoint in `init.vision_layout` (see
    m3d_jax.convert.vit3d.VIT3D_PREFIXES), or with the layout `m3d_clip` a whole M3D-CLIP folder (released,
    converted, or a clip run's export), whose vision encoder is taken."""
    path = init.get("vision_tower")
    if not path:
        return
    layout = init.get("vision_layout", "m3d_clip_vision")
    with on_host():
        if layout == "m3d_clip":
            loaded = convert.load(path, expect="clip").vision_encoder
        else:
            loaded, _ = load_vit3d(path, vision_config, layout)
        place(module, loaded, "vision tower", path, mesh)
