"""Segmentation fine-tuning loss: cross-entropy + soft Dice on softmax probabilities (nnU-Net's
DC_and_CE / MONAI's `DiceCELoss` with one-hot targets and softmax, both terms weighted 1)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def dice_ce_loss(logits: jax.Array, labels: jax.Array, *, include_background: bool = False,
                 smooth: float = 1e-5) -> tuple[jax.Array, dict[str, jax.Array]]:
    """logits [B, K, *spatial], labels int [B, *spatial] → (CE + (1 − soft Dice), parts).

    Soft Dice per sample and class: (2 Σ p·y + smooth) / (Σ p + Σ y + smooth), averaged over samples and
    classes (without class 0 unless `include_background`); CE is averaged over voxels."""
    num_classes = logits.shape[1]
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=1)
    onehot = jnp.moveaxis(jax.nn.one_hot(labels, num_classes, dtype=jnp.float32), -1, 1)  # [B, K, *spatial]
    ce = -jnp.mean(jnp.sum(onehot * log_probs, axis=1))
    probs = jnp.exp(log_probs)
    axes = tuple(range(2, logits.ndim))
    intersection = jnp.sum(probs * onehot, axis=axes)
    dice = (2 * intersection + smooth) / (jnp.sum(probs, axis=axes) + jnp.sum(onehot, axis=axes) + smooth)  # [B, K]
    if not include_background:
        dice = dice[:, 1:]
    dice_loss = 1 - jnp.mean(dice)
    return ce + dice_loss, {"ce": ce, "dice_loss": dice_loss}
