"""PyTorch / open_clip reference implementations that mlx_clip is checked against."""
