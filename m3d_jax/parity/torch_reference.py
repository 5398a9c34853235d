"""PyTorch oracles for M3D-LaMed composed from independent implementations: MONAI's ViT, transformers'
Phi-3 / Llama, segment_anything's TwoWayTransformer and MLP, and torch's own pooling, ConvTranspose3d,
LayerNorm and interpolate. Module names follow the released checkpoints, so a released state dict
loads into them strictly (MONAI's own extra keys aside). Nothing here imports m3d-jax model code."""

from __future__ import annotations

import importlib.util
import json
import math
import pathlib
import sys
import types

import torch
import torch.nn.functional as F
from torch import nn

from m3d_jax.convert.torch_io import CheckpointReader

MONAI_ONLY = ("norm_cross_attn", "cross_attn.", "classification_head")


def load_sam_modeling() -> types.ModuleType:
    """segment_anything's modeling package (.common, .transformer, .mask_decoder), loaded from its files:
    the package's top-level __init__ imports torchvision, which cannot be installed beside CPU torch."""
    name = "sam_modeling_oracle"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec("segment_anything")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("segment-anything is not installed (pip install segment-anything)")
    folder = pathlib.Path(list(spec.submodule_search_locations)[0]) / "modeling"
    package = types.ModuleType(name)
    package.__path__ = [str(folder)]
    sys.modules[name] = package
    for sub in ("common", "transformer", "mask_decoder"):
        sub_spec = importlib.util.spec_from_file_location(f"{name}.{sub}", folder / f"{sub}.py")
        module = importlib.util.module_from_spec(sub_spec)
        sys.modules[f"{name}.{sub}"] = module
        sub_spec.loader.exec_module(module)
        setattr(package, sub, module)
    return package


def monai_vit(image_size, patch_size, hidden_size, mlp_dim, num_layers, num_heads, cls_token: bool) -> nn.Module:
    from monai.networks.nets import ViT

    return ViT(in_channels=1, img_size=tuple(image_size), patch_size=tuple(patch_size), hidden_size=hidden_size,
               mlp_dim=mlp_dim, num_layers=num_layers, num_heads=num_heads, proj_type="perceptron",
               classification=cls_token)


