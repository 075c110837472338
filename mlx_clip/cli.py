"""`mlxclip`: one click group; each subcommand is a thin wrapper over a Python function of the same arguments."""

from __future__ import annotations

import json
import sys

import click

import mlx_clip  # noqa: F401  (preloads the fast BLAS before anything imports mlx.core)

DTYPE = click.Choice(["float32", "bfloat16", "float16"])


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(mlx_clip.__version__, prog_name="mlxclip")
def main():
    """mlx-clip: CLIP fine-tuning, evaluation and serving in MLX."""


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@click.option("--no-bench", is_flag=True, help="Skip the matmul measurement.")
def doctor(as_json, no_bench):
    """MLX version, device, BLAS in use, fp32 matmul rate, torch availability."""
    from mlx_clip.doctor import report

    info = report(measure=not no_bench)
    if as_json:
        click.echo(json.dumps(info))
        return
    for key, value in info.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        click.echo(f"{key:>18}: {value}")


@main.command()
@click.option("--from", "source", type=click.Choice(["open_clip", "hf"]), required=True, help="Checkpoint family.")
@click.option("--arch", help="open_clip architecture name (e.g. ViT-B-32) or a model-config JSON; needed for open_clip.")
@click.option("--checkpoint", required=True, type=click.Path(exists=True),
              help="open_clip: state dict (.safetensors, or .bin/.pt read weights-only); hf: the model dir.")
@click.option("--out", required=True, type=click.Path(), help="Model dir to write.")
@click.option("--dtype", type=DTYPE, default="float32", show_default=True)
def convert(source, arch, checkpoint, out, dtype):
    """Convert an open_clip or Hugging Face CLIP checkpoint into an MLX model dir."""
    from converters.convert import convert_hf, convert_open_clip

    if source == "open_clip":
        if not arch:
            raise click.UsageError("--arch is required with --from open_clip")
        path = convert_open_clip(checkpoint, arch, out, dtype)
    else:
        path = convert_hf(checkpoint, out, dtype)
    click.echo(f"wrote {path}")


@main.command()
@click.option("--model", required=True, help="Model dir (or hub id, or 'builtin').")
@click.option("--to", "target", type=click.Choice(["open_clip", "hf"]), required=True)
@click.option("--out", required=True, type=click.Path(), help="open_clip: FILE.safetensors; hf: a dir.")
def export(model, target, out):
    """Export a model dir to an open_clip state dict or a Hugging Face CLIP dir."""
    from converters.convert import export_hf, export_open_clip

    path = export_open_clip(model, out) if target == "open_clip" else export_hf(model, out)
    click.echo(f"wrote {path}")


@main.command()
@click.option("--arch", required=True, help="Architecture name (see `mlxclip init --list`) or open_clip config JSON.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--out", required=True, type=click.Path())
@click.option("--dtype", type=DTYPE, default="float32", show_default=True)
def init(arch, seed, out, dtype):
    """Write a random-init model dir (CLIP's initialisation, seeded)."""
    from converters.convert import init_model

    click.echo(f"wrote {init_model(arch, seed, out, dtype)}")


@main.command("list-archs")
def list_archs():
    """List the named architectures."""
    from mlx_clip.config import list_configs

    click.echo("\n".join(list_configs()))


@main.command()
@click.option("--model", required=True, help="Model dir, hub id or 'builtin'.")
@click.option("--images", multiple=True, type=click.Path(exists=True), help="Image files or folders (repeatable).")
@click.option("--texts", type=click.Path(exists=True), help="Text file, one caption per line.")
@click.option("--out", required=True, type=click.Path(), help="Output .npz.")
@click.option("--batch-size", type=int, default=32, show_default=True)
def embed(model, images, texts, out, batch_size):
    """Write normalized image and text embeddings to an .npz."""
    from mlx_clip.embed import embed_to_npz
    from mlx_clip.io import load

    if not images and not texts:
        raise click.UsageError("give --images and/or --texts")
    m, tok, pre = load(model)
    result = embed_to_npz(m, tok, pre, images, texts, out, batch_size)
    click.echo(f"wrote {out}: {len(result['image_paths'])} images, {len(result['texts'])} texts, "
               f"dim {m.config.projection_dim}")


def run():
    """Entry point that turns our expected errors into one clear line and exit code 1."""
    from converters.safety import CheckpointError
    from mlx_clip.config import ConfigError

    try:
        main(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (CheckpointError, ConfigError, FileNotFoundError, ValueError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
