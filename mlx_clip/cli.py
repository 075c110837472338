"""`mlxclip`: one click group; each subcommand is a thin wrapper over a Python function of the same arguments."""

from __future__ import annotations

import json
import sys

import click

import mlx_clip  # noqa: F401  (preloads the fast BLAS before anything imports mlx.core)
from mlx_clip import host_malloc

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
@click.option("--quantize", type=click.Choice(["8", "4"]), help="Quantize the towers' Linear layers to 8 or 4 bits "
              "(embeddings, norms, conv stem and projections stay float).")
@click.option("--group-size", type=click.Choice(["32", "64", "128"]), default="64", show_default=True,
              help="Weights per quantization scale; a layer whose input width it does not divide stays float.")
def convert(source, arch, checkpoint, out, dtype, quantize, group_size):
    """Convert an open_clip or Hugging Face CLIP checkpoint into an MLX model dir (optionally quantized)."""
    import tempfile
    from pathlib import Path

    from converters.convert import convert_hf, convert_open_clip
    from mlx_clip.quantize import quantize_dir

    if source == "open_clip" and not arch:
        raise click.UsageError("--arch is required with --from open_clip")

    def convert_to(target):
        return convert_open_clip(checkpoint, arch, target, dtype) if source == "open_clip" \
            else convert_hf(checkpoint, target, dtype)

    if not quantize:
        path = convert_to(out)
    else:  # convert in float beside `out`, then quantize into place: `out` never holds the float model
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=Path(out).parent) as staging:
            path = quantize_dir(convert_to(Path(staging) / "float"), out, int(quantize), int(group_size))
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
@click.option("--data", help="A collection: class-folder root, CSV/TSV, JSONL or WebDataset shards; writes sharded "
              "Parquet + manifest.json to --out (a dir), resuming a matching earlier run there.")
@click.option("--out", required=True, type=click.Path(), help="Output: an .npz (--images/--texts) or a dir (--data).")
@click.option("--batch-size", type=int, default=32, show_default=True)
@click.option("--modality", type=click.Choice(["images", "texts", "both"]), default="images", show_default=True,
              help="--data: embed the images, the captions, or both.")
@click.option("--dtype", "vector_dtype", type=click.Choice(["float16", "float32"]), default="float16",
              show_default=True, help="--data: stored vector dtype.")
@click.option("--shard-size", type=click.IntRange(1), default=1000, show_default=True,
              help="--data: source items per Parquet shard.")
@click.option("--num-threads", type=click.IntRange(1), default=2, show_default=True,
              help="--data: image decoding threads.")
@click.option("--max-bad-fraction", type=click.FloatRange(0, 1), default=1.0, show_default=True,
              help="--data: abort past this fraction of unreadable images (1: never; all are listed in the manifest).")
def embed(model, images, texts, data, out, batch_size, modality, vector_dtype, shard_size, num_threads,
          max_bad_fraction):
    """Write normalized embeddings: of files to an .npz (--images/--texts), or of a collection to Parquet (--data)."""
    from mlx_clip.embed import embed_to_npz
    from mlx_clip.io import load

    if data:
        from mlx_clip.embed_batch import EmbedArgs, embed_collection, format_summary

        if images or texts:
            raise click.UsageError("give --data, or --images/--texts, not both")
        summary = embed_collection(EmbedArgs(model=model, data=data, out=out, modality=modality, dtype=vector_dtype,
                                             shard_size=shard_size, batch_size=batch_size, num_threads=num_threads,
                                             max_bad_fraction=max_bad_fraction))
        click.echo(format_summary(summary))
        return
    if not images and not texts:
        raise click.UsageError("give --images and/or --texts (an .npz), or --data (a Parquet dir)")
    m, tok, pre = load(model)
    result = embed_to_npz(m, tok, pre, images, texts, out, batch_size)
    click.echo(f"wrote {out}: {len(result['image_paths'])} images, {len(result['texts'])} texts, "
               f"dim {m.config.projection_dim}")


@main.command()
@click.option("--embeddings", required=True, type=click.Path(exists=True, file_okay=False),
              help="An `mlxclip embed --data` output dir.")
@click.option("--out", required=True, type=click.Path(), help="Index dir to write.")
@click.option("--kind", type=click.Choice(["exact", "faiss-flat", "faiss-ivf", "faiss-hnsw"]), default="exact",
              show_default=True, help="exact: chunked MLX matmul; faiss-*: FAISS (the 'faiss' extra); ivf/hnsw are "
              "approximate, for large collections.")
@click.option("--column", type=click.Choice(["image_embedding", "text_embedding"]),
              help="Vectors to index (default: the images' when both were embedded).")
def index(embeddings, out, kind, column):
    """Build a search index over embedded vectors."""
    from mlx_clip.index import build_index

    try:
        click.echo(f"wrote {build_index(embeddings, out, kind, column)}")
    except ImportError as exc:
        raise click.ClickException(str(exc)) from exc


@main.command()
@click.option("--index", "index_dir", required=True, type=click.Path(exists=True, file_okay=False),
              help="An `mlxclip index` dir.")
