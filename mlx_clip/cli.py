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


@main.command("eval")
@click.option("--model", required=True, help="Model dir, hub id or 'builtin'.")
@click.option("--data", required=True, help="CSV/TSV (filepath,caption,label), JSONL, class-folder root or tar shards.")
@click.option("--task", type=click.Choice(["zeroshot", "retrieval"]), default="zeroshot", show_default=True)
@click.option("--classnames", type=click.Path(), help="Text file, one class per line in label order; or a CSV with a "
              "'classname' column (and 'label'). Default: the source's class folders or its classes.txt.")
@click.option("--templates", type=click.Path(), help="Text file of '{}' templates, one per line. "
              "Default: 'a photo of a {}.'")
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (fractions in [0, 1]).")
def eval_(model, data, task, classnames, templates, batch_size, as_json):
    """Zero-shot top-1/top-5 and per-class accuracy, or image<->text retrieval R@1/5/10."""
    from mlx_clip.eval import evaluate, format_table

    result = evaluate(model, data, task, classnames, templates, batch_size)
    click.echo(json.dumps(result) if as_json else format_table(result))


@main.command()
@click.option("--model", required=True, help="The base model the adapters were trained on: dir, hub id or 'builtin'.")
@click.option("--adapters", required=True, type=click.Path(exists=True, file_okay=False),
              help="Adapter dir (adapters.safetensors + adapter_config.json).")
@click.option("--out", required=True, type=click.Path(), help="Plain model dir to write.")
def fuse(model, adapters, out):
    """Fold LoRA adapters into the base weights: a plain model dir that `mlx_clip.load` reads."""
    from mlx_clip.train.lora import fuse_adapters

    click.echo(f"wrote {fuse_adapters(model, adapters, out)}")


@main.command()
@click.option("--base", required=True, help="Base model dir (or hub id, or 'builtin').")
@click.option("--finetuned", required=True, help="Fine-tuned model dir of the same architecture.")
@click.option("--alpha", required=True, type=click.FloatRange(0.0, 1.0),
              help="Weight of the fine-tuned model: 0 gives the base, 1 the fine-tuned model.")
@click.option("--out", required=True, type=click.Path(), help="Model dir to write.")
def merge(base, finetuned, alpha, out):
    """WiSE-FT: write (1 - alpha) * base + alpha * finetuned (tokenizer and preprocessing from the fine-tuned dir)."""
    from mlx_clip.train.merge import merge_models

    click.echo(f"wrote {merge_models(base, finetuned, alpha, out)}")


@main.group()
def data():
    """Datasets: synthetic domain sets for demos, tests and benchmarks."""


@data.command()
@click.option("--domain", type=click.Choice(["industrial", "medical", "scientific", "generic"]), required=True)
@click.option("--out", required=True, type=click.Path(), help="Output dir (images/, train/val/test.csv, classes.txt, templates.txt).")
@click.option("--n", type=int, default=3000, show_default=True, help="Images in all (split 80/10/10).")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--image-size", type=int, default=64, show_default=True)
def synth(domain, out, n, seed, image_size):
    """Write a deterministic synthetic domain dataset (or the generic pretraining corpus)."""
    from mlx_clip.data.synth import synthesize, synthesize_generic

    info = synthesize_generic(out, n, seed, image_size) if domain == "generic" else synthesize(domain, out, n, seed, image_size)
    click.echo(f"wrote {out}: {info['splits']} classes {info['classes']}")


def _training_options(func):
    """One click option per TrainingArgs field (help text from the dataclass); None = not given, so YAML can fill it."""
    from mlx_clip.train.args import FIELDS

    for name, f in reversed(list(FIELDS.items())):
        flag = "--" + name.replace("_", "-")
        help_text = f"{f.metadata['help']} [default: {f.default!r}]"
        if isinstance(f.default, bool):
            func = click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=help_text)(func)
        else:
            kind = click.Choice(f.metadata["choices"]) if "choices" in f.metadata else type(f.default)
            func = click.option(flag, name, type=kind, default=None, help=help_text)(func)
    return func


@main.command(context_settings={"max_content_width": 120})
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False),
              help="YAML file of options (keys as the flags, dashes or underscores); flags given here win.")
@_training_options
def finetune(config_file, **flags):
    """Fine-tune a CLIP model on image-caption data. With no arguments: the built-in demo."""
    given = {k: v for k, v in flags.items() if v is not None}
    if not given and not config_file:
        from mlx_clip.train.demo import run_demo

        run_demo()
        return
    from mlx_clip.train.args import resolve_args
    from mlx_clip.train.finetune import finetune as run_finetune

    summary = run_finetune(resolve_args(given, config_file))
    click.echo(f"final model: {summary['final_model']}")
    for key in ("top1_before", "top1_after", "i2t_r1_after", "t2i_r1_after"):
        if key in summary:
            click.echo(f"{key}: {summary[key]:.4f}")


def run():
    """Entry point that turns our expected errors into one clear line and exit code 1."""
    from converters.safety import CheckpointError
    from mlx_clip.config import ConfigError
    from mlx_clip.data.images import TooManyBadImagesError
    from mlx_clip.train.loop import NonFiniteLossError

    try:
        main(standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except (CheckpointError, ConfigError, FileNotFoundError, ValueError, TooManyBadImagesError,
            NonFiniteLossError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
