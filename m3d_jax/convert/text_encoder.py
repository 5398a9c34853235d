"""Key map between transformers `BertModel` state dicts and the JAX BERT (`m3d_jax.models.text_encoder`), and
the BERT sizes read from a state dict's tensor shapes (M3D-CLIP folders do not record them)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from typing import Any

from absl import logging
from flax import nnx

from m3d_jax.convert.keymap import LINEAR, ConversionReport, KeyMap, Linear, Reshape, Rule, load_model, norm_rules
from m3d_jax.convert.kind import Kind, Part
from m3d_jax.convert.torch_io import CheckpointReader, CheckpointReadError
from m3d_jax.models.text_encoder import Bert, BertConfig

Shapes = Mapping[str, tuple[int, ...]]

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


def checkpoint_shapes(reader: CheckpointReader) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape, read from the file headers (no tensor data)."""
    return {key: reader.info(key).shape for key in reader.keys()}


def count_layers(shapes: Shapes, pattern: str) -> int:
    """1 + the largest N among keys matching `pattern` (a regex with one group capturing N); 0 without any."""
    found = [int(match.group(1)) for key in shapes if (match := re.match(pattern, key))]
    return 1 + max(found) if found else 0


def assumed_num_heads(hidden_size: int, where: str, what: str, key: str) -> int:
    """The head count of a transformer whose config records none (shapes cannot tell it): head width 64, as in
    bert-base-uncased (768 / 12) and M3D's ViT-B, or one head when the width does not split that way. Logs a
    warning naming `where`, the value assumed and the config.json `key` that would record it."""
    heads = hidden_size // 64 if hidden_size >= 64 and hidden_size % 64 == 0 else 1
    logging.warning("%s: the %s head count is not recorded; assuming %d heads (head width %d) for width %d; "
                    "if that is wrong, set %s in config.json", where, what, heads, hidden_size // heads,
                    hidden_size, key)
    return heads


def bert_config_from_shapes(shapes: Shapes, where: str, recorded: Mapping[str, Any] | None = None,
                            prefix: str = "", heads_key: str = "num_attention_heads") -> BertConfig:
    """A `BertConfig` for the `BertModel` state dict under `prefix` with the sizes read from its tensor shapes:
    depth (count of `encoder.layer.N`), hidden and intermediate widths, max positions, vocab, type vocab, and
    whether it has a pooler. The head count and the non-size fields (eps, activation, pad id) come from
    `recorded`, a transformers BertConfig dict, where it has them; without a recorded head count it is
    assumed (see `assumed_num_heads`) with a warning naming `where` and `heads_key`, the config key to set."""
    word = shapes.get(f"{prefix}embeddings.word_embeddings.weight")
    if word is None:
        raise CheckpointReadError(f"{where}: no {prefix}embeddings.word_embeddings.weight, so no BERT to size")
    vocab_size, hidden_size = word
    num_layers = count_layers(shapes, rf"{re.escape(prefix)}encoder\.layer\.(\d+)\.")
    intermediate = shapes.get(f"{prefix}encoder.layer.0.intermediate.dense.weight")
    if not num_layers or intermediate is None:
        raise CheckpointReadError(f"{where}: the BERT under {prefix!r} has no {prefix}encoder.layer.0.* weights")
    recorded = dict(recorded or {})
    sizes = dict(
        vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
        intermediate_size=intermediate[0],
        max_position_embeddings=shapes[f"{prefix}embeddings.position_embeddings.weight"][0],
        type_vocab_size=shapes[f"{prefix}embeddings.token_type_embeddings.weight"][0],
    )
    if "num_attention_heads" not in recorded:
        recorded["num_attention_heads"] = assumed_num_heads(hidden_size, where, "BERT", heads_key)
    return BertConfig.from_hf({**recorded, **sizes}, pooler=f"{prefix}pooler.dense.weight" in shapes)


KIND = Kind(
    "bert", "BERT", Bert, BertConfig.from_hf, BertConfig.to_hf,
    lambda source: (KIND.parse(source.hf, source.path / "config.json")
                    if source.hf is not None and source.hf.get("model_type") == "bert" else None),
    released="a transformers folder with model_type bert", parts=(Part("", "", bert_keymap),),
)
