"""Decoder configs of the released checkpoints M3D-LaMed and Med-2E3 build on (values from their
transformers `config.json`), plus tiny ones of the same code for tests."""

from __future__ import annotations

import math

from m3d_jax.models.decoder import DecoderConfig

# microsoft/Phi-3-mini-128k-instruct, current revision (July 2024 update; rope type "longrope").
PHI3_128K_SHORT_FACTOR = (
    1.1, 1.1, 1.1, 1.3000000000000003, 1.3500000000000003, 1.3500000000000003, 1.4000000000000004,
    1.5500000000000005, 2.000000000000001, 2.000000000000001, 2.000000000000001, 2.000000000000001,
    2.000000000000001, 2.000000000000001, 2.000000000000001, 2.000000000000001, 2.000000000000001,
    2.000000000000001, 2.000000000000001, 2.000000000000001, 2.000000000000001, 2.000000000000001,
    2.000000000000001, 2.000000000000001, 2.000000000000001, 2.0500000000000007, 2.0500000000000007,
    2.0500000000000007, 2.0500000000000007, 2.0500000000000007, 2.0500000000000007, 2.1000000000000005,
    2.1000000000000005, 2.1500000000000004, 2.25, 2.25, 2.25, 2.25, 2.25, 2.3999999999999995,
    2.4499999999999993, 2.499999999999999, 2.6999999999999984, 2.6999999999999984, 2.7499999999999982,
    2.799999999999998, 2.8999999999999977, 3.049999999999997,
)
PHI3_128K_LONG_FACTOR = (
    1.0700000524520874, 1.1200000047683716, 1.149999976158142, 1.4199999570846558, 1.5699999332427979,
    1.7999999523162842, 2.129999876022339, 2.129999876022339, 3.009999990463257, 5.910000324249268,
    6.950000286102295, 9.070000648498535, 9.930000305175781, 10.710000038146973, 11.130000114440918,
    14.609999656677246, 15.409998893737793, 19.809999465942383, 37.279998779296875, 38.279998779296875,
    38.599998474121094, 40.12000274658203, 46.20000457763672, 50.940006256103516, 53.66000747680664,
    54.9373893737793, 56.89738845825195, 57.28738784790039, 59.98738479614258, 60.86738586425781,
    60.887386322021484, 61.71739196777344, 62.91739273071289, 62.957393646240234, 63.41739273071289,
    63.8173942565918, 63.83739471435547, 63.897396087646484, 63.93739700317383, 64.06739807128906,
    64.11434936523438, 64.12435150146484, 64.15435028076172, 64.19435119628906, 64.24435424804688,
    64.57435607910156, 64.69000244140625, 64.76000213623047,
)


# len(tokenizer) of each preset's released tokenizer where it differs from the embedding rows (Phi-3 pads
# its 32011 tokens to 32064 rows); LaMed resizes the embeddings to its tokenizer plus four tokens.
TOKENIZER_SIZES = {"phi3_mini_4k": 32011, "phi3_mini_128k": 32011}


def phi3_mini_4k() -> DecoderConfig:
    """microsoft/Phi-3-mini-4k-instruct (M3D-LaMed-Phi-3-4B's LLM): 3.8 B params."""
    return DecoderConfig(
        architecture="phi3", vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_layers=32,
        num_heads=32, num_kv_heads=32, head_dim=96, rms_norm_eps=1e-5, max_position_embeddings=4096,
        sliding_window=2047, rope_theta=10000.0, bos_token_id=1, eos_token_ids=(32000,), pad_token_id=32000,
    )


def phi3_mini_128k() -> DecoderConfig:
    """microsoft/Phi-3-mini-128k-instruct (Med-2E3's LLM): LongRoPE, switch at 4096 positions."""
    factor = 131072 / 4096
    return DecoderConfig(
        architecture="phi3", vocab_size=32064, hidden_size=3072, intermediate_size=8192, num_layers=32,
        num_heads=32, num_kv_heads=32, head_dim=96, rms_norm_eps=1e-5, max_position_embeddings=131072,
        sliding_window=262144, rope_type="longrope", rope_theta=10000.0, rope_factor=factor,
        rope_attention_factor=math.sqrt(1 + math.log(factor) / math.log(4096)),
        rope_original_max_position_embeddings=4096, rope_short_factor=PHI3_128K_SHORT_FACTOR,
        rope_long_factor=PHI3_128K_LONG_FACTOR, bos_token_id=1, eos_token_ids=(32000,), pad_token_id=32000,
    )


def llama2_7b() -> DecoderConfig:
    """meta-llama/Llama-2-7b(-chat)-hf (M3D-LaMed-Llama-2-7B's LLM): 6.7 B params; no pad token (unk = 0)."""
    return DecoderConfig(
        architecture="llama", vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32,
        num_heads=32, num_kv_heads=32, head_dim=128, rms_norm_eps=1e-5, max_position_embeddings=4096,
        rope_theta=10000.0, bos_token_id=1, eos_token_ids=(2,), pad_token_id=0,
    )


def llama3_8b() -> DecoderConfig:
    """meta-llama/Meta-Llama-3-8B: GQA (8 KV heads), 128k vocab, RoPE theta 500000."""
    return DecoderConfig(
        architecture="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32,
        num_heads=32, num_kv_heads=8, head_dim=128, rms_norm_eps=1e-5, max_position_embeddings=8192,
        rope_theta=500000.0, bos_token_id=128000, eos_token_ids=(128001,), pad_token_id=128001,
    )


def llama3_1_8b() -> DecoderConfig:
    """meta-llama/Llama-3.1-8B: Llama 3 with "llama3" RoPE scaling to 131072 positions."""
    base = llama3_8b()
    return DecoderConfig(**{
        **base.__dict__, "max_position_embeddings": 131072, "rope_type": "llama3", "rope_factor": 8.0,
        "rope_low_freq_factor": 1.0, "rope_high_freq_factor": 4.0, "rope_original_max_position_embeddings": 8192,
    })


def tiny_phi3(**overrides) -> DecoderConfig:
    """Phi-3 at test size (same code): 2 layers, width 64, vocab 512."""
    values = dict(architecture="phi3", vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2,
                  num_heads=4, num_kv_heads=4, head_dim=16, max_position_embeddings=256, bos_token_id=1,
                  eos_token_ids=(2,), pad_token_id=0)
    return DecoderConfig(**{**values, **overrides})


PRESETS = {
    "phi3_mini_4k": phi3_mini_4k, "phi3_mini_128k": phi3_mini_128k, "llama2_7b": llama2_7b,
    "llama3_8b": llama3_8b, "llama3_1_8b": llama3_1_8b, "tiny_phi3": tiny_phi3,
}
