"""Volumes, preprocessing, augmentation, M3D-Data sources, prompts and the Grain input pipeline."""