def vit_features(vit: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Final-normed token sequence (cls first when the ViT has one), without MONAI's classification head."""
    x = vit.patch_embedding(images)
    if hasattr(vit, "cls_token"):
        x = torch.cat([vit.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
    for block in vit.blocks:
        x = block(x)
    return vit.norm(x)


def load_filtered(module: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """load_state_dict(strict) except for MONAI's own extra keys, which released checkpoints lack."""
    result = module.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not any(m in k for m in MONAI_ONLY)]
    if missing or result.unexpected_keys:
        raise KeyError(f"{where}: missing {missing}, unexpected {result.unexpected_keys}")


class TorchSegVol(nn.Module):
    """SegVol as M3D-LaMed uses it (seg_module.*): MONAI ViT without cls → SAM two-way mask decoder with
    downsampled cross-attention → two ConvTranspose3d with a whole-block LayerNorm → hypernetwork and
    text-alignment terms on mask 0 → trilinear resize."""

    def __init__(self, image_size, patch_size, dim=768, mlp_dim=3072, num_layers=12, num_heads=12,
                 decoder_heads=8, decoder_mlp_dim=2048, iou_hidden=256, mask_in_chans=16):
        super().__init__()
        sam = load_sam_modeling()
        self.grid = tuple(s // p for s, p in zip(image_size, patch_size))
        self.dim = dim
        self.image_encoder = monai_vit(image_size, patch_size, dim, mlp_dim, num_layers, num_heads, cls_token=False)
        prompt = nn.Module()
        prompt.pe_layer = nn.Module()
        prompt.pe_layer.register_buffer("positional_encoding_gaussian_matrix", torch.randn(3, dim // 2))
        prompt.point_embeddings = nn.ModuleList(nn.Embedding(1, dim) for _ in range(4))
        prompt.not_a_point_embed = nn.Embedding(1, dim)
        prompt.no_mask_embed = nn.Embedding(1, dim)
        prompt.mask_downscaling = nn.Sequential(
            nn.Conv2d(1, mask_in_chans // 4, 2, 2), sam.common.LayerNorm2d(mask_in_chans // 4), nn.GELU(),
            nn.Conv2d(mask_in_chans // 4, mask_in_chans, 2, 2), sam.common.LayerNorm2d(mask_in_chans), nn.GELU(),
            nn.Conv2d(mask_in_chans, dim, 1))
        self.prompt_encoder = prompt
        decoder = nn.Module()
        decoder.transformer = sam.transformer.TwoWayTransformer(depth=2, embedding_dim=dim, num_heads=decoder_heads,
                                                                mlp_dim=decoder_mlp_dim)
        decoder.iou_token = nn.Embedding(1, dim)
        decoder.mask_tokens = nn.Embedding(4, dim)
        decoder.output_upscaling = nn.Sequential(
            nn.ConvTranspose3d(dim, dim // 4, 2, 2), nn.LayerNorm((dim // 4, *(2 * g for g in self.grid))), nn.GELU(),
            nn.ConvTranspose3d(dim // 4, dim // 8, 2, 2), nn.GELU())
        decoder.output_hypernetworks_mlps = nn.ModuleList(sam.mask_decoder.MLP(dim, dim, dim // 8, 3) for _ in range(4))
        decoder.iou_prediction_head = sam.mask_decoder.MLP(dim, iou_hidden, 4, 3)
        decoder.txt_align_upscaled_embedding = nn.Linear(dim, dim // 8)
        self.mask_decoder = decoder

    @torch.no_grad()
    def forward(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        b, dim, grid = images.shape[0], self.dim, self.grid
        embedding = vit_features(self.image_encoder, images).transpose(1, 2).reshape(b, dim, *grid)
        # Random-Fourier PE with coordinates (x, y, z) = (axis 1, axis 0, axis 2) of the grid.
        axes = [(torch.arange(n, dtype=torch.float32) + 0.5) / n for n in grid]
        a0, a1, a2 = torch.meshgrid(*axes, indexing="ij")
        coords = 2 * torch.stack([a1, a0, a2], dim=-1) - 1
        angles = 2 * math.pi * coords @ self.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix
        pe = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1).permute(3, 0, 1, 2)[None]
        decoder = self.mask_decoder
        tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight])[None].expand(b, -1, -1)
        tokens = torch.cat([tokens, text[:, None]], dim=1)
        src = embedding + self.prompt_encoder.no_mask_embed.weight.reshape(1, dim, 1, 1, 1)
        hs, keys = decoder.transformer(src.flatten(3), pe.expand(b, -1, -1, -1, -1).flatten(3), tokens)
        upscaled = decoder.output_upscaling(keys.transpose(1, 2).reshape(b, dim, *grid))
        flat = upscaled.flatten(2)
        hyper = torch.stack([mlp(hs[:, 1 + i]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)], 1)
        masks = hyper @ flat + decoder.txt_align_upscaled_embedding(text)[:, None] @ flat
        low_res = masks[:, :1].reshape(b, 1, *upscaled.shape[2:])
        return F.interpolate(low_res, size=images.shape[2:], mode="trilinear", align_corners=False)


class TorchLamed(nn.Module):
    """M3D-LaMed from a released `config.json` dict: MONAI ViT (cls; final-normed; cls dropped) →
    avg_pool3d + Linear/GELU/Linear → embeddings[:, 1 : 1 + n] replaced (the reference splice) →
    transformers Phi-3 / Llama; [SEG] → Linear/ReLU/Linear → TorchSegVol."""

    def __init__(self, hf_config: dict):
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM, Phi3Config, Phi3ForCausalLM

        self.hf_config = dict(hf_config)
        llm_config = {k: v for k, v in hf_config.items() if k not in ("model_type", "architectures", "auto_map")}
        phi3 = "phi3" in hf_config["model_type"]
        self.llm = (Phi3ForCausalLM(Phi3Config(**llm_config)) if phi3 else LlamaForCausalLM(LlamaConfig(**llm_config)))
        image_size, patch_size = hf_config["image_size"], hf_config["patch_size"]
        vision_dim = hf_config.get("mm_hidden_size", 768)
        vision = dict(hidden_size=vision_dim, mlp_dim=hf_config.get("vision_mlp_dim", 3072),
                      num_layers=hf_config.get("vision_num_layers", 12), num_heads=hf_config.get("vision_num_heads", 12))
        self.vit = monai_vit(image_size, patch_size, cls_token=True, **vision)
        self.grid = tuple(s // p for s, p in zip(image_size, patch_size))
        self.pool = hf_config.get("proj_pooling_size", 2)
        hidden = hf_config["hidden_size"]
        layers = [nn.Linear(vision_dim, hidden)]
        for _ in range(hf_config.get("proj_layer_num", 2) - 1):
            layers += [nn.GELU(), nn.Linear(hidden, hidden)]
        self.projector = nn.Sequential(*layers)
        self.seg_token_id = hf_config["seg_token_id"]
        self.seg_projector = self.seg_module = None
        if hf_config.get("segmentation_module") == "segvol":
            self.seg_projector = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, vision_dim))
            self.seg_module = TorchSegVol(image_size, patch_size, dim=vision_dim, **{
                k: v for k, v in vision.items() if k != "hidden_size"},
                decoder_heads=hf_config.get("seg_decoder_heads", 8),
                decoder_mlp_dim=hf_config.get("seg_decoder_mlp_dim", 2048),
                iou_hidden=hf_config.get("seg_iou_head_hidden", 256))

    @classmethod
    def from_folder(cls, folder) -> TorchLamed:
        folder = pathlib.Path(folder)
        model = cls(json.loads((folder / "config.json").read_text())).eval()
        reader = CheckpointReader(folder)
        model.load_released({key: torch.from_numpy(reader.read(key).copy()) for key in reader.keys()})
        return model

    def _parts(self) -> list[tuple[str, nn.Module]]:
        parts = [("model.vision_tower.vision_tower.", self.vit), ("model.mm_projector.projector.", self.projector)]
        if self.seg_module is not None:
            parts += [("model.seg_projector.", self.seg_projector), ("model.seg_module.", self.seg_module)]
        return parts

    def released_state_dict(self) -> dict[str, torch.Tensor]:
        state = dict(self.llm.state_dict())
        for prefix, module in self._parts():
            state.update({prefix + k: v for k, v in module.state_dict().items() if not any(m in k for m in MONAI_ONLY)})
        return {k: v.contiguous() for k, v in state.items()}

    def load_released(self, state: dict[str, torch.Tensor]) -> None:
        rest = dict(state)
        for prefix, module in self._parts():
            part = {k[len(prefix):]: rest.pop(k) for k in list(rest) if k.startswith(prefix)}
            load_filtered(module, part, prefix)
        if self.llm.config.tie_word_embeddings:
            rest.pop("lm_head.weight", None)
        self.llm.load_state_dict(rest, strict=not self.llm.config.tie_word_embeddings)

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """The projected image tokens [B, proj_out_num, H], as spliced into the prompt."""
        tokens = vit_features(self.vit, images)[:, 1:]
        grid = tokens.transpose(1, 2).reshape(tokens.shape[0], -1, *self.grid)
        return self.projector(F.avg_pool3d(grid, self.pool, self.pool).flatten(2).transpose(1, 2))

    @torch.no_grad()
    def embed(self, images: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        features = self.image_features(images)
        embeds = self.llm.get_input_embeddings()(input_ids)
        return torch.cat([embeds[:, :1], features, embeds[:, 1 + features.shape[1]:]], dim=1)

    @torch.no_grad()
    def forward(self, images, input_ids, attention_mask=None):
        out = self.llm(inputs_embeds=self.embed(images, input_ids), attention_mask=attention_mask,
                       output_hidden_states=True)
        return out.logits, out.hidden_states[-1]

    @torch.no_grad()
    def segment_from_ids(self, images, input_ids) -> torch.Tensor:
        """Mask logits prompted by the hidden states that predict [SEG] in `input_ids` (mean over several)."""
        _, hidden = self(images, input_ids)
        selected = torch.cat([input_ids[:, 1:] == self.seg_token_id,
                              torch.zeros_like(input_ids[:, :1], dtype=torch.bool)], dim=1)
        prompts = []
        for row in range(input_ids.shape[0]):
            chosen = hidden[row][selected[row]]
            prompts.append(self.seg_projector(chosen.mean(0, keepdim=True)) if len(chosen)
                           else torch.zeros(1, self.seg_projector[-1].out_features))
        return self.seg_module(images, torch.cat(prompts))

    @torch.no_grad()
    def greedy(self, images, input_ids, max_new_tokens: int) -> torch.Tensor:
        """Greedy continuation (new tokens only) by transformers generate from the spliced embeddings."""
        return self.llm.generate(inputs_embeds=self.embed(images, input_ids), max_new_tokens=max_new_tokens,
                                 min_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=self.llm.config.pad_token_id)
