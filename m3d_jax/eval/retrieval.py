"""Image ↔ report retrieval with M3D-CLIP: every pair encoded once (volume prepared without augmentation,
report shortened deterministically the training way), then R@k in both directions."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from flax import nnx

from m3d_jax.data.clip_samples import count_tokens, report_excerpt, text_ids
from m3d_jax.data.volume import load_volume, prepare
from m3d_jax.eval.metrics import retrieval_recall
from m3d_jax.models.clip import M3DClip


def encode_pairs(model: M3DClip, tokenizer, records: Sequence[dict], *, batch_size: int = 8,
                 excerpt_tokens: int = 512, window: tuple[float, float] | None = None, seed: int = 42
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(image features [N, E], text features [N, E]) of caption records ({"image", "answer"})."""
    config = model.config
    encode_images = nnx.jit(lambda m, images: m.encode_image(images))
    encode_texts = nnx.jit(lambda m, ids, mask: m.encode_text(ids, mask))
    count = lambda text: count_tokens(tokenizer, text)  # noqa: E731
    image_features, text_features = [], []
    for begin in range(0, len(records), batch_size):
        chunk = list(records[begin:begin + batch_size])
        rows = len(chunk)
        chunk += chunk[-1:] * (batch_size - rows)  # one compiled shape; the padding rows are dropped
        images = np.stack([prepare(load_volume(r["image"], channels=config.vision.in_channels).array,
                                   config.vision.image_size, window)[0]
                           for r in chunk]).astype(np.float32)
        texts = [report_excerpt(r["answer"], count, excerpt_tokens, np.random.default_rng(seed)) for r in chunk]
        ids, mask = map(np.stack, zip(*(text_ids(tokenizer, text, config.max_text_len) for text in texts)))
        image_features.append(np.asarray(encode_images(model, images))[:rows])
        text_features.append(np.asarray(encode_texts(model, ids, mask))[:rows])
    return np.concatenate(image_features), np.concatenate(text_features)


def retrieval_metrics(model: M3DClip, tokenizer, records: Sequence[dict], **kwargs) -> dict[str, float]:
    """R@1/5/10 image→text and text→image (percent) over the records (pair i ↔ i)."""
    images, texts = encode_pairs(model, tokenizer, records, **kwargs)
    return retrieval_recall(images @ texts.T)
