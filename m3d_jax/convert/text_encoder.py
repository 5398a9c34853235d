"""Key map between transformers `BertModel` state dicts and the JAX BERT (`m3d_jax.models.text_encoder`)."""

from __future__ import annotations

import os

from flax import nnx

from m3d_jax.convert.keymap import LINEAR, ConversionReport, KeyMap, Linear, Reshape, Rule, load_model, norm_rules
from m3d_jax.models.text_encoder import Bert, BertConfig

BERT_EXTRAS = (
    ("embeddings.position_ids", "index buffer [1, max_positions] saved by older transformers; recomputed"),
)


def bert_keymap(config: BertConfig, prefix: str = "") -> KeyMap:
    """The torch ↔ JAX map of a `BertModel` (keys under `prefix`, e.g. "bert." inside a task model)."""
    layer = "encoder.layer.{layer}."
    rules = [
        Rule("embeddings.word_embeddings.weight", "embeddings.word"),
        Rule("embeddings.position_embeddings.weight", "embeddings.position"),
        Rule("embeddings.token_type_embeddings.weight", "embeddings.token_type"),
        *norm_rules("embeddings.LayerNorm", "embeddings.norm"),
    ]
    for name in ("query", "key", "value"):
        rules += [Rule(f"{layer}attention.self.{name}.weight", f"layers.{name}.kernel", LINEAR),
                  Rule(f"{layer}attention.self.{name}.bias", f"layers.{name}.bias", Reshape(flatten=True))]
    rules += [
        Rule(f"{layer}attention.output.dense.weight", "layers.attn_out.kernel", Linear(n_in=2)),
        Rule(f"{layer}attention.output.dense.bias", "layers.attn_out.bias"),
        *norm_rules(f"{layer}attention.output.LayerNorm", "layers.norm1"),
        Rule(f"{layer}intermediate.dense.weight", "layers.mlp.linear1.kernel", LINEAR),
        Rule(f"{layer}intermediate.dense.bias", "layers.mlp.linear1.bias"),
        Rule(f"{layer}output.dense.weight", "layers.mlp.linear2.kernel", LINEAR),
        Rule(f"{layer}output.dense.bias", "layers.mlp.linear2.bias"),
        *norm_rules(f"{layer}output.LayerNorm", "layers.norm2"),
    ]
    if config.pooler:
        rules += [Rule("pooler.dense.weight", "pooler.kernel", LINEAR), Rule("pooler.dense.bias", "pooler.bias")]
    return KeyMap("bert", tuple(rules), prefix=prefix, ignored=BERT_EXTRAS)


def load_bert(path: str | os.PathLike, config: BertConfig, prefix: str = "") -> tuple[Bert, ConversionReport]:
    """Loads a JAX BERT from a transformers `BertModel` checkpoint (file or folder)."""
    return load_model(path, bert_keymap(config, prefix), lambda: Bert(config, rngs=nnx.Rngs(0)))
