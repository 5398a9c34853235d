"""PSAT against torch: each layer vs `nn.TransformerDecoderLayer` (post-norm: self-attention, cross-attention,
ReLU FFN — the reference's layer, built from `nn.MultiheadAttention` and `LayerNorm`), the whole module vs
`nn.TransformerDecoder` plus the plane-slice table and query-0 projection written here."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.torch import save_file

from m3d_jax.convert.keymap import load_model
from m3d_jax.convert.med3dinsight import psat_keymap
from m3d_jax.layers import run_stack
from m3d_jax.models.psat import Psat, PsatConfig, check_slice_indices

CONFIG = PsatConfig(hidden_size=32, num_heads=4, num_layers=3, ffn_dim=8, num_queries=10, out_dim=16, slice_bins=16)


class TorchPsat(torch.nn.Module):
    def __init__(self, config: PsatConfig):
        super().__init__()
        torch.manual_seed(0)
        layer = torch.nn.TransformerDecoderLayer(config.hidden_size, config.num_heads, config.ffn_dim, dropout=0.1,
                                                 activation="relu", batch_first=True, norm_first=False)
        self.decoder = torch.nn.TransformerDecoder(layer, config.num_layers, norm=torch.nn.LayerNorm(config.hidden_size))
        with torch.no_grad():  # distinct, non-trivial layers (the reference's deepcopy would make them equal)
            for name, parameter in self.decoder.named_parameters():
                parameter.add_(torch.randn_like(parameter) * (0.1 if "norm" in name or "bias" in name else 0.02))
        self.ps_pos = torch.nn.Parameter(torch.randn(config.hidden_size, 3, config.slice_bins))
        self.queries = torch.nn.Embedding(config.num_queries, config.hidden_size)
        self.proj = torch.nn.Linear(config.hidden_size, config.out_dim)
        self.eval()

    def state_dict_in_reference_layout(self) -> dict[str, torch.Tensor]:
        renamed = {}
        for key, value in self.state_dict().items():
            key = key.replace("multihead_attn", "cross_attn")
            renamed[key if not key.startswith("decoder.") else "psat." + key] = value.detach().clone().contiguous()
        renamed["psat.ps_pos"] = renamed.pop("ps_pos")
        return renamed

    @torch.no_grad()
    def forward(self, memory, plane, slice_index):
        position = self.ps_pos[:, plane, slice_index // 2].T[:, None]  # [B, 1, d]
        queries = self.queries.weight[None].expand(len(memory), -1, -1) + position
        return self.proj(self.decoder(queries, memory + position))[:, 0]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    reference = TorchPsat(CONFIG)
    path = tmp_path_factory.mktemp("psat") / "psat.safetensors"
    save_file(reference.state_dict_in_reference_layout(), str(path))
    model, _ = load_model(path, psat_keymap(CONFIG), lambda: Psat(CONFIG, rngs=nnx.Rngs(0)))
    return reference, model


def test_each_psat_layer_matches_torch_decoder_layer(pair):
    reference, model = pair
    rng = np.random.default_rng(0)
    x, memory = rng.normal(size=(2, 10, 32)).astype(np.float32), rng.normal(size=(2, 7, 32)).astype(np.float32)
    ours = run_stack(model.layers, x, num_layers=CONFIG.num_layers, collect=True, memory=memory).hidden_states
    expected = torch.from_numpy(x)
    for index, layer in enumerate(reference.decoder.layers):
        with torch.no_grad():
            expected = layer(expected, torch.from_numpy(memory))
        assert np.abs(np.asarray(ours[index]) - expected.numpy()).max() <= 1e-5, index


def test_psat_matches_torch_with_plane_slice_positions(pair):
    reference, model = pair
    rng = np.random.default_rng(1)
    memory = rng.normal(size=(3, 8, 32)).astype(np.float32)
    plane, slice_index = np.array([0, 1, 2]), np.array([0, 17, 31])
    expected = reference(torch.from_numpy(memory), torch.from_numpy(plane), torch.from_numpy(slice_index)).numpy()
    ours = np.asarray(nnx.jit(lambda m, *a: m(*a))(model, memory, plane, slice_index))
    assert ours.shape == (3, CONFIG.out_dim) and np.abs(ours - expected).max() <= 1e-5
    # The plane and slice matter: the same memory at another slice bin gives another embedding.
    other = np.asarray(model(memory, plane, slice_index + 2))
    assert np.abs(other - ours).max() > 1e-3


def test_reference_init_copies_the_first_layer_and_checks_indices():
    model = Psat(CONFIG, rngs=nnx.Rngs(0))
    kernel = np.asarray(model.layers.linear1.kernel[...])
    assert kernel.shape == (3, 32, 8) and all(np.array_equal(kernel[0], kernel[i]) for i in (1, 2))
    independent = Psat(PsatConfig(**{**CONFIG.__dict__, "layer_init": "independent"}), rngs=nnx.Rngs(0))
    assert not np.array_equal(np.asarray(independent.layers.linear1.kernel[...])[0],
                              np.asarray(independent.layers.linear1.kernel[...])[1])
    check_slice_indices([0, 2], [0, 31], CONFIG)
    with pytest.raises(ValueError, match=r"slice indices must be in \[0, 32\)"):
        check_slice_indices([0], [32], CONFIG)
    with pytest.raises(ValueError, match="plane ids must be 0..2"):
        check_slice_indices([3], [0], CONFIG)
