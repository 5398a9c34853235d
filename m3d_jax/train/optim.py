"""AdamW with linear warmup + cosine decay (or a constant rate), global-norm clipping, a weight-decay mask
(no decay on vectors: biases, norm scales, cls token; nor on embeddings — or decay on everything), decoupled
(AdamW) or coupled (torch Adam's `weight_decay`: L2 added to the gradient before the moments) weight decay,
gradient accumulation, and skipped updates
for non-finite gradients (the parameters and optimiser state stay as they were; optax would apply one after
N skips in a row, so here it never does — the trainer stops instead, see `max_consecutive_nonfinite`)."""

from __future__ import annotations

import dataclasses

import jax
import optax


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    learning_rate: float = 1e-4
    schedule: str = "warmup_cosine"  # or "constant"
    warmup_fraction: float = 0.03
    total_steps: int = 1000
    end_learning_rate_fraction: float = 0.0
    weight_decay: float = 0.0
    weight_decay_mode: str = "decoupled"  # AdamW; "coupled": torch Adam(weight_decay=...) (Med3DInsight)
    decay_all: bool = False  # decay every parameter (torch optimisers' default) instead of `decay_mask`
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    clip_norm: float = 1.0  # 0 = no clipping
    accumulation_steps: int = 1
    nonfinite: str = "skip"  # NaN/Inf loss or gradients: "skip" the update, or "stop" training
    max_consecutive_nonfinite: int = 10  # with "skip": stop after this many skipped steps in a row
    # Learning-rate multipliers by parameter-path prefix, e.g. {"vision_tower": 0.1}; the longest prefix wins.
    lr_multipliers: dict[str, float] = dataclasses.field(default_factory=dict)


    def __post_init__(self):
        if self.schedule not in ("warmup_cosine", "constant"):
            raise ValueError(f"optim.schedule must be 'warmup_cosine' or 'constant', got {self.schedule!r}")
        if self.weight_decay_mode not in ("decoupled", "coupled"):
            raise ValueError(f"optim.weight_decay_mode must be 'decoupled' or 'coupled', got {self.weight_decay_mode!r}")


def schedule(config: OptimConfig) -> optax.Schedule:
    if config.schedule == "constant":
        return optax.constant_schedule(config.learning_rate)
    warmup = max(1, int(round(config.warmup_fraction * config.total_steps)))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=config.learning_rate, warmup_steps=warmup,
        decay_steps=max(config.total_steps, warmup + 1), end_value=config.learning_rate * config.end_learning_rate_fraction,
    )


def decay_mask(params) -> object:
    """True where weight decay applies: matrices and higher, except embedding tables."""
    def decays(path, leaf) -> bool:
        names = _path_name(path)
        return leaf.ndim >= 2 and "embed_tokens" not in names and "position_embeddings" not in names

    return jax.tree_util.tree_map_with_path(decays, params)


def _path_name(path) -> str:
    return "/".join(str(getattr(p, "key", getattr(p, "name", getattr(p, "idx", p)))) for p in path)


def scale_by_path(multipliers: dict[str, float]) -> optax.GradientTransformation:
    """Multiplies each update by the multiplier of the longest matching path prefix (1 if none)."""
    prefixes = sorted(multipliers, key=len, reverse=True)

    def factor(path) -> float:
        name = _path_name(path)
        return next((float(multipliers[p]) for p in prefixes if name.startswith(p)), 1.0)

    def update(updates, state, params=None):
        del params
        return jax.tree_util.tree_map_with_path(lambda path, u: u * factor(path), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


NEVER = 2**30  # apply_if_finite's limit: never let a non-finite update through


def make_optimizer(config: OptimConfig) -> optax.GradientTransformation:
    parts = []
    if config.clip_norm > 0:
        parts.append(optax.clip_by_global_norm(config.clip_norm))
    mask = None if config.decay_all else decay_mask
    if config.weight_decay_mode == "coupled":
        if config.weight_decay:
            parts.append(optax.add_decayed_weights(config.weight_decay, mask=mask))
        parts.append(optax.adam(schedule(config), b1=config.b1, b2=config.b2, eps=config.eps))
    else:
        parts.append(optax.adamw(schedule(config), b1=config.b1, b2=config.b2, eps=config.eps,
                                 weight_decay=config.weight_decay, mask=mask))
    if config.lr_multipliers:
        parts.append(scale_by_path(dict(config.lr_multipliers)))
    tx = optax.apply_if_finite(optax.chain(*parts), max_consecutive_errors=NEVER)
    return optax.MultiSteps(tx, config.accumulation_steps) if config.accumulation_steps > 1 else tx
