"""Device meshes and the ONE table that maps logical axis names to mesh axes: parameters (`param`'s
names, read back by `logical_axes`), activations (`constrain`) and batches (`batch_sharding`) all go
through `spec_for`, and a name missing from the table is an error, never a silent replication.

Mesh axes: "data" (pure data parallelism), "fsdp" (data parallelism with parameters and optimizer state
sharded), "tensor" (heads / MLP / vocabulary split). Parameters are created directly in their sharded
layout (`create_sharded`): a model larger than one host's memory is never materialised whole.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from m3d_jax.errors import ConfigError

MESH_AXES = ("data", "fsdp", "tensor")

Rule = tuple[str, str | tuple[str, ...] | None]

# logical name → mesh axis (or axes), None to replicate; every name a parameter or activation uses must be
# listed. A mesh axis is used at most once per array (the first dimension that claims it wins) and only
# where it divides the dimension.
LOGICAL_RULES: tuple[Rule, ...] = (
    ("batch", ("data", "fsdp")),  # the data-parallel ways: batches, activations' leading axis, batch_ways
    ("embed", "fsdp"),
    ("vision_embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    # A 3D conv kernel (k, k, k, I, O) is a dense map over each k³ neighbourhood: its input channels are
    # "embed" (fsdp) and its output channels split over tensor, like a dense layer's "mlp" columns (and
    # SegVol's transposed conv); channel counts tensor does not divide stay whole.
    ("conv_out", "tensor"),
    ("layers", None),
    ("head_dim", None),
    ("mlp2", None),
    ("patch", None),
    ("tokens", None),
    ("relative_position", None),  # nnFormer's bias table rows, gathered by a relative-offset index: kept whole
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh shape within a slice (ICI) and across slices (DCN, multi-slice TPU); −1 fills the rest."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    dcn_data: int = 1
    dcn_fsdp: int = 1
    dcn_tensor: int = 1

    def shapes(self, num_devices: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        dcn = (self.dcn_data, self.dcn_fsdp, self.dcn_tensor)
        if num_devices % math.prod(dcn):
            raise ValueError(f"{num_devices} devices cannot form {math.prod(dcn)} slices {dcn}")
        per_slice = num_devices // math.prod(dcn)
        ici = [self.data, self.fsdp, self.tensor]
        if ici.count(-1) > 1:
            raise ValueError(f"at most one mesh axis may be -1, got {ici}")
        if -1 in ici:
            known = math.prod(v for v in ici if v != -1)
            if per_slice % known:
                raise ValueError(f"{per_slice} devices per slice are not divisible by {known}")
            ici[ici.index(-1)] = per_slice // known
        if math.prod(ici) != per_slice:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, ici))} needs {math.prod(ici)} devices per slice, "
                             f"have {per_slice}")
        return tuple(ici), dcn


def on_host() -> contextlib.AbstractContextManager:
    """A context placing eagerly created arrays in host memory (whole-model conversions, pretrained weights
    loaded before they are placed on the mesh)."""
    return jax.default_device(jax.local_devices(backend="cpu")[0])


def make_mesh(config: MeshConfig = MeshConfig(), devices: Sequence[jax.Device] | None = None) -> Mesh:
    """The (data, fsdp, tensor) mesh over `devices` (default: all), slices along the DCN axes."""
    devices = list(devices) if devices is not None else jax.devices()
    ici, dcn = config.shapes(len(devices))
    if math.prod(dcn) > 1:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices)
    else:
        grid = np.asarray(devices).reshape(ici)
    return Mesh(grid, MESH_AXES)


class UnknownLogicalAxisError(ValueError):
    """A logical axis name the rules table does not list: a model bug (the parameter or activation would be
    silently replicated), so it is raised at construction with the names the table knows."""


# Flax renamed the sharding metadata key across releases; read whichever this version writes.
_SHARDING_KEYS = ("out_sharding", "sharding_names", "sharding")


def logical_axes(variable: nnx.Variable) -> tuple[str | None, ...] | None:
    """The logical axis names a parameter was declared with (None if it has none)."""
    metadata = variable.get_metadata()
    for key in _SHARDING_KEYS:
        if metadata.get(key) is not None:
            return tuple(metadata[key])
    return None


def check_logical_names(names: Sequence[str | None], rules: Sequence[Rule] = LOGICAL_RULES, *,
                        what: str = "an array") -> None:
    """Refuses names the rules table does not list (None, a dimension kept whole, is always allowed)."""
    table = dict(rules)
    unknown = [name for name in names if name is not None and name not in table]
    if unknown:
        raise UnknownLogicalAxisError(
            f"logical axis name(s) {unknown} of {what} (axes {tuple(names)}) are not in the rules table "
            f"(m3d_jax.sharding.LOGICAL_RULES); known names: {sorted(table)}. Use one of them, or add the name "
            f"to the table with the mesh axis it shards over (None to keep it whole)")


def spec_for(names: Sequence[str | None] | None, shape: Sequence[int] | None, mesh: Mesh,
             rules: Sequence[Rule] = LOGICAL_RULES) -> PartitionSpec:
    """PartitionSpec of an array whose dimensions carry these logical names, under the rules table. A mesh
    axis of size 1 is left out; with `shape` a dimension is split only where the mesh axes divide it, without
    (None, e.g. a batch whose global size `check_batch_sizes` checked) always."""
    if names is None:
        return PartitionSpec()
    table = _table(names, rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(names, (None,) * len(names) if shape is None else shape):
        axes = tuple(a for a in _rule_axes(table, name) if a not in used and mesh.shape[a] > 1)
        if axes and (size is None or size % math.prod(mesh.shape[a] for a in axes) == 0):
            used.update(axes)
            spec.append(axes[0] if len(axes) == 1 else axes)
        else:
            spec.append(None)
    return PartitionSpec(*spec)


def allowed_mesh_axes(names: Sequence[str | None] | None, mesh: Mesh,
                      rules: Sequence[Rule] = LOGICAL_RULES) -> set[str]:
    """The mesh axes (of size > 1) an array with these logical names may be sharded over under the rules
    table, were every dimension divisible."""
    table = _table(names or (), rules)
    return {axis for name in names or () for axis in _rule_axes(table, name) if mesh.shape[axis] > 1}


def _table(names: Sequence[str | None], rules: Sequence[Rule]) -> dict:
    """The rules as a dict, after checking that it lists every name."""
    check_logical_names(names, rules)
    return dict(rules)


def _rule_axes(table: dict, name: str | None) -> tuple[str, ...]:
    """The mesh axes the rules table maps a logical name to (none for None)."""
    target = table[name] if name is not None else None
    return (target,) if isinstance(target, str) else tuple(target or ())


def state_shardings(state: nnx.State, mesh: Mesh, rules: Sequence[Rule] = LOGICAL_RULES) -> nnx.State:
    """A State of NamedShardings matching `state` (abstract or real), from each variable's logical names."""
    def sharding(variable: nnx.Variable) -> nnx.Variable:
        return variable.replace(NamedSharding(mesh, spec_for(logical_axes(variable), variable.shape, mesh, rules)))

    return jax.tree.map(sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_sharded(make_model: Callable[[], nnx.Module], mesh: Mesh,
                   rules: Sequence[Rule] = LOGICAL_RULES) -> nnx.Module:
    """Builds the model with every parameter initialised directly in its sharded layout."""
    graphdef, abstract = nnx.split(nnx.eval_shape(make_model))
    shardings = state_shardings(abstract, mesh, rules)
    state = jax.jit(lambda: nnx.split(make_model())[1], out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def shard_model(model: nnx.Module, mesh: Mesh, rules: Sequence[Rule] = LOGICAL_RULES) -> nnx.Module:
    """Moves an existing (e.g. converted) model's parameters into their sharded layout."""
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.device_put(state, state_shardings(state, mesh, rules)))


def replicate_strays(module: nnx.Module, mesh: Mesh) -> None:
    """Places every array of `module` not yet laid out on `mesh` (e.g. an optimiser's step counters,
    created on one device) replicated over the mesh, in place."""
    def place(x):
        on_mesh = isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh
        return x if on_mesh else jax.device_put(x, NamedSharding(mesh, PartitionSpec()))

    nnx.update(module, jax.tree.map(place, nnx.state(module)))


RESIDUAL = ("batch", None, None)  # a residual stream [B, T, D]: batch-sharded, features whole


@dataclasses.dataclass(frozen=True)
class ActivationLayout:
    """The mesh and rules table `constrain` lays activations out with: the same rules as the parameters."""

    mesh: Mesh
    rules: Sequence[Rule] = LOGICAL_RULES


_ACTIVATION_LAYOUT: contextvars.ContextVar[ActivationLayout | None] = contextvars.ContextVar(
    "activation_layout", default=None)


@contextlib.contextmanager
def activation_mesh(mesh: Mesh | None, rules: Sequence[Rule] = LOGICAL_RULES) -> Iterator[None]:
    """While tracing inside this context, `constrain` lays activations out on `mesh` under `rules` (pass
    the rules the parameters were sharded with)."""
    token = _ACTIVATION_LAYOUT.set(None if mesh is None else ActivationLayout(mesh, tuple(rules)))
    try:
        yield
    finally:
        _ACTIVATION_LAYOUT.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """A sharding constraint on an activation from its dimensions' logical names under the rules table
    (e.g. ("batch", None, None) for the residual stream: batch over (data, fsdp), features whole, so FSDP
    gathers weights instead of resharding activations). A no-op outside `activation_mesh`."""
    layout = _ACTIVATION_LAYOUT.get()
    if layout is None or layout.mesh.size == 1:
        return x
    spec = spec_for(names, x.shape, layout.mesh, layout.rules)
    return jax.lax.with_sharding_constraint(x, NamedSharding(layout.mesh, spec))


def batch_axes(mesh: Mesh, rules: Sequence[Rule] = LOGICAL_RULES) -> tuple[str, ...]:
    """The mesh axes (of size > 1) the rules table splits a batch over: its "batch" entry."""
    return tuple(axis for axis in _rule_axes(_table(("batch",), rules), "batch") if mesh.shape[axis] > 1)


def batch_ways(mesh: Mesh, rules: Sequence[Rule] = LOGICAL_RULES) -> int:
    """How many ways a global batch is split: the product of its data-parallel axes (DCN included)."""
    return math.prod(mesh.shape[axis] for axis in batch_axes(mesh, rules))


def check_batch_sizes(mesh: Mesh, sizes: dict[str, int | None], rules: Sequence[Rule] = LOGICAL_RULES) -> None:
    """Refuses ({config key: global batch size}) sizes the mesh's data-parallel ways do not divide."""
    ways = batch_ways(mesh, rules)
    axes = " × ".join(_rule_axes(_table(("batch",), rules), "batch")) or "no mesh axes"
    for key, size in sizes.items():
        if size is not None and (not isinstance(size, int) or size <= 0 or size % ways):
            raise ConfigError(f"{key}={size}: a global batch must be a positive multiple of the mesh's {ways} "
                              f"data-parallel ways ({axes} of mesh {dict(mesh.shape)})")


def batch_sharding(mesh: Mesh, ndim: int, rules: Sequence[Rule] = LOGICAL_RULES) -> NamedSharding:
    """Batch-major arrays: the leading axis as the rules' "batch" (data-parallel axes), the rest whole."""
    return NamedSharding(mesh, spec_for(("batch",) + (None,) * (ndim - 1), None, mesh, rules))
