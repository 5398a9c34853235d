"""Med3DInsight's pretraining checkpoint (a plain `state_dict`) ↔ JAX. This module holds the PSAT part
(`psat.*`, `queries.weight`, `proj.*`); torch `nn.MultiheadAttention`'s packed `in_proj_weight` [3d, d] is
split into the q, k, v projections."""

from __future__ import annotations

from m3d_jax.convert.keymap import LINEAR, FusedBias, FusedLinear, KeyMap, Linear, Rule, norm_rules
from m3d_jax.models.psat import PsatConfig


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
