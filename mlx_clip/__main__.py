from mlx_clip.cli import run

run()
