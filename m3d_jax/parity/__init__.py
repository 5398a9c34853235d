"""Parity checking against PyTorch: reference `.npz` files and PyTorch oracles built from MONAI,
transformers and segment_anything (needs the `test` extra)."""
