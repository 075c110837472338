"""Images/s of `mlxclip embed --data` next to the raw model throughput, on this machine.

    python -m benchmarks.embed_throughput [--n 10000] [--batch-size 64] [--workdir /tmp/mlxclip-embed-bench]

Generates `n` 64 px images (mlx_clip.data.synth, the generic shapes corpus), then measures, with the bundled `builtin`
model and the same batch size:
- raw: `encode_image` on already-preprocessed pixels, result copied to numpy (no decoding, no files), before and after
  the pipeline run (the machine is shared, so its load can drift between them);
- pipeline: the `mlxclip embed --data` command itself, in a subprocess (decode in threads, shards, manifest); its rate
  counts the embedding loop, its wall time also start-up and model load.
The ratio pipeline / raw is how busy the pipeline keeps the model. Also: FAISS recall@10 against the exact index on
the resulting vectors. Writes benchmarks/results/embed.md and embed.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import mlx_clip  # noqa: F401  (preloads the fast BLAS before mlx.core)
import mlx.core as mx
import numpy as np

from benchmarks.machine import shared_cpu_label
from mlx_clip.data import open_source, synthesize_generic
from mlx_clip.index import Index, build_index, recall_at_k
from mlx_clip.io import load

RESULTS = Path(__file__).parent / "results"


def make_images(workdir: Path, n: int) -> Path:
    """`n` images in one CSV (the corpus's three splits together); reused when already there."""
    data = workdir / "shapes"
    all_csv = data / "all.csv"
    if all_csv.exists() and sum(1 for _ in open(all_csv)) - 1 == n:
        return all_csv
    synthesize_generic(data, n=n, seed=0, image_size=64)
    rows = [row for split in ("train", "val", "test") for row in csv.DictReader(open(data / f"{split}.csv"))]
    with open(all_csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["filepath", "caption", "label"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return all_csv


def raw_rate(model, pixels: np.ndarray, batch_size: int, repeats: int) -> float:
    """Images/s of encode_image alone over `repeats` passes of `pixels`."""
    model.encode_image(mx.array(pixels[:batch_size]), normalize=True)  # warm-up
    start, done = time.perf_counter(), 0
    for _ in range(repeats):
        for i in range(0, len(pixels), batch_size):
            np.array(model.encode_image(mx.array(pixels[i:i + batch_size]), normalize=True))
            done += len(pixels[i:i + batch_size])
    return done / (time.perf_counter() - start)


def pipeline_rate(all_csv: Path, out: Path, batch_size: int) -> dict:
    """Run `mlxclip embed --data` and read the rate it prints."""
    if out.exists():
        import shutil

        shutil.rmtree(out)
    cmd = [sys.executable, "-m", "mlx_clip", "embed", "--model", "builtin", "--data", str(all_csv), "--out", str(out),
           "--batch-size", str(batch_size)]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    rate = float(re.search(r"([\d.]+) items/s", proc.stdout).group(1))
    manifest = json.loads((out / "manifest.json").read_text())
    return {"items_per_s": rate, "wall_s": wall, "rows": manifest["rows"], "shards": len(manifest["shards"]),
            "command": f"mlxclip embed --model builtin --data {all_csv.name} --out {out.name} --batch-size {batch_size}"}


def faiss_recall(embeddings: Path, workdir: Path, n_queries: int = 200) -> dict:
    """Recall@10 of each FAISS kind against the exact index, queries = a spread of the collection's own vectors."""
    exact = Index(build_index(embeddings, workdir / "idx-exact"))
    rows = np.linspace(0, exact.info["count"] - 1, n_queries).astype(np.int64)
    queries = np.asarray(exact.vectors[rows], np.float32)
    ref = exact.search(queries, 10)[1]
    out = {}
    for kind in ("faiss-flat", "faiss-ivf", "faiss-hnsw"):
        index = Index(build_index(embeddings, workdir / f"idx-{kind}", kind=kind))
        start = time.perf_counter()
        found = index.search(queries, 10)[1]
        out[kind] = {"recall_at_10": recall_at_k(found, ref), "settings": index.info["faiss"],
                     "ms_per_query": 1000 * (time.perf_counter() - start) / n_queries}
    start = time.perf_counter()
    exact.search(queries, 10)
    out["exact"] = {"recall_at_10": 1.0, "settings": {},
                    "ms_per_query": 1000 * (time.perf_counter() - start) / n_queries}
    return out


def write_report(r: dict) -> None:
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "embed.json").write_text(json.dumps(r, indent=2) + "\n")
    raw = (r["raw_before"] + r["raw_after"]) / 2
    p = r["pipeline"]
    lines = [
        f"# `mlxclip embed --data` throughput, {time.strftime('%Y-%m-%d')}",
        f"Machine: {r['machine']}.",
        f"Data: {r['n']} generated 64 px PNGs (mlx_clip.data.synth generic shapes, one CSV). Model: `builtin` "
        f"(`small`: ViT 6x192 at 64 px, float32), batch {r['batch_size']}, vectors stored float16, 1,000 per shard.",
        "",
        "| what | images/s |",
        "|---|---|",
        f"| raw model (`encode_image` on preprocessed pixels), before / after | {r['raw_before']:.1f} / "
        f"{r['raw_after']:.1f} |",
        f"| `{p['command']}` (embedding loop) | {p['items_per_s']:.1f} |",
        f"| the same, whole command (start-up, model load; wall {p['wall_s']:.1f} s) | {r['n'] / p['wall_s']:.1f} |",
        "",
        f"Pipeline / raw model: **{p['items_per_s'] / raw:.0%}** of the raw rate (mean of before and after): "
        + ("at or above the 90% bar." if p["items_per_s"] >= 0.9 * raw else "below the 90% bar."),
        "",
        "How far to trust it: the pipeline decodes with Pillow in 2 threads on the same 2 cores that run the model "
        "(MKL), and the machine was shared with other jobs while this ran (load average above), so every rate here "
        f"moves with their load: the raw rate went from {r['raw_before']:.1f} to {r['raw_after']:.1f} images/s "
        "across the run. A ratio above 100% is that noise, not a pipeline faster than its model; what the numbers "
        "do show is that decoding, sharding and writing do not hold the model back by more than the noise.",
        "",
        f"## Search on these {p['rows']} vectors ({len(r['recall'])} index kinds, 200 queries from the collection)",
        "",
        "| index | recall@10 vs exact | ms/query | settings |",
        "|---|---|---|---|",
    ]
    lines += [f"| {k} | {v['recall_at_10']:.3f} | {v['ms_per_query']:.2f} | {v['settings'] or '-'} |"
              for k, v in r["recall"].items()]
    (RESULTS / "embed.md").write_text("\n".join(lines) + "\n")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=10000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/mlxclip-embed-bench"))
    parser.add_argument("--raw-images", type=int, default=1024, help="images per raw-rate measurement")
    args = parser.parse_args()
    r = {"machine": shared_cpu_label(), "n": args.n, "batch_size": args.batch_size}
    all_csv = make_images(args.workdir, args.n)
    model, _, preprocess = load("builtin")
    from mlx_clip.data import decode_image

    records = list(open_source(all_csv))[: args.raw_images]
    pixels = np.stack([preprocess.to_numpy(decode_image(rec["image"], mode=None)) for rec in records])
    r["raw_before"] = raw_rate(model, pixels, args.batch_size, repeats=1)
    print(f"raw before: {r['raw_before']:.1f} img/s", flush=True)
    r["pipeline"] = pipeline_rate(all_csv, args.workdir / "emb", args.batch_size)
    print(f"pipeline: {r['pipeline']}", flush=True)
    r["raw_after"] = raw_rate(model, pixels, args.batch_size, repeats=1)
    print(f"raw after: {r['raw_after']:.1f} img/s", flush=True)
    r["recall"] = faiss_recall(args.workdir / "emb", args.workdir)
    write_report(r)
    print((RESULTS / "embed.md").read_text())


if __name__ == "__main__":
    main()
