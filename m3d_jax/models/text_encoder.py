"""BERT, the text encoder of M3D-CLIP (bert-base-uncased) and of Med-2E3's text-guided slice scoring.

ids → word + absolute position + token-type embeddings → LayerNorm → post-norm layers
x = norm1(x + attn(x)); x = norm2(x + mlp(x)) → last hidden state; pooler = tanh(dense(hidden[:, 0])).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from m3d_jax.config import ComputeOptions, dataclass_from_mapping
from m3d_jax.layers import Dense, LayerNorm, Mlp, run_stack, stacked
from m3d_jax.layers.attention import attend
from m3d_jax.layers.params import normal, param
from m3d_jax.sharding import RESIDUAL, constrain


@dataclasses.dataclass(frozen=True)
class BertConfig(ComputeOptions):
    """BERT hyper-parameters (defaults: bert-base-uncased); `from_hf` / `to_hf` map a transformers config."""

    vocab_size: int = 30522
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pad_token_id: int = 0
    pooler: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by {self.num_heads} heads")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> BertConfig:
        """From a mapping of this class's fields (e.g. a ConfigDict), naming unknown keys."""
        return dataclass_from_mapping(cls, values)

    @classmethod
    def from_hf(cls, hf: Mapping[str, Any], **overrides: Any) -> BertConfig:
        """From a transformers `BertConfig` dict (`config.json` of a BertModel)."""
        if hf.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"only absolute BERT position embeddings are supported, got "
                             f"{hf['position_embedding_type']!r}")
        act = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}.get(hf.get("hidden_act", "gelu"),
                                                                              hf.get("hidden_act", "gelu"))
        fields = dict(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"], num_heads=hf["num_attention_heads"],
            max_position_embeddings=hf.get("max_position_embeddings", 512),
            type_vocab_size=hf.get("type_vocab_size", 2), layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
            hidden_act=act, pad_token_id=hf.get("pad_token_id", 0) or 0,
        )
        return cls(**{**fields, **overrides})

    def to_hf(self) -> dict[str, Any]:
        """A transformers `config.json` dict for `BertModel`."""
        return dict(
            model_type="bert", architectures=["BertModel"], vocab_size=self.vocab_size,
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers, num_attention_heads=self.num_heads,
            max_position_embeddings=self.max_position_embeddings, type_vocab_size=self.type_vocab_size,
            layer_norm_eps=self.layer_norm_eps, hidden_act={"gelu_tanh": "gelu_new"}.get(self.hidden_act,
                                                                                         self.hidden_act),
            pad_token_id=self.pad_token_id, position_embedding_type="absolute", hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
        )


class BertOutput(NamedTuple):
    last_hidden_state: jax.Array  # [B, T, hidden]
    pooled: jax.Array | None  # [B, hidden]: tanh(dense(hidden[:, 0])), None without a pooler
    hidden_states: tuple[jax.Array, ...] | None  # embeddings output, then every layer's output


class BertEmbeddings(nnx.Module):
    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs, **dtypes):
        self.dtype = dtypes["dtype"]
        table = lambda rows, axes: param(rngs, normal(0.02), (rows, config.hidden_size),  # noqa: E731
                                         dtypes["param_dtype"], axes)
        self.word = table(config.vocab_size, ("vocab", "embed"))
        self.position = table(config.max_position_embeddings, (None, "embed"))
        self.token_type = table(config.type_vocab_size, (None, "embed"))
        self.norm = LayerNorm(config.hidden_size, eps=config.layer_norm_eps, axes=("embed",), rngs=rngs, **dtypes)

    def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array) -> jax.Array:
        length = input_ids.shape[1]
        if length > self.position.shape[0]:
            raise ValueError(f"text of {length} tokens exceeds BERT's {self.position.shape[0]} positions")
        x = (jnp.take(self.word[...], input_ids, axis=0) + self.position[:length][None]
             + jnp.take(self.token_type[...], token_type_ids, axis=0))
        return self.norm(x.astype(self.dtype))


class BertLayer(nnx.Module):
    """Post-norm encoder layer with separate q/k/v projections (the HF layout)."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs, **dtypes):
        heads, head_dim, hidden = config.num_heads, config.head_dim, config.hidden_size
        self.attention_impl = config.attention_impl
        projection = lambda: Dense(hidden, (heads, head_dim), axes=("embed", "heads", "head_dim"),  # noqa: E731
                                   rngs=rngs, **dtypes)
        self.query, self.key, self.value = projection(), projection(), projection()
        self.attn_out = Dense((heads, head_dim), hidden, axes=("heads", "head_dim", "embed"), rngs=rngs, **dtypes)
        self.norm1 = LayerNorm(hidden, eps=config.layer_norm_eps, axes=("embed",), rngs=rngs, **dtypes)
        self.mlp = Mlp(hidden, config.intermediate_size, act=config.hidden_act, rngs=rngs, **dtypes)
        self.norm2 = LayerNorm(hidden, eps=config.layer_norm_eps, axes=("embed",), rngs=rngs, **dtypes)

    def __call__(self, x: jax.Array, *, mask: jax.Array) -> jax.Array:
        context = attend(self.query(x), self.key(x), self.value(x), mask=mask, implementation=self.attention_impl)
        x = constrain(self.norm1(x + self.attn_out(context)), RESIDUAL)
        return constrain(self.norm2(x + self.mlp(x)), RESIDUAL)


class Bert(nnx.Module):
    """BERT encoder. Call with input_ids [B, T] and attention_mask [B, T] (1 = real token)."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
        self.config = config
        dtypes = config.dtypes()
        self.embeddings = BertEmbeddings(config, rngs=rngs, **dtypes)
        self.layers = stacked(lambda layer_rngs: BertLayer(config, rngs=layer_rngs, **dtypes), config.num_layers, rngs)
        self.pooler = (Dense(config.hidden_size, config.hidden_size, axes=("embed", "mlp2"), rngs=rngs, **dtypes)
                       if config.pooler else None)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None,
        *,
        output_hidden_states: bool = False,
    ) -> BertOutput:
        config = self.config
        if attention_mask is None:
            attention_mask = jnp.ones_like(input_ids)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids)  # [B, T, hidden]
        key_mask = attention_mask.astype(bool)[:, None, None, :]  # [B, 1, 1, T]: padding is never attended
        last, hidden_states, _ = run_stack(
            self.layers, x, num_layers=config.num_layers, scan=config.scan_layers, remat=config.remat,
            collect=output_hidden_states, mask=key_mask,
        )
        pooled = jnp.tanh(self.pooler(last[:, 0])) if self.pooler is not None else None
        states = (x, *hidden_states) if output_hidden_states else None
        return BertOutput(last, pooled, states)
