"""Device meshes and the ONE table that maps the logical axis names of parameters (and, through
`constrain`, of activations) to mesh axes.

Mesh axes: "data" (pure data parallelism), "fsdp" (data parallelism with parameters and optimizer state
sharded), "tensor" (heads / MLP / vocabulary split). Parameters are created directly in their sharded
layout (`create_sharded`): a model larger than one host's memory is never materialised whole.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from collections.abc import Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from m3d_jax.errors import ConfigError
from m3d_jax.layers.params import logical_axes

MESH_AXES = ("data", "fsdp", "tensor")

# logical name → mesh axis (or axes). Names not listed are replicated. A mesh axis is used at most once per
# array (the first dimension that claims it wins) and only where it divides the dimension.
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("vision_embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("vocab", "tensor"),
    ("layers", None),
    ("head_dim", None),
    ("mlp2", None),
    ("patch", None),
    ("tokens", None),
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


def spec_for(names: Sequence[str | None] | None, shape: Sequence[int], mesh: Mesh,
             rules=LOGICAL_RULES) -> PartitionSpec:
    """PartitionSpec of an array whose dimensions carry these logical names, under the rules table."""
    if names is None:
        return PartitionSpec()
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for name, size in zip(names, shape):
        axes = tuple(a for a in _rule_axes(table, name) if a not in used and mesh.shape[a] > 1)
        if axes and size % math.prod(mesh.shape[a] for a in axes) == 0:
            used.update(axes)
            spec.append(axes[0] if len(axes) == 1 else axes)
        else:
            spec.append(None)
    return PartitionSpec(*spec)


def allowed_mesh_axes(names: Sequence[str | None] | None, mesh: Mesh, rules=LOGICAL_RULES) -> set[str]:
    """The mesh axes (of size > 1) an array with these logical names may be sharded over under the rules
    table, were every dimension divisible."""
    table = dict(rules)
    return {axis for name in names or () for axis in _rule_axes(table, name) if mesh.shape[axis] > 1}


def _rule_axes(table: dict, name: str | None) -> tuple[str, ...]:
    """The mesh axes the rules table maps a logical name to (none for None or an unlisted name)."""
    target = table.get(name) if name is not None else None
    return (target,) if isinstance(target, str) else tuple(target or ())


def state_shardings(state: nnx.State, mesh: Mesh, rules=LOGICAL_RULES) -> nnx.State:
    """A State of NamedShardings matching `state` (abstract or real), from each variable's logical names."""
    def sharding(variable: nnx.Variable) -> nnx.Variable:
        return variable.replace(NamedSharding(mesh, spec_for(logical_axes(variable), variable.shape, mesh, rules)))

    return jax.tree.map(sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def create_sharded(make_model: Callable[[], nnx.Module], mesh: Mesh, rules=LOGICAL_RULES) -> nnx.Module:
    """Builds the model with every parameter initialised directly in its sharded layout."""
    graphdef, abstract = nnx.split(nnx.eval_shape(make_model))
    shardings = state_shardings(abstract, mesh, rules)
    state = jax.jit(lambda: nnx.split(make_model())[1], out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def shard_model(model: nnx.Module, mesh: Mesh, rules=LOGICAL_RULES) -> nnx.Module:
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

_ACTIVATION_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("activation_mesh", default=None)


@contextlib.contextmanager
def activation_mesh(mesh: Mesh | None):
    """While tracing inside this context, `constrain` lays activations out on `mesh`."""
    token = _ACTIVATION_MESH.set(mesh)
    try:
        yield
    finally:
        _ACTIVATION_MESH.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """A sharding constraint on an activation from its dimensions' logical names under the rules table
    (e.g. ("batch", None, None) for the residual stream: batch over (data, fsdp), features whole, so FSDP
    gathers weights instead of resharding activations). A no-op outside `activation_mesh`."""
    mesh = _ACTIVATION_MESH.get()
    if mesh is None or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec_for(names, x.shape, mesh)))


def batch_ways(mesh: Mesh) -> int:
    """How many ways a global batch is split: the data-parallel axes (data × fsdp, DCN included)."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def check_batch_sizes(mesh: Mesh, sizes: dict[str, int | None]) -> None:
    """Refuses ({config key: global batch size}) sizes the mesh's data-parallel ways do not divide."""
    ways = batch_ways(mesh)
    for key, size in sizes.items():
        if size is not None and (not isinstance(size, int) or size <= 0 or size % ways):
            raise ConfigError(f"{key}={size}: a global batch must be a positive multiple of the mesh's {ways} "
                              f"data-parallel ways (data × fsdp of mesh {dict(mesh.shape)})")


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Batch-major arrays: the leading axis over (data, fsdp), the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))
