"""Converters from open_clip / Hugging Face checkpoints to mlx_clip model dirs (torch is imported lazily, if at all)."""