@click.option("--model", required=True, help="The model that embedded the collection (dir, hub id or 'builtin').")
@click.option("--text", help="Text query.")
@click.option("--image", type=click.Path(exists=True, dir_okay=False), help="Image query.")
@click.option("--k", type=click.IntRange(1), default=10, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON list of hits.")
def search(index_dir, model, text, image, k, as_json):
    """Rank the indexed items by similarity to a text or an image: rank, score, path."""
    from mlx_clip.index import format_results, search as run_search

    if (text is None) == (image is None):
        raise click.UsageError("give --text or --image")
    try:
        hits = run_search(index_dir, model, text=text, image=image, k=k)
    except ImportError as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps(hits) if as_json else format_results(hits))


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


@data.command()
@click.option("--data", "source", required=True, help="CSV/TSV, JSONL, class-folder root or WebDataset shards.")
@click.option("--out", type=click.Path(), help="Also write the statistics as JSON here.")
@click.option("--max-images", type=click.IntRange(1), help="Stop after this many images (default: all).")
def stats(source, out, max_images):
    """Per-channel mean and std of the images (RGB in [0, 1]), streamed; use them with --normalize-from-data."""
    from mlx_clip.domains import data_stats

    result = data_stats(source, out, max_images)
    click.echo(json.dumps(result))


def _training_options(func):
    """One click option per TrainingArgs field (help text from the dataclass); None = not given, so YAML can fill it."""
    from mlx_clip.train.args import FIELDS

    for name, f in reversed(list(FIELDS.items())):
        flag = "--" + name.replace("_", "-")
        help_text = f"{f.metadata['help']} [default: {f.default!r}]"
        if isinstance(f.default, bool):
            func = click.option(f"{flag}/--no-{flag[2:]}", name, default=None, help=help_text)(func)
        else:
            kind = click.Choice(f.metadata["choices"]) if "choices" in f.metadata else f.metadata.get("parse", type(f.default))
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
    from mlx_clip.train import distributed as dist

    if not dist.is_main():  # under mlx.launch only rank 0 reports
        return
    click.echo(f"final model: {summary['final_model']}")
    for key in ("top1_before", "top1_after", "i2t_r1_after", "t2i_r1_after"):
        if key in summary:
            click.echo(f"{key}: {summary[key]:.4f}")


@main.command(context_settings={"max_content_width": 120})
@click.option("--model", default="builtin", show_default=True, help="Model dir, hub id or 'builtin'.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind.")
@click.option("--port", type=int, default=8000, show_default=True)
@click.option("--max-batch", type=click.IntRange(1), default=32, show_default=True,
              help="Most items (images or texts) per model call.")
@click.option("--max-wait-ms", type=click.FloatRange(0), default=5.0, show_default=True,
              help="Longest an item waits for a batch to fill.")
@click.option("--max-concurrent", type=click.IntRange(1), default=128, show_default=True,
              help="Inference requests in flight before 429.")
@click.option("--max-body-mb", type=click.FloatRange(min=0, min_open=True), default=8.0, show_default=True,
              help="Largest request body (413 above).")
@click.option("--max-image-pixels", type=click.IntRange(1), default=64_000_000, show_default=True,
              help="Largest image, width x height, read from the header before decoding (413 above).")
@click.option("--max-client-batch", type=click.IntRange(1), default=256, show_default=True,
              help="Most inputs to embed per request (413 above).")
@click.option("--api-key", envvar="MLXCLIP_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on all routes but /health and / [env: MLXCLIP_API_KEY].")
@click.option("--graceful-timeout", type=click.FloatRange(0), default=30.0, show_default=True,
              help="On SIGTERM, seconds to finish in-flight requests.")
@click.option("--index", type=click.Path(exists=True, file_okay=False), default=None,
              help="An `mlxclip index` dir: enables POST /search.")
def serve(**options):
    """HTTP embedding service: OpenAI-compatible /v1/embeddings, /embed/*, /similarity, /classify, /search (with
    --index), a web page at /."""
    from mlx_clip.serve import ServeConfig, serve as run_server

    run_server(ServeConfig(**options))


@main.command()
@click.option("--arch", required=True, help="Architecture name (see `mlxclip list-archs`); random init.")
@click.option("--batch", type=click.IntRange(1), required=True, help="Pairs per step.")
@click.option("--lora-rank", type=click.IntRange(0), default=0, show_default=True, help="> 0: LoRA instead of full.")
@click.option("--attention-chunk", type=click.IntRange(0), default=0, show_default=True, help="Sliced attention chunk.")
@click.option("--grad-checkpoint", is_flag=True, help="Recompute each block in the backward pass.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bf16-mixed", "bfloat16", "float16"]), default="auto",
              show_default=True, help="Precision policy.")
