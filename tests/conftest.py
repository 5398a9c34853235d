"""Shared fixtures: MONAI oracles with non-trivial random weights, and checkpoint writing helpers."""

from __future__ import annotations

import os

# The suite runs on CPU; with libtpu installed (the test extra brings it for the planner) JAX would
# otherwise probe for a TPU first.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from m3d_jax.models.vit3d import ViT3DConfig  # noqa: E402

# Full ViT-B widths on a small volume: every real shape except the token count.
SMALL_VIT_B = ViT3DConfig(image_size=(16, 64, 64))
TINY = ViT3DConfig(image_size=(16, 64, 64), hidden_size=64, mlp_dim=128, num_layers=3, num_heads=4)


def make_monai_vit(config: ViT3DConfig, seed: int = 0) -> torch.nn.Module:
    """MONAI's ViT with the config's sizes and every parameter randomised (norms and cls included)."""
    from monai.networks.nets import ViT

    torch.manual_seed(seed)
    model = ViT(
        in_channels=config.in_channels, img_size=config.image_size, patch_size=config.patch_size,
        hidden_size=config.hidden_size, mlp_dim=config.mlp_dim, num_layers=config.num_layers,
        num_heads=config.num_heads, proj_type="perceptron", classification=config.cls_token,
        qkv_bias=config.qkv_bias,
    ).eval()
    randomize_norms_and_biases(model)
    with torch.no_grad():
        if config.cls_token:
            model.cls_token.normal_()
    return model


@torch.no_grad()
def randomize_norms_and_biases(model: torch.nn.Module) -> None:
    """Norm weights ≈ 1 ± 0.1, norm biases ± 0.1 and other biases ± 0.02 (MONAI starts them at 1 / 0, which
    would hide layout mistakes)."""
    for name, parameter in model.named_parameters():
        if "norm" in name:
            parameter.copy_(torch.randn_like(parameter) * 0.1 + (1.0 if name.endswith("weight") else 0.0))
        elif name.endswith("bias"):
            parameter.copy_(torch.randn_like(parameter) * 0.02)


@torch.no_grad()
def monai_features(model: torch.nn.Module, images: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """(final normed sequence, every block's output) — MONAI's forward with the classification head left out."""
    x = model.patch_embedding(torch.from_numpy(images))
    if hasattr(model, "cls_token"):
        x = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
    hidden = []
    for block in model.blocks:
        x = block(x)
        hidden.append(x.numpy().copy())
    return model.norm(x).numpy(), hidden


def prefixed_state_dict(model: torch.nn.Module, prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + key: value.detach().clone().contiguous() for key, value in model.state_dict().items()}


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def word_tokenizer(folder, vocab_size: int):
    """A WordLevel tokenizer over words w3..w{vocab_size-1} (<unk>=0, <s>=1, </s>=2), built offline and
    saved to `folder` as a transformers tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", pad_token="<unk>")
    tokenizer.save_pretrained(folder)
    return tokenizer


def recipe_config(name: str, variant: str | None = None):
    """`configs/<name>.py`'s config (its `variant`), loaded from the file as the training entry point does."""
    import pathlib

    from m3d_jax.config import load_config_file

    return load_config_file(pathlib.Path(__file__).parent.parent / "configs" / f"{name}.py", variant)


def abstract_model(config):
    """The config's model with its LoRA applied, built abstractly (nnx.eval_shape: shapes, no arrays)."""
    from flax import nnx

    from m3d_jax.train.lora import apply_lora
    from m3d_jax.train.step import lora_of
    from m3d_jax.train.tasks import get_task

    _, _, make_model = get_task(config.get("task", "lamed")).build(config, without_tokenizer=True)
    lora = lora_of(config)

    def build():
        model = make_model()
        if lora is not None:
            apply_lora(model, lora, rngs=nnx.Rngs(0))
        return model

    return nnx.eval_shape(build)