@click.option("--image-size", type=click.IntRange(0), default=0, help="Image size (0: the architecture's).")
@click.option("--steps", type=click.IntRange(2), default=3, show_default=True, help="Training steps to measure.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def memory(arch, batch, lora_rank, attention_chunk, grad_checkpoint, dtype, image_size, steps, as_json):
    """Peak memory and speed of training steps for a model, batch and set of memory techniques."""
    from mlx_clip.memory import measure_training_memory

    result = measure_training_memory(arch, batch, lora_rank, attention_chunk, grad_checkpoint, dtype, image_size, steps)
    if as_json:
        click.echo(json.dumps(result))
        return
    click.echo(f"{arch} batch {batch} at {result['image_size']} px: peak {result['peak_gb']:.3f} GB, "
               f"{result['step_seconds']:.3f} s/step ({result['images_per_s']:.1f} images/s)")


@main.command()
@click.option("--arch", required=True, help="Architecture name or open_clip config JSON.")
@click.option("--steps", type=int, default=100, show_default=True, help="Training steps compared after the stages.")
@click.option("--device", default="auto", show_default=True, help="auto (mps > cuda > cpu), cpu, cuda, mps.")
@click.option("--out", required=True, type=click.Path(), help="Dir for parity.json, parity.md, parity.png.")
@click.option("--batch", type=int, default=16, show_default=True)
@click.option("--dtype", type=DTYPE, default="float32", show_default=True, help="Bars apply to float32 only.")
@click.option("--lr", type=float, default=1e-4, show_default=True)
@click.option("--warmup", type=int, default=10, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--control", is_flag=True, help="Also train a torch copy nudged by one fp32 rounding: the noise floor.")
def parity(arch, steps, device, out, batch, dtype, lr, warmup, seed, control):
    """Compare MLX with the open_clip reference stage by stage and over N training steps (needs torch)."""
    from benchmarks.parity import parity as run_parity  # torch lives outside mlx_clip: imported only here
    from benchmarks.parity_report import summary

    report = run_parity(arch, steps, device, out, batch, dtype, lr, warmup, seed=seed, control=control,
                        log=lambda message: click.echo(message, err=True))
    click.echo("\n".join(summary(report)))
    if report["passed"] is False:
        sys.exit(1)


@main.command()
@click.option("--arch", required=True, help="Architecture name or open_clip config JSON.")
@click.option("--backend", default="mlx,torch", show_default=True, help="Comma-separated: mlx, torch.")
@click.option("--task", default="train,embed-image,embed-text", show_default=True,
              help="Comma-separated: train, embed-image, embed-text, embed-pair (one image + one caption).")
@click.option("--mode", default="eager,compiled", show_default=True, help="Comma-separated: eager, compiled.")
@click.option("--batch", type=int, default=32, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, mps; both backends use it.")
@click.option("--dtype", type=DTYPE, default="float32", show_default=True)
@click.option("--runs", type=int, default=5, show_default=True, help="Timed runs after warm-up (median reported).")
@click.option("--warmup", type=int, default=2, show_default=True)
@click.option("--out", type=click.Path(), help="Dir for bench-DEVICE-ARCH-DTYPE-bBATCH.{jsonl,md,png}.")
@click.option("--json", "as_json", is_flag=True, help="stdout: JSON lines only, one per measurement.")
@click.option("--caption-tokens", help="Word tokens per caption: N, or A-B drawn uniformly (default 3 to context - 3). "
              "Both backends get the same 77-token rows; MLX cuts the padding after the longest caption.")
@click.option("--rounds", type=int, default=1, show_default=True,
              help="Repeat each measurement N times, the backends taking turns; report the median round (use on "
              "machines whose speed drifts, e.g. shared VMs).")
@click.option("--memory-limit", help="MLX's memory limit while measuring (mx.set_memory_limit), e.g. 19GiB: MLX holds "
              "queued work back to stay under it, lowering its peak at some speed. 'auto': one un-queued run's "
              "measured peak and 10% more, so only queued work waits. torch runs as it is.")
@click.option("--steps-per-run", type=int, help="train: steps queued back to back in each timed run, the time "
              "reported per step (a training loop's pace). Default: 4 on a GPU, 1 on the CPU.")
def bench(arch, backend, task, mode, batch, device, dtype, runs, warmup, out, as_json, caption_tokens, rounds,
          memory_limit, steps_per_run):
    """Time MLX (eager, mx.compile) against torch (eager, torch.compile) on the same device, batch and dtype."""
    from benchmarks.bench import bench as run_bench

    run_bench(arch, backend, task, batch, device, out, as_json, dtype, mode, runs, warmup, caption_tokens=caption_tokens,
              rounds=rounds, memory_limit=memory_limit, steps_per_run=steps_per_run)


def run():
    """Entry point that turns our expected errors into one clear line and exit code 1."""
    from converters.safety import CheckpointError
    from mlx_clip.config import ConfigError
    from mlx_clip.data.images import TooManyBadImagesError
    from mlx_clip.train.loop import NonFiniteLossError

    try:
        if sys.argv[1:2] and sys.argv[1] in host_malloc.COMMANDS:
            host_malloc.ensure(sys.argv[1:])  # may re-execute under mimalloc / jemalloc (a GPU; CPU finetune)
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
